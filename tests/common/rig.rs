//! The in-process rig: a [`Journal`] in a temporary directory, an [`Emitter`] built with [`emit::client`] against an
//! in-process [`Emulator`], and one [`ManualClock`] shared by meterd and the emulator (unless the emulator is given
//! a clock of its own), so hours pass by `clock.set(..)` without sleeping.
//!
//! ```ignore
//! let rig = Rig::at(t("09:00")).top("late_usage = \"reject\"").start().await;
//! rig.ingest(t("09:10"), vec![record(A, "api_calls", t("09:05"), "2.5")]).await;
//! let pass = rig.pass_at(t("10:05")).await;
//! ```
//!
//! The configuration is the one every in-process test used: `[emit] grace = "5m"`, `retry_min = "30s"`, the static
//! token of the emulator, and the dimensions `api_calls` and `gb_processed`; the builder changes any part of it.

use chrono::{DateTime, Duration, Utc};
use meterd::clock::{Clock, ManualClock, SharedClock};
use meterd::config::{self, Settings};
use meterd::emit::{self, Emitter, PassSummary};
use meterd::emulator::{Emulator, EmulatorConfig, Subscription};
use meterd::journal::Journal;
use meterd::journal::status::{self, JournalStatus};
use meterd::journal::usage::{
    self, CarryRow, HourlyRow, IngestOutcome, IngestRules, LateRecord, NewRecord, ReportFilter,
};
use meterd::quantity::Micros;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The emulator's static bearer token.
pub const TOKEN: &str = meterd::emulator::config::DEFAULT_STATIC_TOKEN;

/// The dimensions of the rig's configuration unless [`RigBuilder::dimensions`] says otherwise.
pub const DIMENSIONS: &str = r#"[[dimensions]]
id = "api_calls"
[[dimensions]]
id = "gb_processed"
"#;

/// The environment meterd is configured with: the emulator's static token.
pub fn env() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "METERD_MARKETPLACE__AUTH__STATIC_TOKEN".to_string(),
        TOKEN.to_string(),
    )])
}

/// `"09:05"`, `"09:59:59"` on 2026-03-10, or a full RFC 3339 time.
pub fn t(s: &str) -> DateTime<Utc> {
    let full = if s.contains('T') {
        s.to_string()
    } else if s.len() == 5 {
        format!("2026-03-10T{s}:00Z")
    } else {
        format!("2026-03-10T{s}Z")
    };
    DateTime::parse_from_rfc3339(&full)
        .unwrap_or_else(|e| panic!("bad time {s}: {e}"))
        .with_timezone(&Utc)
}

/// The same time of day on 2026-03-11.
pub fn next_day(s: &str) -> DateTime<Utc> {
    t(s) + Duration::hours(24)
}

/// A decimal quantity (`"2.5"`) in micro-units.
pub fn micros(q: &str) -> Micros {
    Micros::parse_decimal(q).unwrap()
}

/// A record without plan or idempotency key.
pub fn record(resource: &str, dimension: &str, time: DateTime<Utc>, qty: &str) -> NewRecord {
    NewRecord {
        resource: resource.to_string(),
        plan: None,
        dimension: dimension.to_string(),
        time,
        quantity: micros(qty),
        key: None,
    }
}

/// `resource` Subscribed on `plan` for a monthly term over March 2026 (2026-03-01 to 2026-03-31).
pub fn march_subscription(resource: &str, plan: &str) -> Subscription {
    let mut sub = Subscription::new(resource, plan);
    sub.term.start_date = Some("2026-03-01".into());
    sub.term.end_date = Some("2026-03-31".into());
    sub.term.term_unit = "P1M".into();
    sub
}

/// The ingest rules of `POST /v1/usage` under `settings` at `now`.
pub fn ingest_rules(settings: &Settings, now: DateTime<Utc>) -> IngestRules {
    IngestRules {
        now,
        late: settings.late_usage,
        safety_margin: settings.emit.safety_margin,
        min_send_time: settings.emit.min_send_time,
        outbox: settings.fleet.is_some(),
    }
}

