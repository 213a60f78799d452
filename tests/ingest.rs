//! Black-box tests of ingest: the real binary on an ephemeral port.
//!
//! Emission points at a closed port here (nothing listens on 127.0.0.1:9), and `emit.grace` is long, so the hours
//! used stay open and every figure comes from ingest alone.

mod common;

use chrono::{Duration, Timelike, Utc};
use common::{Daemon, http};
use serde_json::{Value, json};

const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";

fn quiet_sections(grace: &str, top_extra: &str) -> (String, String) {
    (
        top_extra.to_string(),
        format!(
            r#"[marketplace]
mode = "azure"
base_url = "http://127.0.0.1:9/api"
[marketplace.auth]
kind = "static_token"
[emit]
grace = "{grace}"
"#
        ),
    )
}

fn start(dir: &std::path::Path, grace: &str, top: &str) -> Daemon {
    let (top, sections) = quiet_sections(grace, top);
    Daemon::start(
        dir,
        &common::config(dir, &top, &sections),
        &[("METERD_MARKETPLACE__AUTH__STATIC_TOKEN", "test-token")],
    )
}

fn post(d: &Daemon, body: &str) -> (u16, Value) {
    let r = http()
        .post(format!("{}/v1/usage", d.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn hour_start(hours_ago: i64) -> chrono::DateTime<Utc> {
    let t = Utc::now() - Duration::hours(hours_ago);
    t.with_minute(0)
        .unwrap()
        .with_second(0)
        .unwrap()
        .with_nanosecond(0)
        .unwrap()
}

fn ts(t: chrono::DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn total(report: &Value, resource: &str, dimension: &str, hour: &str) -> Option<String> {
    report["hours"].as_array().unwrap().iter().find_map(|h| {
        (h["resource"] == resource && h["dimension"] == dimension && h["hour"] == hour)
            .then(|| h["quantity"].as_str().unwrap().to_string())
    })
}

#[test]
fn records_are_summed_exactly_per_hour_and_retries_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "11h", "");
    let h3 = hour_start(3);
    let h2 = hour_start(2);
    // Ten records of 0.1 (a float sum would not be exactly 1), and a mix in another hour and resource.
    let mut batch = Vec::new();
    for i in 0..10 {
        batch.push(json!({"resource": A, "dimension": "api_calls", "quantity": 0.1, "time": ts(h3 + Duration::minutes(i * 5)), "id": format!("k{i}")}));
    }
    batch.push(json!({"resource": A, "dimension": "api_calls", "quantity": 2.5, "time": ts(h2 + Duration::minutes(5))}));
    batch.push(json!({"resource": A, "dimension": "api_calls", "quantity": "1.0", "time": ts(h2 + Duration::minutes(40))}));
    batch.push(json!({"resource": A, "dimension": "api_calls", "quantity": 0.5, "time": ts(h2 + Duration::minutes(59) + Duration::seconds(59))}));
    batch.push(json!({"resource": B.to_uppercase(), "dimension": "gb_processed", "quantity": 0.000001, "time": ts(h2), "plan": "gold"}));
    let (status, body) = post(&d, &serde_json::to_string(&batch).unwrap());
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"accepted": 14, "duplicates": 0, "carried": 0}));

    // The client times out reading the answer and retries the same ids: counted as duplicates, added once.
    let retry: Vec<Value> = batch[..10].to_vec();
    let (status, body) = post(&d, &serde_json::to_string(&retry).unwrap());
    assert_eq!(status, 202);
    assert_eq!(body, json!({"accepted": 0, "duplicates": 10, "carried": 0}));

    let report = d.report();
    assert_eq!(
        total(&report, A, "api_calls", &ts(h3)).as_deref(),
        Some("1")
    );
    assert_eq!(
        total(&report, A, "api_calls", &ts(h2)).as_deref(),
        Some("4")
    );
    // GUIDs are case-folded so one subscription never splits into two hourly events.
    assert_eq!(
        total(&report, B, "gb_processed", &ts(h2)).as_deref(),
        Some("0.000001")
    );
    // GET /v1/usage answers the same totals, filtered by resource.
    let api: Value = http()
        .get(format!("{}/v1/usage?resource={A}", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(api["hours"].as_array().unwrap().len(), 2);
    assert!(
        api["hours"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["resource"] == A)
    );
    let csv = d.cli(&["report", "--format", "csv", "--resource", A]);
    let text = String::from_utf8_lossy(&csv.stdout);
    assert!(
        text.starts_with("hour,resource,plan,dimension,quantity"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 3, "{text}");
    let table = d.cli(&["report"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("api_calls"));
}

#[test]
fn every_bad_input_gets_its_4xx_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "11h", "");
    let now = ts(Utc::now());
    let future = ts(Utc::now() + Duration::minutes(30));
    let long_id = "x".repeat(129);
    let rec = |q: &str| format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":{q}}}"#);
    let cases: Vec<(&str, String, &str, u16)> = vec![
        ("NaN literal", rec("NaN"), "application/json", 400),
        ("Infinity literal", rec("Infinity"), "application/json", 400),
        ("NaN string", rec("\"NaN\""), "application/json", 400),
        ("negative", rec("-1"), "application/json", 400),
        ("zero", rec("0"), "application/json", 400),
        ("seven decimals", rec("0.0000001"), "application/json", 400),
        ("absurdly large", rec("1e30"), "application/json", 400),
        ("boolean quantity", rec("true"), "application/json", 400),
        (
            "missing quantity",
            format!(r#"{{"resource":"{A}","dimension":"api_calls"}}"#),
            "application/json",
            400,
        ),
        (
            "resource not a GUID",
            r#"{"resource":"customer-42","dimension":"api_calls","quantity":1}"#.into(),
            "application/json",
            400,
        ),
        (
            "unknown dimension",
            format!(r#"{{"resource":"{A}","dimension":"api_callz","quantity":1}}"#),
            "application/json",
            400,
        ),
        (
            "dimension not on plan",
            format!(
                r#"{{"resource":"{A}","dimension":"gb_processed","plan":"silver","quantity":1}}"#
            ),
            "application/json",
            200,
        ),
        (
            "time not RFC 3339",
            format!(
                r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"time":"yesterday"}}"#
            ),
            "application/json",
            400,
        ),
        (
            "time in the future",
            format!(
                r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"time":"{future}"}}"#
            ),
            "application/json",
            400,
        ),
        (
            "id too long",
            format!(
                r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"id":"{long_id}"}}"#
            ),
            "application/json",
            400,
        ),
        (
            "unknown field",
            format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"qty":2}}"#),
            "application/json",
            400,
        ),
        (
            "malformed JSON",
            r#"{"resource": "#.into(),
            "application/json",
            400,
        ),
        ("not an object", "42".into(), "application/json", 400),
        ("empty array", "[]".into(), "application/json", 400),
        ("wrong content type", rec("1"), "text/plain", 415),
        (
            "one bad record rejects the whole batch",
            format!(r#"[{},{}]"#, rec("1"), rec("-1")),
            "application/json",
            400,
        ),
        (
            "body over max_body_bytes",
            format!("[{}]", vec![rec("1"); 60_000].join(",")),
            "application/json",
            413,
        ),
        (
            "valid time but bad resource",
            format!(
                r#"{{"resource":"/subscriptions/x","dimension":"api_calls","quantity":1,"time":"{now}"}}"#
            ),
            "application/json",
            400,
        ),
    ];
    for (name, body, ctype, expected) in &cases {
        let r = http()
            .post(format!("{}/v1/usage", d.url))
            .header("content-type", *ctype)
            .body(body.clone())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        if *expected == 200 {
            // The test config declares no plan restrictions: this one is valid and is the control case.
            assert_eq!(status, 202, "{name}: {text}");
            continue;
        }
        assert_eq!(status, *expected, "{name}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{name}: error body is JSON: {text}"));
        let msg = v["errors"][0]["message"].as_str().unwrap_or("");
        assert!(!msg.is_empty(), "{name}: error names the problem: {text}");
    }
    // Only the control record was stored.
    assert_eq!(d.status()["records"], 1);
    // GET with a bad bound explains itself.
    let r = http()
        .get(format!("{}/v1/usage?from=yesterday", d.url))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

