//! The fleet emission benchmark (`bench/fleet-emit.sh`; ignored in `cargo test`): three replicas' fleet
//! emitters, `emit.concurrency` 4 each, claim and send `FLEET_BENCH_EVENTS` (100,000) frozen events to the
//! in-process emulator answering every call after `FLEET_BENCH_LATENCY_MS` (20 ms). It prints the elapsed time
//! next to the bound `events / 25 x latency / (3 x 4)` and their ratio (target <= 1.25).
//!
//! The totals are written straight into PostgreSQL (one `INSERT ... SELECT generate_series`) and frozen before
//! the clock starts (the freeze time is printed apart); the timed part is claim, bill, body, send and settle.

mod common;

use chrono::Duration;
use common::rig::{Rig, env, t};
use meterd::clock::SharedClock;
use meterd::config::FleetSettings;
use meterd::emit;
use meterd::emulator::{EmulatorConfig, Plan, Subscription};
use meterd::fleet::emit::FleetEmitter;
use meterd::journal::pg::PgJournal;
use meterd::journal::pg::freeze::FreezeRule;
use meterd::journal::pg::testing::TestDb;
use std::sync::Arc;

/// CPU seconds (user + system) of process `pid` so far (`/proc/PID/stat`; 0 when unreadable).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which ends with the last ')'): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// The PostgreSQL backends serving this benchmark's database, with their CPU seconds so far.
async fn backends_cpu(pg: &PgJournal) -> std::collections::HashMap<i32, f64> {
    let c = pg.client().await.unwrap();
    c.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        let pid: i32 = r.get(0);
        (pid, cpu_secs(&pid.to_string()))
    })
    .collect()
}

