//! Fleet emission in process, against the real PostgreSQL named by `METERD_TEST_POSTGRES_URL` (each test its own
//! database, dropped at the end; skipped with a message when the variable is unset) and the in-process emulator on
//! one `ManualClock`. Totals and replica heartbeats are written straight into PostgreSQL (as the forwarder and the
//! heartbeat task of part A would), so these tests exercise only the freeze, claim, lease, fence, billing and send.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::rig::{Rig, env, march_subscription, t};
use meterd::clock::{Clock, ManualClock, SharedClock};
use meterd::config::FleetSettings;
use meterd::emit;
use meterd::emulator::{EmulatorConfig, Phase, Plan, Route};
use meterd::fleet::emit::FleetEmitter;
use meterd::journal::outbound::{Settle, SettlePolicy};
use meterd::journal::pg::PgJournal;
use meterd::journal::pg::freeze::FreezeRule;
use meterd::journal::pg::replicas::ReplicaRow;
use meterd::journal::pg::testing::TestDb;
use meterd::outcome::Outcome;
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

/// The shared journal, the emulator and settings for fleet emitters.
struct Fleet {
    rig: Rig,
    pg: PgJournal,
    db: TestDb,
}

impl Fleet {
    async fn start(name: &str) -> Option<Fleet> {
        Fleet::start_with(name, "").await
    }

    /// With lines added to `[emit]`.
    async fn start_with(name: &str, emit: &str) -> Option<Fleet> {
        Fleet::start_billing(name, emit, BILLING).await
    }

    /// With lines added to `[emit]` and `billing` as the dimensions and plans.
    async fn start_billing(name: &str, emit: &str, billing: &str) -> Option<Fleet> {
        let db = TestDb::create(name)?;
        let pg = PgJournal::connect(&db.url, 16).unwrap();
        pg.migrate().await.unwrap();
        let emu_config = EmulatorConfig {
            subscriptions: vec![march_subscription(A, "gold")],
            plans: vec![Plan {
                id: "gold".into(),
                dimensions: None,
            }],
            ..Default::default()
        };
        let rig = Rig::at(t("09:00"))
            .emit(emit)
            .dimensions(billing)
            .emulator(emu_config)
            .start()
            .await;
        Some(Fleet { rig, pg, db })
    }

    fn clock(&self) -> &ManualClock {
        &self.rig.clock
    }

    /// `[fleet]` of replica `replica` on this database (the defaults, `lease` given).
    fn fleet_settings(&self, replica: &str, lease: Duration) -> FleetSettings {
        FleetSettings {
            url: self.db.url.clone(),
            url_file: None,
            replica_id: replica.to_string(),
            max_wait: Duration::minutes(15),
            heartbeat: Duration::seconds(10),
            replica_timeout: Duration::seconds(30),
            lease,
            forward_batch: 1000,
            pool_size: 8,
        }
    }

    /// A replica's fleet emitter, with `lease` (by the database clock).
    fn emitter(&self, replica: &str, lease: Duration) -> FleetEmitter {
        let shared: SharedClock = Arc::new(self.rig.clock.clone());
        let client = emit::client(&self.rig.settings, &env(), shared.clone()).unwrap();
        FleetEmitter::new(
            self.rig.settings.clone(),
            self.fleet_settings(replica, lease),
            PgJournal::connect(&self.db.url, 8).unwrap(),
            shared,
            client,
        )
    }

    /// Adds `micros` to the total of (A, plan '', dimension, hour), as a forward would.
    async fn total(&self, dimension: &str, hour: DateTime<Utc>, micros: i64) {
        let c = self.pg.client().await.unwrap();
        c.execute(
            "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records) VALUES ($1, '', $2, $3, $4, 1)
             ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET quantity = hourly_totals.quantity + excluded.quantity",
            &[&A, &dimension, &hour.timestamp(), &micros],
        )
        .await
        .unwrap();
    }

    /// A replica's heartbeat at `at` with forward watermark `watermark` (replica clock, unix seconds).
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

    /// Every outbound event: (hour, dimension, state, quantity, send_quantity, ambiguous).
    async fn events(&self) -> Vec<(i64, String, String, i64, Option<i64>, bool)> {
        let c = self.pg.client().await.unwrap();
        c.query(
            "SELECT hour, dimension, state, quantity, send_quantity, ambiguous FROM outbound_events ORDER BY hour, dimension",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get::<_, i64>(5) != 0))
        .collect()
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let c = self.pg.client().await.unwrap();
        c.query_one(sql, &[]).await.unwrap().get(0)
    }

    fn rule(&self) -> FreezeRule {
        FreezeRule {
            grace: self.rig.settings.emit.grace,
            safety_margin: self.rig.settings.emit.safety_margin,
            max_wait: Duration::minutes(15),
            replica_timeout: Duration::seconds(30),
        }
    }
}

/// A live replica that has not forwarded past the hour holds its freeze back; its watermark reaching `H + 1h`
/// releases it, and the hour is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_waits_for_a_live_replicas_watermark() {
    let Some(f) = Fleet::start("freeze_waits_for_a_live_replicas_watermark").await else {
        return;
    };
    let e = f.emitter("r1", Duration::seconds(60));
    f.total("api_calls", t("09:00"), 12 * SECOND).await;
    // 10:06: the hour is closed (grace 5m), but replica r2 has forwarded only up to 09:59:59.
    f.heartbeat("r2", t("10:06"), t("09:59:59")).await;
    f.clock().set(t("10:06"));
    let pass = e.pass().await.unwrap();
    assert_eq!(pass.frozen, 0, "{pass:?}");
    assert!(f.events().await.is_empty());
    assert!(f.rig.emu.received_events().is_empty(), "no open-hour send");
    // r2 forwards past 10:00: the next pass freezes and sends the hour.
    f.heartbeat("r2", t("10:07"), t("10:00")).await;
    f.clock().set(t("10:07"));
    let pass = e.pass().await.unwrap();
    assert_eq!(pass.frozen, 1, "{pass:?}");
    let events = f.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].2, "accepted", "{events:?}");
    // 12 used, 10 included: 2 billed.
    assert_eq!(events[0].4, Some(2 * SECOND));
    let accepted = f.rig.emu.accepted_events();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].quantity, 2.0);
}

