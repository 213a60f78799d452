//! Operations, end to end against the real binary: the systemd notify protocol, graceful shutdown under load,
//! `/metrics` (checked by `promtool check metrics` and a strict parser), the health probes, and socket
//! activation.

mod common;

use common::{Daemon, bin, http};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RESOURCE: &str = "11111111-1111-4111-8111-111111111111";

/// A marketplace nobody answers at: emission fails and retries, everything else works.
fn nowhere_sections() -> String {
    common::emulator_sections("http://127.0.0.1:9", "shutdown_timeout = \"5s\"")
}

const TOKEN_ENV: (&str, &str) = ("METERD_MARKETPLACE__AUTH__STATIC_TOKEN", "x");

fn start(dir: &Path, env: &[(&str, &str)]) -> Daemon {
    let mut all = vec![TOKEN_ENV];
    all.extend_from_slice(env);
    Daemon::start(dir, &common::config(dir, "", &nowhere_sections()), &all)
}

fn post_usage(url: &str, body: &serde_json::Value) -> reqwest::blocking::Response {
    http()
        .post(format!("{url}/v1/usage"))
        .json(body)
        .send()
        .expect("POST /v1/usage")
}

#[test]
fn systemd_notify_protocol_ready_watchdog_status_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (lines, done) = (lines.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !done.load(Ordering::SeqCst) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    lines
                        .lock()
                        .unwrap()
                        .extend(msg.lines().map(str::to_string));
                }
            }
        })
    };
    let notify = sock_path.display().to_string();
    let mut d = start(
        dir.path(),
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "500000")],
    );
    // Wait for READY, two watchdog pings and the STATUS of the startup pass.
    let start = Instant::now();
    loop {
        let l = lines.lock().unwrap().clone();
        let pings = l.iter().filter(|x| *x == "WATCHDOG=1").count();
        let pass_status = l.iter().any(|x| x.starts_with("STATUS=pending"));
        if pings >= 2 && pass_status {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "notify messages so far: {l:?}\nlogs:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = d
        .terminate(Duration::from_secs(30))
        .expect("meterd exits after SIGTERM");
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; logs:\n{}",
        d.log_text()
    );

    let l = lines.lock().unwrap().clone();
    eprintln!("notify messages: {l:#?}");
    let first = |pred: &dyn Fn(&str) -> bool| l.iter().position(|x| pred(x));
    let ready = first(&|x| x == "READY=1").expect("READY=1");
    let stopping = first(&|x| x == "STOPPING=1").expect("STOPPING=1");
    let first_ping = first(&|x| x == "WATCHDOG=1").expect("WATCHDOG=1");
    let pass_status = first(&|x| x.starts_with("STATUS=pending")).expect("STATUS= of a pass");
    assert_eq!(ready, 0, "READY=1 comes first: {l:?}");
    assert!(ready < first_ping && first_ping < stopping, "{l:?}");
    assert!(ready < pass_status && pass_status < stopping, "{l:?}");
    let pings_before_stop = l[..stopping].iter().filter(|x| *x == "WATCHDOG=1").count();
    assert!(pings_before_stop >= 2, "{l:?}");
    assert_eq!(l.iter().filter(|x| *x == "READY=1").count(), 1, "{l:?}");
    assert!(
        l.iter().filter(|x| x.starts_with("STATUS=")).count() >= 2,
        "{l:?}"
    );
}