fn var(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: bench/fleet-emit.sh"]
async fn fleet_emission_benchmark() {
    let Some(db) = TestDb::create("fleet_emission_benchmark") else {
        return;
    };
    let events = var("FLEET_BENCH_EVENTS", 100_000) as i64;
    let latency_ms = var("FLEET_BENCH_LATENCY_MS", 20);
    let (replicas, concurrency) = (3usize, 4usize);
    let hours = 20i64;
    let resources = (events + hours - 1) / hours;
    let guid = |i: i64| format!("{i:08x}-1111-4111-8111-{i:012x}");
    let emu_config = EmulatorConfig {
        subscriptions: (0..resources)
            .map(|i| Subscription::new(guid(i), "gold"))
            .collect(),
        plans: vec![Plan {
            id: "gold".into(),
            dimensions: None,
        }],
        latency: std::time::Duration::from_millis(latency_ms),
        ..Default::default()
    };
    let rig = Rig::at(t("09:30"))
        .top("default_plan = \"gold\"\n[subscriptions]\ncheck = false")
        .emit(&format!("concurrency = {concurrency}"))
        .emulator(emu_config)
        .start()
        .await;
    let pg = PgJournal::connect(&db.url, 4).unwrap();
    pg.migrate().await.unwrap();
    if let Ok(ff) = std::env::var("FLEET_BENCH_FILLFACTOR") {
        // Compare page fill settings of `outbound_events` (the schema's is 30) on the same build.
        let ff: u32 = ff.parse().expect("FLEET_BENCH_FILLFACTOR: a percentage");
        pg.client()
            .await
            .unwrap()
            .batch_execute(&format!(
                "ALTER TABLE outbound_events SET (fillfactor = {ff})"
            ))
            .await
            .unwrap();
    }
    // `events` keys: `resources` resources x the 20 hours 2026-03-09T13:00 .. 2026-03-10T08:00, 1 unit each.
    let first_hour = t("2026-03-09T13:00:00Z").timestamp();
    pg.client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records)
             SELECT lpad(to_hex(i / $3::bigint), 8, '0') || '-1111-4111-8111-' || lpad(to_hex(i / $3::bigint), 12, '0'),
                    '', 'api_calls', $1::bigint + (i % $3::bigint) * 3600, 1000000, 1
             FROM generate_series(0::bigint, $2::bigint - 1) AS i",
            &[&first_hour, &events, &hours],
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let rule = FreezeRule {
        grace: rig.settings.emit.grace,
        safety_margin: rig.settings.emit.safety_margin,
        max_wait: Duration::minutes(15),
        replica_timeout: Duration::seconds(30),
    };
    let frozen = pg.freeze(t("09:30"), rule).await.unwrap();
    assert_eq!(frozen.frozen as i64, events);
    let freeze_secs = started.elapsed().as_secs_f64();

    let mut emitters = Vec::new();
    for r in 0..replicas {
        let shared: SharedClock = Arc::new(rig.clock.clone());
        let client = emit::client(&rig.settings, &env(), shared.clone()).unwrap();
        emitters.push(Arc::new(FleetEmitter::new(
            rig.settings.clone(),
            FleetSettings {
                url: db.url.clone(),
                url_file: None,
                replica_id: format!("bench-{r}"),
                max_wait: Duration::minutes(15),
                heartbeat: Duration::seconds(10),
                replica_timeout: Duration::seconds(30),
                lease: Duration::seconds(60),
                forward_batch: 1000,
                pool_size: concurrency + 2,
            },
            PgJournal::connect(&db.url, concurrency + 2).unwrap(),
            shared,
            client,
        )));
    }
    let pg_before = backends_cpu(&pg).await;
    let self_before = cpu_secs("self");
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for e in &emitters {
        let e = e.clone();
        tasks.push(tokio::spawn(async move { e.pass().await.unwrap() }));
    }
    let mut calls = 0;
    for task in tasks {
        calls += task.await.unwrap().calls;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let self_cpu = cpu_secs("self") - self_before;
    let pg_cpu: f64 = backends_cpu(&pg)
        .await
        .iter()
        .map(|(pid, cpu)| cpu - pg_before.get(pid).copied().unwrap_or(0.0))
        .sum();
    let accepted: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT COUNT(*) FROM outbound_events WHERE state = 'accepted'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(accepted, events, "every event accepted once");
    // How the table took the updates: its size after the run, and the share of updates that were HOT (no new
    // index entries). The counters reach pg_stat_user_tables once the backends report them (at the latest
    // when they end), so this may undercount a little.
    let table = pg.client().await.unwrap().query_one(
        "SELECT pg_relation_size('outbound_events'), pg_indexes_size('outbound_events'),
                COALESCE((SELECT n_tup_hot_upd::float8 / NULLIF(n_tup_upd, 0) FROM pg_stat_user_tables
                          WHERE relname = 'outbound_events'), 0)",
        &[],
    ).await.unwrap();
    let (heap, indexes, hot): (i64, i64, f64) = (table.get(0), table.get(1), table.get(2));
    assert_eq!(rig.emu.accepted_events().len() as i64, events);
    let bound =
        events as f64 / 25.0 * (latency_ms as f64 / 1000.0) / (replicas * concurrency) as f64;
    println!(
        "fleet emission: {events} events, {replicas} replicas x concurrency {concurrency}, {latency_ms} ms/call: \
         {elapsed:.2} s ({calls} calls); bound {bound:.2} s; ratio {:.2} (target <= 1.25); freeze beforehand {freeze_secs:.2} s",
        elapsed / bound
    );
    println!(
        "cpu during emission: this process (3 replicas + emulator) {self_cpu:.2} s = {:.2} ms/call; \
         PostgreSQL backends of the database {pg_cpu:.2} s = {:.2} ms/call",
        self_cpu * 1000.0 / calls as f64,
        pg_cpu * 1000.0 / calls as f64,
    );
    println!(
        "outbound_events after: heap {:.1} MB, indexes {:.1} MB; HOT updates {:.0}%",
        heap as f64 / 1e6,
        indexes as f64 / 1e6,
        hot * 100.0
    );
}
