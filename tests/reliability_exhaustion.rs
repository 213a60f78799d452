//! Resource exhaustion and secrets: a full and a read-only journal disk (a real tmpfs mount with `size=`, so
//! SQLite sees ENOSPC/EROFS exactly as in production), and a full run searched for the client secret, the
//! ingest token and every marketplace token.
//!
//! The disk tests need root and `mount`; elsewhere they print `SKIPPED` and pass.

mod common;

use common::{Daemon, http};
use meterd::emulator::{Emulator, EmulatorConfig, Route};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const A: &str = "11111111-1111-4111-8111-111111111111";

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { path, _dir: dir })
    }

    fn remount(&self, opts: &str) -> bool {
        Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn quiet_config(dir: &Path) -> String {
    common::config(
        dir,
        "",
        "[marketplace]\nmode = \"azure\"\nbase_url = \"http://127.0.0.1:9/api\"\n[marketplace.auth]\nkind = \"static_token\"\n[emit]\ngrace = \"11h\"\n",
    )
}

const QUIET_ENV: [(&str, &str); 1] = [("METERD_MARKETPLACE__AUTH__STATIC_TOKEN", "t")];

fn batch(start: usize, n: usize) -> Value {
    Value::Array(
        (start..start + n)
            .map(|i| json!({"resource": A, "dimension": "api_calls", "quantity": 1, "id": format!("disk-{i}-{}", "k".repeat(100))}))
            .collect(),
    )
}

fn post(d: &Daemon, body: &Value) -> (u16, Option<String>, String) {
    match http().post(format!("{}/v1/usage", d.url)).json(body).send() {
        Ok(r) => {
            let s = r.status().as_u16();
            let ra = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (s, ra, r.text().unwrap_or_default())
        }
        Err(e) => (0, None, e.to_string()),
    }
}

fn journal_total(d: &Daemon) -> i64 {
    d.report()["hours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["quantity_micros"].as_i64().unwrap())
        .sum()
}

fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    p
}

#[test]
fn a_full_journal_disk_answers_503_loses_nothing_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("3m") else {
        println!("DISK FULL: SKIPPED (mount -t tmpfs not permitted here)");
        return;
    };
    let mut d = Daemon::start(&fs.path, &quiet_config(&fs.path), &QUIET_ENV);
    let (mut acked, mut next) = (0i64, 0usize);
    assert_eq!(post(&d, &batch(next, 50)).0, 202);
    acked += 50;
    next += 50;
    let filler = fill(&fs.path);
    // Keep posting until the disk refuses (SQLite may still have free pages in its files).
    let mut refused = None;
    for _ in 0..400 {
        let body = batch(next, 50);
        let (status, retry_after, text) = post(&d, &body);
        match status {
            202 => {
                acked += 50;
                next += 50;
            }
            _ => {
                refused = Some((status, retry_after, text, body));
                break;
            }
        }
    }
    let (status, retry_after, text, body) = refused.expect("the disk never filled");
    println!("DISK FULL: answer {status}, Retry-After {retry_after:?}, body {text}");
    assert_eq!(status, 503, "{text}");
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert!(text.contains("disk is full"), "{text}");
    let health = http()
        .get(format!("{}/healthz", d.url))
        .send()
        .unwrap()
        .status();
    println!("DISK FULL: /healthz while full: {health}");
    // Still refused while full; nothing half-stored.
    assert_eq!(post(&d, &body).0, 503);
    // Space returns: the same request goes through without a restart.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    loop {
        let (s, _, text) = post(&d, &body);
        if s == 202 {
            acked += 50;
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no recovery: {s} {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "DISK FULL: recovered {:.2}s after space returned; {} records acknowledged",
        t.elapsed().as_secs_f64(),
        acked
    );
    assert_eq!(journal_total(&d), acked * 1_000_000);
    // Acknowledged means durable, across kill -9 too.
    d.restart();
    assert_eq!(journal_total(&d), acked * 1_000_000);
}

#[test]
fn a_read_only_journal_is_refused_clearly_and_nothing_acknowledged_is_lost() {
    let Some(fs) = Tmpfs::mount("16m") else {
        println!("READ-ONLY: SKIPPED (mount -t tmpfs not permitted here)");
        return;
    };
    let cfg = quiet_config(&fs.path);
    let mut d = Daemon::start(&fs.path, &cfg, &QUIET_ENV);
    assert_eq!(post(&d, &batch(0, 20)).0, 202);
    // A mount cannot become read-only while meterd holds the journal open for writing (EBUSY), so the case
    // that happens in practice is a restart onto a read-only volume.
    let busy = !fs.remount("ro");
    println!("READ-ONLY: remount ro while running refused by the kernel: {busy}");
    if !busy {
        fs.remount("rw");
    }
    assert!(d.terminate(Duration::from_secs(20)).is_some());
    assert!(fs.remount("ro"), "remount ro");
    let out = Command::new(common::bin())
        .args(["run", "--config"])
        .arg(fs.path.join("meterd.toml"))
        .env("METERD_MARKETPLACE__AUTH__STATIC_TOKEN", "t")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("").to_string();
    println!(
        "READ-ONLY: start on a read-only journal: exit {:?}, {last}",
        out.status.code()
    );
    assert!(!out.status.success());
    assert!(
        err.contains("read-only") || err.contains("journal"),
        "unclear error: {err}"
    );
    // Reports still read it.
    let rep = d.cli(&["report", "--format", "json"]);
    println!(
        "READ-ONLY: `meterd report` on the read-only journal: exit {:?}",
        rep.status.code()
    );
    assert!(fs.remount("rw"), "remount rw");
    let d = Daemon::start(&fs.path, &cfg, &QUIET_ENV);
    assert_eq!(journal_total(&d), 20_000_000);
    assert_eq!(post(&d, &batch(20, 1)).0, 202);
}

// ---------------------------------------------------------------------------------------------------------
// Secrets and access.

/// Finds a marketplace token the emulator issued (`emu.<32 hex>.<32 hex>`) in `text`.
fn find_issued_token(text: &str) -> Option<&str> {
    text.match_indices("emu.").find_map(|(i, _)| {
        let rest = &text[i + 4..];
        let hex = rest.chars().take_while(|c| c.is_ascii_hexdigit()).count();
        (hex == 32).then(|| &text[i..(i + 4 + hex).min(text.len())])
    })
}

#[test]
fn secrets_never_leak_and_access_is_guarded() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (addr, emu, _task) = rt
        .block_on(Emulator::spawn_local(EmulatorConfig::default()))
        .unwrap();
    let base = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    let auth = format!(
        "[marketplace.auth]\nkind = \"client_secret\"\ntenant_id = \"emulator-tenant\"\nclient_id = \"00000000-0000-0000-0000-00000000c11e\"\ntoken_url = \"{base}/emulator-tenant/oauth2/v2.0/token\"\n"
    );
    let cfg = common::config(dir.path(), "", &common::emulator_sections(&base, ""))
        .replace("[marketplace.auth]\nkind = \"static_token\"\n", &auth);
    let ingest_token = "ingest-TOKEN-s3cr3t-0123456789";
    let secret = "emulator-secret";
    let env = [
        ("METERD_MARKETPLACE__AUTH__CLIENT_SECRET", secret),
        ("METERD_INGEST__TOKEN", ingest_token),
    ];
    let mut collect = env.to_vec();
    collect.push(("METERD_EMIT__GRACE", "11h"));
    let mut seen = String::new();
    let hour = (chrono::Utc::now() - chrono::Duration::hours(2)).format("%Y-%m-%dT%H:00:00Z");
    let rec =
        json!([{"resource": A, "dimension": "api_calls", "quantity": 2, "time": hour.to_string()}]);
    {
        let mut d = Daemon::start(dir.path(), &cfg, &collect);
        let c = http();
        let url = format!("{}/v1/usage", d.url);
        let no = c.post(&url).json(&rec).send().unwrap();
        let wrong = c
            .post(&url)
            .bearer_auth("ingest-TOKEN-s3cr3t-0123456788")
            .json(&rec)
            .send()
            .unwrap();
        let prefix = c
            .post(&url)
            .bearer_auth(&ingest_token[..10])
            .json(&rec)
            .send()
            .unwrap();
        let status_no = c
            .get(format!("{}/v1/status", d.url))
            .send()
            .unwrap()
            .status()
            .as_u16();
        let metrics_no = c
            .get(format!("{}/metrics", d.url))
            .send()
            .unwrap()
            .status()
            .as_u16();
        let health = c
            .get(format!("{}/healthz", d.url))
            .send()
            .unwrap()
            .status()
            .as_u16();
        let ok = c
            .post(&url)
            .bearer_auth(ingest_token)
            .json(&rec)
            .send()
            .unwrap();
        println!(
            "ACCESS: no token {}, wrong token {}, token prefix {}, /v1/status without token {status_no}, /metrics without token {metrics_no}, /healthz without token {health}, right token {}",
            no.status(),
            wrong.status(),
            prefix.status(),
            ok.status()
        );
        assert_eq!(no.status().as_u16(), 401);
        assert_eq!(wrong.status().as_u16(), 401);
        assert_eq!(prefix.status().as_u16(), 401);
        assert_eq!((status_no, metrics_no, health), (401, 401, 200));
        assert_eq!(ok.status().as_u16(), 202);
        assert!(
            !d.log_text().contains("beyond loopback"),
            "no warning on loopback"
        );
        d.terminate(Duration::from_secs(20));
        seen.push_str(&d.log_text());
    }
    // Sending run: a token refresh failure and a 401 on the way, then status, report, metrics and flush outputs.
    emu.fail_next(Route::Token, 1, 503, None);
    emu.fail_next(Route::BatchUsageEvent, 1, 401, None);
    let d = Daemon::start(dir.path(), &cfg, &env);
    d.wait_report(Duration::from_secs(60), |r| {
        r["hours"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["outcome"] == "accepted")
    });
    let c = http();
    for path in [
        "/v1/status",
        "/metrics",
        "/v1/usage?resource=".to_string().as_str(),
    ] {
        let r = c
            .get(format!("{}{path}", d.url))
            .bearer_auth(ingest_token)
            .send()
            .unwrap();
        seen.push_str(&r.text().unwrap());
    }
    let r = c
        .post(format!("{}/v1/flush", d.url))
        .bearer_auth(ingest_token)
        .send()
        .unwrap();
    seen.push_str(&r.text().unwrap());
    for args in [
        vec!["status", "--json"],
        vec!["status"],
        vec!["report", "--format", "json"],
        vec!["subscriptions"],
        vec!["check-config", "--online"],
        vec!["flush"],
    ] {
        let out = d.cli(&args);
        seen.push_str(&String::from_utf8_lossy(&out.stdout));
        seen.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    seen.push_str(&d.log_text());
    let tokens_issued = emu.request_count(Route::Token);
    println!(
        "SECRETS: searched {} bytes of logs, API answers and CLI output; {tokens_issued} token requests",
        seen.len()
    );
    assert!(tokens_issued >= 2);
    assert!(!seen.contains(secret), "the client secret leaked");
    assert!(!seen.contains(ingest_token), "the ingest token leaked");
    assert_eq!(find_issued_token(&seen), None, "a marketplace token leaked");
    // A sanity check of the search itself.
    assert!(find_issued_token(&emu.issue_token()).is_some());
}

#[test]
fn listening_beyond_loopback_without_a_token_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        quiet_config(dir.path()).replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"");
    let d = Daemon::start(dir.path(), &cfg, &QUIET_ENV);
    let logs = d.log_text();
    assert!(
        logs.contains("Ingest listens beyond loopback without a token"),
        "{logs}"
    );
    let d2dir = tempfile::tempdir().unwrap();
    let d2 = Daemon::start(d2dir.path(), &quiet_config(d2dir.path()), &QUIET_ENV);
    assert!(!d2.log_text().contains("beyond loopback"));
}