#[test]
fn sigterm_under_load_commits_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path(), &[]);
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|t| {
            let (url, acked, stop) = (d.url.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = http();
                let mut i = 0u64;
                let mut errors = 0;
                while !stop.load(Ordering::SeqCst) && errors < 20 {
                    i += 1;
                    let id = format!("load-{t}-{i}");
                    let body = serde_json::json!({
                        "resource": RESOURCE, "dimension": "api_calls", "quantity": 1, "id": id
                    });
                    match client.post(format!("{url}/v1/usage")).json(&body).send() {
                        Ok(r) if r.status().as_u16() == 202 => acked.lock().unwrap().push(id),
                        Ok(_) | Err(_) => {
                            errors += 1;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            })
        })
        .collect();
    // Let the load build up, then stop the daemon in the middle of it.
    let start = Instant::now();
    while acked.lock().unwrap().len() < 200 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = acked.lock().unwrap().len();
    let status = d
        .terminate(Duration::from_secs(30))
        .expect("meterd exits after SIGTERM");
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let logs = d.log_text();
    assert_eq!(status.code(), Some(0), "exit status; logs:\n{logs}");
    assert!(
        logs.contains("Final emission pass"),
        "no final pass in logs:\n{logs}"
    );
    assert!(logs.contains("meterd stopped."), "{logs}");
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= before && before > 0);
    let unique: BTreeSet<&String> = acked.iter().collect();
    assert_eq!(unique.len(), acked.len());

    // Every acknowledged record is in the journal: the record count covers them ...
    let s = d.status();
    let records = s["records"].as_i64().expect("records");
    eprintln!(
        "acknowledged {} records; journal holds {records}",
        acked.len()
    );
    assert!(
        records >= acked.len() as i64,
        "journal has {records} records, {} were acknowledged",
        acked.len()
    );
    // ... the quantities add up ...
    let report = d.report();
    let total: f64 = common::hours(&report)
        .iter()
        .map(|h| h.3.parse::<f64>().unwrap())
        .sum();
    assert_eq!(total as i64, records, "report: {report}");
    // ... and each acknowledged id is known: sent again to a restarted daemon, each one is a duplicate.
    d.restart();
    for chunk in acked.chunks(500) {
        let body: Vec<_> = chunk
            .iter()
            .map(|id| serde_json::json!({"resource": RESOURCE, "dimension": "api_calls", "quantity": 1, "id": id}))
            .collect();
        let r = post_usage(&d.url, &serde_json::Value::Array(body));
        assert_eq!(r.status().as_u16(), 202);
        let v: serde_json::Value = r.json().unwrap();
        assert_eq!(v["accepted"], 0, "{v}");
        assert_eq!(v["duplicates"], chunk.len(), "{v}");
    }
}

/// A strict reading of the Prometheus text format: every sample belongs to a family with `# HELP` and
/// `# TYPE` given before it, names and labels are well formed, values are numbers. Returns the samples.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("HELP has text");
            assert!(name_ok(name) && !doc.trim().is_empty(), "{line}");
            assert!(help.insert(name.to_string()), "duplicate HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE has a type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), ty.to_string()).is_none(),
                "duplicate TYPE: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "{line}");
        let labels = &series[name.len()..];
        if !labels.is_empty() {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1]
                .split(',')
                .filter(|p| !p.is_empty())
            {
                let (k, v) = pair.split_once('=').expect("label k=v");
                assert!(
                    name_ok(k) && v.starts_with('"') && v.ends_with('"'),
                    "{line}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        assert!(help.contains(family), "no HELP for {family}");
        samples.insert(series.to_string(), value);
    }
    samples
}

#[test]
fn metrics_pass_promtool_and_show_pending_age() {
    let dir = tempfile::tempdir().unwrap();
    // Usage two hours ago, taken while the grace period (3h) keeps its hour open ...
    let mut first = start(dir.path(), &[("METERD_EMIT__GRACE", "3h")]);
    let two_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    let r = post_usage(
        &first.url,
        &serde_json::json!({"resource": RESOURCE, "dimension": "api_calls", "quantity": 2.5, "id": "m-1", "time": two_hours_ago}),
    );
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(r.json::<serde_json::Value>().unwrap()["carried"], 0);
    assert_eq!(
        first.terminate(Duration::from_secs(30)).unwrap().code(),
        Some(0)
    );
    // ... then, with grace 0s, the startup pass freezes it; the marketplace is unreachable, so it stays pending
    // and ages.
    let d = start(dir.path(), &[]);
    let r = post_usage(
        &d.url,
        &serde_json::json!({"resource": RESOURCE, "dimension": "api_calls", "quantity": 1, "id": "m-2"}),
    );
    assert_eq!(r.status().as_u16(), 202);
    // A duplicate and an invalid request, so those series exist too.
    post_usage(
        &d.url,
        &serde_json::json!({"resource": RESOURCE, "dimension": "api_calls", "quantity": 1, "id": "m-2"}),
    );
    post_usage(
        &d.url,
        &serde_json::json!({"resource": RESOURCE, "dimension": "nope", "quantity": 1}),
    );
    let _ = http().post(format!("{}/v1/flush", d.url)).send();

    let start = Instant::now();
    let (text, samples) = loop {
        let text = http()
            .get(format!("{}/metrics", d.url))
            .send()
            .unwrap()
            .text()
            .unwrap();
        let samples = parse_exposition(&text);
        if samples.get("meterd_pending_events").copied().unwrap_or(0.0) >= 1.0 {
            break (text, samples);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no pending event in /metrics:\n{text}\nlogs:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let age = samples["meterd_oldest_pending_age_seconds"];
    assert!((3600.0..7300.0).contains(&age), "oldest pending age {age}");
    let expiry = samples["meterd_nearest_expiry_seconds"];
    assert!(
        expiry > 0.0 && expiry < 86_400.0 - 3600.0,
        "nearest expiry {expiry}"
    );
    assert_eq!(
        samples[r#"meterd_journal_events{outcome="pending"}"#],
        samples["meterd_pending_events"]
    );
    for name in [
        r#"meterd_ingest_records_total{result="accepted"}"#,
        r#"meterd_ingest_records_total{result="duplicate"}"#,
        r#"meterd_ingest_requests_total{result="invalid"}"#,
        r#"meterd_journal_events{outcome="duplicate_mismatch"}"#,
        "meterd_journal_records",
        "meterd_journal_commit_seconds_count",
        "meterd_emit_pass_seconds_count",
    ] {
        assert!(samples.contains_key(name), "{name} missing:\n{text}");
    }

    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!(
            "promtool not available ({e}); the strict parser above checked the format (ci/ops-checks.sh installs promtool)"
        ),
    }
}

#[test]
fn health_probes_are_open_and_everything_else_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("ingest-token"), "s3cret-token\n").unwrap();
    let creds_s = creds.display().to_string();
    let mut d = start(dir.path(), &[("CREDENTIALS_DIRECTORY", &creds_s)]);
    let c = http();
    for probe in ["healthz", "readyz"] {
        let r = c.get(format!("{}/{probe}", d.url)).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "/{probe}");
    }
    let r = c.get(format!("{}/readyz", d.url)).send().unwrap();
    assert_eq!(r.json::<serde_json::Value>().unwrap()["status"], "ready");
    for route in ["metrics", "v1/status"] {
        let r = c.get(format!("{}/{route}", d.url)).send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "/{route} without the token");
        let r = c
            .get(format!("{}/{route}", d.url))
            .bearer_auth("s3cret-token")
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "/{route} with the token");
    }
    assert!(
        !d.log_text().contains("s3cret-token"),
        "the token must never be logged"
    );
    assert_eq!(
        d.terminate(Duration::from_secs(30)).unwrap().code(),
        Some(0)
    );
}