/// Everything one in-process test needs; meterd and the emulator share `clock` (see [`RigBuilder::emulator_clock`]).
pub struct Rig {
    /// meterd's clock.
    pub clock: ManualClock,
    /// The emulator, for faults and what it received and accepted.
    pub emu: Emulator,
    /// Where the emulator listens.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The settings the emitter runs with.
    pub settings: Arc<Settings>,
    /// The journal, in `dir`.
    pub journal: Journal,
    /// The emitter (a second one on the same journal: [`Rig::restarted_emitter`]).
    pub emitter: Emitter,
    /// The temporary directory of the journal.
    pub dir: tempfile::TempDir,
}

/// A [`Rig`] that a test file gives helpers of its own, including ones named like the rig's (`ingest`, `pass_at`
/// with other arguments): `use common::rig::Extended as Rig;` and an `impl Rig { .. }` in that file. Everything of
/// the rig itself is reached through `Deref`, or through `.0` where a name is taken.
pub struct Extended(pub Rig);

impl std::ops::Deref for Extended {
    type Target = Rig;

    fn deref(&self) -> &Rig {
        &self.0
    }
}

/// Options of a [`Rig`]; [`RigBuilder::start`] builds it.
pub struct RigBuilder {
    start: DateTime<Utc>,
    top: String,
    marketplace: String,
    grace: String,
    retry_min: String,
    emit: String,
    dimensions: String,
    emulator: EmulatorConfig,
    emulator_clock: Option<SharedClock>,
}

impl Rig {
    /// A rig whose clock starts at `start`, default emulator, default configuration.
    pub fn at(start: DateTime<Utc>) -> RigBuilder {
        RigBuilder {
            start,
            top: String::new(),
            marketplace: String::new(),
            grace: "5m".to_string(),
            retry_min: "30s".to_string(),
            emit: String::new(),
            dimensions: DIMENSIONS.to_string(),
            emulator: EmulatorConfig::default(),
            emulator_clock: None,
        }
    }

    /// Another emitter on the same journal (a restarted process).
    pub fn restarted_emitter(&self) -> Emitter {
        let shared: SharedClock = Arc::new(self.clock.clone());
        let client = emit::client(&self.settings, &env(), shared.clone()).unwrap();
        Emitter::new(self.settings.clone(), self.journal.clone(), shared, client)
    }

    /// The ingest rules of `POST /v1/usage` at `now`.
    pub fn rules(&self, now: DateTime<Utc>) -> IngestRules {
        ingest_rules(&self.settings, now)
    }

    /// Sets the clock to `now` and ingests `records` as `POST /v1/usage` stores them.
    pub async fn try_ingest(
        &self,
        now: DateTime<Utc>,
        records: Vec<NewRecord>,
    ) -> Result<IngestOutcome, Vec<LateRecord>> {
        self.clock.set(now);
        let rules = self.rules(now);
        self.journal
            .write(move |c| usage::ingest(c, &records, &rules))
            .await
            .unwrap()
    }

    /// [`Rig::try_ingest`], which must not refuse.
    pub async fn ingest(&self, now: DateTime<Utc>, records: Vec<NewRecord>) -> IngestOutcome {
        self.try_ingest(now, records).await.unwrap()
    }

    /// Sets the clock and runs one pass.
    pub async fn pass_at(&self, now: DateTime<Utc>) -> PassSummary {
        self.clock.set(now);
        self.emitter.pass().await.unwrap()
    }

    /// The hourly report (every resource) at the clock's now.
    pub async fn report(&self) -> Vec<HourlyRow> {
        self.report_for(None).await
    }

    /// The hourly report of `resource` (or every resource) at the clock's now.
    pub async fn report_for(&self, resource: Option<&str>) -> Vec<HourlyRow> {
        let (now, grace) = (self.clock.now(), self.settings.emit.grace);
        let filter = ReportFilter {
            resource: resource.map(str::to_string),
            ..Default::default()
        };
        self.journal
            .read(move |c| usage::hourly_report(c, &filter, now, grace))
            .await
            .unwrap()
    }

