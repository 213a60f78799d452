//! Hostile input: malformed and abusive requests against the real daemon, slow clients, connection floods, and
//! a proptest fuzzer of the ingest parsers.
//!
//! CI runs everything here in about 15 s. The long fuzz run (200,000 cases per parser):
//! `RELIABILITY_LONG=1 cargo test --release --test hostile fuzz` (see docs/reliability.md).

mod common;

use common::{Daemon, http};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const A: &str = "11111111-1111-4111-8111-111111111111";
/// Limits for the abuse cases: 12 MiB bodies (room for 100k records), 32 connections, 2 s per request.
const MAX_BODY: usize = 12 * 1024 * 1024;
const MAX_CONN: usize = 32;
const REQ_TIMEOUT_S: u64 = 2;

fn start(dir: &std::path::Path) -> Daemon {
    let top = "";
    let sections = r#"[marketplace]
mode = "azure"
base_url = "http://127.0.0.1:9/api"
[marketplace.auth]
kind = "static_token"
[emit]
grace = "11h"
"#;
    let mut cfg = common::config(dir, top, sections);
    cfg = cfg.replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!(
            "listen = \"127.0.0.1:0\"\nmax_body_bytes = {MAX_BODY}\nmax_connections = {MAX_CONN}\nrequest_timeout = \"{REQ_TIMEOUT_S}s\"\n"
        ),
    );
    Daemon::start(
        dir,
        &cfg,
        &[("METERD_MARKETPLACE__AUTH__STATIC_TOKEN", "test-token")],
    )
}

fn addr(d: &Daemon) -> String {
    d.url.trim_start_matches("http://").to_string()
}

/// Sends raw bytes, half-closes nothing, reads the answer's status line (or how the connection ended).
fn raw(d: &Daemon, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr(d)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A server may answer (413, 400) before the whole body is written and close: a write error is fine.
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    status_of(&buf)
}

fn status_of(buf: &[u8]) -> String {
    if buf.is_empty() {
        return "closed".into();
    }
    let line = String::from_utf8_lossy(buf);
    line.split_whitespace()
        .nth(1)
        .unwrap_or("garbage")
        .to_string()
}

fn req(method: &str, path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("content-length") || h.contains("chunked"))
    {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut v = out.into_bytes();
    v.extend_from_slice(body);
    v
}

fn json_post(body: &[u8]) -> Vec<u8> {
    req(
        "POST",
        "/v1/usage",
        &["content-type: application/json"],
        body,
    )
}

fn rec(q: &str) -> Vec<u8> {
    format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":{q}}}"#).into_bytes()
}

fn valid() -> Vec<u8> {
    rec("1")
}

fn utf16(s: &str, be: bool) -> Vec<u8> {
    let mut v = if be {
        vec![0xFE, 0xFF]
    } else {
        vec![0xFF, 0xFE]
    };
    for u in s.encode_utf16() {
        let b = if be { u.to_be_bytes() } else { u.to_le_bytes() };
        v.extend_from_slice(&b);
    }
    v
}

fn nested(open: &str, close: &str, n: usize) -> Vec<u8> {
    let mut s = open.repeat(n);
    s.push_str(&close.repeat(n));
    s.into_bytes()
}

fn hundred_k_records_last_invalid() -> Vec<u8> {
    let one = String::from_utf8(valid()).unwrap();
    let mut s = String::with_capacity(100_001 * (one.len() + 1) + 2);
    s.push('[');
    for _ in 0..100_000 {
        s.push_str(&one);
        s.push(',');
    }
    s.push_str(&String::from_utf8(rec("-1")).unwrap());
    s.push(']');
    s.into_bytes()
}

struct Case {
    name: &'static str,
    request: Vec<u8>,
    /// Answers the case may get (the first is what the table documents as expected).
    expect: &'static [&'static str],
}

