//! Fleet mode's forward path against the real PostgreSQL (`METERD_TEST_POSTGRES_URL`; each test its own
//! database, dropped at the end; skipped with a message when the variable is unset): forwarding is idempotent,
//! the late rule is judged at forward time, the heartbeat's watermark, retention keeps unforwarded records, a
//! replica keeps acknowledging while PostgreSQL is unreachable and catches up by itself, `meterd forward` ships
//! a copied journal, and the URL never shows.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::proxy::Proxy;
use common::rig::{micros, t};
use common::{Daemon, http};
use meterd::clock::{ManualClock, SharedClock};
use meterd::config::Settings;
use meterd::journal::Journal;
use meterd::journal::pg::PgJournal;
use meterd::journal::pg::testing::TestDb;
use meterd::journal::usage::{self, HOUR, NewRecord};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const R: &str = "11111111-1111-4111-8111-111111111111";

/// Fleet settings for a replica named `replica` with its journal in `dir`.
fn settings(dir: &Path, url: &str, replica: &str) -> Arc<Settings> {
    let text = format!(
        "[marketplace]\nmode = \"emulator\"\n[journal]\npath = \"{}\"\n[fleet]\nreplica_id = \"{replica}\"\n\
         [[dimensions]]\nid = \"api_calls\"\n[[dimensions]]\nid = \"gb_processed\"\n",
        dir.join("journal.db").display()
    );
    let env = BTreeMap::from([("METERD_FLEET__URL".to_string(), url.to_string())]);
    Arc::new(meterd::config::load_str(&text, "test", &env).unwrap())
}

/// The (quantity, records, carried in) of the total of `dimension` at `hour` among `totals` (`totals_of`).
fn total_at(
    totals: &[(String, String, i64, i64, i64, i64)],
    dimension: &str,
    hour: i64,
) -> Option<(i64, i64, i64)> {
    totals
        .iter()
        .find(|x| x.1 == dimension && x.2 == hour)
        .map(|x| (x.3, x.4, x.5))
}

fn rec(key: Option<&str>, dimension: &str, time: DateTime<Utc>, qty: &str) -> NewRecord {
    NewRecord {
        resource: R.to_string(),
        plan: None,
        dimension: dimension.to_string(),
        time,
        quantity: micros(qty),
        key: key.map(str::to_string),
    }
}

/// One replica in-process: its settings, local journal and clock.
struct Replica {
    settings: Arc<Settings>,
    journal: Journal,
    clock: ManualClock,
    shared: SharedClock,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn new(db: &TestDb, name: &str, now: DateTime<Utc>) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path(), db.url.expose(), name);
        let journal = Journal::open(&settings.journal.path).unwrap();
        let clock = ManualClock::new(now);
        Replica {
            settings,
            journal,
            shared: Arc::new(clock.clone()),
            clock,
            _dir: dir,
        }
    }

    /// Ingests as `POST /v1/usage` does in fleet mode (into the outbox).
    async fn ingest(&self, records: Vec<NewRecord>) {
        let rules = meterd::fleet::rules(&self.settings, self.clock.now());
        self.journal
            .write(move |c| usage::ingest(c, &records, &rules))
            .await
            .unwrap()
            .unwrap();
    }

    async fn drain(&self, pg: &PgJournal) -> meterd::fleet::Forwarded {
        let (done, result) = meterd::fleet::drain(
            &self.journal,
            pg,
            &self.settings.fleet.as_ref().unwrap().replica_id,
            &self.settings,
            &self.shared,
            1000,
        )
        .await;
        result.unwrap();
        done
    }
}

async fn pg(db: &TestDb) -> PgJournal {
    let pg = PgJournal::connect(&db.url, 4).unwrap();
    pg.migrate().await.unwrap();
    pg
}

/// Another replica's pool (its own forward cache).
async fn pg_of(db: &TestDb) -> PgJournal {
    pg(db).await
}

use meterd::clock::Clock as _;

