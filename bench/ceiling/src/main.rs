//! `bench-tool`: helpers for `bench/run.sh`.
//!
//! - `axum --listen ADDR`: the single-record ceiling, a bare axum handler for `POST /v1/usage` that reads the body
//!   and answers what meterd answers (`202 {"accepted":1,...}`) without touching a journal.
//! - `durable --listen ADDR --db PATH`: the durable single-record ceiling, the least a durable server must do. An
//!   axum handler parses the record (serde into a small struct), hands it to one writer thread over a channel; the
//!   writer commits every record waiting in one transaction (a prepared `INSERT OR IGNORE` on a `UNIQUE` key, WAL,
//!   `synchronous=FULL`) and only then answers each request (`202`, or `202` with `duplicates: 1`).
//! - `sqlite --db PATH --rows N --batch B`: the batched-ingest ceiling, the rows meterd stores for a batch request
//!   inserted by a plain loop into meterd's `usage_records` table (same columns and indexes), `B` rows per
//!   transaction, WAL, `synchronous=FULL`.
//! - `gen-journal --db PATH --records N`: bulk-loads `N` records (and their hourly totals) into a journal whose
//!   schema meterd created, fast (no fsync), for the recovery figure.
//! - `ready-time --url URL -- CMD ARGS`: starts CMD, polls URL until it answers 200, prints the time, VmRSS, then
//!   stops CMD with SIGTERM.
//! - `emit --url API_BASE --resources R --dims D --hour ISO --concurrency C --db PATH`: the emission ceiling, the
//!   least a durable emitter must do with the same calls to the same emulator. `R x D` events in batches of 25,
//!   `C` calls in flight; before each call the sender commits its mark (one row per batch) together with the
//!   previous call's answer (one row per batch), on one writer thread that commits every job waiting in one
//!   transaction (WAL, `synchronous=FULL`), and only then sends. Prints wall time, calls, accepted events, the
//!   mean call and the mean wait for the commit.
//! - `free-port`: prints a free TCP port on 127.0.0.1.

