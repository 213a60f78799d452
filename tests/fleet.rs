//! Black box: the fleet (issue 14, "Tests"). Three `meterd run` processes, each with its own local journal and
//! `replica_id`, share one PostgreSQL database (`METERD_TEST_POSTGRES_URL`, a database of its own; skipped with a
//! message when the variable is unset) through a TCP proxy the test can cut, and send to the in-process emulator
//! with latency. Clients post to all three with retries (with and without ids, the same ids sometimes to two
//! replicas), replicas are SIGKILLed at random (also mid-send) and restarted on the same journal, PostgreSQL is
//! cut once. Time: the records are for hours 2-5 h ago; the replicas collect with `emit.grace = 11h` (nothing
//! closes) and then restart with `emit.grace = 0s` (every past hour closes at once), as `tests/reliability.rs`
//! does, so no test waits for the wall clock to pass an hour.

mod common;

use chrono::{DateTime, Duration, Timelike, Utc};
use common::proxy::Proxy;
use common::{Daemon, TOKEN_ENV, emu_rig, hour_start, http, ts};
use meterd::emulator::{EmulatorConfig, Phase, Route};
use meterd::journal::pg::PgJournal;
use meterd::journal::pg::testing::TestDb;
use meterd::quantity::Micros;
use rand::RngExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";
const DIMS: [&str; 2] = ["api_calls", "gb_processed"];
const TIMEOUT: StdDuration = StdDuration::from_secs(90);

/// One record as the client keeps it.
#[derive(Clone, Debug)]
struct Rec {
    id: Option<String>,
    resource: &'static str,
    dimension: &'static str,
    time: DateTime<Utc>,
    micros: i64,
}

fn body(batch: &[Rec]) -> Vec<Value> {
    batch
        .iter()
        .map(|r| {
            let mut v = json!({"resource": r.resource, "dimension": r.dimension, "time": ts(r.time),
                               "quantity": Micros(r.micros).to_decimal_string()});
            if let Some(id) = &r.id {
                v["id"] = json!(id);
            }
            v
        })
        .collect()
}

/// The clients' side: batches still to send (with ids: retried, to any replica, until acknowledged), the
/// ledger of acknowledged records, and the replicas' current addresses (a restarted replica has a new port).
#[derive(Default)]
struct Clients {
    queue: VecDeque<Vec<Rec>>,
    in_flight: usize,
    acked: Vec<Rec>,
    retried: u64,
    twice: u64,
    urls: Vec<String>,
}

fn post(client: &reqwest::blocking::Client, url: &str, batch: &[Rec]) -> Result<u16, String> {
    client
        .post(format!("{url}/v1/usage"))
        .json(&body(batch))
        .send()
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// Posts queued batches to random replicas until `stop`; a batch whose request failed (its replica was killed)
/// goes back to the queue and is sent again, with the same ids, to any replica. One batch in eight, once
/// acknowledged, is posted again to another replica (the same ids through two replicas).
fn sender(clients: Arc<Mutex<Clients>>, stop: Arc<AtomicBool>) {
    meterd::tls::install_crypto_provider();
    let http = reqwest::blocking::Client::builder()
        .timeout(StdDuration::from_secs(20))
        .build()
        .unwrap();
    let mut rng = rand::rng();
    while !stop.load(Ordering::SeqCst) {
        let (batch, urls) = {
            let mut c = clients.lock().unwrap();
            match c.queue.pop_front() {
                Some(b) => {
                    c.in_flight += 1;
                    (b, c.urls.clone())
                }
                None => {
                    drop(c);
                    std::thread::sleep(StdDuration::from_millis(5));
                    continue;
                }
            }
        };
        let first = rng.random_range(0..urls.len());
        let answer = post(&http, &urls[first], &batch);
        let again = rng.random_range(0..8) == 0;
        let mut c = clients.lock().unwrap();
        c.in_flight -= 1;
        match answer {
            Ok(202) => {
                c.acked.extend(batch.iter().cloned());
                if again {
                    c.twice += 1;
                    drop(c);
                    let second = (first + 1) % urls.len();
                    // Whatever it answers (that replica may be down), the ids count once.
                    let _ = post(&http, &urls[second], &batch);
                }
            }
            Ok(s) => panic!("ingest answered {s}"),
            Err(_) => {
                c.retried += 1;
                c.queue.push_back(batch);
            }
        }
    }
}

fn batches(
    next_id: &mut u64,
    n: usize,
    hours: &[DateTime<Utc>],
    rng: &mut impl rand::Rng,
) -> Vec<Vec<Rec>> {
    (0..n)
        .map(|_| {
            (0..rng.random_range(1..12))
                .map(|_| {
                    *next_id += 1;
                    let hour = hours[rng.random_range(0..hours.len())];
                    Rec {
                        id: Some(format!("fleet-{next_id}")),
                        resource: if rng.random_bool(0.5) { A } else { B },
                        dimension: DIMS[rng.random_range(0..2)],
                        time: (hour + Duration::seconds(rng.random_range(0..3600)))
                            .min(Utc::now() - Duration::seconds(1)),
                        micros: rng.random_range(1..5_000_000),
                    }
                })
                .collect()
        })
        .collect()
}

fn replica_config(dir: &Path, base: &str, replica: &str) -> String {
    common::config(
        dir,
        "",
        &format!(
            "{}[fleet]\nreplica_id = \"{replica}\"\nheartbeat = \"1s\"\nreplica_timeout = \"3s\"\nlease = \"5s\"\n\
             max_wait = \"2s\"\n",
            common::emulator_sections(base, "")
        ),
    )
}

fn wait_until(what: &str, logs: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > TIMEOUT {
            panic!("{what} not reached in {TIMEOUT:?}; logs:\n{}", logs());
        }
        std::thread::sleep(StdDuration::from_millis(100));
    }
}