/// The same batch forwarded twice (a crash after the PostgreSQL commit, before the local mark) and the same
/// client id arriving through two replicas each count once in `records` and in the hourly total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_is_idempotent_across_retries_and_replicas() {
    let Some(db) = TestDb::create("forward_is_idempotent_across_retries_and_replicas") else {
        return;
    };
    let pg = pg(&db).await;
    let now = t("12:30");
    let a = Replica::new(&db, "a", now);
    let b = Replica::new(&db, "b", now);
    a.ingest(vec![
        rec(Some("shared"), "api_calls", t("12:05"), "1.5"),
        rec(Some("a-1"), "api_calls", t("12:10"), "2"),
    ])
    .await;
    b.ingest(vec![
        rec(Some("shared"), "api_calls", t("12:06"), "1.5"),
        rec(Some("b-1"), "api_calls", t("12:20"), "3"),
    ])
    .await;

    let batch = a.journal.outbox_batch(100).await.unwrap();
    assert_eq!(batch.len(), 2);
    let rules = meterd::fleet::rules(&a.settings, now);
    let first = pg.forward("a", &batch, &rules).await.unwrap();
    assert_eq!((first.inserted, first.duplicates), (2, 0));
    let again = pg.forward("a", &batch, &rules).await.unwrap();
    assert_eq!(
        (again.inserted, again.duplicates),
        (0, 2),
        "a re-forwarded batch adds nothing"
    );
    // The local marks were never cleared: the forwarder ships them again, as duplicates.
    let a_done = a.drain(&pg).await;
    assert_eq!((a_done.inserted, a_done.duplicates), (0, 2));
    let b_done = b.drain(&pg).await;
    assert_eq!(
        (b_done.inserted, b_done.duplicates),
        (1, 1),
        "the id already forwarded by replica a counts once"
    );
    assert_eq!(a.journal.outbox_stats().await.unwrap().unforwarded, 0);
    assert_eq!(b.journal.outbox_stats().await.unwrap().unforwarded, 0);

    assert_eq!(pg.record_count().await.unwrap(), 3);
    let totals = pg.totals_of(R).await.unwrap();
    let noon = t("12:00").timestamp();
    assert_eq!(
        totals,
        vec![(
            String::new(),
            "api_calls".to_string(),
            noon,
            micros("6.5").0,
            3,
            0
        )]
    );
}

/// The forward pipeline (the next batch read while one is in PostgreSQL, its local mark cleared with the next
/// batch's transaction) forwards an outbox of many batches exactly once: every record in `records` once, the
/// hourly total exact, every local mark cleared at the end, and a record ingested between two drains is the
/// only one the second drain ships.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_forward_of_many_batches_ships_each_record_once() {
    let Some(db) = TestDb::create("pipelined_forward_of_many_batches_ships_each_record_once")
    else {
        return;
    };
    let pg = pg(&db).await;
    let now = t("12:30");
    let a = Replica::new(&db, "a", now);
    // 23 records in batches of 4: five full batches (read ahead, marked one batch late) and a short one.
    for i in 0..23 {
        let key = format!("k-{i}");
        a.ingest(vec![rec(Some(&key), "api_calls", t("12:05"), "1")])
            .await;
    }
    let replica = a.settings.fleet.as_ref().unwrap().replica_id.clone();
    let drain =
        |limit| meterd::fleet::drain(&a.journal, &pg, &replica, &a.settings, &a.shared, limit);
    let (done, result) = drain(4).await;
    result.unwrap();
    assert_eq!((done.batches, done.inserted, done.duplicates), (6, 23, 0));
    assert_eq!(a.journal.outbox_stats().await.unwrap().unforwarded, 0);
    assert_eq!(pg.record_count().await.unwrap(), 23);
    a.ingest(vec![rec(Some("late-comer"), "api_calls", t("12:06"), "2")])
        .await;
    let (again, result) = drain(4).await;
    result.unwrap();
    assert_eq!((again.batches, again.inserted, again.duplicates), (1, 1, 0));
    assert_eq!(a.journal.outbox_stats().await.unwrap().unforwarded, 0);
    let noon = t("12:00").timestamp();
    assert_eq!(
        pg.totals_of(R).await.unwrap(),
        vec![(
            String::new(),
            "api_calls".to_string(),
            noon,
            micros("25").0,
            24,
            0
        )]
    );
}