/// A live replica that never catches up holds the hour back only until `H + 1h + grace + max_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_stops_waiting_after_max_wait() {
    let Some(f) = Fleet::start("freeze_stops_waiting_after_max_wait").await else {
        return;
    };
    let e = f.emitter("r1", Duration::seconds(60));
    f.total("api_calls", t("09:00"), 3 * SECOND).await;
    for (now, frozen) in [("10:19:59", 0), ("10:20:00", 1)] {
        // r2 stays alive (fresh heartbeat) and stuck at 09:30.
        f.heartbeat("r2", t(now), t("09:30")).await;
        f.clock().set(t(now));
        let pass = e.pass().await.unwrap();
        assert_eq!(pass.frozen, frozen, "at {now}: {pass:?}");
    }
    assert_eq!(f.events().await.len(), 1);
}

/// A replica whose heartbeat expired (older than `fleet.replica_timeout`) stops holding the hour back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_stops_waiting_for_a_replica_whose_heartbeat_expired() {
    let Some(f) = Fleet::start("freeze_stops_waiting_for_a_replica_whose_heartbeat_expired").await
    else {
        return;
    };
    let e = f.emitter("r1", Duration::seconds(60));
    f.total("api_calls", t("09:00"), 3 * SECOND).await;
    f.heartbeat("gone", t("10:06"), t("09:30")).await;
    // Timeout 30 s: live at 10:06:30, gone at 10:06:31.
    f.clock().set(t("10:06:30"));
    assert_eq!(e.pass().await.unwrap().frozen, 0);
    f.clock().set(t("10:06:31"));
    assert_eq!(e.pass().await.unwrap().frozen, 1);
    // 3 used of 10 included: nothing to send.
    assert_eq!(f.events().await[0].2, "included");
}

/// A replica whose clock runs two hours ahead of the database's (another host, NTP broken) sees the database's
/// open hour as closed and long past `max_wait`. It must not freeze it: the hours a freeze closes are judged by
/// the database clock whenever the replica's is ahead. An hour closed by the database's clock is still frozen.
/// Its heartbeat's watermark is moved back onto the database's time line, so it does not release an hour for the
/// others either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_runs_ahead_never_freezes_the_open_hour() {
    let Some(f) = Fleet::start("a_replica_whose_clock_runs_ahead").await else {
        return;
    };
    let db_now = f
        .scalar("SELECT extract(epoch from clock_timestamp())::bigint")
        .await;
    let open = DateTime::from_timestamp(db_now - db_now.rem_euclid(3600), 0).unwrap();
    // The hour open by the database's clock, and one closed two hours before it.
    f.total("api_calls", open, 12 * SECOND).await;
    f.total("api_calls", open - Duration::hours(2), 12 * SECOND)
        .await;
    let e = f.emitter("ahead", Duration::seconds(60));
    f.clock()
        .set(DateTime::from_timestamp(db_now, 0).unwrap() + Duration::hours(2));
    let pass = e.pass().await.unwrap();
    assert_eq!(pass.frozen, 1, "only the closed hour: {pass:?}");
    let hours: Vec<i64> = f.events().await.iter().map(|e| e.0).collect();
    assert_eq!(hours, vec![(open - Duration::hours(2)).timestamp()]);
    let through = f
        .scalar("SELECT value FROM meta WHERE key = 'frozen_through'")
        .await;
    assert!(
        through <= open.timestamp(),
        "frozen through {through}, open hour {}",
        open.timestamp()
    );

    // A heartbeat of `replica` by its clock at `at`, every record before `at - 5 s` forwarded: the watermark
    // stored.
    let published = async |replica: &str, at: i64| -> i64 {
        f.pg.heartbeat(&ReplicaRow {
            replica_id: replica.into(),
            started_at: at,
            heartbeat_at: at,
            watermark: at - 5,
            unforwarded: 0,
            version: "test".into(),
        })
        .await
        .unwrap();
        f.scalar(&format!(
            "SELECT watermark FROM replicas WHERE replica_id = '{replica}'"
        ))
        .await
    };
    // Its watermark lands on the database's time line ...
    let stored = published("ahead", f.clock().now().timestamp()).await;
    assert!(
        (db_now - 5..=db_now + 60).contains(&stored),
        "watermark {stored}, database clock {db_now}"
    );
    // ... and a replica behind the database publishes its watermark as it is.
    assert_eq!(published("behind", db_now - 7200).await, db_now - 7205);
}

/// Replicas freezing the same hours at the same moment write one event per key between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_freezing_the_same_keys_at_once_write_one_event_each() {
    let Some(f) = Fleet::start("two_replicas_freezing_the_same_keys_at_once").await else {
        return;
    };
    for round in 0..5i64 {
        let hour = t("03:00") + Duration::hours(round);
        for d in ["api_calls", "gb_processed"] {
            f.total(d, hour, SECOND).await;
        }
        let now = hour + Duration::minutes(66);
        let barrier = Arc::new(tokio::sync::Barrier::new(4));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (pg, rule, barrier) = (
                PgJournal::connect(&f.db.url, 2).unwrap(),
                f.rule(),
                barrier.clone(),
            );
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                pg.freeze(now, rule).await.unwrap().frozen
            }));
        }
        let mut frozen = 0;
        for task in tasks {
            frozen += task.await.unwrap();
        }
        assert_eq!(
            frozen, 2,
            "round {round}: two keys frozen once between the replicas"
        );
    }
    assert_eq!(f.scalar("SELECT COUNT(*) FROM outbound_events").await, 10);
    assert_eq!(
        f.scalar("SELECT COUNT(*) FROM hourly_totals WHERE outbound_id IS NULL")
            .await,
        0
    );
}

