//! Fleet retention benchmark (docs/performance.md, "Fleet retention"): prints one JSON line.
//!
//! `fleet_retention_bench EVENTS [REPLICAS]`: a fresh PostgreSQL database seeded with EVENTS settled outbound
//! events of old hours (100 resources per hour), one hourly total each and one raw record each, past
//! `journal.retention` and `ingest.dedupe_window`. Then:
//!
//! - **chunks**: `PgJournal::apply_retention` with one chunk of each kind per call (1000 rows), called until
//!   nothing is left; each call's duration is an upper bound of the longest transaction (the longest time any row
//!   is locked). Prints the longest and the mean.
//! - **throughput**: the same seed again, deleted by REPLICAS concurrent full runs (`apply_retention` with the
//!   default chunking), next to the ceiling: the same seed deleted by one plain loop of the bare statements in
//!   chunks of 1000 (`DELETE ... WHERE id IN (SELECT ... WHERE <the same condition> LIMIT 1000)` of totals,
//!   events and records, on the same indexes; no sums, no `SKIP LOCKED`), rows/s. With REPLICAS = 1 the ratio
//!   is retention's own cost; with more, what running it on several replicas at once gives.
//!
//! Needs `METERD_TEST_POSTGRES_URL` (an admin URL: each part creates and drops its own database).

use meterd::journal::pg::PgJournal;
use meterd::journal::pg::retention::RetentionRules;
use meterd::journal::pg::testing::TestDb;
use std::time::Instant;

const NOW: i64 = 1_773_100_800; // 2026-03-10T00:00:00Z
const DAY: i64 = 86_400;

async fn seed(db: &TestDb, events: i64) -> PgJournal {
    let pg = PgJournal::connect(&db.url, 8).expect("pool");
    pg.migrate().await.expect("migrate");
    let c = pg.client().await.expect("client");
    // Hours from 800 days ago on, 100 resources per hour; every row past 730 days of retention and 7 of dedupe.
    let base = (NOW - 800 * DAY) / 3600 * 3600;
    c.batch_execute(&format!(
        "INSERT INTO outbound_events (id, resource, plan, dimension, hour, quantity, body, state, next_attempt_at,
                                      deadline, frozen_at, finished_at, send_quantity, term_start, billable, included)
         SELECT i, 'r' || (i % 100), 'gold', 'api_calls', {base} + (i / 100) * 3600, 1000000, '{{}}',
                CASE WHEN i % 7 = 0 THEN 'included' ELSE 'accepted' END, 0, 0, 0, 0, 1000000,
                {base} + (i / 100) * 3600 - ({base} + (i / 100) * 3600) % (30 * 86400), 1, 0
         FROM generate_series(1, {events}) AS i;
         SELECT setval('outbound_events_id_seq', {events});
         INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, outbound_id)
         SELECT resource, plan, dimension, hour, quantity, 1, id FROM outbound_events;
         INSERT INTO records (idem_key, replica, resource, plan, dimension, event_time, origin_hour, hour, quantity,
                              received_at, forwarded_at)
         SELECT 'k' || id, 'r1', resource, plan, dimension, hour, hour, hour, quantity, hour + 60, hour + 61
         FROM outbound_events;
         ANALYZE;"
    ))
    .await
    .expect("seed");
    pg
}

fn rules() -> RetentionRules {
    let now = chrono::DateTime::from_timestamp(NOW, 0).expect("now");
    RetentionRules::new(now, chrono::Duration::days(730), chrono::Duration::days(7))
}

async fn count(pg: &PgJournal, table: &str) -> i64 {
    let c = pg.client().await.expect("client");
    c.query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let events: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let replicas: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let rows = 3 * events; // events + totals + records

    // Chunks: one chunk of each kind per call.
    let db = TestDb::create("fleet_retention_bench chunks").expect("METERD_TEST_POSTGRES_URL");
    let pg = seed(&db, events).await;
    let mut one = rules();
    one.max_chunks = 1;
    let (mut longest, mut calls, mut deleted) = (0f64, 0u64, 0u64);
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let s = pg.apply_retention(&one).await.expect("retention");
        let took = t.elapsed().as_secs_f64();
        if !s.any() {
            break;
        }
        longest = longest.max(took);
        calls += 1;
        deleted += s.events + s.hourly_totals + s.records;
    }
    let chunked = started.elapsed().as_secs_f64();
    assert_eq!(deleted as i64, rows, "every row deleted once");
    drop(pg);
    drop(db);

    // Throughput: REPLICAS full runs at once.
    let db = TestDb::create("fleet_retention_bench throughput").expect("METERD_TEST_POSTGRES_URL");
    let pg = seed(&db, events).await;
    let started = Instant::now();
    let mut runs = Vec::new();
    for _ in 0..replicas {
        let pg = PgJournal::connect(&db.url, 2).expect("pool");
        runs.push(tokio::spawn(async move {
            let mut total = 0u64;
            loop {
                let s = pg.apply_retention(&rules()).await.expect("retention");
                total += s.events + s.hourly_totals + s.records;
                if !s.more {
                    return total;
                }
            }
        }));
    }
    let mut deleted = 0u64;
    for r in runs {
        deleted += r.await.expect("run");
    }
    let retention_secs = started.elapsed().as_secs_f64();
    assert_eq!(deleted as i64, rows, "every row deleted once");
    for t in ["outbound_events", "hourly_totals", "records"] {
        assert_eq!(count(&pg, t).await, 0, "{t}");
    }
    drop(pg);
    drop(db);

    // Ceiling: the bare deletes, one loop.
    let db = TestDb::create("fleet_retention_bench ceiling").expect("METERD_TEST_POSTGRES_URL");
    let pg = seed(&db, events).await;
    let c = pg.client().await.expect("client");
    let cutoff = rules().cutoff();
    let started = Instant::now();
    let mut deleted = 0u64;
    loop {
        let n = c
            .execute(
                "WITH ev AS (SELECT id FROM outbound_events WHERE hour < $1 AND state <> 'pending'
                             ORDER BY hour, id LIMIT 1000),
                      t AS (DELETE FROM hourly_totals WHERE outbound_id IN (SELECT id FROM ev) RETURNING 1)
                 DELETE FROM outbound_events WHERE id IN (SELECT id FROM ev)",
                &[&cutoff],
            )
            .await
            .expect("delete");
        if n == 0 {
            break;
        }
        deleted += 2 * n;
    }
    loop {
        let n = c
            .execute(
                "DELETE FROM records WHERE idem_key IN (
                     SELECT idem_key FROM records WHERE received_at < $1 ORDER BY received_at LIMIT 1000)",
                &[&(NOW - 7 * DAY)],
            )
            .await
            .expect("delete");
        if n == 0 {
            break;
        }
        deleted += n;
    }
    let ceiling_secs = started.elapsed().as_secs_f64();
    assert_eq!(deleted as i64, rows, "every row deleted once");
    drop(c);
    drop(pg);
    drop(db);

    let rate = |secs: f64| (rows as f64 / secs).round();
    println!(
        "{}",
        serde_json::json!({
            "events": events,
            "rows": rows,
            "chunk_calls": calls,
            "chunk_longest_s": (longest * 1000.0).round() / 1000.0,
            "chunk_mean_s": ((chunked / calls.max(1) as f64) * 1000.0).round() / 1000.0,
            "replicas": replicas,
            "retention_rows_per_s": rate(retention_secs),
            "ceiling_rows_per_s": rate(ceiling_secs),
            "ratio": ((retention_secs.recip() / ceiling_secs.recip()) * 100.0).round() / 100.0,
        })
    );
}
