//! The shared journal's retention and `GET /v1/consumption?group_by=` in fleet mode, against the real PostgreSQL
//! named by `METERD_TEST_POSTGRES_URL` (each test its own database, dropped at the end; skipped with a message
//! when the variable is unset), the in-process emulator and one `ManualClock`. Records reach PostgreSQL through
//! the forward path (`PgJournal::forward`), hours are frozen and sent by the fleet emitter.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::rig::{Rig, env, march_subscription, t};
use meterd::clock::SharedClock;
use meterd::config::FleetSettings;
use meterd::emit;
use meterd::emulator::{EmulatorConfig, Plan};
use meterd::fleet::emit::FleetEmitter;
use meterd::journal::outbox::OutboxRecord;
use meterd::journal::pg::PgJournal;
use meterd::journal::pg::records::ForwardSummary;
use meterd::journal::pg::retention::{RetentionRules, RetentionSummary};
use meterd::journal::pg::testing::TestDb;
use meterd::journal::reads::Reads;
use meterd::journal::usage::NewRecord;
use serde_json::Value;
use std::sync::Arc;

const A: &str = "11111111-1111-4111-8111-111111111111";
const SECOND: i64 = 1_000_000;

const BILLING: &str = r#"[[dimensions]]
id = "api_calls"
[[dimensions]]
id = "gb_processed"

[[plans]]
id = "gold"
included = { api_calls = 10 }
"#;

fn emulator() -> EmulatorConfig {
    EmulatorConfig {
        subscriptions: vec![march_subscription(A, "gold")],
        plans: vec![Plan {
            id: "gold".into(),
            dimensions: None,
        }],
        ..Default::default()
    }
}

/// One record: (idempotency key, dimension, event time, whole units).
type Rec<'a> = (&'a str, &'a str, DateTime<Utc>, i64);

/// The shared journal, the emulator and settings for fleet emitters.
struct Fleet {
    rig: Rig,
    pg: PgJournal,
    db: TestDb,
}

impl Fleet {
    async fn start(name: &str, at: DateTime<Utc>) -> Option<Fleet> {
        let db = TestDb::create(name)?;
        let pg = PgJournal::connect(&db.url, 8).unwrap();
        pg.migrate().await.unwrap();
        let rig = Rig::at(at)
            .dimensions(BILLING)
            .emulator(emulator())
            .start()
            .await;
        Some(Fleet { rig, pg, db })
    }

    fn emitter(&self, replica: &str) -> FleetEmitter {
        let shared: SharedClock = Arc::new(self.rig.clock.clone());
        let client = emit::client(&self.rig.settings, &env(), shared.clone()).unwrap();
        FleetEmitter::new(
            self.rig.settings.clone(),
            FleetSettings {
                url: self.db.url.clone(),
                url_file: None,
                replica_id: replica.to_string(),
                max_wait: Duration::minutes(15),
                heartbeat: Duration::seconds(10),
                replica_timeout: Duration::seconds(30),
                lease: Duration::seconds(60),
                forward_batch: 1000,
                pool_size: 8,
            },
            PgJournal::connect(&self.db.url, 8).unwrap(),
            shared,
            client,
        )
    }

