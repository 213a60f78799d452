//! Black-box tests of emission: the real `meterd` binary against the emulator (in this test process).
//!
//! Time is the wall clock on both sides. Records are stamped in hours that closed a few hours ago; the daemon is
//! first started with a long grace (so nothing is frozen while records arrive), then restarted with `grace = 0s`,
//! whose startup catch-up pass freezes and sends them. The emulator's own clock is shifted where a test needs
//! the marketplace to see time pass.

mod common;

use chrono::{Duration, Utc};
use common::{Daemon, http};
use meterd::emulator::{
    EmulatorConfig, NextLinkMode, Phase, Route, Subscription, SubscriptionStatus,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";

use common::{TOKEN_ENV, emu_rig as rig, hour_start, ts};

fn post(d: &Daemon, records: &Value) {
    let r = http()
        .post(format!("{}/v1/usage", d.url))
        .json(records)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_eq!(status, 202, "{}", r.text().unwrap());
}

fn stop(mut d: Daemon) -> String {
    let status = d.terminate(StdDuration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit; logs:\n{}",
        d.log_text()
    );
    d.log_text()
}

/// Rows of the report whose hour is not open, keyed (resource, dimension, hour) -> (quantity, outcome).
fn frozen_rows(report: &Value) -> BTreeMap<(String, String, String), (String, String)> {
    report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["outcome"] != "open")
        .map(|h| {
            (
                (
                    h["resource"].as_str().unwrap().into(),
                    h["dimension"].as_str().unwrap().into(),
                    h["hour"].as_str().unwrap().into(),
                ),
                (
                    h["quantity"].as_str().unwrap().into(),
                    h["outcome"].as_str().unwrap().into(),
                ),
            )
        })
        .collect()
}

fn all_settled(report: &Value) -> bool {
    report["hours"].as_array().unwrap().iter().all(|h| {
        !matches!(
            h["outcome"].as_str(),
            Some("pending" | "closed" | "closing")
        )
    })
}