use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn need(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| {
        eprintln!("bench-tool: missing {name}");
        std::process::exit(2)
    })
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("axum") => axum_ceiling(&need(&args, "--listen")),
        Some("durable") => durable_ceiling(&need(&args, "--listen"), &need(&args, "--db")),
        Some("sqlite") => sqlite_ceiling(
            &need(&args, "--db"),
            need(&args, "--rows").parse().unwrap(),
            arg(&args, "--batch").map_or(1000, |b| b.parse().unwrap()),
        ),
        Some("gen-journal") => gen_journal(
            &need(&args, "--db"),
            need(&args, "--records").parse().unwrap(),
            arg(&args, "--resources").map_or(1000, |b| b.parse().unwrap()),
        ),
        Some("emit") => emit_ceiling(&args),
        Some("free-port") => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            println!("{}", l.local_addr().unwrap().port());
        }
        Some("ready-time") => {
            let sep = args.iter().position(|a| a == "--").expect("-- CMD");
            ready_time(
                &need(&args, "--url"),
                &args[sep + 1..],
                arg(&args, "--timeout").map_or(60.0, |t| t.parse().unwrap()),
            )
        }
        _ => {
            eprintln!("usage: bench-tool axum|durable|sqlite|gen-journal|emit|ready-time|free-port ...");
            std::process::exit(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Bare axum handler.

async fn bare_usage(body: axum::body::Bytes) -> impl axum::response::IntoResponse {
    // Touch the body like a real handler would (it is read in full), answer what meterd answers.
    let _ = body.len();
    (
        axum::http::StatusCode::ACCEPTED,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        r#"{"accepted":1,"carried":0,"duplicates":0}"#,
    )
}

fn axum_ceiling(listen: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let app = axum::Router::new().route("/v1/usage", axum::routing::post(bare_usage));
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        eprintln!("bare axum listening on {}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Durable ceiling: parse, one writer thread, group commit with synchronous=FULL, answer after the commit.

/// The record as the durable ceiling parses it: the fields meterd's single-record body carries.
#[derive(serde::Deserialize)]
struct CeilingRecord {
    resource: String,
    dimension: String,
    quantity: f64,
    id: String,
}

/// One record waiting for the writer, with where to send its answer (true: stored; false: a duplicate key).
type Waiting = (CeilingRecord, tokio::sync::oneshot::Sender<bool>);

async fn durable_usage(
    axum::extract::State(tx): axum::extract::State<std::sync::mpsc::Sender<Waiting>>,
    axum::Json(record): axum::Json<CeilingRecord>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx.send((record, reply)).is_err() {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let body = match answer.await {
        Ok(true) => r#"{"accepted":1,"carried":0,"duplicates":0}"#,
        Ok(false) => r#"{"accepted":0,"carried":0,"duplicates":1}"#,
        Err(_) => return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    (
        axum::http::StatusCode::ACCEPTED,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The writer: takes every record waiting, inserts them in one transaction, commits (fsync), then answers.
fn durable_writer(db: &str, rx: std::sync::mpsc::Receiver<Waiting>) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{suffix}"));
    }
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .unwrap();
    conn.execute_batch(USAGE_RECORDS).unwrap();
    let mut group: Vec<Waiting> = Vec::with_capacity(4096);
    let mut answers: Vec<(tokio::sync::oneshot::Sender<bool>, bool)> = Vec::with_capacity(4096);
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < 4096 {
            match rx.try_recv() {
                Ok(w) => group.push(w),
                Err(_) => break,
            }
        }
        let now = now_secs();
        let hour = now / 3600 * 3600;
        let tx = conn.transaction().unwrap();
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO usage_records (idem_key, resource, plan, dimension, event_time, origin_hour, hour, quantity, received_at)
                     VALUES (?1, ?2, '', ?3, ?4, ?5, ?5, ?6, ?4)",
                )
                .unwrap();
            for (r, reply) in group.drain(..) {
                let micros = (r.quantity * 1e6).round() as i64;
                let stored = st
                    .execute(rusqlite::params![r.id, r.resource, r.dimension, now, hour, micros])
                    .unwrap()
                    == 1;
                answers.push((reply, stored));
            }
        }
        tx.commit().unwrap();
        for (reply, stored) in answers.drain(..) {
            let _ = reply.send(stored);
        }
    }
}

fn durable_ceiling(listen: &str, db: &str) {
    let (tx, rx) = std::sync::mpsc::channel::<Waiting>();
    let db = db.to_string();
    std::thread::Builder::new()
        .name("ceiling-writer".into())
        .spawn(move || durable_writer(&db, rx))
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let app = axum::Router::new()
            .route("/v1/usage", axum::routing::post(durable_usage))
            .with_state(tx);
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        eprintln!("durable ceiling listening on {}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Raw rusqlite ceiling.

/// meterd's `usage_records` table (src/journal/schema.rs, migration 1), so the ceiling stores the same rows in the
/// same B-trees.
const USAGE_RECORDS: &str = "
    CREATE TABLE IF NOT EXISTS usage_records (
        seq         INTEGER PRIMARY KEY,
        idem_key    TEXT UNIQUE,
        resource    TEXT NOT NULL,
        plan        TEXT NOT NULL,
        dimension   TEXT NOT NULL,
        event_time  INTEGER NOT NULL,
        origin_hour INTEGER NOT NULL,
        hour        INTEGER NOT NULL,
        quantity    INTEGER NOT NULL,
        received_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS usage_records_received ON usage_records(received_at);";

fn sqlite_ceiling(db: &str, rows: usize, batch: usize) {
    let _ = std::fs::remove_file(db);
    let _ = std::fs::remove_file(format!("{db}-wal"));
    let _ = std::fs::remove_file(format!("{db}-shm"));
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .unwrap();
    conn.execute_batch(USAGE_RECORDS).unwrap();
    let now = now_secs();
    let hour = now / 3600 * 3600;
    let resource = "11111111-1111-4111-8111-111111111111";
    let started = Instant::now();
    let mut i = 0usize;
    while i < rows {
        let tx = conn.transaction().unwrap();
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO usage_records (idem_key, resource, plan, dimension, event_time, origin_hour, hour, quantity, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .unwrap();
            for _ in 0..batch.min(rows - i) {
                let key = format!("ceiling-{i}");
                st.execute(rusqlite::params![
                    key, resource, "", "api_calls", now, hour, hour, 1_000_000i64, now
                ])
                .unwrap();
                i += 1;
            }
        }
        tx.commit().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"rows\":{rows},\"batch\":{batch},\"seconds\":{secs:.3},\"rows_per_s\":{:.0}}}",
        rows as f64 / secs
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 5. Journal generator.

fn gen_journal(db: &str, records: u64, resources: u64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    // Loading only: no rollback journal, no fsync. meterd puts the file back in WAL mode when it opens it.
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;",
    )
    .unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert!(version >= 1, "start meterd once on {db} to create its schema");
    let now = now_secs();
    let hour = now / 3600 * 3600;
    let dims = ["api_calls", "gb_processed"];
    let res: Vec<String> = (0..resources)
        .map(|r| format!("{:08x}-0000-4000-8000-{:012x}", r + 1, r + 1))
        .collect();
    let started = Instant::now();
    let chunk = 1_000_000u64;
    let mut i = 0u64;
    while i < records {
        conn.execute_batch("BEGIN").unwrap();
        {
            let mut st = conn
                .prepare_cached(
                    "INSERT INTO usage_records (idem_key, resource, plan, dimension, event_time, origin_hour, hour, quantity, received_at)
                     VALUES (?1, ?2, '', ?3, ?4, ?5, ?5, 1000000, ?4)",
                )
                .unwrap();
            let end = (i + chunk).min(records);
            while i < end {
                // Keys like the ones applications send (a request id); sorted so the load is an append.
                let key = format!("req-{i:012}");
                let r = &res[(i % resources) as usize];
                let d = dims[((i / resources) % dims.len() as u64) as usize];
                st.execute(rusqlite::params![key, r, d, now, hour]).unwrap();
                i += 1;
            }
        }
        conn.execute_batch("COMMIT").unwrap();
    }
    // The hourly totals those records add up to.
    conn.execute_batch(&format!(
        "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, carried_in)
         SELECT resource, plan, dimension, hour, SUM(quantity), COUNT(*), 0 FROM usage_records
         WHERE hour = {hour} GROUP BY resource, plan, dimension, hour
         ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET
             quantity = quantity + excluded.quantity, records = records + excluded.records;
         PRAGMA journal_mode = WAL;"
    ))
    .unwrap();
    drop(conn);
    let size = std::fs::metadata(db).unwrap().len();
    println!(
        "{{\"records\":{records},\"seconds\":{:.1},\"bytes\":{size},\"bytes_per_record\":{:.1}}}",
        started.elapsed().as_secs_f64(),
        size as f64 / records.max(1) as f64
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Readiness timer.

fn http_status(host_port: &str, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(host_port).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn vm(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn ready_time(url: &str, cmd: &[String], timeout: f64) {
    let rest = url.strip_prefix("http://").expect("http:// url");
    let (host_port, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let started = Instant::now();
    let mut child = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start command");
    let ready = loop {
        if http_status(host_port, path) == Some(200) {
            break Some(started.elapsed());
        }
        if let Ok(Some(st)) = child.try_wait() {
            eprintln!("bench-tool: command exited before it was ready: {st}");
            break None;
        }
        if started.elapsed().as_secs_f64() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let rss = vm(child.id(), "VmRSS:").unwrap_or(0);
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    match ready {
        Some(d) => println!(
            "{{\"ready_ms\":{:.1},\"rss_kb\":{rss}}}",
            d.as_secs_f64() * 1000.0
        ),
        None => {
            println!("{{\"ready_ms\":null,\"rss_kb\":{rss}}}");
            std::process::exit(1)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Emission ceiling.

/// One writer job of the emission ceiling: a batch's mark, the previous batch's answer, and where to say "durable".
struct EmitJob {
    mark: Option<i64>,
    answer: Option<(i64, String)>,
    done: tokio::sync::oneshot::Sender<()>,
}

fn emit_writer(db: &str, rx: std::sync::mpsc::Receiver<EmitJob>) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{suffix}"));
    }
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE calls (batch INTEGER PRIMARY KEY, marked_at INTEGER NOT NULL, answer TEXT);",
    )
    .unwrap();
    let mut group: Vec<EmitJob> = Vec::new();
    while let Ok(first) = rx.recv() {
        group.push(first);
        while let Ok(j) = rx.try_recv() {
            group.push(j);
        }
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        {
            let mut answer = tx
                .prepare_cached("UPDATE calls SET answer = ?2 WHERE batch = ?1")
                .unwrap();
            let mut mark = tx
                .prepare_cached("INSERT INTO calls (batch, marked_at) VALUES (?1, ?2)")
                .unwrap();
            for j in &group {
                if let Some((b, a)) = &j.answer {
                    answer.execute(rusqlite::params![b, a]).unwrap();
                }
                if let Some(b) = j.mark {
                    mark.execute(rusqlite::params![b, now_secs()]).unwrap();
                }
            }
        }
        tx.commit().unwrap();
        for j in group.drain(..) {
            let _ = j.done.send(());
        }
    }
}

fn emit_ceiling(args: &[String]) {
    let url = format!(
        "{}/batchUsageEvent?api-version=2018-08-31",
        need(args, "--url").trim_end_matches('/')
    );
    let resources: usize = need(args, "--resources").parse().unwrap();
    let dims: usize = arg(args, "--dims").map_or(25, |d| d.parse().unwrap());
    let hour = need(args, "--hour");
    let concurrency: usize = arg(args, "--concurrency").map_or(4, |c| c.parse().unwrap());
    let db = need(args, "--db");
    let token = std::env::var("METERD_MARKETPLACE__AUTH__STATIC_TOKEN").unwrap_or_else(|_| "emulator-token".into());
    // The same events meterd sends in part 3 (one per resource and dimension, quantity 1), in batches of 25.
    let mut events = Vec::with_capacity(resources * dims);
    for r in 1..=resources {
        for d in 1..=dims {
            events.push(format!(
                r#"{{"resourceId":"{r:08x}-0000-4000-8000-{r:012x}","quantity":1,"dimension":"dim{d:02}","effectiveStartTime":"{hour}","planId":"any"}}"#
            ));
        }
    }
    let bodies: Vec<String> = events
        .chunks(25)
        .map(|c| format!("{{\"request\":[{}]}}", c.join(",")))
        .collect();
    let bodies = std::sync::Arc::new(bodies);
    let (tx, rx) = std::sync::mpsc::channel::<EmitJob>();
    std::thread::Builder::new()
        .name("ceiling-writer".into())
        .spawn(move || emit_writer(&db, rx))
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let mut senders = Vec::new();
        for _ in 0..concurrency {
            let (client, url, token, bodies, next, tx) = (
                client.clone(),
                url.clone(),
                token.clone(),
                bodies.clone(),
                next.clone(),
                tx.clone(),
            );
            senders.push(tokio::spawn(async move {
                // (calls, accepted, call time, commit wait)
                let mut figures = (0usize, 0usize, Duration::ZERO, Duration::ZERO);
                let mut answered: Option<(i64, String)> = None;
                loop {
                    let b = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mark = (b < bodies.len()).then_some(b as i64);
                    if mark.is_none() && answered.is_none() {
                        break;
                    }
                    let waited = Instant::now();
                    let (done, durable) = tokio::sync::oneshot::channel();
                    tx.send(EmitJob { mark, answer: answered.take(), done }).unwrap();
                    durable.await.unwrap();
                    figures.3 += waited.elapsed();
                    let Some(b) = mark else { break };
                    let called = Instant::now();
                    let answer = client
                        .post(&url)
                        .bearer_auth(&token)
                        .header("content-type", "application/json")
                        .body(bodies[b as usize].clone())
                        .send()
                        .await
                        .unwrap();
                    assert!(answer.status().is_success(), "the emulator answered {}", answer.status());
                    let text = answer.text().await.unwrap();
                    figures.2 += called.elapsed();
                    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
                    figures.1 += parsed["result"]
                        .as_array()
                        .map_or(0, |r| r.iter().filter(|e| e["status"] == "Accepted").count());
                    figures.0 += 1;
                    answered = Some((b as i64, text));
                }
                figures
            }));
        }
        let (mut calls, mut accepted, mut call, mut wait) = (0, 0, Duration::ZERO, Duration::ZERO);
        for s in senders {
            let f = s.await.unwrap();
            calls += f.0;
            accepted += f.1;
            call += f.2;
            wait += f.3;
        }
        let wall = started.elapsed().as_secs_f64();
        let per = |d: Duration| d.as_secs_f64() * 1000.0 / calls.max(1) as f64;
        println!(
            "{{\"wall_s\":{wall:.3},\"calls\":{calls},\"accepted\":{accepted},\"call_ms\":{:.2},\"wait_ms\":{:.2}}}",
            per(call),
            per(wait)
        );
    });
}