/// A batch mixing keys the fleet has with new ones (the plain insert fails on the known key and the forward runs
/// again skipping what is there): only the new records count, in `records`, in the hourly totals and in the
/// carries; and a total frozen by another replica meanwhile refuses that batch too, nothing committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_known_keys_counts_only_its_new_records() {
    let Some(db) = TestDb::create("a_batch_with_known_keys_counts_only_its_new_records") else {
        return;
    };
    let pg = pg(&db).await;
    let now = t("12:30");
    let old = t("2026-03-09T13:10:00Z"); // past its hour's window: carried into the open hour
    let a = Replica::new(&db, "a", now);
    a.ingest(vec![
        rec(Some("k1"), "api_calls", t("12:05"), "1"),
        rec(Some("k3"), "api_calls", old, "0.5"),
    ])
    .await;
    let first = a.drain(&pg).await;
    assert_eq!((first.inserted, first.duplicates, first.carried), (2, 0, 1));
    let b = Replica::new(&db, "b", now);
    b.ingest(vec![
        rec(Some("k0"), "api_calls", t("12:06"), "2"),
        rec(Some("k1"), "api_calls", t("12:05"), "1"),
        rec(Some("k2"), "api_calls", t("12:07"), "4"),
        rec(Some("k3"), "api_calls", old, "0.5"),
        rec(Some("k4"), "api_calls", old, "0.25"),
    ])
    .await;
    let second = b.drain(&pg).await;
    assert_eq!(
        (second.inserted, second.duplicates, second.carried),
        (3, 2, 1),
        "k1 and k3 came through replica a already"
    );
    assert_eq!(pg.record_count().await.unwrap(), 5);
    let noon = t("12:00").timestamp();
    assert_eq!(
        pg.totals_of(R).await.unwrap(),
        vec![(
            String::new(),
            "api_calls".to_string(),
            noon,
            micros("7.75").0,
            5,
            micros("0.75").0
        )]
    );
    let c = pg.client().await.unwrap();
    let carried: i64 = c
        .query_one("SELECT sum(quantity)::int8 FROM carries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(carried, micros("0.75").0, "k3's carry counted once");

    // A known key and a new one whose total another replica froze in the same instant: refused, as without the
    // known key, and nothing of it committed.
    let eleven = t("11:00").timestamp();
    c.execute(
        "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, outbound_id)
         VALUES ($1, '', 'api_calls', $2, 1000000, 1, 999999)",
        &[&R, &eleven],
    )
    .await
    .unwrap();
    b.ingest(vec![rec(Some("raced"), "api_calls", t("11:30"), "1")])
        .await;
    let mut batch = a.journal.outbox_batch(10).await.unwrap();
    assert!(batch.is_empty());
    batch.extend(b.journal.outbox_batch(10).await.unwrap());
    let mut known = batch[0].clone();
    known.idem_key = "k0".into();
    known.seq = -1;
    batch.push(known);
    let e = pg
        .forward("b", &batch, &meterd::fleet::rules(&b.settings, now))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("frozen by another replica"), "{e}");
    assert_eq!(pg.record_count().await.unwrap(), 5, "nothing committed");
}

