//! Fleet forward benchmark (bench/fleet-forward.sh): prints one JSON line per part.
//!
//! - `throughput N BATCH [RESOURCES]`: N records waiting in a local outbox, forwarded into a fresh PostgreSQL database with
//!   `meterd::fleet::drain` (read from SQLite, insert with the late rule and hourly totals, mark locally), next to
//!   the ceiling: the same N rows inserted from memory into the same `records` table by a plain loop of
//!   multi-row `INSERT ... SELECT FROM unnest(...)` statements of BATCH rows, each its own transaction.
//! - `profile N BATCH`: the same forward, batch after batch, with its steps timed apart (SQLite read, the
//!   PostgreSQL transaction, the local durable mark), in ms per batch.
//! - `lag RATE SECONDS REPLICAS`: REPLICAS replicas in this process (each its own SQLite outbox and forwarder,
//!   as `meterd run` starts it), records ingested at RATE records/s in total for SECONDS; every 20 ms the age of
//!   each replica's oldest record not yet in PostgreSQL is sampled (from the ingest instant of each batch, so the
//!   figure is exact to the sampling, not rounded to the second of `received_at`); prints p50/p99/max.
//!
//! Needs `METERD_TEST_POSTGRES_URL` (an admin URL: each part creates and drops its own database).

use meterd::clock::{SharedClock, SystemClock};
use meterd::config::Settings;
use meterd::journal::Journal;
use meterd::journal::pg::PgJournal;
use meterd::journal::pg::testing::TestDb;
use meterd::journal::usage::NewRecord;
use meterd::quantity::Micros;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Resources the records of `throughput` and `profile` are spread over (round robin): 50 by default, 20 records
/// per key in a batch of 1000; the optional last argument changes it (10,000: one record per key per batch, as an
/// app with many subscriptions sending small amounts each).
static RESOURCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(50);

fn settings(dir: &std::path::Path, url: &str, replica: &str, batch: usize) -> Arc<Settings> {
    let text = format!(
        "[marketplace]\nmode = \"emulator\"\n[journal]\npath = \"{}\"\n[fleet]\nreplica_id = \"{replica}\"\n\
         forward_batch = {batch}\nheartbeat = \"1s\"\n[[dimensions]]\nid = \"api_calls\"\n",
        dir.join("journal.db").display()
    );
    let env = BTreeMap::from([("METERD_FLEET__URL".to_string(), url.to_string())]);
    Arc::new(meterd::config::load_str(&text, "bench", &env).expect("settings"))
}

fn resource(i: usize) -> String {
    let n = RESOURCES.load(std::sync::atomic::Ordering::Relaxed);
    format!("{:08x}-1111-4111-8111-111111111111", i % n)
}

fn records(prefix: &str, from: usize, n: usize) -> Vec<NewRecord> {
    let now = chrono::Utc::now();
    (from..from + n)
        .map(|i| NewRecord {
            resource: resource(i),
            plan: None,
            dimension: "api_calls".into(),
            time: now,
            quantity: Micros(1_000_000),
            key: Some(format!("{prefix}-{i}")),
        })
        .collect()
}

async fn ingest(journal: &Journal, settings: &Settings, recs: Vec<NewRecord>) {
    let rules = meterd::fleet::rules(settings, chrono::Utc::now());
    journal
        .ingest(recs, rules)
        .await
        .expect("ingest")
        .expect("not late");
}