fn case(name: &'static str, request: Vec<u8>, expect: &'static [&'static str]) -> Case {
    Case {
        name,
        request,
        expect,
    }
}

fn cases() -> Vec<Case> {
    let big = vec![b' '; MAX_BODY + 1];
    let mut big_chunked = format!(
        "POST /v1/usage HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
        MAX_BODY + 1
    )
    .into_bytes();
    big_chunked.extend(std::iter::repeat_n(b' ', MAX_BODY + 1));
    big_chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let v = valid();
    let ce = |ctype: &str, body: &str| {
        req(
            "POST",
            "/api/v1/events",
            &[&format!("content-type: {ctype}")],
            body.as_bytes(),
        )
    };
    let guid_multibyte =
        r#"{"resource":"/subscriptionsé/providers/x","dimension":"api_calls","quantity":1}"#
            .to_string();
    vec![
        // Encoding
        case("invalid UTF-8 (0xFF 0xFE inside a string)", json_post(&[b"{\"resource\":\"\xff\xfe\",\"dimension\":\"api_calls\",\"quantity\":1}".as_slice()].concat()), &["400"]),
        case("UTF-8 BOM before a valid record", json_post(&[b"\xEF\xBB\xBF".as_slice(), &v].concat()), &["400"]),
        case("UTF-16LE with BOM", json_post(&utf16(std::str::from_utf8(&v).unwrap(), false)), &["400"]),
        case("UTF-16BE with BOM", json_post(&utf16(std::str::from_utf8(&v).unwrap(), true)), &["400"]),
        case("overlong UTF-8 ('/' as C0 AF)", json_post(&[format!(r#"{{"resource":"{A}","dimension":"api"#).as_bytes(), b"\xC0\xAF", br#"calls","quantity":1}"#].concat()), &["400"]),
        case("NUL byte inside a string", json_post(format!("{{\"resource\":\"{A}\",\"dimension\":\"api\0calls\",\"quantity\":1}}").as_bytes()), &["400"]),
        case("lone surrogate escape \\ud800", json_post(format!(r#"{{"resource":"{A}","dimension":"api_calls\ud800","quantity":1}}"#).as_bytes()), &["400"]),
        case("multi-byte char at byte 15 of a resource URI", json_post(guid_multibyte.as_bytes()), &["400"]),
        // Numbers
        case("quantity 1e400", json_post(&rec("1e400")), &["400"]),
        case("quantity -0", json_post(&rec("-0")), &["400"]),
        case("quantity 0", json_post(&rec("0")), &["400"]),
        case("quantity hex 0x10", json_post(&rec("0x10")), &["400"]),
        case("quantity huge integer (40 digits)", json_post(&rec(&"9".repeat(40))), &["400"]),
        case("quantity 1e-7", json_post(&rec("1e-7")), &["400"]),
        case("quantity 7 decimals 1.0000001", json_post(&rec("1.0000001")), &["400"]),
        case("quantity above 10^9", json_post(&rec("1000000001")), &["400"]),
        case("quantity NaN", json_post(&rec("NaN")), &["400"]),
        case("quantity Infinity", json_post(&rec("Infinity")), &["400"]),
        case("quantity negative", json_post(&rec("-5")), &["400"]),
        case("quantity as boolean", json_post(&rec("true")), &["400"]),
        case("quantity null", json_post(&rec("null")), &["400"]),
        case("quantity as object", json_post(&rec("{\"v\":1}")), &["400"]),
        // Sizes
        case("body 1 byte over max_body_bytes (content-length)", json_post(&big), &["413"]),
        case("body over max_body_bytes (chunked)", big_chunked, &["413"]),
        case("content-length over the limit, no body sent", req("POST", "/v1/usage", &["content-type: application/json", "content-length: 100000000"], b""), &["413"]),
        case("100k valid records + 1 invalid (9 MB, within the limit)", json_post(&hundred_k_records_last_invalid()), &["400"]),
        case("empty body", json_post(b""), &["400"]),
        case("empty array", json_post(b"[]"), &["400"]),
        case("id of 129 bytes", json_post(format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"id":"{}"}}"#, "k".repeat(129)).as_bytes()), &["400"]),
        case("dimension of 100k chars", json_post(format!(r#"{{"resource":"{A}","dimension":"{}","quantity":1}}"#, "d".repeat(100_000)).as_bytes()), &["400"]),
        // Nesting and structure
        case("10k nested arrays", json_post(&nested("[", "]", 10_000)), &["400"]),
        case("10k nested objects", json_post(&nested("{\"a\":", "}", 10_000)), &["400"]),
        case("duplicate field quantity", json_post(format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"quantity":2}}"#).as_bytes()), &["400"]),
        case("unknown field", json_post(format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"admin":true}}"#).as_bytes()), &["400"]),
        case("trailing garbage after the record", json_post(&[v.as_slice(), b"xyz"].concat()), &["400"]),
        case("two records without an array", json_post(&[v.as_slice(), &v].concat()), &["400"]),
        case("JSON string instead of a record", json_post(b"\"hello\""), &["400"]),
        case("time not RFC 3339", json_post(format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"time":"yesterday"}}"#).as_bytes()), &["400"]),
        case("time 1 year ahead", json_post(format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"time":"{}"}}"#, (chrono::Utc::now() + chrono::Duration::days(365)).to_rfc3339()).as_bytes()), &["400"]),
        case("time year 99999", json_post(format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"time":"99999-01-01T00:00:00Z"}}"#).as_bytes()), &["400"]),
        case("resource not a GUID (SQL text)", json_post(br#"{"resource":"'; DROP TABLE usage_records;--","dimension":"api_calls","quantity":1}"#), &["400"]),
        case("unknown dimension", json_post(format!(r#"{{"resource":"{A}","dimension":"nope","quantity":1}}"#).as_bytes()), &["400"]),
        // Headers
        case("missing content-type", req("POST", "/v1/usage", &[], &v), &["415"]),
        case("content-type text/plain", req("POST", "/v1/usage", &["content-type: text/plain"], &v), &["415"]),
        case("duplicate content-type (text/plain first)", req("POST", "/v1/usage", &["content-type: text/plain", "content-type: application/json"], &v), &["415"]),
        case("absurd content-length (20 digits)", req("POST", "/v1/usage", &["content-type: application/json", "content-length: 99999999999999999999"], &v), &["400"]),
        case("negative content-length", req("POST", "/v1/usage", &["content-type: application/json", "content-length: -1"], &v), &["400"]),
        case("two different content-lengths", req("POST", "/v1/usage", &["content-type: application/json", "content-length: 3", "content-length: 70"], &v), &["400"]),
        case("content-length and chunked together", req("POST", "/v1/usage", &["content-type: application/json", "content-length: 5", "transfer-encoding: chunked"], b"zz\r\nxx\r\n0\r\n\r\n"), &["400"]),
        case("chunked with an invalid chunk size", req("POST", "/v1/usage", &["content-type: application/json", "transfer-encoding: chunked"], b"zz\r\nxx\r\n0\r\n\r\n"), &["400"]),
        case("1 MB header", req("POST", "/v1/usage", &["content-type: application/json", &format!("x-junk: {}", "a".repeat(1_000_000))], &v), &["431", "400", "closed"]),
        case("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), &["400"]),
        case("bearer token on an open API (ignored) with an invalid body", req("POST", "/v1/usage", &["content-type: application/json", "authorization: Bearer x"], b"{"), &["400"]),
        // Methods
        case("PUT /v1/usage", req("PUT", "/v1/usage", &["content-type: application/json"], &v), &["405"]),
        case("DELETE /v1/usage", req("DELETE", "/v1/usage", &[], b""), &["405"]),
        case("PATCH /v1/usage", req("PATCH", "/v1/usage", &["content-type: application/json"], &v), &["405"]),
        case("TRACE /v1/usage", req("TRACE", "/v1/usage", &[], b""), &["405"]),
        case("POST /v1/usage/../healthz (path trick)", req("POST", "/v1/usage/../healthz", &["content-type: application/json"], &v), &["404", "405"]),
        // CloudEvents
        case("CloudEvents specversion 0.3", ce("application/cloudevents+json", &format!(r#"{{"specversion":"0.3","id":"e","source":"s","type":"api-requests","subject":"{A}","data":{{"count":1}}}}"#)), &["400"]),
        case("CloudEvents batch type with a single event", ce("application/cloudevents-batch+json", &format!(r#"{{"specversion":"1.0","id":"e","source":"s","type":"api-requests","subject":"{A}","data":{{"count":1}}}}"#)), &["400"]),
        case("CloudEvents count 1e400", ce("application/cloudevents+json", &format!(r#"{{"specversion":"1.0","id":"e","source":"s","type":"api-requests","subject":"{A}","data":{{"count":1e400}}}}"#)), &["400"]),
        case("CloudEvents unknown type", ce("application/cloudevents+json", &format!(r#"{{"specversion":"1.0","id":"e","source":"s","type":"nope","subject":"{A}","data":{{"count":1}}}}"#)), &["400"]),
        case("CloudEvents data as a string", ce("application/cloudevents+json", &format!(r#"{{"specversion":"1.0","id":"e","source":"s","type":"api-requests","subject":"{A}","data":"1"}}"#)), &["400"]),
        case("CloudEvents 10k nested data", ce("application/cloudevents+json", &format!(r#"{{"specversion":"1.0","id":"e","source":"s","type":"api-requests","subject":"{A}","data":{}}}"#, String::from_utf8(nested("{\"a\":", "}", 10_000)).unwrap())), &["400"]),
    ]
}

/// What the journal holds, as `meterd report` prints it plus the status counters.
fn journal_snapshot(d: &Daemon) -> String {
    let mut r = d.report();
    // `generated_at`-like fields would differ between calls; keep only the hours and carries.
    let keep = serde_json::json!({"hours": r["hours"].take(), "carries": r["carries"].take()});
    keep.to_string()
}

fn healthy(d: &Daemon) -> bool {
    http()
        .get(format!("{}/healthz", d.url))
        .send()
        .is_ok_and(|r| r.status().as_u16() == 200)
}

#[test]
fn hostile_requests_get_clear_4xx_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    // One real record, so "unchanged" compares a non-empty journal.
    assert_eq!(raw(&d, &json_post(&valid())), "202");
    let before = journal_snapshot(&d);
    let mut table = Vec::new();
    let mut wrong = Vec::new();
    for c in cases() {
        let t = Instant::now();
        let got = raw(&d, &c.request);
        let ms = t.elapsed().as_millis();
        if !c.expect.contains(&got.as_str()) {
            wrong.push(format!("{}: got {got}, expected {:?}", c.name, c.expect));
        }
        table.push(format!("| {} | {} | {} |", c.name, got, ms));
        assert!(healthy(&d), "unhealthy after `{}`", c.name);
    }
    println!(
        "HOSTILE TABLE ({} cases)\n| request | answer | ms |\n|---|---|---|\n{}",
        table.len(),
        table.join("\n")
    );
    assert!(table.len() >= 40);
    assert!(
        wrong.is_empty(),
        "unexpected answers:\n{}",
        wrong.join("\n")
    );
    assert_eq!(journal_snapshot(&d), before, "the journal changed");
    let logs = d.log_text();
    assert!(!logs.contains("panicked"), "a handler panicked:\n{logs}");
}

/// A client that sends its body one byte a second is cut by `ingest.request_timeout` with 408; one that sends
/// its headers one byte every 0.8 s is disconnected by the same timeout. Both are cut before they finish sending
/// (a condition, not a duration: each takes over a minute to send in full, the timeout is 2 s).
#[test]
fn slowloris_bodies_and_headers_are_cut_by_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let before = journal_snapshot(&d);
    let body = valid();
    let head = format!(
        "POST /v1/usage HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // Slow body.
    let mut s = TcpStream::connect(addr(&d)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let t = Instant::now();
    let body_sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let mut s = s.try_clone().unwrap();
        let body = body.clone();
        let sent = body_sent.clone();
        std::thread::spawn(move || {
            for b in body {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    let body_cut = t.elapsed();
    let status = status_of(&buf[..n]);
    println!(
        "SLOWLORIS body: answer {status} after {:.1}s",
        body_cut.as_secs_f64()
    );
    assert_eq!(status, "408");
    let sent = body_sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent < body.len(),
        "the slow body was not cut: all {sent} bytes were sent before the answer"
    );
    drop(s);
    // Slow headers.
    let mut s = TcpStream::connect(addr(&d)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t = Instant::now();
    let mut closed_after = None;
    let mut head_sent = 0;
    for b in head.bytes() {
        if s.write_all(&[b]).is_err() {
            closed_after = Some(t.elapsed());
            break;
        }
        match s.read(&mut buf) {
            Ok(_) => {
                closed_after = Some(t.elapsed());
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed_after = Some(t.elapsed());
                break;
            }
        }
        head_sent += 1;
        std::thread::sleep(Duration::from_millis(800));
    }
    let closed_after = closed_after.expect("a slow-header client was never disconnected");
    println!(
        "SLOWLORIS headers: disconnected after {:.1}s",
        closed_after.as_secs_f64()
    );
    assert!(
        head_sent < head.len(),
        "the slow headers were not cut: all {head_sent} bytes were sent"
    );
    let _ = writer.join();
    assert!(healthy(&d));
    assert_eq!(journal_snapshot(&d), before);
}

/// Issue 11 defect 2, "an error answer after the commit": keyless records posted while another process holds the
/// journal's write lock for longer than `ingest.request_timeout`. Every answer is 2xx (the record is stored) or
/// not (nothing of it is stored); no request is answered 408, or left without an answer, while its journal job
/// is queued and then commits. Afterwards the stored quantity equals the acknowledged quantity exactly.
#[test]
fn a_request_queued_behind_a_locked_journal_is_stored_if_and_only_if_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let journal = dir.path().join("journal.db");
    let stored = |journal: &std::path::Path| -> (i64, i64) {
        let c = rusqlite::Connection::open_with_flags(
            journal,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        c.busy_timeout(Duration::from_secs(30)).unwrap();
        c.query_row(
            "SELECT COUNT(*), COALESCE(SUM(quantity), 0) FROM usage_records",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    assert_eq!(raw(&d, &json_post(&rec("1"))), "202");
    let (base_records, base_quantity) = stored(&journal);
    // Hold the write lock from a second connection for twice the request timeout (below the writer's 5 s busy
    // timeout, so the queued jobs commit once it is released).
    let holder = rusqlite::Connection::open(&journal).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let hold = Duration::from_secs(REQ_TIMEOUT_S * 2);
    let clients: Vec<_> = (1..=8u64)
        .map(|i| {
            let d_addr = addr(&d);
            std::thread::spawn(move || {
                let body = rec(&i.to_string());
                let mut s = TcpStream::connect(d_addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                s.write_all(&json_post(&body)).unwrap();
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                (i, status_of(&buf))
            })
        })
        .collect();
    std::thread::sleep(hold);
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    let answers: Vec<(u64, String)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    println!("LOCKED JOURNAL: answers {answers:?}");
    // The writer runs jobs in order: once a later record is acknowledged, every job queued before it has
    // committed or failed, so the count below is final.
    assert_eq!(raw(&d, &json_post(&rec("100"))), "202");
    let acked: Vec<u64> = answers
        .iter()
        .filter(|(_, s)| s.starts_with('2'))
        .map(|(i, _)| *i)
        .collect();
    let (records, quantity) = stored(&journal);
    let acked_quantity: i64 =
        acked.iter().map(|i| *i as i64 * 1_000_000).sum::<i64>() + 100_000_000;
    assert_eq!(
        (records - base_records, quantity - base_quantity),
        (acked.len() as i64 + 1, acked_quantity),
        "stored (records, micro-units) differ from acknowledged; answers {answers:?}"
    );
    for (i, s) in &answers {
        assert!(
            s.starts_with('2') || s == "503",
            "record {i} was answered {s}: only 2xx (stored) or 503 (the writer gave up on the lock) may answer a \
             request whose job reached the journal"
        );
    }
    assert!(healthy(&d));
}

fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|it| {
            it.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// 100 idle connections against `max_connections = 32`: the daemon holds at most 32 of them open (the rest wait
/// in the kernel backlog), closes idle ones after `request_timeout`, and answers a real client within a few
/// seconds, and all the while ingest stays correct.
#[test]
fn an_idle_connection_flood_is_bounded_and_drained() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let baseline = open_sockets(d.pid());
    let flood: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(addr(&d)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = open_sockets(d.pid());
    println!(
        "FLOOD: {} idle connections opened; daemon holds {} sockets (baseline {baseline}, max_connections {MAX_CONN})",
        flood.len(),
        held
    );
    assert!(
        held <= baseline + MAX_CONN + 2,
        "the daemon holds {held} sockets for {} idle clients",
        flood.len()
    );
    // A real client gets through once idle connections are cut (each batch of 32 lasts request_timeout).
    let t = Instant::now();
    let r = http()
        .post(format!("{}/v1/usage", d.url))
        .header("content-type", "application/json")
        .body(valid())
        .send()
        .unwrap();
    let waited = t.elapsed();
    println!(
        "FLOOD: a real request answered {} after {:.1}s",
        r.status(),
        waited.as_secs_f64()
    );
    assert_eq!(r.status().as_u16(), 202);
    let n = flood.len();
    drop(flood);
    assert!(healthy(&d));
    assert!(n >= 90);
}

// ---------------------------------------------------------------------------------------------------------
// Fuzzing the parsers in process.

mod fuzz {
    use chrono::{DateTime, Utc};
    use meterd::ingest::AppState;
    use meterd::journal::usage::NewRecord;
    use proptest::prelude::*;
    use std::sync::Arc;

    const A: &str = super::A;

    fn cases() -> u32 {
        if std::env::var("RELIABILITY_LONG").is_ok() {
            200_000
        } else {
            2_000
        }
    }

    fn state() -> (AppState, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"[journal]
path = "{}"
[marketplace]
mode = "azure"
base_url = "http://127.0.0.1:9/api"
[marketplace.auth]
kind = "static_token"
[[dimensions]]
id = "api_calls"
[[dimensions]]
id = "gb_processed"
[[meters]]
type = "api-requests"
dimension = "api_calls"
value_property = "$.count"
"#,
            dir.path().join("j.db").display()
        );
        let env = std::collections::BTreeMap::from([(
            "METERD_MARKETPLACE__AUTH__STATIC_TOKEN".to_string(),
            "t".to_string(),
        )]);
        let settings = Arc::new(meterd::config::load_str(&text, "fuzz", &env).unwrap());
        let journal = meterd::journal::Journal::open(&dir.path().join("j.db")).unwrap();
        let now = now();
        let state = AppState {
            settings,
            reads: meterd::journal::reads::Reads::Local(journal.clone()),
            journal,
            clock: Arc::new(meterd::clock::ManualClock::new(now)),
            token: None,
            emitter: None,
            metrics: None,
            ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            liveness: Arc::new(meterd::ops::Liveness::default()),
        };
        (state, dir)
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-10T10:30:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn assert_valid(r: &NewRecord) {
        assert!(r.quantity.0 > 0, "{r:?}");
        assert!(r.quantity.0 <= 1_000_000_000_000_000, "{r:?}");
        assert!(
            r.dimension == "api_calls" || r.dimension == "gb_processed",
            "{r:?}"
        );
        assert!(
            meterd::ingest::validate::is_guid(&r.resource)
                || r.resource
                    .to_ascii_lowercase()
                    .starts_with("/subscriptions/"),
            "{r:?}"
        );
        // A usage `id` is at most 128 bytes; a CloudEvent's key is `ce:<len>:<source>:<id>` and `source` has no
        // length limit of its own (see docs/reliability.md, "What is left").
        assert!(
            r.key
                .as_ref()
                .is_none_or(|k| k.len() <= 128 || k.starts_with("ce:")),
            "{r:?}"
        );
        assert!(r.time <= now() + chrono::Duration::minutes(5), "{r:?}");
    }

    /// Tricky JSON fragments spliced into valid bodies.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("1e400".to_string()),
            Just("-0".to_string()),
            Just("0x10".to_string()),
            Just("1e-7".to_string()),
            Just("99999999999999999999999".to_string()),
            Just("\"\\ud800\"".to_string()),
            Just("é".to_string()),
            Just("日本".to_string()),
            Just("\u{0}".to_string()),
            Just("[[[[[[".to_string()),
            Just("}".to_string()),
            Just("\"".to_string()),
            Just(",".to_string()),
            Just("null".to_string()),
            Just("/subscriptions".to_string()),
            Just("1.0000001".to_string()),
            Just("1000000000".to_string()),
            "[ -~]{0,12}".prop_map(|s| s),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| f.to_string()),
        ]
    }

    fn valid_usage() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just(A.to_string()), Just("/subscriptions/x/resourceGroups/g/providers/Microsoft.Solutions/applications/a".to_string())],
            prop_oneof![Just("api_calls"), Just("gb_processed")],
            1u32..1_000_000,
            0u32..7,
            prop::option::of("[a-z0-9-]{1,20}"),
        )
            .prop_map(|(res, dim, q, scale, id)| {
                let qty = format!("{}", q as f64 / 10f64.powi(scale as i32));
                let id = id.map(|k| format!(r#","id":"{k}""#)).unwrap_or_default();
                format!(
                    r#"{{"resource":"{res}","dimension":"{dim}","quantity":{qty},"time":"2026-03-10T09:15:00Z"{id}}}"#
                )
            })
    }

    fn valid_event() -> impl Strategy<Value = String> {
        (1u32..1_000_000, "[a-z0-9]{1,10}").prop_map(|(q, id)| {
            format!(
                r#"{{"specversion":"1.0","id":"{id}","source":"s","type":"api-requests","subject":"{A}","time":"2026-03-10T09:15:00Z","data":{{"count":{q}}}}}"#
            )
        })
    }

    /// Mutates a valid body: splice a fragment at a position, delete a range, or flip a byte.
    fn mutated(base: impl Strategy<Value = String>) -> impl Strategy<Value = Vec<u8>> {
        (
            base,
            fragment(),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            0u8..4,
            any::<u8>(),
            any::<bool>(),
        )
            .prop_map(|(body, frag, at, len, op, byte, wrap)| {
                let mut b = body.into_bytes();
                let i = at.index(b.len() + 1);
                match op {
                    0 => {
                        b.splice(i..i, frag.into_bytes());
                    }
                    1 => {
                        let end = (i + len.index(8)).min(b.len());
                        b.splice(i..end, frag.into_bytes());
                    }
                    2 => {
                        let end = (i + len.index(8)).min(b.len());
                        b.drain(i..end);
                    }
                    _ => {
                        if i < b.len() {
                            b[i] = byte;
                        }
                    }
                }
                if wrap {
                    let mut w = vec![b'['];
                    w.extend_from_slice(&b);
                    w.push(b']');
                    w
                } else {
                    b
                }
            })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            mutated(valid_usage()),
            mutated(valid_event()),
        ]
    }

    thread_local! {
        static STATE: (AppState, tempfile::TempDir) = state();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        /// `parse_usage` never panics, and whatever it accepts is a valid record.
        #[test]
        fn fuzz_parse_usage(body in body()) {
            STATE.with(|(state, _)| {
                if let Ok(records) = meterd::ingest::usage_api::parse_usage(state, &body, now()) {
                    prop_assert!(!records.is_empty());
                    records.iter().for_each(assert_valid);
                }
                Ok::<(), TestCaseError>(())
            })?;
        }

        /// `parse_events` never panics (all three content types), and whatever it accepts is a valid record.
        #[test]
        fn fuzz_parse_events(body in body(), ct in 0usize..3) {
            let ctype = ["application/cloudevents+json", "application/cloudevents-batch+json", "application/json"][ct];
            STATE.with(|(state, _)| {
                if let Ok(records) = meterd::ingest::cloudevents::parse_events(state, &body, ctype, now()) {
                    records.iter().for_each(assert_valid);
                }
                Ok::<(), TestCaseError>(())
            })?;
        }
    }
}