/// Two replicas streaming outboxes of many batches into the same hourly totals at once, each with two batches
/// in flight, half of their ids the same (a client retrying through the other replica): every id is in
/// `records` once, each total is the exact sum of the distinct ids, and no forward fails (their locks are taken
/// in one order: keys, then totals in the freeze's order, so neither a deadlock nor a lost update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_streaming_the_same_ids_at_once_count_each_once() {
    let Some(db) = TestDb::create("two_replicas_streaming_the_same_ids_at_once_count_each_once")
    else {
        return;
    };
    let pg = pg(&db).await;
    let now = t("12:30");
    let a = Replica::new(&db, "a", now);
    let b = Replica::new(&db, "b", now);
    let resources: Vec<String> = (0..7)
        .map(|i| format!("{i:08x}-2222-4222-8222-222222222222"))
        .collect();
    let one = |key: String, i: usize| NewRecord {
        resource: resources[i % resources.len()].clone(),
        plan: None,
        dimension: if i.is_multiple_of(3) {
            "gb_processed"
        } else {
            "api_calls"
        }
        .to_string(),
        time: t("12:10"),
        quantity: micros("1"),
        key: Some(key),
    };
    // a: shared-0..1999 and a-0..999; b: shared-1000..2999 (in another order) and b-0..999.
    let mut for_a: Vec<NewRecord> = (0..2000).map(|i| one(format!("shared-{i}"), i)).collect();
    for_a.extend((0..1000).map(|i| one(format!("a-{i}"), i)));
    let mut for_b: Vec<NewRecord> = (1000..3000)
        .rev()
        .map(|i| one(format!("shared-{i}"), i))
        .collect();
    for_b.extend((0..1000).map(|i| one(format!("b-{i}"), i)));
    for chunk in for_a.chunks(500) {
        a.ingest(chunk.to_vec()).await;
    }
    for chunk in for_b.chunks(500) {
        b.ingest(chunk.to_vec()).await;
    }
    let drain = |r: &'static str, x: &Replica| {
        let (journal, settings, clock, pg) = (
            x.journal.clone(),
            x.settings.clone(),
            x.shared.clone(),
            pg.clone(),
        );
        async move { meterd::fleet::drain(&journal, &pg, r, &settings, &clock, 250).await }
    };
    let ((da, ra), (db_, rb)) = tokio::join!(drain("a", &a), drain("b", &b));
    ra.unwrap();
    rb.unwrap();
    assert_eq!(da.records() + db_.records(), 6000);
    assert_eq!(
        da.inserted + db_.inserted,
        5000,
        "3,000 shared ids and 2,000 own"
    );
    assert_eq!(da.batches + db_.batches, 24);
    assert_eq!(pg.record_count().await.unwrap(), 5000);
    assert_eq!(a.journal.outbox_stats().await.unwrap().unforwarded, 0);
    assert_eq!(b.journal.outbox_stats().await.unwrap().unforwarded, 0);
    // The expected totals: each distinct id once.
    let mut want: BTreeMap<(String, String), i64> = BTreeMap::new();
    let ids = (0..3000).chain(0..1000).chain(0..1000);
    for i in ids {
        let r = one(String::new(), i);
        *want.entry((r.resource, r.dimension)).or_default() += 1;
    }
    let c = pg.client().await.unwrap();
    let got: BTreeMap<(String, String), i64> = c
        .query(
            "SELECT resource, dimension, quantity, records FROM hourly_totals",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| {
            let (q, n): (i64, i64) = (row.get(2), row.get(3));
            assert_eq!(q, n * 1_000_000);
            ((row.get(0), row.get(1)), n)
        })
        .collect();
    assert_eq!(got, want);
}

/// At forward time a record whose key is frozen in the fleet journal, or whose hour is no longer sendable, is
/// carried into the open hour with a `carries` row; a record of an unfrozen key of the same closed hour goes into
/// its own hour. A total frozen by another replica during the forward refuses the whole batch (retried; nothing
/// committed), so no unit is added to a frozen total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rule_is_applied_at_forward_time() {
    let Some(db) = TestDb::create("late_rule_is_applied_at_forward_time") else {
        return;
    };
    let pg = pg(&db).await;
    let now = t("12:30");
    let ten = t("10:00").timestamp();
    let c = pg.client().await.unwrap();
    // Another replica froze (R, api_calls, 10:00) with 4 units.
    let id: i64 = c
        .query_one(
            "INSERT INTO outbound_events (resource, plan, dimension, hour, quantity, body, state, next_attempt_at,
                                          deadline, frozen_at)
             VALUES ($1, '', 'api_calls', $2, 4000000, '', 'pending', 0, 0, 0) RETURNING id",
            &[&R, &ten],
        )
        .await
        .unwrap()
        .get(0);
    c.execute(
        "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, outbound_id)
         VALUES ($1, '', 'api_calls', $2, 4000000, 1, $3)",
        &[&R, &ten, &id],
    )
    .await
    .unwrap();

    let r = Replica::new(&db, "r", now);
    let old = t("2026-03-09T13:10:00Z"); // its window (less margins) ended at 2026-03-10T11:45
    r.ingest(vec![
        rec(Some("frozen-key"), "api_calls", t("10:15"), "1"),
        rec(Some("own-hour"), "gb_processed", t("10:20"), "2"),
        rec(Some("too-old"), "api_calls", old, "0.5"),
        rec(Some("open-hour"), "api_calls", t("12:01"), "0.25"),
    ])
    .await;
    let done = r.drain(&pg).await;
    assert_eq!((done.inserted, done.carried), (4, 2));

    let noon = t("12:00").timestamp();
    let totals = pg.totals_of(R).await.unwrap();
    let q = |dim: &str, hour: i64| total_at(&totals, dim, hour);
    assert_eq!(
        q("api_calls", ten),
        Some((4_000_000, 1, 0)),
        "the frozen total is untouched"
    );
    assert_eq!(
        q("gb_processed", ten),
        Some((2_000_000, 1, 0)),
        "an unfrozen key of a closed hour takes its own hour"
    );
    assert_eq!(
        q("api_calls", noon),
        Some((1_750_000, 3, 1_500_000)),
        "carried into the open hour"
    );
    let mut carries: Vec<(i64, i64, i64, String)> = c
        .query(
            "SELECT from_hour, to_hour, quantity, reason FROM carries WHERE lower(resource) = $1 ORDER BY from_hour",
            &[&R],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    carries.sort();
    assert_eq!(
        carries,
        vec![
            (usage::hour_of(old), noon, 500_000, "late".to_string()),
            (ten, noon, 1_000_000, "late".to_string()),
        ]
    );
    let hours: Vec<(String, i64, i64)> = c
        .query(
            "SELECT idem_key, origin_hour, hour FROM records ORDER BY idem_key",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert!(
        hours.contains(&("frozen-key".into(), ten, noon)),
        "{hours:?}"
    );

    // A total frozen in the same instant by another replica (its event not visible to this forward yet).
    let eleven = t("11:00").timestamp();
    c.execute(
        "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, outbound_id)
         VALUES ($1, '', 'api_calls', $2, 1000000, 1, 999999)",
        &[&R, &eleven],
    )
    .await
    .unwrap();
    r.ingest(vec![rec(Some("raced"), "api_calls", t("11:30"), "1")])
        .await;
    let batch = r.journal.outbox_batch(10).await.unwrap();
    let e = pg
        .forward("r", &batch, &meterd::fleet::rules(&r.settings, now))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("frozen by another replica"), "{e}");
    assert_eq!(
        pg.record_count().await.unwrap(),
        4,
        "nothing of the refused batch committed"
    );
    let eleven_total = pg.totals_of(R).await.unwrap();
    assert!(
        eleven_total
            .iter()
            .any(|x| x.2 == eleven && x.3 == 1_000_000)
    );
}