/// Issue 15's typed fast path for records reads what the field-by-field path read: a record given as an array is
/// refused (serde would read a struct from an array by position), a repeated field is refused, `null` is the
/// same as an absent field, and every unknown field is named.
#[test]
fn records_read_by_the_typed_path_are_judged_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "11h", "");
    let (status, v) = post(&d, &format!(r#"[["{A}","api_calls",1]]"#));
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["errors"][0]["message"], "each record must be a JSON object",
        "{v}"
    );
    assert_eq!(v["errors"][0]["index"], 0, "{v}");
    let (status, v) = post(
        &d,
        &format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"quantity":2}}"#),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("duplicate field `quantity`"),
        "{v}"
    );
    let (status, v) = post(
        &d,
        &format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"qty":2,"amount":3}}"#),
    );
    assert_eq!(status, 400, "{v}");
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert!(fields.contains(&"qty") && fields.contains(&"amount"), "{v}");
    let (status, v) = post(
        &d,
        &format!(
            r#"{{"resource":"{A}","dimension":"api_calls","quantity":1.5,"plan":null,"id":null,"time":null}}"#
        ),
    );
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["accepted"], 1, "{v}");
    assert_eq!(d.status()["records"], 1);
}

#[test]
fn acknowledged_records_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path(), "11h", "");
    let h = hour_start(1);
    let mut expected = 0i64;
    for i in 0..50 {
        let q = i + 1;
        let (status, _) = post(
            &d,
            &format!(
                r#"{{"resource":"{A}","dimension":"api_calls","quantity":{q},"time":"{}","id":"r{i}"}}"#,
                ts(h)
            ),
        );
        assert_eq!(status, 202);
        expected += q;
    }
    // Kill right after the last 202: no shutdown, no checkpoint.
    d.kill9();
    d.restart();
    let report = d.report();
    assert_eq!(
        total(&report, A, "api_calls", &ts(h)),
        Some(expected.to_string())
    );
    assert_eq!(d.status()["records"], 50);
    // And the idempotency keys survived too.
    let (_, body) = post(
        &d,
        &format!(
            r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"time":"{}","id":"r7"}}"#,
            ts(h)
        ),
    );
    assert_eq!(body["duplicates"], 1);
}

