//! Test harness: starts the real `meterd` binary on an ephemeral port and talks to it; [`rig`] is the in-process
//! rig (journal, emitter and emulator on one `ManualClock`).
#![allow(dead_code)]

pub mod proxy;
pub mod rig;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meterd")
}

/// A configuration for tests: journal in `dir`, ephemeral port, JSON logs, the emulator's dimensions.
pub fn config(dir: &Path, extra_top: &str, extra_sections: &str) -> String {
    format!(
        r#"{extra_top}
[journal]
path = "{journal}"
[ingest]
listen = "127.0.0.1:0"
[log]
format = "json"
level = "info,meterd=debug"
{extra_sections}
[[dimensions]]
id = "api_calls"
[[dimensions]]
id = "gb_processed"
[[meters]]
type = "api-requests"
dimension = "api_calls"
value_property = "$.count"
"#,
        journal = dir.join("journal.db").display()
    )
}

/// Configuration sections pointing at an emulator at `base` (http://127.0.0.1:PORT) with its static token.
pub fn emulator_sections(base: &str, emit_extra: &str) -> String {
    format!(
        r#"[marketplace]
mode = "azure"
base_url = "{base}/api"
timeout = "3s"
[marketplace.auth]
kind = "static_token"
[emit]
grace = "0s"
retry_min = "1s"
retry_max = "2s"
schedule = "0 5 * * * *"
{emit_extra}
"#
    )
}

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The configuration file.
    pub config_path: PathBuf,
    /// Every log line so far (stderr).
    pub logs: Arc<Mutex<Vec<String>>>,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Writes `config` to `dir/meterd.toml` and starts `meterd run` with it.
    pub fn start(dir: &Path, config: &str, env: &[(&str, &str)]) -> Daemon {
        let config_path = dir.join("meterd.toml");
        std::fs::write(&config_path, config).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(config_path, env)
    }

    fn spawn(config_path: PathBuf, env: Vec<(String, String)>) -> Daemon {
        let mut cmd = Command::new(bin());
        cmd.arg("run").arg("--config").arg(&config_path);
        cmd.env_remove("RUST_LOG");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meterd");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("meterd listening.")
                    && let Some(addr) = json_field(&line, "addr")
                {
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "meterd did not start; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Daemon {
            child: Some(child),
            url,
            config_path,
            logs,
            env,
        }
    }

    /// Starts the daemon again with the same configuration (killing it first if it still runs).
    pub fn restart(&mut self) {
        self.kill9();
        let old = std::mem::take(&mut *self.logs.lock().unwrap());
        let mut fresh = Self::spawn(self.config_path.clone(), self.env.clone());
        fresh.logs.lock().unwrap().splice(0..0, old);
        std::mem::swap(self, &mut fresh);
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// All log lines so far.
    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Runs `meterd ARGS --config <this config>` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args).arg("--config").arg(&self.config_path);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run meterd cli")
    }

    /// `meterd report --format json`, parsed.
    pub fn report(&self) -> serde_json::Value {
        let out = self.cli(&["report", "--format", "json"]);
        assert!(
            out.status.success(),
            "report failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("report json")
    }

    /// `meterd status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Waits until `pred(report)` holds, up to `timeout`; returns the last report.
    pub fn wait_report(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let r = self.report();
            if pred(&r) {
                return r;
            }
            if start.elapsed() > timeout {
                panic!(
                    "condition not reached; report:\n{}\nlogs:\n{}",
                    serde_json::to_string_pretty(&r).unwrap(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reads a string field from a JSON log line.
pub fn json_field(line: &str, field: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get(field).and_then(|f| f.as_str()).map(str::to_string)
}

/// A blocking HTTP client for tests.
pub fn http() -> reqwest::blocking::Client {
    meterd::tls::install_crypto_provider();
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Hour totals from a report: (resource, dimension, hour) -> (quantity string, outcome).
pub fn hours(report: &serde_json::Value) -> Vec<(String, String, String, String, String)> {
    report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["resource"].as_str().unwrap().to_string(),
                h["dimension"].as_str().unwrap().to_string(),
                h["hour"].as_str().unwrap().to_string(),
                h["quantity"].as_str().unwrap().to_string(),
                h["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The in-process emulator the black-box tests run the daemon against, with a temp dir for the daemon.
pub struct EmuRig {
    /// Runtime the emulator serves on (the test body stays blocking).
    pub _rt: tokio::runtime::Runtime,
    /// The emulator, for faults and its ledger.
    pub emu: meterd::emulator::Emulator,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The daemon's directory (journal, configuration).
    pub dir: tempfile::TempDir,
}

/// Starts an emulator with `config` on 127.0.0.1:0.
pub fn emu_rig(config: meterd::emulator::EmulatorConfig) -> EmuRig {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (addr, emu, _task) = rt
        .block_on(meterd::emulator::Emulator::spawn_local(config))
        .unwrap();
    EmuRig {
        _rt: rt,
        emu,
        base: format!("http://{addr}"),
        dir: tempfile::tempdir().unwrap(),
    }
}

/// The static token variable the emulator accepts.
pub const TOKEN_ENV: (&str, &str) = ("METERD_MARKETPLACE__AUTH__STATIC_TOKEN", "emulator-token");

impl EmuRig {
    /// A daemon configuration pointing at this emulator, with extra `[emit]` lines.
    pub fn config(&self, emit_extra: &str) -> String {
        config(
            self.dir.path(),
            "",
            &emulator_sections(&self.base, emit_extra),
        )
    }

    /// Starts the daemon with a long grace: records can be posted for past hours without freezing them.
    pub fn collecting(&self, emit_extra: &str) -> Daemon {
        Daemon::start(
            self.dir.path(),
            &self.config(emit_extra),
            &[TOKEN_ENV, ("METERD_EMIT__GRACE", "11h")],
        )
    }

    /// Starts the daemon with grace 0s: the startup pass freezes and sends every closed hour.
    pub fn sending(&self, emit_extra: &str) -> Daemon {
        Daemon::start(self.dir.path(), &self.config(emit_extra), &[TOKEN_ENV])
    }
}

/// The start of the UTC hour `hours_ago` hours before now.
pub fn hour_start(hours_ago: i64) -> chrono::DateTime<chrono::Utc> {
    use chrono::Timelike;
    let t = chrono::Utc::now() - chrono::Duration::hours(hours_ago);
    t.with_minute(0)
        .unwrap()
        .with_second(0)
        .unwrap()
        .with_nanosecond(0)
        .unwrap()
}

/// RFC 3339 with `Z`, seconds precision.
pub fn ts(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}