/// `systemd-socket-activate` (from the systemd package) plays systemd's part: it binds the socket and execs
/// meterd with `LISTEN_FDS=1` and `LISTEN_PID`. Skipped when the tool is missing.
#[test]
fn socket_activation_takes_the_passed_listener() {
    let Ok(tool) = which("systemd-socket-activate") else {
        eprintln!("systemd-socket-activate not installed; skipping");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // ingest.listen names a unix socket that must not be created: the passed TCP socket wins.
    let config = common::config(dir.path(), "", &nowhere_sections()).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"unix:{}/unused.sock\"", dir.path().display()),
    );
    let config_path = dir.path().join("meterd.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(tool)
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--setenv=METERD_MARKETPLACE__AUTH__STATIC_TOKEN=x")
        .arg(bin())
        .args(["run", "--config"])
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate");
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    // The socket exists before meterd runs: early connections wait in its backlog, and /readyz says 503
    // until the daemon is ready.
    loop {
        if let Ok(r) = http().get(format!("{url}/readyz")).send()
            && r.status().as_u16() == 200
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("/readyz never answered 200 on the activated socket");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = post_usage(
        &url,
        &serde_json::json!({"resource": RESOURCE, "dimension": "api_calls", "quantity": 1}),
    );
    assert_eq!(r.status().as_u16(), 202);
    assert!(
        !dir.path().join("unused.sock").exists(),
        "ingest.listen must not be bound under socket activation"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    let mut logs = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(logs.contains("socket activation"), "{logs}");
    assert!(logs.contains(&format!("127.0.0.1:{port}")), "{logs}");
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// Every metric recorded anywhere in `src/` has its `# HELP` in `src/ops/metrics.rs`, and the operations guide
/// lists it.
#[test]
fn every_metric_is_described_and_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let described = std::fs::read_to_string(root.join("src/ops/metrics.rs")).unwrap();
    let guide = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let mut names = BTreeSet::new();
    let mut stack = vec![root.join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                    for (i, _) in text.match_indices(macro_name) {
                        let rest = text[i + macro_name.len()..].trim_start();
                        if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next())
                            && name.starts_with("meterd_")
                        {
                            names.insert(name.to_string());
                        }
                    }
                }
            }
        }
    }
    assert!(names.len() >= 15, "{names:?}");
    for name in &names {
        assert!(
            described.contains(&format!("\"{name}\",")),
            "{name} has no describe_* in src/ops/metrics.rs"
        );
        assert!(
            guide.contains(&format!("`{name}`")),
            "{name} is not in docs/operations.md"
        );
    }
}