    /// `replica` forwards `recs`, received (and forwarded) at `now`.
    async fn forward(&self, replica: &str, now: DateTime<Utc>, recs: &[Rec<'_>]) -> ForwardSummary {
        let batch: Vec<OutboxRecord> = recs
            .iter()
            .enumerate()
            .map(|(i, (key, dim, time, units))| OutboxRecord {
                seq: i as i64 + 1,
                idem_key: key.to_string(),
                resource: A.to_string(),
                plan: String::new(),
                dimension: dim.to_string(),
                event_time: time.timestamp(),
                quantity: units * SECOND,
                received_at: now.timestamp(),
            })
            .collect();
        self.pg
            .forward(
                replica,
                &batch,
                &meterd::fleet::rules(&self.rig.settings, now),
            )
            .await
            .unwrap()
    }

    /// One fleet pass of replica `r1` at `now`.
    async fn pass_at(&self, now: DateTime<Utc>) -> meterd::emit::PassSummary {
        self.rig.clock.set(now);
        self.emitter("r1").pass().await.unwrap()
    }

    /// A replica's heartbeat at `at` with forward watermark `watermark`.
    async fn heartbeat(&self, replica: &str, at: DateTime<Utc>, watermark: DateTime<Utc>) {
        let c = self.pg.client().await.unwrap();
        c.execute(
            "INSERT INTO replicas (replica_id, started_at, heartbeat_at, watermark, version) VALUES ($1, $2, $2, $3, 'test')
             ON CONFLICT (replica_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, watermark = excluded.watermark",
            &[&replica, &at.timestamp(), &watermark.timestamp()],
        )
        .await
        .unwrap();
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let c = self.pg.client().await.unwrap();
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn retention(&self, now: DateTime<Utc>, retention: Duration) -> RetentionSummary {
        self.pg
            .apply_retention(&RetentionRules::new(now, retention, Duration::days(7)))
            .await
            .unwrap()
    }

    fn reads(&self) -> Reads {
        Reads::Fleet {
            pg: self.pg.clone(),
            replica_timeout: Duration::seconds(30),
        }
    }

    async fn grouped(&self, by: meterd::billing::GroupBy) -> Vec<Value> {
        self.reads()
            .consumption_grouped(A.to_string(), None, i64::MIN, i64::MAX, by)
            .await
            .unwrap()
    }
}

fn g(dimension: &str, period: &str, quantity: &str) -> Value {
    serde_json::json!({"dimension": dimension, "period": period, "quantity": quantity})
}

/// Settled hours older than `journal.retention` are deleted with their totals, and their months stay in
/// consumption by month and by dimension; a pending event of such an hour, its total, and a total not frozen
/// yet are kept. A second run deletes nothing and adds nothing to the months again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_hours_past_retention_go_and_their_months_stay() {
    use meterd::billing::GroupBy;
    let Some(f) = Fleet::start(
        "settled_hours_past_retention_go_and_their_months_stay",
        t("2026-02-10T09:10:00Z"),
    )
    .await
    else {
        return;
    };
    let feb10 = |hm: &str| t(&format!("2026-02-10T{hm}:00Z"));
    let feb11 = |hm: &str| t(&format!("2026-02-11T{hm}:00Z"));
    f.forward(
        "r1",
        feb10("10:10"),
        &[
            ("k1", "api_calls", feb10("09:05"), 7),
            ("k2", "api_calls", feb10("09:40"), 5),
            ("k3", "gb_processed", feb10("09:20"), 3),
            ("k4", "api_calls", feb10("10:05"), 4),
        ],
    )
    .await;
    let pass = f.pass_at(feb10("11:06")).await;
    assert_eq!(pass.frozen, 3, "{pass:?}");
    // 11 Feb 09:00 is frozen but not sent (pending); 11 Feb 12:00 is never frozen.
    f.forward(
        "r1",
        feb11("09:10"),
        &[("k5", "api_calls", feb11("09:05"), 2)],
    )
    .await;
    f.pg.freeze(
        feb11("10:06"),
        meterd::journal::pg::freeze::FreezeRule {
            grace: f.rig.settings.emit.grace,
            safety_margin: f.rig.settings.emit.safety_margin,
            max_wait: Duration::minutes(15),
            replica_timeout: Duration::seconds(30),
        },
    )
    .await
    .unwrap();
    f.forward(
        "r1",
        feb11("12:10"),
        &[("k6", "gb_processed", feb11("12:05"), 1)],
    )
    .await;
    let feb = "2026-02-01T00:00:00Z";
    let month_before = f.grouped(GroupBy::Month).await;
    assert_eq!(
        month_before,
        [g("api_calls", feb, "18"), g("gb_processed", feb, "4")]
    );
    let dimension_before = f.grouped(GroupBy::Dimension).await;

    // 14 March, retention 30 days: every February hour is past it.
    let s = f
        .retention(t("2026-03-14T00:00:00Z"), Duration::days(30))
        .await;
    assert_eq!((s.events, s.hourly_totals), (3, 3), "{s:?}");
    assert_eq!(
        f.scalar("SELECT COUNT(*) FROM outbound_events WHERE state = 'pending'")
            .await,
        1,
        "the pending event is kept"
    );
    assert_eq!(
        f.scalar("SELECT COUNT(*) FROM outbound_events").await,
        1,
        "only the pending event is left"
    );
    assert_eq!(
        f.scalar("SELECT COUNT(*) FROM hourly_totals").await,
        2,
        "the pending event's total and the unfrozen total are kept"
    );
    assert_eq!(f.grouped(GroupBy::Month).await, month_before);
    assert_eq!(f.grouped(GroupBy::Dimension).await, dimension_before);
    assert_eq!(
        f.grouped(GroupBy::Hour).await,
        [
            g("api_calls", "2026-02-11T09:00:00Z", "2"),
            g("gb_processed", "2026-02-11T12:00:00Z", "1")
        ],
        "by hour: only the hours kept"
    );

    let again = f
        .retention(t("2026-03-14T00:00:00Z"), Duration::days(30))
        .await;
    assert_eq!(
        (again.events, again.hourly_totals),
        (0, 0),
        "nothing more: {again:?}"
    );
    assert_eq!(f.grouped(GroupBy::Month).await, month_before);

    // Once a pass settled the pending event (expired past its window), the next run deletes it too.
    let cutoff = t("2026-02-12T00:00:00Z").timestamp();
    f.pass_at(t("2026-03-14T00:00:00Z")).await;
    assert_eq!(
        f.scalar(&format!(
            "SELECT COUNT(*) FROM outbound_events WHERE state = 'pending' AND hour < {cutoff}"
        ))
        .await,
        0
    );
    let s = f
        .retention(t("2026-03-14T00:00:00Z"), Duration::days(30))
        .await;
    assert!(s.events >= 1, "{s:?}");
    assert_eq!(
        f.scalar(&format!(
            "SELECT COUNT(*) FROM outbound_events WHERE hour < {cutoff}"
        ))
        .await,
        0,
        "no settled February event is left"
    );
}

/// A record is compacted past `ingest.dedupe_window` only once no replica heard from inside the window can still
/// forward a duplicate of it: replica B received a client's retry of `dup` an hour after A did, and is stuck
/// (watermark 30 minutes after A's copy). Eight days later `old` is compacted, `dup` is kept, and B's late copy is
/// deduplicated (the total does not grow). A replica silent for longer than the window does not hold anything
/// back. Once B has caught up, `dup` goes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_inside_the_window_is_still_deduplicated_after_compaction() {
    let t0 = t("2026-03-10T09:05:00Z");
    let Some(f) = Fleet::start(
        "a_duplicate_inside_the_window_is_still_deduplicated_after_compaction",
        t0,
    )
    .await
    else {
        return;
    };
    let old_at = t0 - Duration::days(8);
    f.forward("a", old_at, &[("old", "api_calls", old_at, 1)])
        .await;
    let first = f
        .forward(
            "a",
            t0,
            &[("dup", "api_calls", t0 - Duration::minutes(1), 3)],
        )
        .await;
    assert_eq!(first.inserted, 1);

    let now = t0 + Duration::days(7) + Duration::hours(2);
    f.heartbeat("a", now, now - Duration::seconds(5)).await;
    f.heartbeat("b", now, t0 + Duration::minutes(30)).await;
    // Heard from last more than the window ago: no longer counted.
    f.heartbeat("c", now - Duration::days(8), t0 - Duration::days(9))
        .await;
    let s = f.retention(now, Duration::days(730)).await;
    assert_eq!(
        s.records_before,
        (t0 + Duration::minutes(30) - Duration::days(7)).timestamp(),
        "{s:?}"
    );
    assert_eq!(s.records, 1, "only `old`: {s:?}");
    assert_eq!(
        f.scalar("SELECT COUNT(*) FROM records WHERE idem_key = 'dup'")
            .await,
        1
    );

    // B forwards its copy (received an hour after A's, inside the window): counted once.
    let late = f
        .forward(
            "b",
            now,
            &[("dup", "api_calls", t0 - Duration::minutes(1), 3)],
        )
        .await;
    assert_eq!((late.inserted, late.duplicates), (0, 1), "{late:?}");
    assert_eq!(
        f.scalar(&format!(
            "SELECT COALESCE(SUM(quantity), 0)::bigint FROM hourly_totals
             WHERE dimension = 'api_calls' AND hour = {}",
            t("2026-03-10T09:00:00Z").timestamp()
        ))
        .await,
        3 * SECOND,
        "the hour of `dup` holds it once"
    );

    f.heartbeat("b", now, now - Duration::seconds(5)).await;
    let s = f.retention(now, Duration::days(730)).await;
    assert_eq!(s.records, 1, "{s:?}");
    assert_eq!(f.scalar("SELECT COUNT(*) FROM records").await, 0);
}

/// Four replicas running retention at once (chunks of three rows) delete every settled event, total and record
/// exactly once: the monthly sums hold the exact usage (nothing added twice), and the balance of the current term
/// (consumed, overage frozen and accepted, remainder) is the same after the deletion as before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_running_retention_at_once_delete_each_row_once() {
    use meterd::billing::GroupBy;
    let start = t("2026-03-10T00:00:00Z");
    let Some(f) = Fleet::start(
        "replicas_running_retention_at_once_delete_each_row_once",
        start,
    )
    .await
    else {
        return;
    };
    let mut keys = Vec::new();
    for h in 0..20 {
        keys.push((format!("a{h}"), "api_calls", h, 1 + h % 3));
        keys.push((format!("g{h}"), "gb_processed", h, 2));
    }
    let recs: Vec<Rec<'_>> = keys
        .iter()
        .map(|(k, d, h, q)| {
            (
                k.as_str(),
                *d,
                start + Duration::hours(*h) + Duration::minutes(5),
                *q,
            )
        })
        .collect();
    f.forward("r1", t("2026-03-10T20:01:00Z"), &recs).await;
    let pass = f.pass_at(t("2026-03-10T20:06:00Z")).await;
    assert_eq!(pass.frozen, 40, "{pass:?}");
    assert_eq!(
        f.scalar("SELECT COUNT(*) FROM outbound_events WHERE state <> 'pending'")
            .await,
        40,
        "every hour settled (accepted, or covered by the allowance)"
    );
    let total: i64 = recs.iter().map(|r| r.3).sum::<i64>() * SECOND;
    let now = t("2026-03-18T00:00:00Z");
    let balance = || async {
        f.reads()
            .balance(f.rig.settings.clone(), A.to_string(), now)
            .await
            .unwrap()
    };
    let before = balance().await;
    let api = before.iter().find(|d| d.dimension == "api_calls").unwrap();
    assert_ne!(api.overage_frozen, "0", "{api:?}");
    let month_before = f.grouped(GroupBy::Month).await;