#[test]
fn late_usage_is_carried_forward_or_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // Grace 0s: the startup pass freezes every hour before the current one (a flush waits for a pass).
    let d = start(dir.path(), "0s", "");
    http().post(format!("{}/v1/flush", d.url)).send().unwrap();
    let frozen_hour = hour_start(2);
    // Freezing is per key: the first record of A/api_calls two hours ago goes into its own hour (its key has no
    // event yet) and the next pass freezes the key; only later usage of that key is carried.
    let record = |q: i64, t: chrono::DateTime<Utc>| {
        format!(
            r#"{{"resource":"{A}","dimension":"api_calls","quantity":{q},"time":"{}"}}"#,
            ts(t)
        )
    };
    let (status, body) = post(&d, &record(2, frozen_hour + Duration::minutes(10)));
    assert_eq!(
        (status, &body["carried"]),
        (202, &serde_json::json!(0)),
        "{body}"
    );
    http().post(format!("{}/v1/flush", d.url)).send().unwrap();
    // The open hour when the record is carried (the wall clock may turn an hour during the test).
    let open_before = ts(hour_start(0));
    let (status, body) = post(&d, &record(1, frozen_hour + Duration::minutes(30)));
    let open_after = ts(hour_start(0));
    assert_eq!(status, 202);
    assert_eq!(body["carried"], 1);
    let report = d.report();
    let carries = report["carries"].as_array().unwrap();
    assert_eq!(carries.len(), 1, "{report}");
    assert_eq!(carries[0]["from_hour"], ts(frozen_hour));
    let to = carries[0]["to_hour"].as_str().unwrap().to_string();
    assert!(to == open_before || to == open_after, "{to}");
    assert_eq!(total(&report, A, "api_calls", &to).as_deref(), Some("1"));
    drop(d);

    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "0s", "late_usage = \"reject\"");
    http().post(format!("{}/v1/flush", d.url)).send().unwrap();
    let (status, body) = post(&d, &record(2, frozen_hour + Duration::minutes(10)));
    assert_eq!(status, 202, "{body}");
    http().post(format!("{}/v1/flush", d.url)).send().unwrap();
    let (status, body) = post(
        &d,
        &format!(
            r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"time":"{}"}}"#,
            ts(frozen_hour)
        ),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("frozen"),
        "{body}"
    );
    // Older than the 24-hour window.
    let (status, body) = post(
        &d,
        &format!(
            r#"{{"resource":"{A}","dimension":"api_calls","quantity":1,"time":"{}"}}"#,
            ts(Utc::now() - Duration::hours(25))
        ),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("24-hour"),
        "{body}"
    );
    assert_eq!(d.status()["records"], 1, "only the record in its own hour");
}