/// The plan of the claim as the emission loop runs it on a fresh connection: `settings` set in the transaction
/// first (what `PgJournal::settle_and_mark` sends before the claim), then the claim prepared and explained
/// (`EXPLAIN EXECUTE` takes the plan the plan cache would, custom or generic), as text.
async fn claim_plan(f: &Fleet, settings: &str, now: DateTime<Utc>) -> String {
    use meterd::journal::pg::outbound::CLAIM_SQL;
    let mut c = tokio_postgres::connect(f.db.url.expose(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(c.1);
    let tx = c.0.transaction().await.unwrap();
    tx.batch_execute(settings).await.unwrap();
    tx.batch_execute(&format!(
        "PREPARE claim(bigint, bigint, text, bigint, text, bigint[]) AS {}",
        *CLAIM_SQL
    ))
    .await
    .unwrap();
    let rows = tx
        .query(
            &format!(
                "EXPLAIN EXECUTE claim({}, 25, 'r', 60, 'x', '{{}}')",
                now.timestamp()
            ),
            &[],
        )
        .await
        .unwrap();
    let lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    lines.join("\n")
}

/// The claim reads the `(state, hour)` index in order and stops at its 25th row, from its first execution on a
/// connection. Without the generic plan set before it, PostgreSQL planned the first five executions per connection
/// with the parameters' values and statistics that lagged the freeze: a bitmap scan of every due row and a sort
/// (120 ms per claim at 45,000 pending in the benchmark, against 0.6 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_reads_the_state_index_in_order_from_its_first_execution() {
    let Some(f) = Fleet::start("the_claim_reads_the_state_index_in_order").await else {
        return;
    };
    // 20,000 keys over 20 closed hours, frozen at once (no ANALYZE after it, as right after a freeze).
    let first = t("2026-03-09T13:00:00Z").timestamp();
    f.pg.client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records)
             SELECT lpad(to_hex(i / 20), 8, '0') || '-1111-4111-8111-' || lpad(to_hex(i / 20), 12, '0'),
                    '', 'api_calls', $1::bigint + (i % 20) * 3600, 1000000, 1
             FROM generate_series(0::bigint, 19999) AS i",
            &[&first],
        )
        .await
        .unwrap();
    let now = t("2026-03-10T09:30:00Z");
    assert_eq!(f.pg.freeze(now, f.rule()).await.unwrap().frozen, 20_000);
    let plan = claim_plan(&f, meterd::journal::pg::outbound::GENERIC_PLANS, now).await;
    assert!(
        plan.contains("Index Scan using outbound_events_state") && !plan.contains("Sort"),
        "the claim must read outbound_events_state in order, without a sort: {plan}"
    );
}

/// A stale owner (its lease expired and another replica claimed the event) cannot settle it; the new owner can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_settle_is_refused() {
    let Some(f) = Fleet::start("a_stale_owners_settle_is_refused").await else {
        return;
    };
    f.total("api_calls", t("09:00"), 20 * SECOND).await;
    let now = t("10:06");
    f.pg.freeze(now, f.rule()).await.unwrap();
    let policy = SettlePolicy::from_settings(&f.rig.settings);
    // Lease 0 s: expired as soon as it is taken.
    let a = f.pg.claim("a", now, 25, Duration::zero()).await.unwrap();
    assert_eq!(a.len(), 1);
    let b =
        f.pg.claim("b", now, 25, Duration::seconds(60))
            .await
            .unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].fence, a[0].fence + 1);
    // While b holds it, nobody else claims it.
    assert!(
        f.pg.claim("c", now, 25, Duration::seconds(60))
            .await
            .unwrap()
            .is_empty()
    );
    let id = a[0].event.id;
    let accepted = Settle::Accepted {
        usage_event_id: Some("stale".into()),
    };
    let stale =
        f.pg.settle(id, "a", a[0].fence, accepted.clone(), now, &policy)
            .await
            .unwrap();
    assert_eq!(stale, None, "a's settle is refused");
    assert_eq!(f.events().await[0].2, "pending", "and changed nothing");
    // b's marks and settles go through.
    assert!(
        f.pg.mark_attempt("b", &[(id, b[0].fence, "")], Duration::seconds(60))
            .await
            .unwrap()
    );
    assert!(
        !f.pg
            .mark_attempt("a", &[(id, a[0].fence, "")], Duration::seconds(60))
            .await
            .unwrap()
    );
    let ok =
        f.pg.settle(id, "b", b[0].fence, accepted, now, &policy)
            .await
            .unwrap();
    assert_eq!(ok, Some(Outcome::Accepted));
    // Settled once: a second settle, even by b at its fence, changes nothing.
    let again =
        f.pg.settle(
            id,
            "b",
            b[0].fence,
            Settle::Rejected { reason: "x".into() },
            now,
            &policy,
        )
        .await
        .unwrap();
    assert_eq!(again, None);
    assert_eq!(f.events().await[0].2, "accepted");
}