async fn throughput(n: usize, batch: usize) {
    let db =
        TestDb::create("fleet_bench_throughput").expect("METERD_TEST_POSTGRES_URL is required");
    let pg = PgJournal::connect(&db.url, 4).expect("connect");
    pg.migrate().await.expect("migrate");
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), db.url.expose(), "bench", batch);
    let journal = Journal::open(&s.journal.path).expect("journal");
    for from in (0..n).step_by(1000) {
        ingest(&journal, &s, records("t", from, 1000.min(n - from))).await;
    }
    let clock: SharedClock = Arc::new(SystemClock);
    let started = Instant::now();
    let (done, result) = meterd::fleet::drain(&journal, &pg, "bench", &s, &clock, batch).await;
    result.expect("forward");
    let forward_s = started.elapsed().as_secs_f64();
    assert_eq!(done.inserted, n, "every record forwarded once");
    assert_eq!(pg.record_count().await.expect("count"), n as i64);

    // The ceiling: the same rows from memory, plain multi-row INSERTs into the same (emptied) table.
    let client = pg.client().await.expect("client");
    client
        .batch_execute("TRUNCATE records, hourly_totals, resource_spellings")
        .await
        .expect("truncate");
    let now = chrono::Utc::now().timestamp();
    let hour = now.div_euclid(3600) * 3600;
    let stmt = client
        .prepare(
            "INSERT INTO records (idem_key, replica, resource, plan, dimension, event_time, origin_hour, hour,
                                  quantity, received_at, forwarded_at)
             SELECT k, 'bench', r, '', 'api_calls', $3, $4, $4, 1000000, $3, $3
             FROM unnest($1::text[], $2::text[]) AS t(k, r)",
        )
        .await
        .expect("prepare");
    let started = Instant::now();
    for from in (0..n).step_by(batch) {
        let m = batch.min(n - from);
        let keys: Vec<String> = (from..from + m).map(|i| format!("c-{i}")).collect();
        let res: Vec<String> = (from..from + m).map(resource).collect();
        client
            .execute(&stmt, &[&keys, &res, &now, &hour])
            .await
            .expect("insert");
    }
    let ceiling_s = started.elapsed().as_secs_f64();
    drop(client);
    let fwd = n as f64 / forward_s;
    let ceil = n as f64 / ceiling_s;
    println!(
        "{}",
        serde_json::json!({
            "part": "throughput", "records": n, "batch": batch,
            "resources": RESOURCES.load(std::sync::atomic::Ordering::Relaxed),
            "forward_records_per_s": fwd.round(), "ceiling_records_per_s": ceil.round(),
            "ratio": (fwd / ceil * 100.0).round() / 100.0,
            "forward_s": forward_s, "ceiling_s": ceiling_s,
        })
    );
}

/// `profile N BATCH`: the forward of `throughput`, one batch after another without overlap, timing its three
/// steps apart (SQLite read, the PostgreSQL transaction, the local durable mark): where the ms of a batch go.
async fn profile(n: usize, batch: usize) {
    let db = TestDb::create("fleet_bench_profile").expect("METERD_TEST_POSTGRES_URL is required");
    let pg = PgJournal::connect(&db.url, 4).expect("connect");
    pg.migrate().await.expect("migrate");
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(dir.path(), db.url.expose(), "bench", batch);
    let journal = Journal::open(&s.journal.path).expect("journal");
    for from in (0..n).step_by(1000) {
        ingest(&journal, &s, records("p", from, 1000.min(n - from))).await;
    }
    let (mut read, mut forward, mut mark, mut batches) = (0.0, 0.0, 0.0, 0usize);
    let started = Instant::now();
    loop {
        let t0 = Instant::now();
        let b = journal.outbox_batch(batch).await.expect("read");
        let t1 = Instant::now();
        if b.is_empty() {
            break;
        }
        let rules = meterd::fleet::rules(&s, chrono::Utc::now());
        pg.forward("bench", &b, &rules).await.expect("forward");
        let t2 = Instant::now();
        journal
            .outbox_mark_forwarded(b.iter().map(|r| r.seq).collect())
            .await
            .expect("mark");
        let t3 = Instant::now();
        read += (t1 - t0).as_secs_f64();
        forward += (t2 - t1).as_secs_f64();
        mark += (t3 - t2).as_secs_f64();
        batches += 1;
    }
    let total = started.elapsed().as_secs_f64();
    let ms = |x: f64| (x / batches.max(1) as f64 * 1000.0 * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "part": "profile", "records": n, "batch": batch, "batches": batches,
            "resources": RESOURCES.load(std::sync::atomic::Ordering::Relaxed),
            "records_per_s": (n as f64 / total).round(),
            "ms_per_batch": ms(total), "sqlite_read_ms": ms(read), "pg_forward_ms": ms(forward),
            "local_mark_ms": ms(mark),
        })
    );
}

/// Per replica: (ingest instant, cumulative records after the batch).
type Batches = Arc<Mutex<VecDeque<(Instant, usize)>>>;