/// Waits until the clients' queue is empty and nothing is in flight.
fn drain(clients: &Arc<Mutex<Clients>>, logs: impl Fn() -> String) {
    wait_until("the clients' queue drained", logs, || {
        let c = clients.lock().unwrap();
        c.queue.is_empty() && c.in_flight == 0
    });
}

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

fn hour_of(t: DateTime<Utc>) -> String {
    ts(t.with_minute(0).unwrap().with_second(0).unwrap())
}

fn settled(report: &Value) -> bool {
    report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| !matches!(h["outcome"].as_str(), Some("pending" | "closing")))
}

#[test]
fn three_replicas_with_kills_and_a_postgres_cut_send_each_hour_once_with_the_exact_sum() {
    let Some(db) = TestDb::create("fleet_blackbox") else {
        return;
    };
    // The run takes about 20 s; one that crossed a UTC hour boundary would close the "open" hour midway (and a
    // pass may or may not send it). Near the end of an hour, start in the next one instead (waits at most 90 s).
    let to_next_hour = hour_start(0) + Duration::hours(1) - Utc::now();
    if to_next_hour < Duration::seconds(90) {
        println!("the hour ends in {to_next_hour}; starting in the next one");
        std::thread::sleep(
            (to_next_hour + Duration::seconds(1))
                .to_std()
                .unwrap_or_default(),
        );
    }
    let started = Instant::now();
    let r = emu_rig(EmulatorConfig::default());
    r.emu.set_latency(StdDuration::from_millis(50));
    let (server, user) = db.server();
    let proxy = Proxy::start(&server, true);
    let url = format!(
        "postgres://{user}@127.0.0.1:{}/{}?sslmode=disable",
        proxy.port,
        db.name()
    );
    let check = PgJournal::connect(&db.url, 2).unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let configs: Vec<String> = (0..3)
        .map(|i| replica_config(dirs[i].path(), &r.base, &format!("replica-{i}")))
        .collect();
    let start = |i: usize, grace: &str| {
        Daemon::start(
            dirs[i].path(),
            &configs[i],
            &[
                TOKEN_ENV,
                ("METERD_FLEET__URL", &url),
                ("METERD_EMIT__GRACE", grace),
            ],
        )
    };

    // Phase 1: collecting (grace 11h: nothing closes). Clients post past-hour records with ids; replicas are
    // killed at random moments (mid-request) and restarted on their journals; PostgreSQL is cut for a while.
    let mut replicas: Vec<Daemon> = (0..3).map(|i| start(i, "11h")).collect();
    let all_logs = |ds: &[Daemon]| -> String {
        ds.iter()
            .enumerate()
            .map(|(i, d)| format!("--- replica-{i}\n{}", d.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let past: Vec<_> = (2..=5).map(hour_start).collect();
    let mut rng = rand::rng();
    let mut next_id = 0u64;
    let clients = Arc::new(Mutex::new(Clients {
        urls: replicas.iter().map(|d| d.url.clone()).collect(),
        ..Clients::default()
    }));
    clients
        .lock()
        .unwrap()
        .queue
        .extend(batches(&mut next_id, 150, &past, &mut rng));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..2)
        .map(|_| {
            let (c, s) = (clients.clone(), stop.clone());
            std::thread::spawn(move || sender(c, s))
        })
        .collect();
    let mut kills = 0;
    let mut no_id = Vec::new();
    for round in 0..6 {
        std::thread::sleep(StdDuration::from_millis(rng.random_range(100..500)));
        if round == 1 {
            proxy.set_open(false);
        }
        if round == 2 {
            // Records without ids, while PostgreSQL is cut: each replica acknowledges from its outbox. (Not
            // retried: a request cut by a kill could have been committed, and without an id that is not
            // idempotent, so these go to replicas not being killed.)
            let http = http();
            for (i, d) in replicas.iter().enumerate() {
                let batch: Vec<Rec> = (0..5)
                    .map(|k| Rec {
                        id: None,
                        resource: A,
                        dimension: DIMS[k % 2],
                        time: past[k % past.len()] + Duration::minutes(7 * (i as i64 + 1)),
                        micros: 250_000 * (k as i64 + 1),
                    })
                    .collect();
                assert_eq!(post(&http, &d.url, &batch), Ok(202));
                no_id.extend(batch);
            }
        }
        if round == 4 {
            proxy.set_open(true);
        }
        let i = rng.random_range(0..3);
        replicas[i].kill9();
        kills += 1;
        replicas[i].restart();
        clients.lock().unwrap().urls[i] = replicas[i].url.clone();
    }
    proxy.set_open(true);
    drain(&clients, || all_logs(&replicas));
    clients.lock().unwrap().acked.extend(no_id);
    let acked_past = clients.lock().unwrap().acked.len() as i64;
    // Every acknowledged record (one per id; the ids sent twice count once) reaches PostgreSQL.
    wait_until(
        "every acknowledged record forwarded",
        || all_logs(&replicas),
        || block_on(check.record_count()).unwrap_or(-1) == acked_past,
    );
    assert!(
        r.emu.received_events().is_empty(),
        "nothing sent while collecting"
    );

    // Phase 2: every replica restarts with grace 0s: the past hours close at once and any replica may send them.
    // The emulator holds its answers after recording the first batches; a replica is killed mid-send (its lease
    // runs out and another replica sends the same bytes again). Meanwhile records for the open hour arrive.
    r.emu.delay_next(
        Route::BatchUsageEvent,
        2,
        StdDuration::from_secs(4),
        Phase::After,
    );
    for (i, d) in replicas.iter_mut().enumerate() {
        d.kill9();
        *d = start(i, "0s");
        clients.lock().unwrap().urls[i] = d.url.clone();
    }
    let open = [hour_start(0)];
    clients
        .lock()
        .unwrap()
        .queue
        .extend(batches(&mut next_id, 40, &open, &mut rng));
    wait_until(
        "a batch reached the marketplace",
        || all_logs(&replicas),
        || !r.emu.received_events().is_empty(),
    );
    // The closed hours are frozen now (one freeze takes every closed key): more usage for them (ids `late-N`)
    // is carried into the open hour at forward time.
    let late: Vec<Vec<Rec>> = batches(&mut next_id, 15, &past, &mut rng)
        .into_iter()
        .map(|b| {
            b.into_iter()
                .map(|mut r| {
                    r.id = r.id.map(|id| id.replace("fleet-", "late-"));
                    r
                })
                .collect()
        })
        .collect();
    clients.lock().unwrap().queue.extend(late);
    for _ in 0..2 {
        let i = rng.random_range(0..3);
        replicas[i].kill9();
        kills += 1;
        replicas[i].restart();
        clients.lock().unwrap().urls[i] = replicas[i].url.clone();
        std::thread::sleep(StdDuration::from_millis(rng.random_range(100..800)));
    }
    drain(&clients, || all_logs(&replicas));
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.join().unwrap();
    }
    let c = clients.lock().unwrap();
    let acked_all = c.acked.len() as i64;
    wait_until(
        "the open hour's records forwarded",
        || all_logs(&replicas),
        || block_on(check.record_count()).unwrap_or(-1) == acked_all,
    );

    // The ledger: per (resource, dimension) and per closed (resource, dimension, hour).
    let mut ledger: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut per_hour: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    let mut late: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for rec in &c.acked {
        *ledger
            .entry((rec.resource.into(), rec.dimension.into()))
            .or_default() += rec.micros;
        let key = (rec.resource.into(), rec.dimension.into(), hour_of(rec.time));
        if rec.id.as_deref().is_some_and(|id| id.starts_with("late-")) {
            *late.entry(key).or_default() += rec.micros;
        } else if rec.time < hour_start(1) {
            *per_hour.entry(key).or_default() += rec.micros;
        }
    }
    // Any replica's report reads the shared journal: wait until every closed key has settled.
    let reader = &replicas[rng.random_range(0..3)];
    let deadline = Instant::now() + TIMEOUT;
    let report = loop {
        let rep = reader.report();
        let accepted = per_hour.keys().all(|k| {
            rep["hours"].as_array().unwrap().iter().any(|h| {
                h["resource"] == k.0
                    && h["dimension"] == k.1
                    && h["hour"] == k.2
                    && matches!(h["outcome"].as_str(), Some("accepted" | "duplicate"))
            })
        });
        let closed_settled = rep["hours"].as_array().unwrap().iter().all(|h| {
            h["hour"].as_str().unwrap() >= ts(hour_start(0)).as_str()
                || !matches!(h["outcome"].as_str(), Some("pending" | "closing"))
        });
        if accepted && closed_settled {
            break rep;
        }
        assert!(
            Instant::now() < deadline,
            "the closed hours did not settle; report:\n{}\nlogs:\n{}",
            serde_json::to_string_pretty(&rep).unwrap(),
            all_logs(&replicas)
        );
        std::thread::sleep(StdDuration::from_millis(200));
    };

    // 1: every acknowledged unit is in exactly one visible outcome (the `carried` source rows moved their units
    // into a later row), through the report of one replica and `GET /v1/usage` of another.
    let usage: Value = http()
        .get(format!(
            "{}/v1/usage",
            replicas[(rng.random_range(0..3)) as usize].url
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    for (what, view) in [("report", &report), ("GET /v1/usage", &usage)] {
        let mut journal: BTreeMap<(String, String), i64> = BTreeMap::new();
        for h in view["hours"].as_array().unwrap() {
            if h["outcome"] != "carried" {
                *journal
                    .entry((
                        h["resource"].as_str().unwrap().into(),
                        h["dimension"].as_str().unwrap().into(),
                    ))
                    .or_default() += h["quantity_micros"].as_i64().unwrap();
            }
        }
        assert_eq!(
            journal, ledger,
            "{what} vs the clients' acknowledged ledger:\n{view}"
        );
    }
    // The late usage is named where it went: carried (reason `late`) from its own hour into the open hour.
    let mut carried: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for cr in report["carries"].as_array().unwrap() {
        assert_eq!(cr["reason"], "late", "{cr}");
        assert!(
            cr["to_hour"].as_str().unwrap() >= ts(hour_start(0)).as_str(),
            "{cr}"
        );
        let q = Micros::parse_decimal(cr["quantity"].as_str().unwrap()).unwrap();
        *carried
            .entry((
                cr["resource"].as_str().unwrap().into(),
                cr["dimension"].as_str().unwrap().into(),
                cr["from_hour"].as_str().unwrap().into(),
            ))
            .or_default() += q.0;
    }
    assert_eq!(carried, late, "carries vs the late usage acknowledged");
    // 2: the marketplace accepted each closed key exactly once, with the exact sum over all replicas.
    let mut emu: BTreeMap<(String, String, String), (usize, i64)> = BTreeMap::new();
    for e in r.emu.accepted_events() {
        let slot = emu
            .entry((
                e.resource_id.clone().unwrap(),
                e.dimension.clone(),
                e.effective_start_time.clone(),
            ))
            .or_default();
        slot.0 += 1;
        slot.1 += (e.quantity * 1e6).round() as i64;
    }
    assert_eq!(
        emu.keys().collect::<BTreeSet<_>>(),
        per_hour.keys().collect::<BTreeSet<_>>(),
        "accepted keys vs the closed keys acknowledged"
    );
    for (k, micros) in &per_hour {
        assert_eq!(emu[k], (1, *micros), "{k:?}: accepted (count, micro-units)");
        let row = report["hours"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["resource"] == k.0 && h["dimension"] == k.1 && h["hour"] == k.2)
            .unwrap();
        assert_eq!(row["quantity_micros"].as_i64(), Some(*micros), "{row}");
    }
    // 3: no open-hour send, and nothing billed as a mismatch.
    let received = r.emu.received_events();
    for e in &received {
        let start: DateTime<Utc> = e.event["effectiveStartTime"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            start + Duration::hours(1) <= e.received_at,
            "an open hour was sent: {e:?}"
        );
    }
    assert!(
        report["hours"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["outcome"] != "duplicate_mismatch"),
        "{report}"
    );
    let status = reader.status();
    let fleet = status["fleet"]["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("{status}"));
    assert!(fleet.len() >= 3, "{status}");
    println!(
        "FLEET: kills={kills} acked-records={} late-keys={} retried-requests={} sent-twice={} closed-keys={} events-received={} \
         outcomes-settled={} in {:.1}s",
        c.acked.len(),
        late.len(),
        c.retried,
        c.twice,
        per_hour.len(),
        received.len(),
        settled(&report),
        started.elapsed().as_secs_f64()
    );
}