/// A call's mark applies only when every stored body is the body about to be sent: the bill-and-body transaction
/// commits without waiting for its WAL flush, so a PostgreSQL crash can lose it while its claim survives; the
/// worker still holds the bytes it computed, and the mark must then refuse them (sending them would bill an
/// amount the journal never recorded, and a rebill could differ: `duplicate_mismatch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_is_refused_unless_the_stored_body_is_the_one_sent() {
    let Some(f) = Fleet::start("a_mark_is_refused_unless_the_stored_body").await else {
        return;
    };
    f.total("api_calls", t("09:00"), 20 * SECOND).await;
    let now = t("10:06");
    f.pg.freeze(now, f.rule()).await.unwrap();
    let a =
        f.pg.claim("a", now, 25, Duration::seconds(60))
            .await
            .unwrap();
    let (id, fence) = (a[0].event.id, a[0].fence);
    let lease = Duration::seconds(60);
    // The bill was lost: the stored body is still empty, the worker holds the body it computed.
    let body = r#"{"quantity":10}"#;
    assert!(
        !f.pg
            .mark_attempt("a", &[(id, fence, body)], lease)
            .await
            .unwrap(),
        "a body that is not stored is never marked for a call"
    );
    assert_eq!(
        f.scalar("SELECT attempts + in_flight FROM outbound_events")
            .await,
        0
    );
    // Another body is stored (a rebill at the same fence): still refused.
    f.pg.client()
        .await
        .unwrap()
        .execute(
            "UPDATE outbound_events SET body = $1 WHERE id = $2",
            &[&r#"{"quantity":11}"#, &id],
        )
        .await
        .unwrap();
    assert!(
        !f.pg
            .mark_attempt("a", &[(id, fence, body)], lease)
            .await
            .unwrap()
    );
    // The stored bytes themselves: marked.
    assert!(
        f.pg.mark_attempt("a", &[(id, fence, r#"{"quantity":11}"#)], lease)
            .await
            .unwrap()
    );
    assert_eq!(
        f.scalar("SELECT attempts + in_flight FROM outbound_events")
            .await,
        2
    );
}

/// The last call's answers and the next call's mark share one transaction, each fenced apart: a stale answer is
/// refused while the mark applies, and a lost lease on the next call refuses the mark while the answer settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_and_mark_fences_the_answers_and_the_mark_apart() {
    let Some(f) = Fleet::start("settle_and_mark_fences_apart").await else {
        return;
    };
    for h in ["08:00", "09:00", "10:00"] {
        f.total("api_calls", t(h), 20 * SECOND).await;
    }
    let now = t("11:06");
    f.pg.freeze(now, f.rule()).await.unwrap();
    let policy = SettlePolicy::from_settings(&f.rig.settings);
    let lease = Duration::seconds(60);
    // a: the 08:00 event marked and answered; the 09:00 event claimed with a lease that ends at once, then
    // claimed by b.
    let e1 = f.pg.claim("a", now, 1, lease).await.unwrap().remove(0);
    assert!(
        f.pg.mark_attempt("a", &[(e1.event.id, e1.fence, "")], lease)
            .await
            .unwrap()
    );
    let e2 =
        f.pg.claim("a", now, 1, Duration::zero())
            .await
            .unwrap()
            .remove(0);
    let e2b = f.pg.claim("b", now, 1, lease).await.unwrap().remove(0);
    assert_eq!(e2b.event.id, e2.event.id);
    let accepted = |id: i64, fence: i64| meterd::journal::pg::FencedAnswers {
        call_alert: None,
        settles: vec![(
            id,
            fence,
            Settle::Accepted {
                usage_event_id: Some(format!("u{id}")),
            },
        )],
        now,
    };
    let answers = accepted(e1.event.id, e1.fence);
    let (counts, marked, _) =
        f.pg.settle_and_mark(
            "a",
            Some((&answers, &policy)),
            &[(e2.event.id, e2.fence, "")],
            lease,
            None,
        )
        .await
        .unwrap();
    assert_eq!(counts.get("accepted"), Some(&1), "{counts:?}");
    assert!(!marked, "a's lease on the 09:00 event was lost: no call");
    let states = f.events().await;
    assert_eq!(states[0].2, "accepted");
    assert_eq!(
        f.scalar(&format!(
            "SELECT attempts FROM outbound_events WHERE id = {}",
            e2.event.id
        ))
        .await,
        0,
        "the refused mark changed nothing"
    );
    // b: a stale answer for the 08:00 event (settled already) with the mark of its own 09:00 event.
    let stale = accepted(e1.event.id, e1.fence);
    // The same transaction claims b's next batch (the 10:00 event; never the one it marks).
    let claim = meterd::journal::pg::outbound::ClaimArgs {
        now,
        limit: 25,
        lease,
        excluding: vec![e2b.event.id],
    };
    let (counts, marked, claimed) =
        f.pg.settle_and_mark(
            "b",
            Some((&stale, &policy)),
            &[(e2b.event.id, e2b.fence, "")],
            lease,
            Some(&claim),
        )
        .await
        .unwrap();
    assert_eq!(counts.get("stale"), Some(&1), "{counts:?}");
    assert!(marked);
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].event.hour, t("10:00").timestamp());
    assert_eq!(
        f.scalar(&format!(
            "SELECT attempts * 10 + in_flight FROM outbound_events WHERE id = {}",
            e2b.event.id
        ))
        .await,
        11
    );
}

/// A fleet call refused whole with HTTP 400 is sent again at once in halves under the same leases (each half
/// marked in the transaction that settles the call before it), and every event is accepted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_call_refused_with_400_is_sent_again_in_halves() {
    let Some(f) = Fleet::start_with("a_fleet_call_refused_with_400", "concurrency = 1").await
    else {
        return;
    };
    let first = t("2026-03-10T02:00:00Z");
    for h in 0..4 {
        f.total("gb_processed", first + Duration::hours(h), SECOND)
            .await;
    }
    f.clock().set(t("09:30"));
    f.rig
        .emu
        .fail_next(meterd::emulator::Route::BatchUsageEvent, 1, 400, None);
    let a = f.emitter("a", Duration::seconds(60));
    let pass = a.pass().await.unwrap();
    assert_eq!(pass.calls, 3, "{pass:?}");
    assert_eq!(pass.outcomes.get("accepted"), Some(&4), "{pass:?}");
    let events = f.events().await;
    assert!(events.iter().all(|e| e.2 == "accepted"), "{events:?}");
    assert_eq!(f.rig.emu.accepted_events().len(), 4);
    assert_eq!(
        f.scalar(
            "SELECT count(*) FROM outbound_events WHERE lease_owner IS NOT NULL OR in_flight = 1"
        )
        .await,
        0
    );
}

