//! Black-box tests of the commands a newcomer and an operator type (issue 12): the run command without a
//! configuration, the journal-only commands without marketplace credentials or on a read-only directory, emulator
//! mode end to end, and the quickstart.

mod common;

use common::{Daemon, EmuRig, bin, emu_rig, hour_start, ts};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

const SUB: &str = "11111111-1111-4111-8111-111111111111";

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `meterd ARGS` in `cwd`, with no configuration found through the environment.
fn meterd_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.current_dir(cwd).args(args).env_remove("METERD_CONFIG");
    for (k, _) in std::env::vars() {
        if k.starts_with("METERD_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run meterd")
}

#[test]
fn run_without_a_configuration_refuses_and_says_to_use_emulator() {
    if Path::new("/etc/meterd/meterd.toml").exists() {
        panic!("/etc/meterd/meterd.toml exists on this host: this test needs a host without one");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = meterd_in(dir.path(), &["run"], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no configuration file"), "{}", text(&out));
    assert!(err.contains("meterd run --emulator"), "{}", text(&out));
    // A production host whose file went missing must not start reporting anywhere: nothing was created.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A journal with one sent hour, written by a daemon against the emulator, then stopped.
fn journal_with_one_accepted_hour(rig: &EmuRig) -> Daemon {
    let mut d = rig.sending("");
    let h = hour_start(2);
    let body = format!(
        r#"{{"resource":"{SUB}","dimension":"api_calls","quantity":2.5,"time":"{}","id":"ro-1"}}"#,
        ts(h + chrono::Duration::minutes(10))
    );
    let r = common::http()
        .post(format!("{}/v1/usage", d.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let r = common::http()
        .post(format!("{}/v1/flush", d.url))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let report = d.report();
    let hours = common::hours(&report);
    // The record went into its own hour (once late usage is kept there) or was carried into the open one: either
    // way the journal now holds a row the read-only commands must show.
    assert!(!hours.is_empty(), "{report}");
    assert!(
        d.terminate(Duration::from_secs(30)).is_some(),
        "meterd did not stop"
    );
    d
}

/// A configuration for the same journal whose `[marketplace.auth]` has neither tenant nor client id.
fn incomplete_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("incomplete.toml");
    std::fs::write(
        &path,
        format!(
            "[journal]\npath = \"{}\"\n[marketplace]\nmode = \"azure\"\n[marketplace.auth]\nkind = \"client_secret\"\n\
             tenant_id = \"\"\n[[dimensions]]\nid = \"api_calls\"\n[[dimensions]]\nid = \"gb_processed\"\n",
            dir.join("journal.db").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn report_status_balance_work_with_incomplete_marketplace_credentials() {
    let rig = emu_rig(Default::default());
    let _d = journal_with_one_accepted_hour(&rig);
    let cfg = incomplete_config(rig.dir.path());
    let cfg = cfg.to_str().unwrap();
    for args in [
        vec!["status", "--config", cfg],
        vec!["status", "--json", "--config", cfg],
        vec!["report", "--config", cfg],
        vec!["balance", "--resource", SUB, "--config", cfg],
        vec!["check-config", "--config", cfg],
    ] {
        let out = meterd_in(rig.dir.path(), &args, &[]);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let all = text(&out);
        assert!(
            all.contains("warning:") && all.contains("marketplace.auth.tenant_id"),
            "{args:?} must warn what is missing: {all}"
        );
    }
    let report = meterd_in(rig.dir.path(), &["report", "--config", cfg], &[]);
    assert!(
        String::from_utf8_lossy(&report.stdout).contains(SUB),
        "{}",
        text(&report)
    );
    // Commands that talk to the marketplace still refuse, naming the key.
    for args in [
        vec!["subscriptions", "--config", cfg],
        vec!["check-config", "--online", "--config", cfg],
        vec!["run", "--config", cfg],
    ] {
        let out = meterd_in(rig.dir.path(), &args, &[]);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("marketplace.auth.tenant_id"),
            "{args:?}: {}",
            text(&out)
        );
    }
}

/// Every file in `dir` with its length and modification time.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                (m.len(), m.modified().unwrap()),
            )
        })
        .collect()
}

/// No file created, removed or changed; except that where a `-wal` is left (a killed daemon, or one whose
/// connections did not all close), a reader may rebuild SQLite's `-shm` (the volatile WAL index, never journal
/// data) where the directory lets it.
fn assert_unchanged(
    before: &BTreeMap<String, (u64, SystemTime)>,
    after: &BTreeMap<String, (u64, SystemTime)>,
    round: &str,
) {
    let keys = |m: &BTreeMap<String, (u64, SystemTime)>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(before),
        keys(after),
        "{round}: files created or removed"
    );
    let wal_left = before.keys().any(|k| k.ends_with("-wal"));
    for (name, b) in before {
        if wal_left && name.ends_with("-shm") {
            continue;
        }
        assert_eq!(b, &after[name], "{round}: {name} was modified");
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs `meterd ARGS` with `dir` read-only: as a normal user by `chmod 0555`; as root (whom permissions do not
/// stop) inside a private mount namespace where `dir` is a read-only bind mount. `None` when neither works here.
fn meterd_with_read_only_dir(dir: &Path, args: &[&str]) -> Option<Output> {
    if !is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        let out = meterd_in(dir, args, &[]);
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        return Some(out);
    }
    let d = dir.display().to_string();
    let mut script = format!(
        "mount --bind '{d}' '{d}' && mount -o remount,ro,bind '{d}' && ! touch '{d}/probe' 2>/dev/null && exec '{}'",
        bin()
    );
    for a in args {
        script.push_str(&format!(" '{a}'"));
    }
    let probe = Command::new("unshare").args(["-m", "true"]).output().ok()?;
    if !probe.status.success() {
        return None;
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &script]).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("METERD_") {
            cmd.env_remove(k);
        }
    }
    Some(cmd.output().expect("unshare"))
}

#[test]
fn journal_commands_read_a_read_only_journal_directory_without_touching_it() {
    let rig = emu_rig(Default::default());
    let mut d = journal_with_one_accepted_hour(&rig);
    // 1. A copy with no -wal beside it (what a clean close leaves, or a backup): read as immutable.
    let copy = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(rig.dir.path().join("journal.db"))
        .unwrap()
        .execute(
            "VACUUM INTO ?1",
            [copy.path().join("journal.db").to_str().unwrap()],
        )
        .unwrap();
    // VACUUM INTO writes a rollback-journal file; the journal is WAL: switch the copy, and closing the only
    // connection checkpoints and removes its -wal, as a clean close of the journal does.
    let c = rusqlite::Connection::open(copy.path().join("journal.db")).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(c);
    // 2. The daemon's own directory after a kill -9 (the -wal and -shm stay beside the journal).
    for round in ["copy", "killed"] {
        let dir = if round == "copy" {
            copy.path()
        } else {
            d.restart();
            d.kill9();
            rig.dir.path()
        };
        let cfg = incomplete_config(dir);
        let cfg = cfg.to_str().unwrap().to_string();
        if round == "copy" {
            assert!(!dir.join("journal.db-wal").exists());
        }
        // The writable case first: the read-only commands never create or modify a file.
        let before = snapshot(dir);
        for args in [
            vec!["status", "--config", &cfg],
            vec!["report", "--format", "json", "--config", &cfg],
            vec!["balance", "--resource", SUB, "--config", &cfg],
        ] {
            let out = meterd_in(dir, &args, &[]);
            assert!(out.status.success(), "{round} {args:?}: {}", text(&out));
        }
        assert_unchanged(&before, &snapshot(dir), round);
        // Then the read-only directory.
        let report =
            meterd_with_read_only_dir(dir, &["report", "--format", "json", "--config", &cfg]);
        let Some(report) = report else {
            eprintln!(
                "skipped the read-only mount part: running as root without `unshare -m` (no CAP_SYS_ADMIN); \
                 the unchanged-directory checks above still ran"
            );
            return;
        };
        assert!(report.status.success(), "{round} report: {}", text(&report));
        let v: serde_json::Value = serde_json::from_slice(&report.stdout).expect("report json");
        assert!(
            v["hours"].as_array().is_some_and(|h| !h.is_empty()),
            "{round}: {}",
            text(&report)
        );
        for args in [
            vec!["status", "--config", &cfg],
            vec!["balance", "--resource", SUB, "--config", &cfg],
        ] {
            let out = meterd_with_read_only_dir(dir, &args).unwrap();
            assert!(out.status.success(), "{round} {args:?}: {}", text(&out));
        }
        assert_unchanged(&before, &snapshot(dir), round);
    }
}

#[test]
fn emulator_mode_subscriptions_and_check_config_online_reach_the_daemons_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ingest.sock");
    let cfg = dir.path().join("meterd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[journal]\npath = \"{}\"\n[ingest]\nlisten = \"unix:{}\"\n[marketplace]\nmode = \"emulator\"\n\
             [log]\nformat = \"json\"\n[[dimensions]]\nid = \"api_calls\"\n",
            dir.path().join("journal.db").display(),
            sock.display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    // Without a daemon: a clear error saying how to start one.
    let out = meterd_in(dir.path(), &["subscriptions", "--config", cfg], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("meterd run --emulator"),
        "{}",
        text(&out)
    );
    let mut child = Command::new(bin())
        .args(["run", "--config", cfg])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let subs = loop {
        let out = meterd_in(dir.path(), &["subscriptions", "--config", cfg], &[]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let online = meterd_in(
        dir.path(),
        &["check-config", "--online", "--config", cfg],
        &[],
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(subs.status.success(), "{}", text(&subs));
    let s = String::from_utf8_lossy(&subs.stdout);
    assert!(
        s.contains(SUB) && s.contains("Subscribed"),
        "{}",
        text(&subs)
    );
    assert!(online.status.success(), "{}", text(&online));
    let o = String::from_utf8_lossy(&online.stdout);
    assert!(
        o.contains("token: OK") && o.contains("subscriptions: OK"),
        "{}",
        text(&online)
    );
}

/// The README's quickstart, step by step: `meterd run --emulator` with no configuration, a record for the hour
/// that closed last, `meterd flush`, and the hour is `accepted` with the emulator's `usageEventId`.
#[test]
fn quickstart_last_hour_goes_from_open_to_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // Only the listener moves off the README's 127.0.0.1:8787 so tests can run side by side.
    let listen = format!("unix:{}", dir.path().join("ingest.sock").display());
    let env = [("METERD_INGEST__LISTEN", listen.as_str())];
    let mut cmd = Command::new(bin());
    cmd.current_dir(dir.path())
        .args(["run", "--emulator"])
        .env_remove("RUST_LOG")
        .env_remove("METERD_CONFIG")
        .env(env[0].0, env[0].1)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let last = ts(hour_start(2) + chrono::Duration::minutes(30));
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        let out = meterd_in(
            dir.path(),
            &[
                "record",
                "--resource",
                SUB,
                "--dimension",
                "api_calls",
                "--quantity",
                "2.5",
                "--id",
                "first",
                "--time",
                &last,
            ],
            &env,
        );
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let flush = meterd_in(dir.path(), &["flush"], &env);
    let report = meterd_in(dir.path(), &["report", "--format", "json"], &env);
    let table = meterd_in(dir.path(), &["report"], &env);
    let _ = child.kill();
    let _ = child.wait();
    assert!(record.status.success(), "{}", text(&record));
    assert_eq!(
        String::from_utf8_lossy(&record.stdout).trim(),
        "recorded",
        "{}",
        text(&record)
    );
    assert!(flush.status.success(), "{}", text(&flush));
    let v: serde_json::Value = serde_json::from_slice(&report.stdout).expect("report json");
    let hour = ts(hour_start(2));
    let row = v["hours"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hour"] == hour.as_str())
        .unwrap_or_else(|| panic!("no row for {hour}: {v}"));
    assert_eq!(row["quantity"], "2.5", "{v}");
    assert_eq!(row["outcome"], "accepted", "{v}");
    let id = row["usage_event_id"].as_str().expect("usage event id");
    // The flush sent it, or the minutely pass did just before (the README says so: "or already `accepted`"),
    // and then the flush found nothing left to send. Either way it was sent once, and the report shows it.
    let flushed = String::from_utf8_lossy(&flush.stdout);
    assert!(
        flushed.contains(id) || flushed.contains("nothing was due"),
        "flush lists the sent event, or found it sent already: {}",
        text(&flush)
    );
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("accepted"),
        "{}",
        text(&table)
    );
}

#[test]
fn flush_prints_a_summary_and_json_keeps_the_daemons_line() {
    let rig = emu_rig(Default::default());
    let d = rig.sending("");
    let human = d.cli(&["flush", "--url", &d.url]);
    assert!(human.status.success(), "{}", text(&human));
    let h = String::from_utf8_lossy(&human.stdout);
    assert!(h.starts_with("pass at "), "{}", text(&human));
    assert!(h.contains("pending after the pass: 0"), "{}", text(&human));
    let json = d.cli(&["flush", "--json", "--url", &d.url]);
    assert!(json.status.success(), "{}", text(&json));
    let line = String::from_utf8_lossy(&json.stdout);
    assert_eq!(line.trim().lines().count(), 1, "{}", text(&json));
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    assert!(v["started"].is_string() && v["pending_after"] == 0, "{v}");
}

/// Found by schemathesis-style checking against `docs/openapi.yaml`: a query string the extractor cannot read
/// (a parameter given twice) was answered with a `text/plain` 400 instead of the documented `{"errors": [...]}`.
#[test]
fn get_routes_answer_a_bad_query_string_with_json_errors() {
    let rig = emu_rig(Default::default());
    let d = rig.collecting("");
    for path in [
        "/v1/usage?from=2026-01-01&from=2026-01-02",
        "/v1/consumption?resource=11111111-1111-4111-8111-111111111111&to=1&to=2",
    ] {
        let r = common::http()
            .get(format!("{}{path}", d.url))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
        let ctype = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert!(ctype.starts_with("application/json"), "{path}: {ctype}");
        let v: serde_json::Value = r.json().unwrap();
        let msg = v["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("query"), "{path}: {v}");
    }
}