/// A forward remembers the fleet's spellings and `frozen_through` from the batch before and then skips the
/// lookups (journal/pg/records.rs, `ForwardCache`); what it remembered must never outlive the fleet's state. Here
/// another replica freezes 11:00 after this replica's first forward: the next forward still carries a record of
/// the frozen key (not added to the frozen total, not refused over and over), puts one of a key without its event
/// into its own hour, and counts a resource under the fleet's first spelling (written by a third replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_after_a_forward_is_judged_by_the_next_forward() {
    let Some(db) = TestDb::create("a_freeze_after_a_forward_is_judged_by_the_next_forward") else {
        return;
    };
    let pg = pg(&db).await;
    let now = t("12:30");
    let (eleven, noon) = (t("11:00").timestamp(), t("12:00").timestamp());
    let upper = "AAAAAAAA-1111-4111-8111-111111111111";
    let lower = upper.to_ascii_lowercase();
    let on = |resource: &str, key: &str, dimension: &str, time: &str, qty: &str| NewRecord {
        resource: resource.to_string(),
        ..rec(Some(key), dimension, t(time), qty)
    };
    // A third replica spells the resource first, in capitals.
    let b = Replica::new(&db, "b", now);
    b.ingest(vec![on(upper, "b1", "api_calls", "12:01", "1")])
        .await;
    b.drain(&pg_of(&db).await).await;

    let r = Replica::new(&db, "r", now);
    r.ingest(vec![
        rec(Some("k1"), "api_calls", t("11:10"), "1"),
        on(&lower, "a1", "api_calls", "12:02", "1"),
    ])
    .await;
    let first = r.drain(&pg).await;
    assert_eq!((first.inserted, first.carried), (2, 0));

    // Another replica (its own pool) freezes the closed hour 11:00: `frozen_through` moves to 12:00.
    let rule = meterd::journal::pg::freeze::FreezeRule {
        grace: Duration::minutes(5),
        safety_margin: Duration::minutes(15),
        max_wait: Duration::minutes(15),
        replica_timeout: Duration::seconds(30),
    };
    let frozen = pg_of(&db).await.freeze(now, rule).await.unwrap();
    assert_eq!((frozen.frozen, frozen.through), (1, noon));

    r.ingest(vec![
        rec(Some("k2"), "api_calls", t("11:20"), "2"),
        rec(Some("k3"), "gb_processed", t("11:30"), "4"),
        on(&lower, "a2", "api_calls", "12:03", "1"),
    ])
    .await;
    let second = r.drain(&pg).await;
    assert_eq!(
        (second.inserted, second.carried),
        (3, 1),
        "k2's key is frozen"
    );
    let totals = pg.totals_of(R).await.unwrap();
    let q = |dim: &str, hour: i64| total_at(&totals, dim, hour);
    assert_eq!(
        q("api_calls", eleven),
        Some((1_000_000, 1, 0)),
        "the frozen total is untouched"
    );
    assert_eq!(
        q("api_calls", noon),
        Some((2_000_000, 1, 2_000_000)),
        "carried into the open hour"
    );
    assert_eq!(
        q("gb_processed", eleven),
        Some((4_000_000, 1, 0)),
        "a key without its event takes its own hour"
    );
    let c = pg.client().await.unwrap();
    let spelled: Vec<(String, i64)> = c
        .query(
            "SELECT resource, sum(quantity)::int8 FROM hourly_totals WHERE lower(resource) = $1 GROUP BY 1",
            &[&lower],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        spelled,
        vec![(upper.to_string(), 3_000_000)],
        "one total, under the fleet's first spelling"
    );
    assert_eq!(pg.record_count().await.unwrap(), 6);
}

