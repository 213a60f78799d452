//! Black box: late usage in its own hour, against the real binary and `meterd emulator`'s engine.

mod common;

use chrono::Duration;
use common::{Daemon, emu_rig, hour_start, http, ts};
use meterd::emulator::EmulatorConfig;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

const A: &str = "11111111-1111-4111-8111-111111111111";

fn post(d: &Daemon, records: &Value) -> Value {
    let r = http()
        .post(format!("{}/v1/usage", d.url))
        .json(records)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    assert_eq!(status, 202, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn flush(d: &Daemon) -> Value {
    http()
        .post(format!("{}/v1/flush", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

/// A running daemon with `emit.grace = 0s` (its startup pass has frozen every closed hour it knew: none) receives
/// usage for 2-5 hours ago: each key is accepted by the emulator in its own hour with the exact sum. More usage for
/// an already-sent key is carried into the open hour (named in the report and `GET /v1/usage`), and the grand
/// total is exact.
#[test]
fn running_daemon_sends_usage_for_hours_ago_in_its_own_hour() {
    let r = emu_rig(EmulatorConfig::default());
    let d = r.sending("");
    // A pass has run (and frozen nothing: the journal is empty) before the usage arrives.
    flush(&d);
    let mut records = Vec::new();
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    for ago in 2..=5 {
        let hour = hour_start(ago);
        for (dim, qs) in [("api_calls", [1.25, 2.0]), ("gb_processed", [0.5, 0.125])] {
            for (i, q) in qs.iter().enumerate() {
                records.push(json!({"resource": A, "dimension": dim, "quantity": q,
                                    "time": ts(hour + Duration::minutes(10 + 30 * i as i64))}));
                *expected.entry((dim.to_string(), ts(hour))).or_default() += (q * 1e6) as i64;
            }
        }
    }
    let answer = post(&d, &Value::Array(records));
    assert_eq!(answer["carried"], 0, "{answer}");
    flush(&d);
    let report = d.wait_report(StdDuration::from_secs(60), |rep| {
        rep["hours"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["outcome"] == "accepted")
            .count()
            == 8
    });
    let accepted = r.emu.accepted_events();
    assert_eq!(accepted.len(), 8, "{accepted:?}");
    for e in &accepted {
        let key = (e.dimension.clone(), e.effective_start_time.clone());
        assert_eq!(
            (e.quantity * 1e6).round() as i64,
            expected[&key],
            "{key:?}: {report}"
        );
    }

    // More usage for an already-sent key: carried, and named.
    let late_hour = hour_start(3);
    let answer = post(
        &d,
        &json!([{"resource": A, "dimension": "api_calls", "quantity": 4.5,
                 "time": ts(late_hour + Duration::minutes(45))}]),
    );
    assert_eq!(answer["carried"], 1, "{answer}");
    flush(&d);
    assert_eq!(r.emu.accepted_events().len(), 8, "nothing sent twice");
    let usage: Value = http()
        .get(format!("{}/v1/usage", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    for view in [&usage, &d.report()] {
        let carries = view["carries"].as_array().unwrap();
        assert_eq!(carries.len(), 1, "{view}");
        assert_eq!(carries[0]["from_hour"], ts(late_hour));
        assert_eq!(carries[0]["quantity"], "4.5");
        assert_eq!(carries[0]["reason"], "late");
        let to = carries[0]["to_hour"].as_str().unwrap();
        let into = view["hours"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hour"] == to && h["dimension"] == "api_calls")
            .unwrap_or_else(|| panic!("the hour it went to is listed: {view}"));
        assert_eq!(into["carried_in_micros"], 4_500_000);
        // Grand total: every unit posted is in exactly one hour row.
        let total: i64 = view["hours"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["quantity_micros"].as_i64().unwrap())
            .sum();
        assert_eq!(total, expected.values().sum::<i64>() + 4_500_000, "{view}");
    }
    let accepted_total: i64 = r
        .emu
        .accepted_events()
        .iter()
        .map(|e| (e.quantity * 1e6).round() as i64)
        .sum();
    assert_eq!(accepted_total, expected.values().sum::<i64>());
}

/// Defect 6 through the HTTP API: one managed application URI posted in two letter cases is one event, accepted
/// by the emulator with the sum and the first spelling; no second event, no `duplicate_mismatch`.
#[test]
fn managed_app_uri_in_two_letter_cases_is_one_event_with_the_sum() {
    const APP: &str = "/subscriptions/aaaa0000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Solutions/applications/app1";
    let r = emu_rig(EmulatorConfig {
        managed_apps: vec![meterd::emulator::ManagedApp {
            resource_uri: APP.into(),
            resource_usage_id: None,
            offer_id: "emulator-offer".into(),
        }],
        ..EmulatorConfig::default()
    });
    let cfg = common::config(
        r.dir.path(),
        "default_plan = \"gold\"",
        &common::emulator_sections(&r.base, ""),
    );
    let d = Daemon::start(r.dir.path(), &cfg, &[common::TOKEN_ENV]);
    let hour = hour_start(2);
    let shouting = APP
        .to_ascii_uppercase()
        .replacen("/SUBSCRIPTIONS/", "/subscriptions/", 1);
    let answer = post(
        &d,
        &json!([
            {"resource": APP, "dimension": "api_calls", "quantity": 1.5, "time": ts(hour + Duration::minutes(5))},
            {"resource": shouting, "dimension": "api_calls", "quantity": 2, "time": ts(hour + Duration::minutes(15))},
            {"resource": APP.to_ascii_lowercase(), "dimension": "api_calls", "quantity": 0.25,
             "time": ts(hour + Duration::minutes(25))},
        ]),
    );
    assert_eq!(
        (answer["accepted"].as_i64(), answer["carried"].as_i64()),
        (Some(3), Some(0)),
        "{answer}"
    );
    flush(&d);
    let report = d.wait_report(StdDuration::from_secs(60), |rep| {
        rep["hours"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["outcome"] == "accepted")
    });
    let rows = report["hours"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "one key: {report}");
    assert_eq!(
        (rows[0]["resource"].as_str(), rows[0]["quantity"].as_str()),
        (Some(APP), Some("3.75"))
    );
    let accepted = r.emu.accepted_events();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0].resource_uri.as_deref(), Some(APP));
    assert_eq!(accepted[0].quantity, 3.75);
    assert_eq!(r.emu.received_events().len(), 1, "sent once");
}