    /// Every carry.
    pub async fn carries(&self) -> Vec<CarryRow> {
        self.journal
            .read(|c| usage::carry_report(c, &ReportFilter::default()))
            .await
            .unwrap()
    }

    /// What `meterd status` shows at the clock's now.
    pub async fn status(&self) -> JournalStatus {
        let now = self.clock.now();
        self.journal
            .read(move |c| status::status(c, now))
            .await
            .unwrap()
    }

    /// The report row of (resource, dimension, hour); there must be exactly one.
    pub async fn row(&self, resource: &str, dimension: &str, hour: DateTime<Utc>) -> HourlyRow {
        let hour = usage::fmt_time(hour.timestamp());
        let report = self.report().await;
        let mut rows = report
            .iter()
            .filter(|r| r.resource == resource && r.dimension == dimension && r.hour == hour);
        let row = rows
            .next()
            .unwrap_or_else(|| panic!("no row {resource}/{dimension}/{hour} in {report:#?}"))
            .clone();
        assert!(rows.next().is_none(), "one row per key: {report:#?}");
        row
    }
}

impl RigBuilder {
    /// Lines before the sections (`late_usage = "reject"`, `default_plan = ..`, whole tables).
    pub fn top(mut self, lines: &str) -> Self {
        self.top = lines.to_string();
        self
    }

    /// Lines added to `[marketplace]` (`timeout = "1s"`).
    pub fn marketplace(mut self, lines: &str) -> Self {
        self.marketplace = lines.to_string();
        self
    }

    /// `emit.grace` (default `5m`).
    pub fn grace(mut self, value: &str) -> Self {
        self.grace = value.to_string();
        self
    }

    /// `emit.retry_min` (default `30s`).
    pub fn retry_min(mut self, value: &str) -> Self {
        self.retry_min = value.to_string();
        self
    }

    /// Lines added to `[emit]` (`concurrency = 1`).
    pub fn emit(mut self, lines: &str) -> Self {
        self.emit = lines.to_string();
        self
    }

    /// What ends the configuration instead of [`DIMENSIONS`]: `[[dimensions]]` and `[[plans]]` tables.
    pub fn dimensions(mut self, tables: &str) -> Self {
        self.dimensions = tables.to_string();
        self
    }

    /// The emulator's configuration (its clock is set by the rig).
    pub fn emulator(mut self, config: EmulatorConfig) -> Self {
        self.emulator = config;
        self
    }

    /// A clock of the emulator's own instead of meterd's.
    pub fn emulator_clock(mut self, clock: SharedClock) -> Self {
        self.emulator_clock = Some(clock);
        self
    }

    /// Starts the emulator, opens the journal and builds the emitter.
    pub async fn start(self) -> Rig {
        let clock = ManualClock::new(self.start);
        let shared: SharedClock = Arc::new(clock.clone());
        let mut emu_config = self.emulator;
        emu_config.clock = Some(self.emulator_clock.unwrap_or_else(|| shared.clone()));
        let (addr, emu, _server) = Emulator::spawn_local(emu_config).await.unwrap();
        let base = format!("http://{addr}");
        let dir = tempfile::tempdir().unwrap();
        let journal_path = dir.path().join("journal.db");
        let text = format!(
            r#"{top}
[journal]
path = "{journal}"
[marketplace]
mode = "azure"
base_url = "{base}/api"
{marketplace}
[marketplace.auth]
kind = "static_token"
[emit]
grace = "{grace}"
retry_min = "{retry_min}"
{emit}
{dimensions}"#,
            top = self.top,
            journal = journal_path.display(),
            marketplace = self.marketplace,
            grace = self.grace,
            retry_min = self.retry_min,
            emit = self.emit,
            dimensions = self.dimensions,
        );
        let settings = Arc::new(config::load_str(&text, "test rig", &env()).unwrap());
        let journal = Journal::open(&journal_path).unwrap();
        let client = emit::client(&settings, &env(), shared.clone()).unwrap();
        let emitter = Emitter::new(settings.clone(), journal.clone(), shared, client);
        Rig {
            clock,
            emu,
            addr,
            base,
            settings,
            journal,
            emitter,
            dir,
        }
    }
}