#[test]
fn closed_hours_go_exactly_once_with_exact_sums_and_the_open_hour_waits() {
    let r = rig(EmulatorConfig::default());
    let d = r.collecting("");
    let (h3, h2, open) = (hour_start(3), hour_start(2), Utc::now());
    let mut records = Vec::new();
    let mut expected: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for (res, dim) in [
        (A, "api_calls"),
        (A, "gb_processed"),
        (B, "api_calls"),
        (B, "gb_processed"),
    ] {
        for (hour, qs) in [(h3, [0.25, 0.5, 1.0]), (h2, [2.5, 1.0, 0.5])] {
            for (i, q) in qs.iter().enumerate() {
                records.push(json!({"resource": res, "dimension": dim, "quantity": q, "time": ts(hour + Duration::minutes(i as i64 * 20))}));
                *expected
                    .entry((res.into(), dim.into(), ts(hour)))
                    .or_default() += (q * 1e6) as i64;
            }
        }
    }
    records.push(json!({"resource": A, "dimension": "api_calls", "quantity": 7, "time": ts(open)}));
    post(&d, &Value::Array(records));
    stop(d);

    let d = r.sending("");
    let report = d.wait_report(StdDuration::from_secs(30), |rep| {
        frozen_rows(rep).len() == 8 && all_settled(rep)
    });
    let rows = frozen_rows(&report);
    for ((res, dim, hour), micros) in &expected {
        let (q, outcome) = &rows[&(res.clone(), dim.clone(), hour.clone())];
        assert_eq!(outcome, "accepted", "{res}/{dim}/{hour}");
        assert_eq!(meterd::quantity::Micros(*micros).to_decimal_string(), *q);
    }
    // The emulator holds exactly one event per (resource, dimension, hour), with our quantities.
    let accepted = r.emu.accepted_events();
    assert_eq!(accepted.len(), 8, "{accepted:?}");
    for e in &accepted {
        let key = (
            e.resource_id.clone().unwrap(),
            e.dimension.clone(),
            e.effective_start_time.clone(),
        );
        assert_eq!((e.quantity * 1e6).round() as i64, expected[&key], "{key:?}");
        assert_eq!(e.plan_id, "gold", "plan from the subscription list");
    }
    // Nothing of the open hour was sent.
    let open_row = report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["outcome"] == "open")
        .expect("open hour row");
    assert_eq!(open_row["quantity"], "7");
    assert!(
        accepted
            .iter()
            .all(|e| e.effective_start_time != ts(hour_start(0)))
    );
    // Status agrees.
    let status = d.status();
    assert_eq!(status["outcomes"]["accepted"], 8);
    assert_eq!(status["pending_events"], 0);
    assert!(status["last_success"].is_string());
    // A flush sends nothing new: the hour is accepted once, ever.
    let f: Value = http()
        .post(format!("{}/v1/flush", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(f["sent"], 0, "{f}");
    assert_eq!(r.emu.accepted_events().len(), 8);
    // Every unit ingested is accounted for under exactly one outcome.
    let mut by_outcome: BTreeMap<String, i64> = BTreeMap::new();
    for h in report["hours"].as_array().unwrap() {
        *by_outcome
            .entry(h["outcome"].as_str().unwrap().into())
            .or_default() += h["quantity_micros"].as_i64().unwrap();
    }
    let ingested: i64 = expected.values().sum::<i64>() + 7_000_000;
    assert_eq!(by_outcome.values().sum::<i64>(), ingested, "{by_outcome:?}");
    assert_eq!(by_outcome["open"], 7_000_000);
}

#[test]
fn a_crash_between_send_and_record_ends_as_duplicate_never_twice() {
    let r = rig(EmulatorConfig::default());
    let d = r.collecting("");
    let h = hour_start(2);
    post(
        &d,
        &json!([{"resource": A, "dimension": "api_calls", "quantity": 4, "time": ts(h)}]),
    );
    stop(d);
    // The marketplace records the batch, then answers slowly: meterd is killed while it waits.
    r.emu.delay_next(
        Route::BatchUsageEvent,
        1,
        StdDuration::from_secs(20),
        Phase::After,
    );
    let mut d = r.sending("");
    let start = std::time::Instant::now();
    while r.emu.accepted_events().is_empty() {
        assert!(
            start.elapsed() < StdDuration::from_secs(20),
            "the batch never reached the emulator:\n{}",
            d.log_text()
        );
        std::thread::sleep(StdDuration::from_millis(50));
    }
    d.kill9();
    d.restart();
    let report = d.wait_report(StdDuration::from_secs(30), all_settled);
    let rows = frozen_rows(&report);
    assert_eq!(
        rows[&(A.to_string(), "api_calls".to_string(), ts(h))],
        ("4".to_string(), "duplicate".to_string())
    );
    assert_eq!(r.emu.accepted_events().len(), 1, "billed once");
    let received = r.emu.received_events();
    assert!(received.len() >= 2, "the same event was resent");
}

#[test]
fn throttling_server_errors_timeouts_and_drops_are_retried_until_accepted() {
    let r = rig(EmulatorConfig::default());
    let d = r.collecting("");
    let h = hour_start(2);
    post(
        &d,
        &json!([
            {"resource": A, "dimension": "api_calls", "quantity": 1, "time": ts(h)},
            {"resource": B, "dimension": "api_calls", "quantity": 2, "time": ts(h)}
        ]),
    );
    stop(d);
    r.emu.fail_next(Route::BatchUsageEvent, 1, 429, Some(1));
    r.emu.fail_next(Route::BatchUsageEvent, 1, 503, None);
    r.emu.fail_next(Route::BatchUsageEvent, 1, 500, None);
    r.emu.drop_next(Route::BatchUsageEvent, 1, Phase::Before);
    // Past the client timeout (3s in the test config), after the marketplace recorded it.
    r.emu.delay_next(
        Route::BatchUsageEvent,
        1,
        StdDuration::from_secs(5),
        Phase::After,
    );
    let d = r.sending("");
    let report = d.wait_report(StdDuration::from_secs(60), |rep| {
        frozen_rows(rep).len() == 2 && all_settled(rep)
    });
    let rows = frozen_rows(&report);
    // The timed-out attempt was recorded, so the resend is a Duplicate with the same quantity: billed once.
    for (res, q) in [(A, "1"), (B, "2")] {
        let (quantity, outcome) = &rows[&(res.to_string(), "api_calls".to_string(), ts(h))];
        assert_eq!(quantity, q);
        assert!(outcome == "duplicate" || outcome == "accepted", "{outcome}");
    }
    assert_eq!(r.emu.accepted_events().len(), 2);
    assert!(r.emu.request_count(Route::BatchUsageEvent) >= 6);
    let logs = d.log_text();
    assert!(
        logs.contains("Batch call failed; retrying later."),
        "{logs}"
    );
    assert!(
        logs.contains("x-ms-requestid") || logs.contains("request_id"),
        "calls are logged with their request ids"
    );
}

#[test]
fn an_expired_token_is_refreshed() {
    let r = rig(EmulatorConfig::default());
    let auth = format!(
        "[marketplace.auth]\nkind = \"client_secret\"\ntenant_id = \"emulator-tenant\"\nclient_id = \"00000000-0000-0000-0000-00000000c11e\"\ntoken_url = \"{}/emulator-tenant/oauth2/v2.0/token\"\n",
        r.base
    );
    let cfg = r
        .config("")
        .replace("[marketplace.auth]\nkind = \"static_token\"\n", &auth);
    let secret = ("METERD_MARKETPLACE__AUTH__CLIENT_SECRET", "emulator-secret");
    let d = Daemon::start(r.dir.path(), &cfg, &[secret, ("METERD_EMIT__GRACE", "11h")]);
    let h = hour_start(3);
    post(
        &d,
        &json!([{"resource": A, "dimension": "api_calls", "quantity": 1, "time": ts(h)}]),
    );
    stop(d);
    // The first send fails (after a token was issued); the emulator's clock then jumps past the token's life.
    r.emu.fail_next(Route::BatchUsageEvent, 2, 503, None);
    let d = Daemon::start(r.dir.path(), &cfg, &[secret]);
    let start = std::time::Instant::now();
    while r.emu.request_count(Route::BatchUsageEvent) == 0 {
        assert!(start.elapsed() < StdDuration::from_secs(20));
        std::thread::sleep(StdDuration::from_millis(20));
    }
    r.emu.shift_clock(Duration::minutes(70));
    let report = d.wait_report(StdDuration::from_secs(30), |rep| {
        frozen_rows(rep).len() == 1 && all_settled(rep)
    });
    assert_eq!(frozen_rows(&report).values().next().unwrap().1, "accepted");
    assert!(
        r.emu.request_count(Route::Token) >= 2,
        "a new token was fetched"
    );
    let logs = d.log_text();
    assert!(
        !logs.contains("emulator-secret"),
        "the client secret never appears in logs"
    );
}

#[test]
fn events_the_marketplace_calls_expired_are_carried_into_the_open_hour() {
    let r = rig(EmulatorConfig::default());
    let d = r.collecting("");
    let old = hour_start(10);
    post(
        &d,
        &json!([{"resource": A, "dimension": "api_calls", "quantity": 3, "time": ts(old)}]),
    );
    stop(d);
    // For the marketplace, 10 hours ago is now more than 24 hours ago.
    r.emu.shift_clock(Duration::hours(15));
    // The open hour when the carry happens (the wall clock may turn an hour during the test).
    let open_before = ts(hour_start(0));
    let d = r.sending("");
    let report = d.wait_report(StdDuration::from_secs(30), |rep| {
        rep["hours"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["outcome"] == "carried")
    });
    let open_after = ts(hour_start(0));
    let carried = report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["outcome"] == "carried")
        .unwrap();
    assert_eq!(carried["hour"], ts(old));
    let to = carried["carried_to"].as_str().unwrap().to_string();
    assert!(to == open_before || to == open_after, "{to}");
    let target = report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hour"] == to.as_str())
        .unwrap();
    assert_eq!(target["quantity"], "3");
    assert_eq!(target["carried_in_micros"], 3_000_000);
    assert_eq!(report["carries"][0]["reason"], "expired");
    assert!(r.emu.accepted_events().is_empty());
}