/// A fleet call that fails transiently (HTTP 503) settles as a retry: the lease is freed (the statement's
/// parameters once failed to type, so every fleet retry failed its settle), and when the retry is due another
/// replica sends it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_call_failing_transiently_is_retried_by_any_replica() {
    let Some(f) = Fleet::start_with("a_fleet_call_failing_transiently", "concurrency = 1").await
    else {
        return;
    };
    f.total("gb_processed", t("2026-03-10T02:00:00Z"), SECOND)
        .await;
    f.clock().set(t("09:30"));
    f.rig
        .emu
        .fail_next(meterd::emulator::Route::BatchUsageEvent, 1, 503, None);
    let a = f.emitter("a", Duration::seconds(60));
    let pass = a.pass().await.unwrap();
    assert_eq!(pass.outcomes.get("retry"), Some(&1), "{pass:?}");
    assert_eq!(
        f.scalar("SELECT count(*) FROM outbound_events WHERE state = 'pending' AND lease_owner IS NULL AND in_flight = 0")
            .await,
        1,
        "pending, not in flight, lease freed"
    );
    f.clock().set(t("10:30"));
    let b = f.emitter("b", Duration::seconds(60));
    let pass = b.pass().await.unwrap();
    assert_eq!(pass.outcomes.get("accepted"), Some(&1), "{pass:?}");
    assert_eq!(f.rig.emu.accepted_events().len(), 1);
}

/// A lease that expires while its call is in flight: the next owner's claim marks the event ambiguous, it sends
/// the same bytes, the marketplace answers `Duplicate` with the same quantity (billed once), and the first
/// owner's late answer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expiry_mid_call_is_ambiguous_and_the_resend_counts_once() {
    // One worker per replica: with a 0 s lease, a's own workers would take the event from each other.
    let Some(f) = Fleet::start_with("lease_expiry_mid_call_is_ambiguous", "concurrency = 1").await
    else {
        return;
    };
    f.total("api_calls", t("09:00"), 15 * SECOND).await;
    f.clock().set(t("10:06"));
    // a's call is recorded by the marketplace, then its answer is held back for 3 s.
    f.rig.emu.delay_next(
        Route::BatchUsageEvent,
        1,
        std::time::Duration::from_secs(3),
        Phase::After,
    );
    let a = Arc::new(f.emitter("a", Duration::zero()));
    let b = f.emitter("b", Duration::seconds(60));
    let a_pass = tokio::spawn({
        let a = a.clone();
        async move { a.pass().await.unwrap() }
    });
    // Wait until a's call has reached the marketplace (recorded, answer delayed).
    for _ in 0..200 {
        if !f.rig.emu.accepted_events().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        f.rig.emu.accepted_events().len(),
        1,
        "a's call was recorded"
    );
    let b_pass = b.pass().await.unwrap();
    assert_eq!(b_pass.outcomes.get("duplicate"), Some(&1), "{b_pass:?}");
    let a_pass = a_pass.await.unwrap();
    assert_eq!(a_pass.outcomes.get("stale"), Some(&1), "{a_pass:?}");
    let events = f.events().await;
    assert_eq!(events.len(), 1);
    let (_, _, state, _, send, ambiguous) = &events[0];
    assert_eq!(state, "duplicate");
    assert!(
        ambiguous,
        "the claim after the expired lease marked it ambiguous"
    );
    assert_eq!(*send, Some(5 * SECOND));
    // The marketplace holds it once, with the exact quantity.
    let accepted = f.rig.emu.accepted_events();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].quantity, 5.0);
    // And the billing state counts it once.
    assert_eq!(
        f.scalar("SELECT consumed FROM term_usage").await,
        15 * SECOND
    );
}

/// Two replicas emitting at once (four workers each, claims of 25) draw one subscription's allowance exactly:
/// 22 hours of 3 `api_calls` against 10 included bill exactly 56, and 22 of 1 `gb_processed` (none included)
/// bill 22, whichever replica bills which hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_bill_one_allowance_exactly() {
    let Some(f) =
        Fleet::start_with("two_replicas_bill_one_allowance_exactly", "concurrency = 4").await
    else {
        return;
    };
    let first = t("2026-03-09T11:00:00Z");
    for h in 0..22 {
        f.total("api_calls", first + Duration::hours(h), 3 * SECOND)
            .await;
        f.total("gb_processed", first + Duration::hours(h), SECOND)
            .await;
    }
    // The billing rows exist already (committed), as after the first hour of a term: only the lock billing takes
    // on them keeps two replicas from drawing the same allowance.
    f.pg.client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO remainders (resource, dimension, remainder) VALUES ($1, 'api_calls', 0), ($1, 'gb_processed', 0)",
            &[&A],
        )
        .await
        .unwrap();
    f.clock().set(t("09:30"));
    let a = f.emitter("a", Duration::seconds(60));
    let b = f.emitter("b", Duration::seconds(60));
    let (ra, rb) = tokio::join!(a.pass(), b.pass());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.frozen + rb.frozen, 44, "{ra:?} {rb:?}");
    let events = f.events().await;
    assert_eq!(events.len(), 44);
    let sent = |d: &str| -> i64 { events.iter().filter(|e| e.1 == d).filter_map(|e| e.4).sum() };
    assert_eq!(sent("api_calls"), 56 * SECOND, "{events:?}");
    assert_eq!(sent("gb_processed"), 22 * SECOND, "{events:?}");
    for e in &events {
        assert!(
            e.2 == "accepted" || e.2 == "included",
            "every hour ends accepted or included: {events:?}"
        );
    }
    let market: f64 = f.rig.emu.accepted_events().iter().map(|e| e.quantity).sum();
    assert_eq!(market, 78.0);
    assert_eq!(
        f.rig.emu.accepted_events().len(),
        44 - events.iter().filter(|e| e.2 == "included").count()
    );
    assert_eq!(
        f.scalar("SELECT consumed FROM term_usage WHERE dimension = 'api_calls'")
            .await,
        66 * SECOND
    );
    assert_eq!(
        f.scalar("SELECT overage FROM term_usage WHERE dimension = 'api_calls'")
            .await,
        56 * SECOND
    );
}