async fn lag(rate: usize, seconds: u64, replicas: usize) {
    let db = TestDb::create("fleet_bench_lag").expect("METERD_TEST_POSTGRES_URL is required");
    let pg = PgJournal::connect(&db.url, 4).expect("connect");
    pg.migrate().await.expect("migrate");
    let clock: SharedClock = Arc::new(SystemClock);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut dirs = Vec::new();
    let mut reps = Vec::new();
    for r in 0..replicas {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = settings(dir.path(), db.url.expose(), &format!("replica-{r}"), 1000);
        let journal = Journal::open(&s.journal.path).expect("journal");
        let own =
            PgJournal::connect(&db.url, s.fleet.as_ref().unwrap().pool_size).expect("connect");
        let tasks = meterd::fleet::spawn(
            s.clone(),
            s.fleet.clone().unwrap(),
            journal.clone(),
            own,
            clock.clone(),
            stop_rx.clone(),
        );
        let batches: Batches = Arc::default();
        reps.push((s, journal, batches, tasks));
        dirs.push(dir);
    }
    // Generators: every 10 ms each replica ingests its share (one request, as an app's batch would be).
    let per_tick = (rate / replicas / 100).max(1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut gens = Vec::new();
    for (r, (s, journal, batches, _)) in reps.iter().enumerate() {
        let (s, journal, batches) = (s.clone(), journal.clone(), batches.clone());
        gens.push(tokio::spawn(async move {
            let mut total = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < deadline {
                tick.tick().await;
                let at = Instant::now();
                ingest(&journal, &s, records(&format!("r{r}"), total, per_tick)).await;
                total += per_tick;
                batches.lock().unwrap().push_back((at, total));
            }
            total
        }));
    }
    let mut samples: Vec<f64> = Vec::new();
    let mut sampler = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < deadline {
        sampler.tick().await;
        for (_, journal, batches, _) in &reps {
            let waiting = journal.outbox_stats().await.expect("stats").unforwarded as usize;
            let q = batches.lock().unwrap();
            let total = q.back().map(|b| b.1).unwrap_or(0);
            let forwarded = total.saturating_sub(waiting);
            // The oldest batch with a record not yet forwarded.
            let lag = q
                .iter()
                .find(|(_, cum)| *cum > forwarded)
                .map(|(at, _)| at.elapsed().as_secs_f64())
                .unwrap_or(0.0);
            samples.push(lag);
        }
    }
    let mut ingested = 0;
    for g in gens {
        ingested += g.await.expect("generator");
    }
    // Let the forwarders finish, then check every record arrived once.
    let settle = Instant::now();
    while pg.record_count().await.expect("count") < ingested as i64
        && settle.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = pg.record_count().await.expect("count");
    let _ = stop_tx.send(true);
    for (_, _, _, t) in reps {
        let _ = t.forwarder.await;
        let _ = t.heartbeat.await;
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "part": "lag", "replicas": replicas, "target_rate": rate, "seconds": seconds,
            "ingested": ingested, "stored": stored,
            "achieved_rate": (ingested as f64 / seconds as f64).round(),
            "samples": samples.len(),
            "p50_s": (pct(0.5) * 1000.0).round() / 1000.0,
            "p99_s": (pct(0.99) * 1000.0).round() / 1000.0,
            "max_s": (pct(1.0) * 1000.0).round() / 1000.0,
        })
    );
    assert_eq!(
        stored, ingested as i64,
        "every acknowledged record is in PostgreSQL once"
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let part = args.first().map(String::as_str);
    if let (Some("throughput" | "profile"), Some(r)) =
        (part, args.get(3).and_then(|a| a.parse().ok()))
    {
        RESOURCES.store(r, std::sync::atomic::Ordering::Relaxed);
    }
    match args.first().map(String::as_str) {
        Some("throughput") => throughput(num(1, 100_000), num(2, 1000)).await,
        Some("profile") => profile(num(1, 100_000), num(2, 1000)).await,
        Some("lag") => lag(num(1, 10_000), num(2, 20) as u64, num(3, 3)).await,
        _ => {
            eprintln!(
                "usage: fleet_bench throughput N BATCH [RESOURCES] | profile N BATCH [RESOURCES] | lag RATE SECONDS REPLICAS"
            );
            std::process::exit(2);
        }
    }
}