#[test]
fn subscription_statuses_decide_what_is_sent() {
    let r = rig(EmulatorConfig::default());
    let pending = "44444444-4444-4444-8444-444444444444";
    let suspended = "55555555-5555-4555-8555-555555555555";
    let cancelled = "66666666-6666-4666-8666-666666666666";
    let unknown = "77777777-7777-4777-8777-777777777777";
    r.emu.add_subscription(
        Subscription::new(pending, "gold").with_status(SubscriptionStatus::PendingFulfillmentStart),
    );
    r.emu.add_subscription(
        Subscription::new(suspended, "gold").with_status(SubscriptionStatus::Suspended),
    );
    r.emu.add_subscription(Subscription::new(cancelled, "gold"));
    // Cancelled ten minutes ago: the hour three hours ago closed before that, so it is still billable.
    r.emu.shift_clock(Duration::minutes(-10));
    r.emu
        .set_status(cancelled, SubscriptionStatus::Unsubscribed);
    r.emu.shift_clock(Duration::minutes(10));
    let d = r.collecting("");
    let h = hour_start(3);
    let recs: Vec<Value> = [pending, suspended, cancelled, unknown]
        .iter()
        .map(|s| json!({"resource": s, "dimension": "api_calls", "quantity": 1, "time": ts(h)}))
        .collect();
    post(&d, &Value::Array(recs));
    stop(d);
    let d = r.sending("");
    let report = d.wait_report(StdDuration::from_secs(30), |rep| {
        frozen_rows(rep)
            .get(&(cancelled.to_string(), "api_calls".to_string(), ts(h)))
            .is_some_and(|v| v.1 == "accepted")
    });
    let full = &report["hours"];
    // A GUID no list shows may be a managed application's resourceUsageId: it is not held for the list; here it
    // waits for a plan (the records name none and there is no default_plan).
    let row = full
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == unknown)
        .unwrap();
    assert_eq!(row["outcome"], "pending", "{row}");
    assert!(
        row["last_error"].as_str().unwrap().contains("no plan id"),
        "{row}"
    );
    for s in [pending, suspended] {
        let row = full
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == s)
            .unwrap();
        assert_eq!(row["outcome"], "pending", "{s} is held: {row}");
        assert!(
            row["last_error"].as_str().unwrap().contains("holding"),
            "{row}"
        );
    }
    let status = d.status();
    assert_eq!(status["pending_events"], 3);
    assert!(status["nearest_expiry_seconds"].as_i64().unwrap() > 0);
    // The pending subscription is activated: the held event goes at a later pass.
    r.emu.set_status(pending, SubscriptionStatus::Subscribed);
    let f: Value = http()
        .post(format!("{}/v1/flush", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(f["outcomes"]["accepted"] == 1, "{f}");
    let report = d.wait_report(StdDuration::from_secs(30), |rep| {
        frozen_rows(rep)
            .get(&(pending.to_string(), "api_calls".to_string(), ts(h)))
            .is_some_and(|v| v.1 == "accepted")
    });
    let _ = report;
}

#[test]
fn invalid_dimension_and_not_authorized_surface_as_rejected() {
    let r = rig(EmulatorConfig::default());
    r.emu.forbid_resource(B);
    let d = r.collecting("");
    let h = hour_start(2);
    post(
        &d,
        &json!([
            {"resource": A, "dimension": "api_calls", "quantity": 1, "time": ts(h), "plan": "silver"},
            {"resource": B, "dimension": "api_calls", "quantity": 1, "time": ts(h)}
        ]),
    );
    stop(d);
    let d = r.sending("");
    let report = d.wait_report(StdDuration::from_secs(30), |rep| {
        frozen_rows(rep).len() == 2 && all_settled(rep)
    });
    for h in report["hours"].as_array().unwrap() {
        assert_eq!(h["outcome"], "rejected", "{h}");
    }
    let a = report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["resource"] == A)
        .unwrap();
    assert!(
        a["last_error"]
            .as_str()
            .unwrap()
            .contains("InvalidDimension"),
        "{a}"
    );
    let b = report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["resource"] == B)
        .unwrap();
    assert!(
        b["last_error"]
            .as_str()
            .unwrap()
            .contains("ResourceNotAuthorized"),
        "{b}"
    );
    assert_eq!(d.status()["outcomes"]["rejected"], 2);
    let logs = d.log_text();
    assert!(
        logs.contains("resource_not_authorized") && logs.contains("\"alert\":\"rejected\""),
        "{logs}"
    );
}