/// The heartbeat publishes the `received_at` of the oldest unforwarded record as the watermark (replica clock),
/// and once the outbox is empty `now` less the slack; the outbox size goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_publishes_the_forward_watermark() {
    let Some(db) = TestDb::create("heartbeat_publishes_the_forward_watermark") else {
        return;
    };
    let pg = pg(&db).await;
    let now = t("12:30");
    let r = Replica::new(&db, "hb", now);
    r.ingest(vec![rec(Some("x"), "api_calls", t("12:29"), "1")])
        .await;
    r.clock.advance(Duration::seconds(40));
    r.ingest(vec![rec(Some("y"), "api_calls", t("12:30"), "1")])
        .await;
    let fleet = r.settings.fleet.clone().unwrap();
    let started = now.timestamp();
    meterd::fleet::beat(&fleet, &r.journal, &pg, &r.shared, started)
        .await
        .unwrap();
    let rows = pg.replicas().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].replica_id, "hb");
    assert_eq!(
        rows[0].watermark,
        now.timestamp(),
        "oldest unforwarded record"
    );
    assert_eq!(rows[0].heartbeat_at, now.timestamp() + 40);
    assert_eq!(rows[0].unforwarded, 2);
    r.drain(&pg).await;
    r.clock.advance(Duration::seconds(20));
    meterd::fleet::beat(&fleet, &r.journal, &pg, &r.shared, started)
        .await
        .unwrap();
    let rows = pg.replicas().await.unwrap();
    assert_eq!(
        rows[0].watermark,
        now.timestamp() + 60 - meterd::fleet::WATERMARK_SLACK_SECS
    );
    assert_eq!(rows[0].unforwarded, 0);
    let live = pg
        .live_replicas(now.timestamp() + 60 + 31, 30)
        .await
        .unwrap();
    assert!(
        live.is_empty(),
        "a replica silent for longer than the timeout is not live"
    );
}

/// Retention (the emitter's, and fleet mode's local one) never deletes a record still waiting in the outbox; once
/// forwarded it goes like any record past the dedupe window. Needs no PostgreSQL.
#[tokio::test]
async fn retention_keeps_unforwarded_records() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), "postgres://u@127.0.0.1:1/none", "ret");
    let journal = Journal::open(&settings.journal.path).unwrap();
    let t0 = t("12:30");
    let fleet_rules = meterd::fleet::rules(&settings, t0);
    let mut single_rules = fleet_rules;
    single_rules.outbox = false;
    journal
        .write(move |c| {
            usage::ingest(c, &[rec(Some("fleet"), "api_calls", t0, "1")], &fleet_rules)?.unwrap();
            usage::ingest(
                c,
                &[rec(Some("single"), "api_calls", t0, "1")],
                &single_rules,
            )?
            .unwrap();
            Ok(())
        })
        .await
        .unwrap();
    let later = t0 + Duration::days(8);
    let window = Duration::days(7);
    let (_, deleted) = journal
        .write(move |c| usage::apply_retention(c, later, Duration::days(730), window))
        .await
        .unwrap();
    assert_eq!(deleted, 1, "only the record that is not waiting");
    assert_eq!(
        journal
            .outbox_compact(later, Duration::days(730), window)
            .await
            .unwrap(),
        0
    );
    let waiting = journal.outbox_batch(10).await.unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].idem_key, "fleet");
    journal
        .outbox_mark_forwarded(vec![waiting[0].seq])
        .await
        .unwrap();
    assert_eq!(
        journal
            .outbox_compact(later, Duration::days(730), window)
            .await
            .unwrap(),
        1
    );
    assert_eq!(journal.read(usage::record_count).await.unwrap(), 0);
}