/// Billing is set-based per claimed batch: the hours of one key claimed in one batch draw the allowance, carry
/// the unit remainder and cross a threshold in hour order, exactly as one event after another would. Six hours
/// of 500 `compute_blocks` (1200 per unit, none included) send 0, 0, 1, 0, 1, 0 units and leave 600 carried;
/// six hours of 3 `api_calls` against 10 included send 0, 0, 0, 2, 3, 3 and fire the 80% threshold once, at the
/// third hour (9 of 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_bills_a_keys_hours_in_order() {
    const UNITS: &str = r#"[[dimensions]]
id = "api_calls"
thresholds = ["80%"]
[[dimensions]]
id = "compute_blocks"
unit = 1200

[[plans]]
id = "gold"
included = { api_calls = 10, compute_blocks = 0 }
"#;
    let Some(f) = Fleet::start_billing(
        "one_batch_bills_a_keys_hours_in_order",
        "concurrency = 1",
        UNITS,
    )
    .await
    else {
        return;
    };
    let first = t("2026-03-09T11:00:00Z");
    for h in 0..6 {
        f.total("compute_blocks", first + Duration::hours(h), 500 * SECOND)
            .await;
        f.total("api_calls", first + Duration::hours(h), 3 * SECOND)
            .await;
    }
    f.clock().set(t("09:30"));
    let a = f.emitter("a", Duration::seconds(60));
    let pass = a.pass().await.unwrap();
    assert_eq!(pass.frozen, 12, "{pass:?}");
    let events = f.events().await;
    let sent = |d: &str| -> Vec<i64> {
        events
            .iter()
            .filter(|e| e.1 == d)
            .map(|e| e.4.unwrap_or(0) / SECOND)
            .collect()
    };
    assert_eq!(sent("compute_blocks"), vec![0, 0, 1, 0, 1, 0], "{events:?}");
    assert_eq!(sent("api_calls"), vec![0, 0, 0, 2, 3, 3], "{events:?}");
    let states = |d: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.1 == d)
            .map(|e| e.2.clone())
            .collect()
    };
    assert_eq!(
        states("compute_blocks"),
        [
            "remainder",
            "remainder",
            "accepted",
            "remainder",
            "accepted",
            "remainder"
        ]
    );
    assert_eq!(
        states("api_calls"),
        [
            "included", "included", "included", "accepted", "accepted", "accepted"
        ]
    );
    assert_eq!(
        f.scalar("SELECT remainder FROM remainders WHERE dimension = 'compute_blocks'")
            .await,
        600 * SECOND
    );
    assert_eq!(
        f.scalar("SELECT consumed FROM term_usage WHERE dimension = 'api_calls'")
            .await,
        18 * SECOND
    );
    assert_eq!(
        f.scalar("SELECT COUNT(*) FROM thresholds_fired").await,
        1,
        "the threshold fires once"
    );
    assert_eq!(
        f.scalar("SELECT COUNT(*) FROM alerts WHERE kind = 'threshold' AND body LIKE '%\"consumed\":\"9\"%'")
            .await,
        1
    );
}

/// In fleet mode the shared reads (status with the replicas, report, balance, consumption) answer from the
/// shared journal, whichever replica asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_reads_answer_from_the_shared_journal() {
    use meterd::journal::reads::Reads;
    use meterd::journal::usage::ReportFilter;
    let Some(f) = Fleet::start("fleet_reads_answer_from_the_shared_journal").await else {
        return;
    };
    let reads = Reads::Fleet {
        pg: f.pg.clone(),
        replica_timeout: Duration::seconds(30),
    };
    f.total("api_calls", t("08:00"), 12 * SECOND).await;
    f.total("api_calls", t("09:00"), 4 * SECOND).await;
    f.heartbeat("r1", t("10:06"), t("10:06")).await;
    f.heartbeat("r2", t("10:06"), t("10:06")).await;
    f.clock().set(t("10:06"));
    // r1 sends 08:00 and 09:00 ...
    let pass = f.emitter("r1", Duration::seconds(60)).pass().await.unwrap();
    assert_eq!(pass.frozen, 2);
    // ... then r2 claims a later hour and holds its lease.
    f.total("api_calls", t("10:00"), SECOND).await;
    f.pg.freeze(t("11:06"), f.rule()).await.unwrap();
    assert_eq!(
        f.pg.claim("r2", t("11:06"), 25, Duration::seconds(60))
            .await
            .unwrap()
            .len(),
        1
    );
    let (status, replicas) = reads.status(t("10:06:10")).await.unwrap();
    assert_eq!(status.pending_events, 1);
    // 08:00 draws the 10 included and bills 2, 09:00 bills its 4.
    assert_eq!(status.outcomes.get("accepted"), Some(&2));
    let replicas = replicas.expect("fleet status lists the replicas");
    assert_eq!(replicas.len(), 2);
    assert_eq!(
        (replicas[0].replica_id.as_str(), replicas[0].leases_held),
        ("r1", 0)
    );
    assert_eq!(
        (replicas[1].replica_id.as_str(), replicas[1].leases_held),
        ("r2", 1)
    );
    assert!(
        replicas
            .iter()
            .all(|r| r.live && r.forward_lag_seconds == 10)
    );
    let (hours, carries) = reads
        .report(ReportFilter::default(), t("11:06"), Duration::minutes(5))
        .await
        .unwrap();
    assert!(carries.is_empty());
    let outcomes: Vec<(&str, &str)> = hours
        .iter()
        .map(|h| (h.quantity.as_str(), h.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [("12", "accepted"), ("4", "accepted"), ("1", "pending")]
    );
    let balance = reads
        .balance(f.rig.settings.clone(), A.to_uppercase(), t("11:06"))
        .await
        .unwrap();
    let api = balance.iter().find(|d| d.dimension == "api_calls").unwrap();
    assert_eq!(
        (
            api.plan.as_str(),
            api.included.as_str(),
            api.consumed.as_str(),
            api.overage_frozen.as_str()
        ),
        ("gold", "10", "17", "6")
    );
    let consumption = reads
        .consumption(A.to_string(), None, i64::MIN, i64::MAX)
        .await
        .unwrap();
    assert_eq!(consumption, vec![("api_calls".to_string(), 17 * SECOND, 3)]);
}