#[test]
fn more_than_25_events_split_into_calls_and_every_subscription_page_is_read() {
    let r = rig(EmulatorConfig {
        next_link: NextLinkMode::ForeignHost,
        page_size: 4,
        ..Default::default()
    });
    let subs: Vec<String> = (0..15)
        .map(|i| format!("{i:08x}-aaaa-4aaa-8aaa-{i:012x}"))
        .collect();
    for s in &subs {
        r.emu.add_subscription(Subscription::new(s.clone(), "gold"));
    }
    let d = r.collecting("concurrency = 2\n");
    let h = hour_start(2);
    let recs: Vec<Value> = subs
        .iter()
        .flat_map(|s| {
            ["api_calls", "gb_processed"]
                .map(|dim| json!({"resource": s, "dimension": dim, "quantity": 1, "time": ts(h)}))
        })
        .collect();
    post(&d, &Value::Array(recs));
    stop(d);
    let d = r.sending("concurrency = 2\n");
    let report = d.wait_report(StdDuration::from_secs(30), |rep| {
        frozen_rows(rep).len() == 30 && all_settled(rep)
    });
    assert!(frozen_rows(&report).values().all(|(_, o)| o == "accepted"));
    assert_eq!(r.emu.accepted_events().len(), 30);
    assert_eq!(
        r.emu.request_count(Route::BatchUsageEvent),
        2,
        "30 events go as 25 + 5"
    );
    assert!(
        r.emu.request_count(Route::Subscriptions) >= 5,
        "all pages of 18 subscriptions at 4 per page"
    );
}