fn metric(d: &Daemon, name: &str) -> Option<f64> {
    let text = http()
        .get(format!("{}/metrics", d.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn wait_for(what: &str, d: &Daemon, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            panic!("{what} not reached; logs:\n{}", d.log_text());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// One runtime for the blocking tests: the pool's connections live on the runtime that opened them.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
    .block_on(f)
}

/// `meterd run` in fleet mode with PostgreSQL unreachable (a proxy that refuses) acknowledges every record into
/// its outbox, shows the lag in its metrics, and forwards everything by itself once PostgreSQL is reachable;
/// cut again mid-run, it catches up again. Records without `id` get generated keys. The URL (with a password)
/// appears in no log line, status document or metric.
#[test]
fn a_replica_keeps_acknowledging_while_postgres_is_down_and_catches_up() {
    let Some(db) = TestDb::create("a_replica_keeps_acknowledging_while_postgres_is_down") else {
        return;
    };
    let (server, user) = db.server();
    let proxy = Proxy::start(&server, false);
    let url = format!(
        "postgres://{user}:Sup3r-s3cret-pw@127.0.0.1:{}/{}?sslmode=prefer",
        proxy.port,
        db.name()
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(
        dir.path(),
        "",
        "[marketplace]\nmode = \"emulator\"\n[fleet]\nreplica_id = \"replica-1\"\nheartbeat = \"1s\"\n",
    );
    let d = Daemon::start(dir.path(), &cfg, &[("METERD_FLEET__URL", &url)]);
    let now = Utc::now();
    let post = |n: usize, tag: &str| {
        let batch: Vec<_> = (0..n)
            .map(|i| {
                let mut r = json!({"resource": R, "dimension": "api_calls", "quantity": 1, "time": common::ts(now)});
                if i % 2 == 0 {
                    r["id"] = json!(format!("{tag}-{i}"));
                }
                r
            })
            .collect();
        let r = http()
            .post(format!("{}/v1/usage", d.url))
            .header("content-type", "application/json")
            .body(serde_json::to_string(&batch).unwrap())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "{}", r.text().unwrap());
    };
    post(10, "down");
    wait_for("the outbox gauge", &d, || {
        metric(&d, "meterd_fleet_unforwarded_records") == Some(10.0)
    });
    let check = PgJournal::connect(&db.url, 4).unwrap();
    block_on(check.migrate()).unwrap(); // the replica could not: nothing is there yet
    assert_eq!(block_on(check.record_count()).unwrap(), 0);

    proxy.set_open(true);
    wait_for("every record forwarded", &d, || {
        block_on(check.record_count()).unwrap() == 10
    });
    wait_for("the outbox gauge emptied", &d, || {
        metric(&d, "meterd_fleet_unforwarded_records") == Some(0.0)
    });
    // Cut again: still acknowledging; restored: caught up.
    proxy.set_open(false);
    post(6, "cut");
    proxy.set_open(true);
    wait_for("caught up after the second cut", &d, || {
        block_on(check.record_count()).unwrap() == 16
    });
    let totals = block_on(check.totals_of(R)).unwrap();
    assert_eq!(totals.iter().map(|x| x.3).sum::<i64>(), 16_000_000);
    let c = block_on(check.client()).unwrap();
    let generated: i64 = block_on(c.query_one(
        "SELECT COUNT(*) FROM records WHERE idem_key LIKE 'meterd-gen:%' AND replica = 'replica-1'",
        &[],
    ))
    .unwrap()
    .get(0);
    assert_eq!(generated, 8, "records without id got generated keys");
    wait_for("the heartbeat", &d, || {
        block_on(check.replicas())
            .unwrap()
            .iter()
            .any(|r| r.replica_id == "replica-1" && r.unforwarded == 0)
    });

    let status = http()
        .get(format!("{}/v1/status", d.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let metrics = http()
        .get(format!("{}/metrics", d.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let cli_status = d.cli(&["status", "--json"]);
    let logs = d.log_text();
    for (what, text) in [
        ("log", logs.as_str()),
        ("status", status.as_str()),
        ("metrics", metrics.as_str()),
        ("cli status", &String::from_utf8_lossy(&cli_status.stdout)),
        (
            "cli status stderr",
            &String::from_utf8_lossy(&cli_status.stderr),
        ),
    ] {
        assert!(
            !text.contains("Sup3r-s3cret-pw"),
            "the password is in the {what}:\n{text}"
        );
    }
    assert!(
        logs.contains("not reachable") || logs.contains("failed; retrying"),
        "the outage is logged:\n{logs}"
    );
    // `POST /v1/flush` runs a pass of the fleet emitter (the local SQLite emitter does not run in fleet mode);
    // the hour is open: nothing is frozen.
    let flush = http().post(format!("{}/v1/flush", d.url)).send().unwrap();
    assert_eq!(flush.status().as_u16(), 200, "{}", flush.text().unwrap());
    let local_events = d.status()["pending_events"].as_i64().unwrap_or(0);
    assert_eq!(local_events, 0, "nothing frozen");
}

/// `meterd forward --journal PATH` on a copy of a dead replica's journal ships its waiting records, prints a
/// summary and exits 0; again (or on a second copy) it adds nothing.
#[test]
fn meterd_forward_ships_a_copied_journal_once() {
    let Some(db) = TestDb::create("meterd_forward_ships_a_copied_journal_once") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    let hour = now.timestamp().div_euclid(HOUR) * HOUR;
    {
        let settings = settings(dir.path(), db.url.expose(), "dead");
        let journal = Journal::open(&settings.journal.path).unwrap();
        let rules = meterd::fleet::rules(&settings, now);
        let records: Vec<NewRecord> = (0..25)
            .map(|i| rec(Some(&format!("dead-{i}")), "api_calls", now, "0.5"))
            .collect();
        journal
            .write_blocking(move |c| usage::ingest(c, &records, &rules).map(|r| r.unwrap()))
            .unwrap();
        journal.close();
    }
    let copy = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let f = f.unwrap();
        if f.file_name().to_string_lossy().starts_with("journal.db") {
            std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
        }
    }
    let cfg = dir.path().join("forward.toml");
    std::fs::write(
        &cfg,
        "[marketplace]\nmode = \"emulator\"\n[fleet]\nreplica_id = \"rescuer\"\nforward_batch = 10\n",
    )
    .unwrap();
    let run = |journal: &Path| {
        let out = std::process::Command::new(common::bin())
            .args(["forward", "--json", "--config"])
            .arg(&cfg)
            .arg("--journal")
            .arg(journal)
            .env("METERD_FLEET__URL", db.url.expose())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str::<serde_json::Value>(line.trim()).unwrap()
    };
    let first = run(&copy.path().join("journal.db"));
    assert_eq!(first["waiting"], 25);
    assert_eq!(first["inserted"], 25);
    assert_eq!(first["left"], 0);
    let second = run(&copy.path().join("journal.db"));
    assert_eq!(
        (second["waiting"].as_i64(), second["forwarded"].as_i64()),
        (Some(0), Some(0))
    );
    let original = run(&dir.path().join("journal.db"));
    assert_eq!(
        (
            original["inserted"].as_i64(),
            original["duplicates"].as_i64()
        ),
        (Some(0), Some(25)),
        "a second copy of the same journal counts once"
    );
    let pg = PgJournal::connect(&db.url, 1).unwrap();
    let totals = block_on(pg.totals_of(R)).unwrap();
    assert_eq!(totals.len(), 1);
    assert_eq!(
        (totals[0].2, totals[0].3, totals[0].4),
        (hour, 12_500_000, 25)
    );
    let c = block_on(pg.client()).unwrap();
    let by: String = block_on(c.query_one("SELECT DISTINCT replica FROM records", &[]))
        .unwrap()
        .get(0);
    assert_eq!(by, "forward@rescuer");

    // Without a URL it says what to set.
    let out = std::process::Command::new(common::bin())
        .args(["forward", "--config"])
        .arg(dir.path().join("none.toml"))
        .arg("--journal")
        .arg(copy.path().join("journal.db"))
        .env_remove("METERD_FLEET__URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
}