    let mut runs = Vec::new();
    for _ in 0..4 {
        let pg = PgJournal::connect(&f.db.url, 2).unwrap();
        runs.push(tokio::spawn(async move {
            let mut rules = RetentionRules::new(now, Duration::hours(25), Duration::days(7));
            rules.chunk = 3;
            pg.apply_retention(&rules).await
        }));
    }
    let mut sum = RetentionSummary::default();
    for r in runs {
        let s = r.await.unwrap().unwrap();
        sum.events += s.events;
        sum.hourly_totals += s.hourly_totals;
        sum.records += s.records;
    }
    assert_eq!(
        (sum.events, sum.hourly_totals, sum.records),
        (40, 40, 40),
        "{sum:?}"
    );
    for table in ["outbound_events", "hourly_totals", "records"] {
        assert_eq!(
            f.scalar(&format!("SELECT COUNT(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    assert_eq!(
        f.scalar("SELECT SUM(quantity)::bigint FROM usage_months")
            .await,
        total
    );
    assert_eq!(
        f.scalar("SELECT SUM(events)::bigint FROM retired_overage")
            .await,
        40
    );
    assert_eq!(f.grouped(GroupBy::Month).await, month_before);
    assert_eq!(balance().await, before, "the balance is the same after");
}

/// Serves `GET /v1/consumption` (and every route) over `reads` on an ephemeral port; returns its base URL.
async fn serve(rig: &Rig, reads: Reads) -> (String, tokio::task::JoinHandle<()>) {
    let state = meterd::ingest::AppState {
        settings: rig.settings.clone(),
        journal: rig.journal.clone(),
        reads,
        clock: Arc::new(rig.clock.clone()),
        token: None,
        emitter: None,
        metrics: None,
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        liveness: Arc::new(meterd::ops::Liveness::default()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, meterd::ingest::router(state))
            .await
            .unwrap();
    });
    (base, server)
}

async fn get(base: &str, query: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}/v1/consumption?resource={A}&{query}"))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The same usage through single mode (SQLite journal and emitter) and fleet mode (forwarded into the shared
/// journal, sent by the fleet emitter), both with retention applied, gives the same JSON for every `group_by`
/// but `pool` (and the same per-dimension totals without it); fleet mode answers `group_by=pool` with a 400 that
/// says why. Before, fleet mode refused every `group_by`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_in_fleet_mode_answers_as_single_mode() {
    let Some(f) = Fleet::start(
        "group_by_in_fleet_mode_answers_as_single_mode",
        t("2026-02-27T10:00:00Z"),
    )
    .await
    else {
        return;
    };
    let single = Rig::at(t("2026-02-27T10:00:00Z"))
        .dimensions(BILLING)
        .emulator(emulator())
        .start()
        .await;
    // Days of usage, each sent by a pass of both: (received at, records, pass at).
    let days: Vec<(&str, Vec<Rec<'_>>, &str)> = vec![
        (
            "2026-02-27T12:00:00Z",
            vec![
                ("f1", "api_calls", t("2026-02-27T10:05:00Z"), 6),
                ("f2", "api_calls", t("2026-02-27T11:15:00Z"), 3),
                ("f3", "gb_processed", t("2026-02-27T11:20:00Z"), 2),
            ],
            "2026-02-27T12:06:00Z",
        ),
        (
            "2026-03-01T02:00:00Z",
            vec![
                ("m1", "api_calls", t("2026-03-01T00:05:00Z"), 4),
                ("m2", "gb_processed", t("2026-03-01T01:05:00Z"), 5),
            ],
            "2026-03-01T02:06:00Z",
        ),
        (
            "2026-03-09T23:30:00Z",
            vec![
                ("n1", "api_calls", t("2026-03-09T22:05:00Z"), 2),
                ("n2", "api_calls", t("2026-03-09T23:10:00Z"), 1),
                ("n3", "gb_processed", t("2026-03-09T22:50:00Z"), 7),
            ],
            "2026-03-10T00:06:00Z",
        ),
        (
            // Not sent: the open hour.
            "2026-03-10T00:30:00Z",
            vec![("o1", "api_calls", t("2026-03-10T00:10:00Z"), 8)],
            "",
        ),
    ];
    for (received, recs, pass) in &days {
        let received = t(received);
        f.forward("r1", received, recs).await;
        let records: Vec<NewRecord> = recs
            .iter()
            .map(|(k, d, time, q)| NewRecord {
                resource: A.to_string(),
                plan: None,
                dimension: d.to_string(),
                time: *time,
                quantity: meterd::quantity::Micros(q * SECOND),
                key: Some(k.to_string()),
            })
            .collect();
        single.ingest(received, records).await;
        if !pass.is_empty() {
            f.pass_at(t(pass)).await;
            single.pass_at(t(pass)).await;
        }
    }
    // Retention of five days at 10 March 00:40: the February and 1 March hours go into the months.
    let now = t("2026-03-10T00:40:00Z");
    let fleet_deleted = f.retention(now, Duration::days(5)).await;
    let (single_deleted, _) = single
        .journal
        .write(move |c| {
            meterd::journal::usage::apply_retention(c, now, Duration::days(5), Duration::days(7))
        })
        .await
        .unwrap();
    assert_eq!(fleet_deleted.hourly_totals, 5, "{fleet_deleted:?}");
    assert_eq!(single_deleted, 5);

    let (single_base, s1) = serve(&single, Reads::Local(single.journal.clone())).await;
    let (fleet_base, s2) = serve(&f.rig, f.reads()).await;
    let queries = [
        "group_by=dimension",
        "group_by=hour",
        "group_by=day",
        "group_by=month",
        "group_by=month&dimension=gb_processed",
        "group_by=day&from=2026-03-01T00:00:00Z&to=2026-03-10T00:00:00Z",
        "group_by=hour&dimension=api_calls&from=2026-03-09T23:00:00Z",
        "group_by=%20month%20",
        "",
    ];
    for q in queries {
        let (ss, sj) = get(&single_base, q).await;
        let (fs, fj) = get(&fleet_base, q).await;
        assert_eq!((ss, fs), (200, 200), "{q}: {sj} / {fj}");
        assert_eq!(fj, sj, "{q}");
    }
    // The answers are not empty, and the months reach back past retention.
    let (_, by_month) = get(&fleet_base, "group_by=month").await;
    assert_eq!(
        by_month["groups"],
        serde_json::json!([
            g("api_calls", "2026-02-01T00:00:00Z", "9"),
            g("api_calls", "2026-03-01T00:00:00Z", "15"),
            g("gb_processed", "2026-02-01T00:00:00Z", "2"),
            g("gb_processed", "2026-03-01T00:00:00Z", "12"),
        ])
    );
    let (_, by_day) = get(&fleet_base, "group_by=day").await;
    assert_eq!(
        by_day["groups"],
        serde_json::json!([
            g("api_calls", "2026-03-09T00:00:00Z", "3"),
            g("api_calls", "2026-03-10T00:00:00Z", "8"),
            g("gb_processed", "2026-03-09T00:00:00Z", "7"),
        ]),
        "by day: only the hours kept"
    );

    let (status, body) = get(&fleet_base, "group_by=pool").await;
    assert_eq!(status, 400, "{body}");
    let text = body.to_string();
    assert!(
        text.contains("fleet mode") && text.contains("pools"),
        "{text}"
    );
    let (status, _) = get(&single_base, "group_by=pool").await;
    assert_eq!(status, 200);
    let (status, _) = get(&fleet_base, "group_by=week").await;
    assert_eq!(status, 400);
    s1.abort();
    s2.abort();
}

/// The hourly task every replica runs (`meterd::fleet::retention_loop`, started by the heartbeat task) applies
/// `journal.retention` and `ingest.dedupe_window` from the settings by the injected clock, and ends when stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicas_retention_task_applies_the_settings() {
    let start = t("2026-03-10T09:00:00Z");
    let Some(f) = Fleet::start("the_replicas_retention_task_applies_the_settings", start).await
    else {
        return;
    };
    f.forward(
        "r1",
        t("2026-03-10T09:30:00Z"),
        &[("k", "api_calls", start, 12)],
    )
    .await;
    f.pass_at(t("2026-03-10T10:06:00Z")).await;
    assert_eq!(f.scalar("SELECT COUNT(*) FROM outbound_events").await, 1);
    // `journal.retention` is 730 days by default: a day past it, the hour goes.
    f.rig.clock.set(start + Duration::days(731));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(meterd::fleet::retention_loop(
        f.rig.settings.clone(),
        f.pg.clone(),
        Arc::new(f.rig.clock.clone()),
        std::time::Duration::from_millis(20),
        stop,
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Events and records go in separate transactions of the same run: wait for both.
    while f
        .scalar("SELECT (SELECT COUNT(*) FROM outbound_events) + (SELECT COUNT(*) FROM records)")
        .await
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the task never applied retention"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        f.scalar("SELECT SUM(quantity)::bigint FROM usage_months")
            .await,
        12 * SECOND
    );
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

/// A balance in fleet mode answers as in single mode for the same usage, before and after retention deletes the
/// term's first hours, with an hour of the term under another plan than the subscription's: `usage` is all
/// usage of the term (every plan's), and the deleted hours' usage, frozen and accepted overage stay counted.
/// Before, fleet mode's `usage` was the current plan's consumption only, and retention took nothing of it along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_in_fleet_mode_answers_as_single_mode_across_plans_and_retention() {
    let Some(f) = Fleet::start(
        "a_balance_in_fleet_mode_answers_as_single_mode",
        t("2026-03-02T10:00:00Z"),
    )
    .await
    else {
        return;
    };
    let single = Rig::at(t("2026-03-02T10:00:00Z"))
        .dimensions(BILLING)
        .emulator(emulator())
        .start()
        .await;
    // (key, plan named by the record, dimension, time, units), all received at 2026-03-02T12:00.
    let recs: [(&str, &str, &str, &str, i64); 4] = [
        ("p1", "", "api_calls", "2026-03-02T10:05:00Z", 8),
        ("p2", "silver", "api_calls", "2026-03-02T10:20:00Z", 5),
        ("p3", "", "api_calls", "2026-03-02T11:05:00Z", 7),
        ("p4", "", "gb_processed", "2026-03-02T11:10:00Z", 3),
    ];
    let received = t("2026-03-02T12:00:00Z");
    let batch: Vec<OutboxRecord> = recs
        .iter()
        .enumerate()
        .map(|(i, (key, plan, dim, time, units))| OutboxRecord {
            seq: i as i64 + 1,
            idem_key: key.to_string(),
            resource: A.to_string(),
            plan: plan.to_string(),
            dimension: dim.to_string(),
            event_time: t(time).timestamp(),
            quantity: units * SECOND,
            received_at: received.timestamp(),
        })
        .collect();
    f.pg.forward(
        "r1",
        &batch,
        &meterd::fleet::rules(&f.rig.settings, received),
    )
    .await
    .unwrap();
    let records: Vec<NewRecord> = recs
        .iter()
        .map(|(key, plan, dim, time, units)| NewRecord {
            resource: A.to_string(),
            plan: (!plan.is_empty()).then(|| plan.to_string()),
            dimension: dim.to_string(),
            time: t(time),
            quantity: meterd::quantity::Micros(units * SECOND),
            key: Some(key.to_string()),
        })
        .collect();
    single.ingest(received, records).await;
    f.pass_at(t("2026-03-02T12:06:00Z")).await;
    single.pass_at(t("2026-03-02T12:06:00Z")).await;

    let now = t("2026-03-04T00:40:00Z");
    let balances = || async {
        let fleet = f
            .reads()
            .balance(f.rig.settings.clone(), A.to_string(), now)
            .await
            .unwrap();
        let local = Reads::Local(single.journal.clone())
            .balance(single.settings.clone(), A.to_string(), now)
            .await
            .unwrap();
        (local, fleet)
    };
    let (local, fleet) = balances().await;
    assert_eq!(fleet, local);
    let api = local.iter().find(|d| d.dimension == "api_calls").unwrap();
    assert_eq!(api.usage, "20", "{api:?}");
    // Retention of 30 hours at 4 March 00:40 deletes both hours of 2 March.
    let fleet_deleted = f.retention(now, Duration::hours(30)).await;
    let (single_deleted, _) = single
        .journal
        .write(move |c| {
            meterd::journal::usage::apply_retention(c, now, Duration::hours(30), Duration::days(7))
        })
        .await
        .unwrap();
    assert_eq!(fleet_deleted.hourly_totals, 4, "{fleet_deleted:?}");
    assert_eq!(single_deleted, 4);
    let (local_after, fleet_after) = balances().await;
    assert_eq!(local_after, local, "single mode after retention");
    assert_eq!(fleet_after, local, "fleet mode after retention");
}