#[test]
fn secrets_never_appear_in_logs_status_reports_or_errors() {
    let r = rig(EmulatorConfig::default());
    let token_file = r.dir.path().join("ingest-token");
    std::fs::write(&token_file, "ingest-s3cret-value\n").unwrap();
    let cfg = r.config("").replace(
        "listen = \"127.0.0.1:0\"",
        &format!(
            "listen = \"127.0.0.1:0\"\ntoken_file = \"{}\"",
            token_file.display()
        ),
    );
    // Debug-level logs, the most talkative setting.
    let cfg = cfg.replace("level = \"info,meterd=debug\"", "level = \"debug\"");
    let d = Daemon::start(r.dir.path(), &cfg, &[TOKEN_ENV]);
    let h = hour_start(0);
    let c = http();
    let resp = c
        .post(format!("{}/v1/usage", d.url))
        .bearer_auth("ingest-s3cret-value")
        .json(&json!([{"resource": A, "dimension": "api_calls", "quantity": 1, "time": ts(h)}]))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    // A wrong token is refused without echoing either token.
    let bad = c
        .get(format!("{}/v1/status", d.url))
        .bearer_auth("guess")
        .send()
        .unwrap()
        .text()
        .unwrap();
    let status = c
        .get(format!("{}/v1/status", d.url))
        .bearer_auth("ingest-s3cret-value")
        .send()
        .unwrap()
        .text()
        .unwrap();
    let flush = c
        .post(format!("{}/v1/flush", d.url))
        .bearer_auth("ingest-s3cret-value")
        .send()
        .unwrap()
        .text()
        .unwrap();
    let metrics = c
        .get(format!("{}/metrics", d.url))
        .bearer_auth("ingest-s3cret-value")
        .send()
        .unwrap()
        .text()
        .unwrap();
    let report = d.cli(&["report", "--format", "json"]);
    let cli_status = d.cli(&["status", "--json"]);
    let check = d.cli(&["check-config"]);
    let logs = stop(d);
    let everything = format!(
        "{bad}{status}{flush}{metrics}{}{}{}{}{}{logs}",
        String::from_utf8_lossy(&report.stdout),
        String::from_utf8_lossy(&report.stderr),
        String::from_utf8_lossy(&cli_status.stdout),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for secret in ["ingest-s3cret-value", "emulator-token"] {
        assert!(!everything.contains(secret), "`{secret}` leaked");
    }
    assert!(logs.contains("meterd listening."), "the logs were captured");
}

#[test]
fn balance_and_consumption_routes_and_command() {
    let r = rig(EmulatorConfig::default());
    let plans =
        "[[plans]]\nid = \"gold\"\nincluded = { api_calls = 10, gb_processed = \"infinite\" }\n";
    let cfg = format!("{}{plans}", r.config(""));
    let d = Daemon::start(
        r.dir.path(),
        &cfg,
        &[TOKEN_ENV, ("METERD_EMIT__GRACE", "11h")],
    );
    let h = hour_start(2);
    post(
        &d,
        &json!([
            {"resource": A, "dimension": "api_calls", "quantity": 4, "time": ts(h)},
            {"resource": A, "dimension": "api_calls", "quantity": 9, "time": ts(h + Duration::minutes(1))},
            {"resource": A, "dimension": "gb_processed", "quantity": 5, "time": ts(h)}
        ]),
    );
    stop(d);
    let d = Daemon::start(r.dir.path(), &cfg, &[TOKEN_ENV]);
    d.wait_report(StdDuration::from_secs(30), |rep| {
        frozen_rows(rep).len() == 2 && all_settled(rep)
    });
    // 13 used, 10 included: 3 billed; gb_processed is infinite.
    let accepted = r.emu.accepted_events();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0].quantity, 3.0);
    let b: Value = http()
        .get(format!("{}/v1/subscriptions/{A}/balance", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let api = b["dimensions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["dimension"] == "api_calls")
        .unwrap();
    assert_eq!(
        (
            api["included"].as_str(),
            api["consumed"].as_str(),
            api["remaining"].as_str()
        ),
        (Some("10"), Some("13"), Some("0"))
    );
    assert_eq!(api["overage_accepted"], "3");
    let c: Value = http()
        .get(format!(
            "{}/v1/consumption?resource={A}&dimension=gb_processed&from={}",
            d.url,
            ts(h)
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(c["dimensions"][0]["quantity"], "5");
    let out = d.cli(&["balance", "--resource", A]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("api_calls") && text.contains("infinite"),
        "{text}"
    );
    let report = d.report();
    let row = report["hours"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["dimension"] == "api_calls")
        .unwrap();
    assert_eq!(
        (row["included"].as_str(), row["billed"].as_str()),
        (Some("10"), Some("3"))
    );
}

/// `meterd run` with its log pipe closed (its stderr's reader gone) still acknowledges and sends. Before, every
/// log line it could not write made tracing-subscriber `eprintln!` the failure, which panicked on that same closed
/// stderr: the request handler or the emitter task that logged died mid-way.
#[test]
fn the_daemon_keeps_ingesting_and_sending_when_its_log_pipe_closes() {
    use std::io::{BufRead, BufReader};
    let r = rig(EmulatorConfig::default());
    let config_path = r.dir.path().join("meterd.toml");
    std::fs::write(&config_path, r.config("")).unwrap();
    let mut child = std::process::Command::new(common::bin())
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .env(TOKEN_ENV.0, TOKEN_ENV.1)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn meterd");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("meterd exited before listening");
        };
        if line.contains("meterd listening.")
            && let Some(addr) = common::json_field(&line, "addr")
        {
            break addr;
        }
    };
    drop(lines); // its stderr has no reader from here on
    let h = hour_start(2);
    let mut statuses = Vec::new();
    // Both records in the first request (one commit): the startup pass may freeze the hour at any moment, and a
    // record committed after that freeze would be carried, not sent with the hour. The second request is a
    // duplicate of one of them (it logs too, and adds nothing).
    let both = json!([
        {"resource": A, "dimension": "api_calls", "quantity": 2, "time": ts(h), "id": "r0"},
        {"resource": A, "dimension": "api_calls", "quantity": 3, "time": ts(h), "id": "r1"},
    ]);
    let again = json!([{"resource": A, "dimension": "api_calls", "quantity": 3, "time": ts(h), "id": "r1"}]);
    for body in [both, again] {
        let resp = http().post(format!("{url}/v1/usage")).json(&body).send();
        statuses.push(resp.map(|r| r.status().as_u16()).unwrap_or(0));
    }
    // A pass logs as it goes (freeze, send, outcome).
    // (The startup pass may have sent it already; then this pass finds nothing left.)
    let flush = http()
        .post(format!("{url}/v1/flush"))
        .send()
        .and_then(|r| r.json::<Value>());
    let status = http()
        .get(format!("{url}/v1/status"))
        .send()
        .and_then(|r| r.json::<Value>());
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "meterd exited");
    assert_eq!(statuses, [202, 202]);
    let flush = flush.expect("an answer to /v1/flush");
    assert_eq!(flush["pending_after"], 0, "{flush}");
    let status = status.expect("an answer to /v1/status");
    assert_eq!(status["outcomes"]["accepted"], 1, "{status}");
    let accepted = r.emu.accepted_events();
    assert_eq!(accepted.len(), 1);
    assert_eq!((accepted[0].quantity * 1e6).round() as i64, 5_000_000);
}