#[test]
fn bearer_token_guards_every_route_but_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("ingest-token");
    std::fs::write(&token_file, "s3cr3t-ingest\n").unwrap();
    let (top, mut sections) = quiet_sections("11h", "");
    sections.push_str(&format!(
        "[ingest]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token_file.display()
    ));
    let cfg = common::config(dir.path(), &top, "")
        .replace("[ingest]\nlisten = \"127.0.0.1:0\"\n", "")
        + &sections;
    let d = Daemon::start(
        dir.path(),
        &cfg,
        &[("METERD_MARKETPLACE__AUTH__STATIC_TOKEN", "test-token")],
    );
    let body = format!(r#"{{"resource":"{A}","dimension":"api_calls","quantity":1}}"#);
    let c = http();
    let r = c
        .post(format!("{}/v1/usage", d.url))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .post(format!("{}/v1/usage", d.url))
        .header("content-type", "application/json")
        .bearer_auth("wrong")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .post(format!("{}/v1/usage", d.url))
        .header("content-type", "application/json")
        .bearer_auth("s3cr3t-ingest")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(
        c.get(format!("{}/v1/status", d.url))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        c.get(format!("{}/healthz", d.url))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        c.get(format!("{}/readyz", d.url))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert!(!d.log_text().contains("s3cr3t-ingest"));
}

#[test]
fn cloudevents_single_batch_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "11h", "");
    let t = ts(hour_start(1) + Duration::minutes(3));
    let ev = |id: &str, n: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"app","type":"api-requests","subject":"{A}","time":"{t}","data":{{"count":{n}}}}}"#
        )
    };
    let c = http();
    let r = c
        .post(format!("{}/api/v1/events", d.url))
        .header("content-type", "application/cloudevents+json")
        .body(ev("e1", "2"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let r = c
        .post(format!("{}/api/v1/events", d.url))
        .header("content-type", "application/cloudevents-batch+json")
        .body(format!(
            "[{},{},{}]",
            ev("e1", "2"),
            ev("e2", "3.5"),
            ev("e3", "\"0.5\"")
        ))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let report = d.report();
    assert_eq!(
        total(&report, A, "api_calls", &ts(hour_start(1))).as_deref(),
        Some("6")
    );
    // Unknown type and missing value: problem details naming the event and the field.
    let bad = r#"[{"specversion":"1.0","id":"x","source":"app","type":"nope","subject":"11111111-1111-4111-8111-111111111111","data":{}}]"#;
    let r = c
        .post(format!("{}/api/v1/events", d.url))
        .header("content-type", "application/cloudevents-batch+json")
        .body(bad)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: Value = r.json().unwrap();
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("no meter for type `nope`"),
        "{v}"
    );
    let r = c
        .post(format!("{}/api/v1/events", d.url))
        .header("content-type", "application/cloudevents+json")
        .body(ev("e9", "-1"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(d.status()["records"], 3);
}

/// Posts a batch with the `cloudevents` package from PyPI (the CloudEvents SDK), as a real client would.
#[test]
fn cloudevents_from_the_python_sdk_land_as_usage() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import cloudevents.http"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install the cloudevents package (pip install \"cloudevents>=1.11,<2\")"
        );
        eprintln!(
            "skipping: python3 with the `cloudevents` 1.x package is not installed (pip install \"cloudevents>=1.11,<2\")"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "11h", "");
    let t = ts(hour_start(1) + Duration::minutes(7));
    let script = format!(
        r#"
import json, urllib.request
from cloudevents.http import CloudEvent
from cloudevents.conversion import to_structured, to_json
events = [CloudEvent({{"type": "api-requests", "source": "sdk-test", "subject": "{A}", "time": "{t}", "id": f"py-{{i}}"}}, {{"count": i + 1}}) for i in range(4)]
# Batch mode: a JSON array of structured events.
body = "[" + ",".join(to_json(e).decode() for e in events) + "]"
req = urllib.request.Request("{url}/api/v1/events", data=body.encode(), headers={{"content-type": "application/cloudevents-batch+json"}})
print(urllib.request.urlopen(req).status)
# Structured single event through the SDK's own helper.
headers, data = to_structured(CloudEvent({{"type": "api-requests", "source": "sdk-test", "subject": "{A}", "time": "{t}", "id": "py-single"}}, {{"count": 10}}))
req = urllib.request.Request("{url}/api/v1/events", data=data, headers=headers)
print(urllib.request.urlopen(req).status)
"#,
        url = d.url
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "204\n204");
    let report = d.report();
    assert_eq!(
        total(&report, A, "api_calls", &ts(hour_start(1))).as_deref(),
        Some("20")
    );
}

#[test]
fn record_and_status_commands_talk_to_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "11h", "");
    let out = d.cli(&[
        "record",
        "--url",
        &d.url,
        "--resource",
        A,
        "--dimension",
        "api_calls",
        "--quantity",
        "3",
        "--id",
        "cli-1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "recorded");
    let out = d.cli(&[
        "record",
        "--url",
        &d.url,
        "--resource",
        A,
        "--dimension",
        "api_calls",
        "--quantity",
        "3",
        "--id",
        "cli-1",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("duplicate"));
    let out = d.cli(&[
        "record",
        "--url",
        &d.url,
        "--resource",
        A,
        "--dimension",
        "nope",
        "--quantity",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dimension `nope` is not declared"));
    let out = d.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("pending events"));
    let out = d.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