/// Fleet alerts are raised in the shared journal; every replica's delivery task claims due ones from it. Two
/// replicas delivering at once hand each alert to the webhook exactly once, and a webhook failure keeps the alert
/// for a later attempt (attempts and error recorded). Before this, the delivery task read only the local journal:
/// alerts raised in fleet mode were never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_alerts_are_delivered_once_by_any_replica() {
    let Some(db) = TestDb::create("fleet_alerts_are_delivered_once_by_any_replica") else {
        return;
    };
    let pg = PgJournal::connect(&db.url, 4).unwrap();
    pg.migrate().await.unwrap();
    let now = t("2026-03-10T10:00:00Z");
    {
        let c = pg.client().await.unwrap();
        for i in 0..40i64 {
            c.execute(
                "INSERT INTO alerts (kind, dedupe, body, created_at, next_attempt_at) VALUES ('threshold', $1, $2, $3, $3)",
                &[&format!("k{i}"), &format!("{{\"n\":{i}}}"), &now.timestamp()],
            )
            .await
            .unwrap();
        }
    }
    // A webhook that counts what it receives; it fails while `failing` is set.
    let received = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = {
        let (received, failing) = (received.clone(), failing.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: String| {
                let (received, failing) = (received.clone(), failing.clone());
                async move {
                    if failing.load(std::sync::atomic::Ordering::SeqCst) {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    received.lock().unwrap().push(body);
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let clock: SharedClock = Arc::new(ManualClock::new(now));
    let http = meterd::tls::client();
    let replicas: Vec<meterd::alerts::AlertStore> = (0..2)
        .map(|_| meterd::alerts::AlertStore::Fleet(PgJournal::connect(&db.url, 2).unwrap()))
        .collect();
    let (a, b) = tokio::join!(
        meterd::alerts::deliver_from(&replicas[0], &clock, Some(&url), Some(&http)),
        meterd::alerts::deliver_from(&replicas[1], &clock, Some(&url), Some(&http)),
    );
    assert_eq!(
        a.unwrap() + b.unwrap(),
        40,
        "every due alert delivered by one replica or the other"
    );
    let mut bodies = received.lock().unwrap().clone();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 40, "each alert exactly once");
    assert_eq!(
        received.lock().unwrap().len(),
        40,
        "no alert delivered twice"
    );
    // Nothing left: a second round delivers nothing.
    assert_eq!(
        meterd::alerts::deliver_from(&replicas[1], &clock, Some(&url), Some(&http))
            .await
            .unwrap(),
        0
    );
    // A failing webhook: the alert stays undelivered with its attempt and error, due again later.
    {
        let c = pg.client().await.unwrap();
        c.execute(
            "INSERT INTO alerts (kind, dedupe, body, created_at, next_attempt_at) VALUES ('threshold', 'late', '{}', $1, $1)",
            &[&now.timestamp()],
        )
        .await
        .unwrap();
    }
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        meterd::alerts::deliver_from(&replicas[0], &clock, Some(&url), Some(&http))
            .await
            .unwrap(),
        0
    );
    let c = pg.client().await.unwrap();
    let row = c
        .query_one(
            "SELECT attempts, last_error, delivered_at, next_attempt_at FROM alerts WHERE dedupe = 'late'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert!(row.get::<_, Option<String>>(1).unwrap().contains("500"));
    assert_eq!(row.get::<_, Option<i64>>(2), None);
    assert!(row.get::<_, i64>(3) > now.timestamp());
    server.abort();
}

/// The dashboard's routes in fleet mode read the shared journal (a replica's local journal holds only its own
/// share and is never sent, so before this its dashboard showed every fleet hour as missing or pending): the cards
/// carry the fleet's balances and threshold state, the chart the fleet's outcomes, the at-risk list the fleet's
/// pending events. The credit pool routes answer 400 with the reason (pools are single-replica only for now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_dashboard_routes_read_the_shared_journal() {
    use meterd::journal::reads::Reads;
    let Some(f) = Fleet::start("fleet_dashboard_routes_read_the_shared_journal").await else {
        return;
    };
    f.total("api_calls", t("08:00"), 12 * SECOND).await;
    f.total("api_calls", t("09:00"), 4 * SECOND).await;
    f.heartbeat("r1", t("10:06"), t("10:06")).await;
    f.clock().set(t("10:06"));
    let pass = f.emitter("r1", Duration::seconds(60)).pass().await.unwrap();
    assert_eq!(pass.frozen, 2);
    f.total("api_calls", t("10:00"), SECOND).await;
    f.pg.freeze(t("11:06"), f.rule()).await.unwrap();
    f.clock().set(t("11:06"));

    let mut settings = (*f.rig.settings).clone();
    settings.fleet = Some(f.fleet_settings("r1", Duration::seconds(60)));
    let reads = Reads::Fleet {
        pg: f.pg.clone(),
        replica_timeout: Duration::seconds(30),
    };
    let state = meterd::ingest::AppState {
        settings: Arc::new(settings),
        journal: f.rig.journal.clone(),
        reads: reads.clone(),
        clock: Arc::new(f.rig.clock.clone()),
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
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };

    let cards = get(format!("{base}/v1/dashboard/subscriptions?limit=20")).await;
    assert_eq!(cards["total"], 1, "{cards}");
    let card = &cards["subscriptions"][0];
    assert_eq!(card["resource"], A);
    assert_eq!(card["pending_events"], 1, "10:00 frozen, not sent yet");
    let api = card["dimensions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["dimension"] == "api_calls")
        .unwrap();
    let balance = reads
        .balance(f.rig.settings.clone(), A.to_string(), t("11:06"))
        .await
        .unwrap();
    let want = balance.iter().find(|d| d.dimension == "api_calls").unwrap();
    let mut shown = api.clone();
    shown.as_object_mut().unwrap().remove("threshold");
    assert_eq!(
        shown,
        serde_json::to_value(want).unwrap(),
        "the card is the balance route's answer"
    );
    assert_eq!(
        (api["consumed"].as_str(), api["overage_frozen"].as_str()),
        (Some("17"), Some("6"))
    );
    assert_eq!(api["threshold"]["state"], "exhausted", "{api}");

    let usage = get(format!(
        "{base}/v1/dashboard/usage?resource={A}&dimension=api_calls&bucket=hour&from=2026-03-10T08:00:00Z&to=2026-03-10T11:00:00Z"
    ))
    .await;
    let buckets = usage["series"][0]["buckets"].as_array().unwrap();
    let groups: Vec<(&str, &str, &str)> = buckets
        .iter()
        .map(|b| {
            (
                b["start"].as_str().unwrap(),
                b["groups"]["accepted"].as_str().unwrap(),
                b["groups"]["pending"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            ("2026-03-10T08:00:00Z", "12", "0"),
            ("2026-03-10T09:00:00Z", "4", "0"),
            ("2026-03-10T10:00:00Z", "0", "1")
        ]
    );
    let months = get(format!(
        "{base}/v1/dashboard/usage?resource={A}&dimension=api_calls&bucket=month&from=2026-02-01T00:00:00Z&to=2026-04-01T00:00:00Z"
    ))
    .await;
    let m = months["series"][0]["buckets"].as_array().unwrap();
    assert_eq!(
        (
            m.len(),
            m[0]["total"].as_str(),
            m[1]["start"].as_str(),
            m[1]["total"].as_str()
        ),
        (2, Some("0"), Some("2026-03-01T00:00:00Z"), Some("17"))
    );

    let risk = get(format!("{base}/v1/dashboard/at-risk")).await;
    assert_eq!(risk["pending_total"], 1);
    assert_eq!(risk["pending"][0]["hour"], "2026-03-10T10:00:00Z");

    let pools = http.get(format!("{base}/v1/pools")).send().await.unwrap();
    assert_eq!(pools.status(), 400);
    let msg = pools.text().await.unwrap();
    assert!(msg.contains("not available in fleet mode"), "{msg}");
    server.abort();
}

/// `meterd reconcile` on a fleet replica compares the marketplace with what the fleet sent (the shared journal).
/// Before, it read the replica's own journal, which sends nothing in fleet mode: every hour the fleet sent showed
/// as a difference (meterd 0, marketplace the quantity) and the command failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_reconcile_compares_the_marketplace_with_the_shared_journal() {
    let Some(f) =
        Fleet::start("fleet_reconcile_compares_the_marketplace_with_the_shared_journal").await
    else {
        return;
    };
    f.total("api_calls", t("08:00"), 12 * SECOND).await;
    f.total("api_calls", t("09:00"), 4 * SECOND).await;
    f.heartbeat("r1", t("10:06"), t("10:06")).await;
    f.clock().set(t("10:06"));
    let pass = f.emitter("r1", Duration::seconds(60)).pass().await.unwrap();
    assert_eq!(pass.frozen, 2);
    assert_eq!(f.rig.emu.accepted_events().len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meterd.toml");
    std::fs::write(
        &config,
        format!(
            "[journal]\npath = \"{}\"\n[marketplace]\nmode = \"azure\"\nbase_url = \"{}/api\"\ntimeout = \"5s\"\n\
             [marketplace.auth]\nkind = \"static_token\"\n[fleet]\nreplica_id = \"r9\"\n{BILLING}",
            dir.path().join("journal.db").display(),
            f.rig.base
        ),
    )
    .unwrap();
    let url = f.db.url.expose().to_string();
    let reconcile = |date: &'static str| {
        let (config, url) = (config.clone(), url.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_meterd"))
                .args(["reconcile", "--config"])
                .arg(&config)
                .args(["--date", date])
                .env_remove("RUST_LOG")
                .env("METERD_FLEET__URL", url)
                .env("METERD_MARKETPLACE__AUTH__STATIC_TOKEN", "emulator-token")
                .output()
                .unwrap()
        })
    };
    let out = reconcile("2026-03-10").await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no differences"), "{text}");
    assert!(
        !text.contains(url.as_str()),
        "the URL is never printed: {text}"
    );
    // A difference the fleet has not seen is still found: the marketplace's quantity, 0 in the shared journal.
    let c = f.pg.client().await.unwrap();
    c.execute(
        "UPDATE outbound_events SET send_quantity = send_quantity + 1000000 WHERE hour = $1",
        &[&t("09:00").timestamp()],
    )
    .await
    .unwrap();
    let out = reconcile("2026-03-10").await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&A.to_ascii_lowercase()) && stdout.contains("api_calls"),
        "{stdout}"
    );
}
