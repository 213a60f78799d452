//! Billing policy, in process: scenarios 12-14 of `shared/scenarios.md` and the rules around them.
//!
//! The shared in-process rig ([`common::rig`]): a journal, an emitter and an emulator share one `ManualClock`, so
//! terms and hours pass without sleeping.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::rig::{Extended as Rig, env, march_subscription, t};
use meterd::clock::{ManualClock, SharedClock};
use meterd::emit;
use meterd::emulator::{EmulatorConfig, Phase, Plan, Route, Subscription, SubscriptionStatus};
use meterd::journal::usage::NewRecord;
use meterd::quantity::Micros;
use std::sync::{Arc, Mutex};

const A: &str = "11111111-1111-4111-8111-111111111111";

const BILLING: &str = r#"
[[dimensions]]
id = "api_calls"
thresholds = ["80%"]
[[dimensions]]
id = "gb_processed"
[[dimensions]]
id = "compute_blocks"
unit = 1200

[[plans]]
id = "gold"
included = { api_calls = 100, gb_processed = "infinite", compute_blocks = 0 }
"#;

/// The shared rig with [`BILLING`] and subscription A on `gold` for March 2026, and this file's helpers.
impl Rig {
    async fn new(start: &str, extra: &str) -> Rig {
        let sub = march_subscription(A, "gold");
        let emu_config = EmulatorConfig {
            subscriptions: vec![sub],
            plans: vec![
                Plan {
                    id: "gold".into(),
                    dimensions: None,
                },
                Plan {
                    id: "silver".into(),
                    dimensions: None,
                },
            ],
            ..Default::default()
        };
        let rig = common::rig::Rig::at(t(start))
            .top(extra)
            .dimensions(BILLING)
            .emulator(emu_config)
            .start()
            .await;
        Rig(rig)
    }

    async fn ingest(&self, dimension: &str, time: &str, qty: &str) {
        let recs = vec![NewRecord {
            resource: A.into(),
            plan: None,
            dimension: dimension.into(),
            time: t(time),
            quantity: Micros::parse_decimal(qty).unwrap(),
            key: None,
        }];
        let out = self.0.ingest(self.clock.now_utc(), recs).await;
        assert_eq!(out.accepted, 1);
    }

    /// Sets the clock and runs a pass.
    async fn pass_at(&self, at: &str) -> emit::PassSummary {
        self.0.pass_at(t(at)).await
    }

    /// Quantity the emulator accepted for (dimension, hour), if any.
    fn sent(&self, dimension: &str, hour: &str) -> Option<f64> {
        self.emu
            .accepted_events()
            .into_iter()
            .find(|e| e.dimension == dimension && e.effective_start_time == hour)
            .map(|e| e.quantity)
    }

    async fn outcome(&self, dimension: &str, hour: &str) -> String {
        self.report()
            .await
            .into_iter()
            .find(|r| r.dimension == dimension && r.hour == hour)
            .map(|r| r.outcome)
            .unwrap_or_default()
    }

    async fn balance(&self, dimension: &str) -> meterd::billing::DimensionBalance {
        let (s, now) = (self.settings.clone(), self.clock.now_utc());
        let all = self
            .journal
            .read(move |c| meterd::billing::balance(c, &s, A, now))
            .await
            .unwrap();
        all.into_iter().find(|b| b.dimension == dimension).unwrap()
    }
}

trait NowUtc {
    fn now_utc(&self) -> DateTime<Utc>;
}
impl NowUtc for ManualClock {
    fn now_utc(&self) -> DateTime<Utc> {
        meterd::clock::Clock::now(self)
    }
}

/// A local webhook receiver collecting JSON bodies.
async fn webhook() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body.0);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}/hook"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_12_only_overage_is_sent_and_the_allowance_resets_each_term() {
    let r = Rig::new("2026-03-02T10:00:00Z", "").await;
    // 60 consumed earlier this term (the term started 2026-03-01).
    r.ingest("api_calls", "2026-03-02T10:10:00Z", "60").await;
    r.pass_at("2026-03-02T11:05:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-02T10:00:00Z").await,
        "included"
    );
    assert!(r.emu.received_events().is_empty(), "nothing to bill yet");

    r.clock.set(t("2026-03-10T09:10:00Z"));
    r.ingest("api_calls", "2026-03-10T09:10:00Z", "30").await; // total 90
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "included"
    );
    assert_eq!(r.sent("api_calls", "2026-03-10T09:00:00Z"), None);

    r.ingest("api_calls", "2026-03-10T10:20:00Z", "25").await; // total 115: the crossing hour sends 15
    r.pass_at("2026-03-10T11:05:00Z").await;
    assert_eq!(r.sent("api_calls", "2026-03-10T10:00:00Z"), Some(15.0));

    r.ingest("api_calls", "2026-03-10T11:20:00Z", "5").await;
    r.pass_at("2026-03-10T12:05:00Z").await;
    assert_eq!(r.sent("api_calls", "2026-03-10T11:00:00Z"), Some(5.0));

    // Balance, by hand: included 100, consumed 120, remaining 0, overage 20 frozen and accepted.
    let b = r.balance("api_calls").await;
    assert_eq!(
        (
            b.included.as_str(),
            b.consumed.as_str(),
            b.remaining.as_str()
        ),
        ("100", "120", "0")
    );
    assert_eq!(
        (b.overage_frozen.as_str(), b.overage_accepted.as_str()),
        ("20", "20")
    );
    assert_eq!(
        (b.term_start.as_str(), b.term_end.as_str()),
        ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z")
    );

    // Next term (rolled forward from the listed term start): the allowance is 100 again.
    r.clock.set(t("2026-04-01T09:10:00Z"));
    r.ingest("api_calls", "2026-04-01T09:10:00Z", "50").await;
    r.pass_at("2026-04-01T10:05:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-04-01T09:00:00Z").await,
        "included"
    );
    let b = r.balance("api_calls").await;
    assert_eq!(
        (
            b.consumed.as_str(),
            b.remaining.as_str(),
            b.term_start.as_str()
        ),
        ("50", "50", "2026-04-01T00:00:00Z")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_allowances_never_bill_and_unlisted_plans_bill_everything() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    r.ingest("gb_processed", "2026-03-10T09:10:00Z", "123456.5")
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.outcome("gb_processed", "2026-03-10T09:00:00Z").await,
        "included"
    );
    assert!(r.emu.received_events().is_empty());
    assert_eq!(r.balance("gb_processed").await.remaining, "infinite");
    // A plan with no [[plans]] entry includes nothing: every unit is billed.
    let recs = vec![NewRecord {
        resource: A.into(),
        plan: Some("silver".into()),
        dimension: "api_calls".into(),
        time: t("2026-03-10T10:10:00Z"),
        quantity: Micros(7_000_000),
        key: None,
    }];
    r.0.ingest(t("2026-03-10T10:10:00Z"), recs).await;
    r.pass_at("2026-03-10T11:05:00Z").await;
    assert_eq!(r.sent("api_calls", "2026-03-10T10:00:00Z"), Some(7.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_13_billing_units_send_whole_units_and_carry_the_remainder() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    r.ingest("compute_blocks", "2026-03-10T09:10:00Z", "3000")
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(r.sent("compute_blocks", "2026-03-10T09:00:00Z"), Some(2.0));
    assert_eq!(r.balance("compute_blocks").await.carried_remainder, "600");
    r.ingest("compute_blocks", "2026-03-10T10:10:00Z", "700")
        .await;
    r.pass_at("2026-03-10T11:05:00Z").await;
    assert_eq!(r.sent("compute_blocks", "2026-03-10T10:00:00Z"), Some(1.0));
    // Hour 11:00 brings nothing: nothing is sent, 100 s stay carried and visible.
    r.pass_at("2026-03-10T12:05:00Z").await;
    assert_eq!(r.emu.accepted_events().len(), 2);
    let b = r.balance("compute_blocks").await;
    assert_eq!(
        (
            b.carried_remainder.as_str(),
            b.unit,
            b.overage_frozen.as_str()
        ),
        ("100", 1200, "3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_rounding_over_many_hours_sums_exactly() {
    let r = Rig::new("2026-03-10T00:00:00Z", "").await;
    // 30 hours of odd amounts: the units sent plus the final remainder equal the usage exactly.
    let mut total = 0i64;
    for h in 0..30i64 {
        let at = t("2026-03-10T00:00:00Z") + Duration::hours(h);
        let q = 37 + (h * 911) % 2400; // seconds
        total += q;
        r.clock.set(at + Duration::minutes(10));
        r.ingest(
            "compute_blocks",
            &(at + Duration::minutes(10)).to_rfc3339(),
            &q.to_string(),
        )
        .await;
        r.pass_at(&(at + Duration::minutes(65)).to_rfc3339()).await;
    }
    let units: f64 = r
        .emu
        .accepted_events()
        .iter()
        .filter(|e| e.dimension == "compute_blocks")
        .map(|e| e.quantity)
        .sum();
    let remainder: i64 = r
        .balance("compute_blocks")
        .await
        .carried_remainder
        .parse()
        .unwrap();
    assert_eq!(units as i64 * 1200 + remainder, total);
    assert!(remainder < 1200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_14_a_threshold_fires_once_per_term_and_again_after_renewal() {
    let (url, got) = webhook().await;
    let r = Rig::new(
        "2026-03-02T10:00:00Z",
        &format!("[alerts]\nwebhook_url = \"{url}\"\n"),
    )
    .await;
    let clock: SharedClock = Arc::new(r.clock.clone());
    let deliver = |r: &Rig| {
        let (j, c, u) = (r.journal.clone(), clock.clone(), url.clone());
        async move {
            meterd::alerts::deliver_once(&j, &c, Some(&u), Some(&meterd::tls::client()))
                .await
                .unwrap()
        }
    };
    r.ingest("api_calls", "2026-03-02T10:10:00Z", "60").await;
    r.pass_at("2026-03-02T11:05:00Z").await;
    r.clock.set(t("2026-03-10T09:10:00Z"));
    r.ingest("api_calls", "2026-03-10T09:10:00Z", "30").await; // crosses 80 in hour 09:00
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(deliver(&r).await, 1);
    r.ingest("api_calls", "2026-03-10T10:20:00Z", "25").await;
    r.pass_at("2026-03-10T11:05:00Z").await;
    deliver(&r).await;
    let thresholds: Vec<_> = got
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "threshold")
        .cloned()
        .collect();
    assert_eq!(thresholds.len(), 1, "once per term: {thresholds:?}");
    assert_eq!(thresholds[0]["threshold"], "80%");
    assert_eq!(thresholds[0]["consumed"], "90");
    assert_eq!(thresholds[0]["hour"], "2026-03-10T09:00:00Z");
    // Renewal: the next term crosses again.
    r.clock.set(t("2026-04-02T09:10:00Z"));
    r.ingest("api_calls", "2026-04-02T09:10:00Z", "85").await;
    r.pass_at("2026-04-02T10:05:00Z").await;
    deliver(&r).await;
    let n = got
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "threshold")
        .count();
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_fails_is_retried_from_the_journal() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    let clock: SharedClock = Arc::new(r.clock.clone());
    r.emu.fail_next(Route::BatchUsageEvent, 10_000, 503, None);
    r.ingest("api_calls", "2026-03-10T09:10:00Z", "500").await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    // Pending for longer than alerts.pending_age (6 h) after the hour ended: an alert.
    r.pass_at("2026-03-10T16:10:00Z").await;
    let alerts = r
        .journal
        .read(|c| meterd::alerts::list(c, 50))
        .await
        .unwrap();
    assert!(
        alerts.iter().any(|a| a["kind"] == "pending_age"),
        "{alerts:?}"
    );
    // Nobody listens on the webhook: delivery fails and is kept for later.
    let dead = "http://127.0.0.1:9/hook".to_string();
    let n = meterd::alerts::deliver_once(
        &r.journal,
        &clock,
        Some(&dead),
        Some(&meterd::tls::client()),
    )
    .await
    .unwrap();
    assert_eq!(n, 0);
    let alerts = r
        .journal
        .read(|c| meterd::alerts::list(c, 50))
        .await
        .unwrap();
    assert!(
        alerts
            .iter()
            .all(|a| a["delivered_at"].is_null() && a["attempts"] == 1),
        "{alerts:?}"
    );
    // Later, with a receiver, it arrives.
    let (url, got) = webhook().await;
    r.clock.set(t("2026-03-10T17:00:00Z"));
    let n =
        meterd::alerts::deliver_once(&r.journal, &clock, Some(&url), Some(&meterd::tls::client()))
            .await
            .unwrap();
    assert!(n >= 1);
    assert!(
        got.lock()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "pending_age")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_a_planted_difference() {
    let r = Rig::new("2026-03-10T09:00:00Z", "[[plans]]\nid = \"unused\"\n").await;
    r.ingest("gb_processed", "2026-03-10T09:10:00Z", "1").await; // included (infinite): not sent
    r.ingest("compute_blocks", "2026-03-10T09:20:00Z", "2400")
        .await; // 2 units
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(r.sent("compute_blocks", "2026-03-10T09:00:00Z"), Some(2.0));
    let clock: SharedClock = Arc::new(r.clock.clone());
    let diffs = meterd::cli::reconcile(&r.settings, &env(), clock.clone(), "2026-03-10")
        .await
        .unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    // Someone else reports for the same subscription: the marketplace now holds more than meterd sent.
    let body = r#"{"request":[{"resourceId":"11111111-1111-4111-8111-111111111111","quantity":3,"dimension":"api_calls","effectiveStartTime":"2026-03-10T09:00:00Z","planId":"gold"}]}"#;
    let url = format!(
        "{}/batchUsageEvent?api-version=2018-08-31",
        r.settings.marketplace.base_url
    );
    let resp = meterd::tls::client()
        .post(url)
        .bearer_auth("emulator-token")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let diffs = meterd::cli::reconcile(&r.settings, &env(), clock, "2026-03-10")
        .await
        .unwrap();
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert_eq!(
        (
            diffs[0].dimension.as_str(),
            diffs[0].meterd.as_str(),
            diffs[0].marketplace.as_str()
        ),
        ("api_calls", "0", "3")
    );
}

/// Alerts of `kind` in the journal.
async fn alerts_of(r: &Rig, kind: &str) -> Vec<serde_json::Value> {
    let kind = kind.to_string();
    r.journal
        .read(move |c| meterd::alerts::list(c, 1000))
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a["kind"] == kind.as_str())
        .collect()
}

/// A scripted batch answer (HTTP 200) with one result for A's `dimension` at `hour`.
fn answer(status: &str, dimension: &str, hour: &str, quantity: f64) -> meterd::emulator::Fault {
    let body = serde_json::json!({"count": 1, "result": [{
        "status": status, "resourceId": A, "dimension": dimension, "planId": "gold",
        "effectiveStartTime": hour, "quantity": quantity, "messageTime": hour,
        "error": {"code": status, "message": format!("scripted {status}")}
    }]});
    meterd::emulator::Fault::new(
        Route::BatchUsageEvent,
        meterd::emulator::FaultKind::Fail {
            status: 200,
            retry_after: None,
            body: Some(body),
        },
        1,
    )
}

/// Issue 11 defect 1: an event that expires after billing carries only what its whole units covered; the
/// remainder it left behind is billed once, from the `remainders` table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_1_an_expired_event_does_not_bill_its_remainder_twice() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    r.ingest("compute_blocks", "2026-03-10T09:30:00Z", "3000")
        .await;
    // Every batch answers 503 until the 09:00 event runs out of window.
    r.emu.fail_next(Route::BatchUsageEvent, 10_000, 503, None);
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.outcome("compute_blocks", "2026-03-10T09:00:00Z").await,
        "pending"
    );
    r.pass_at("2026-03-11T09:00:00Z").await;
    // Expired and carried into the open hour (the report names it `carried`).
    assert_eq!(
        r.outcome("compute_blocks", "2026-03-10T09:00:00Z").await,
        "carried"
    );
    r.emu.clear_faults();
    r.pass_at("2026-03-11T10:05:00Z").await;
    // 3,000 s are 2 units of 1,200 s and 600 s carried: never 3 units.
    assert_eq!(r.sent("compute_blocks", "2026-03-11T09:00:00Z"), Some(2.0));
    let b = r.balance("compute_blocks").await;
    assert_eq!(b.carried_remainder, "600");
    let units: f64 = r.emu.accepted_events().iter().map(|e| e.quantity).sum();
    assert_eq!(units as i64 * 1200 + 600, 3000);
}

/// Issue 11 defect 4: a definite refusal (`ResourceNotActive`) clears the in-flight marker, so the event ends
/// `not_active` at its deadline, never `expired_unconfirmed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_4_a_refused_event_ends_not_active_not_expired_unconfirmed() {
    let r = Rig::new(
        "2026-03-10T09:00:00Z",
        "default_plan = \"gold\"\n[subscriptions]\ncheck = false\n",
    )
    .await;
    r.emu.set_status(A, SubscriptionStatus::Suspended);
    r.ingest("api_calls", "2026-03-10T09:30:00Z", "500").await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "pending"
    );
    assert_eq!(r.emu.request_count(Route::BatchUsageEvent), 1);
    r.pass_at("2026-03-10T10:20:00Z").await;
    assert_eq!(r.emu.request_count(Route::BatchUsageEvent), 2);
    r.pass_at("2026-03-11T09:00:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "not_active"
    );
    assert!(alerts_of(&r, "expired_unconfirmed").await.is_empty());
}

/// Issue 11 defect 7: after an ambiguous attempt, a per-event `Expired` ends `expired_unconfirmed` with the
/// reconcile alert, just like an expiry by deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_7_expired_unconfirmed_from_an_expired_answer_raises_the_reconcile_alert() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    r.ingest("api_calls", "2026-03-10T09:30:00Z", "500").await;
    r.emu.drop_next(Route::BatchUsageEvent, 1, Phase::Before);
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "pending"
    );
    r.emu.add_fault(answer(
        "Expired",
        "api_calls",
        "2026-03-10T09:00:00Z",
        400.0,
    ));
    r.pass_at("2026-03-10T11:00:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "expired_unconfirmed"
    );
    let alerts = alerts_of(&r, "expired_unconfirmed").await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["hour"], "2026-03-10T09:00:00Z");
}

/// Issue 11 defect 7, the other path: an ambiguous attempt and then the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_7_expired_unconfirmed_by_deadline_raises_the_reconcile_alert() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    r.ingest("api_calls", "2026-03-10T09:30:00Z", "500").await;
    r.emu.drop_next(Route::BatchUsageEvent, 1, Phase::Before);
    r.emu.fail_next(Route::BatchUsageEvent, 10_000, 503, None);
    r.pass_at("2026-03-10T10:05:00Z").await;
    r.pass_at("2026-03-11T09:00:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "expired_unconfirmed"
    );
    assert_eq!(alerts_of(&r, "expired_unconfirmed").await.len(), 1);
}

/// Issue 11 defect 5: an hour that closed after the real cancellation, but before meterd saw it, is refused
/// once; the list then shows the cancellation and the event settles `skipped_unsubscribed`. Over a simulated
/// hour of passes every 10 s (what the wake-up loop does with held events), it is neither re-sent nor is the
/// list re-walked more than once per `subscriptions.refresh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_5_a_mid_hour_cancellation_causes_no_resend_storm() {
    let r = Rig::new("2026-03-10T08:00:00Z", "").await;
    r.ingest("api_calls", "2026-03-10T08:30:00Z", "500").await;
    r.ingest("api_calls", "2026-03-10T09:30:00Z", "500").await;
    r.pass_at("2026-03-10T09:06:00Z").await;
    assert_eq!(r.sent("api_calls", "2026-03-10T08:00:00Z"), Some(400.0));
    // Really cancelled at 09:50: hour 09:00 ends after it and is refused with ResourceNotFound.
    r.emu.cancel_at(A, t("2026-03-10T09:50:00Z"));
    let (batches, lists) = (
        r.emu.request_count(Route::BatchUsageEvent),
        r.emu.request_count(Route::Subscriptions),
    );
    let start = t("2026-03-10T10:05:00Z");
    for i in 0..360 {
        r.pass_at(&(start + Duration::seconds(10 * i)).to_rfc3339())
            .await;
    }
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "skipped_unsubscribed"
    );
    let batches = r.emu.request_count(Route::BatchUsageEvent) - batches;
    let lists = r.emu.request_count(Route::Subscriptions) - lists;
    assert_eq!(
        batches, 1,
        "hour 09:00 is sent once, refused, and not sent again"
    );
    // subscriptions.refresh is 10 minutes: at most one walk per refresh over the hour, plus the first.
    assert!(lists <= 7, "{lists} list walks in an hour");
    assert!(r.emu.accepted_events().len() == 1);
}

/// Issue 11 defect 8: a remainder absorbed by an event that then ends not billed (`rejected`) is given back to the
/// next hour, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_8_a_remainder_absorbed_by_a_rejected_event_is_restored() {
    let r = Rig::new("2026-03-10T08:00:00Z", "").await;
    r.ingest("compute_blocks", "2026-03-10T08:30:00Z", "600")
        .await;
    r.pass_at("2026-03-10T09:06:00Z").await;
    assert_eq!(r.balance("compute_blocks").await.carried_remainder, "600");
    // Hour 09:00: 1,800 s + the 600 s carried = 2 units, refused for good.
    r.ingest("compute_blocks", "2026-03-10T09:30:00Z", "1800")
        .await;
    r.emu.add_fault(answer(
        "InvalidDimension",
        "compute_blocks",
        "2026-03-10T09:00:00Z",
        2.0,
    ));
    r.pass_at("2026-03-10T10:06:00Z").await;
    assert_eq!(
        r.outcome("compute_blocks", "2026-03-10T09:00:00Z").await,
        "rejected"
    );
    // The 600 s from 08:00 are carried again; 09:00's own usage is not billed.
    assert_eq!(r.balance("compute_blocks").await.carried_remainder, "600");
    r.ingest("compute_blocks", "2026-03-10T10:30:00Z", "600")
        .await;
    r.pass_at("2026-03-10T11:06:00Z").await;
    assert_eq!(r.sent("compute_blocks", "2026-03-10T10:00:00Z"), Some(1.0));
    assert_eq!(r.balance("compute_blocks").await.carried_remainder, "0");
}

/// Issue 11 defect 8: a `Subscribed` subscription listed without its term keeps the term meterd knew, so the
/// allowance does not reset mid-term (falling back to calendar months would start another term).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_8_a_subscription_listed_without_term_keeps_its_allowance() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    let mut sub = Subscription::new(A, "gold");
    sub.term.start_date = Some("2026-03-05".into());
    sub.term.end_date = Some("2026-04-04".into());
    sub.term.term_unit = "P1M".into();
    r.emu.add_subscription(sub.clone());
    r.ingest("api_calls", "2026-03-10T09:30:00Z", "80").await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "included"
    );
    // The list now shows it without a term.
    sub.term.start_date = None;
    sub.term.end_date = None;
    sub.term.term_unit = String::new();
    r.emu.add_subscription(sub);
    r.ingest("api_calls", "2026-03-10T10:30:00Z", "80").await;
    r.pass_at("2026-03-10T11:20:00Z").await;
    // 160 consumed of 100 included: 60 billed.
    assert_eq!(r.sent("api_calls", "2026-03-10T10:00:00Z"), Some(60.0));
    assert_eq!(
        r.balance("api_calls").await.term_start,
        "2026-03-05T00:00:00Z"
    );
}

/// Issue 11 defect 8: a whole-call 400 caused by one event is split (the batch sent again in halves), so the
/// 23 good events of the batch are accepted in the same pass instead of waiting with it until they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_8_a_whole_call_400_is_split_so_good_events_go_through() {
    let r = Rig::new("2026-03-10T01:30:00Z", "").await;
    // Each record arrives in its own (open) hour; no pass runs until all 24 hours are closed.
    for h in 1..24 {
        let at = format!("2026-03-10T{h:02}:30:00Z");
        r.clock.set(t(&at));
        r.ingest("api_calls", &at, "500").await;
        if h == 5 {
            r.ingest("compute_blocks", &at, "2400").await;
        }
    }
    r.emu.poison_dimension("compute_blocks");
    let summary = r.pass_at("2026-03-11T00:06:00Z").await;
    let accepted = r.emu.accepted_events();
    assert_eq!(accepted.len(), 23, "{summary:?}");
    assert!(accepted.iter().all(|e| e.dimension == "api_calls"));
    assert_eq!(
        r.outcome("compute_blocks", "2026-03-10T05:00:00Z").await,
        "pending"
    );
    // Halving isolates it in a handful of calls (24 -> 12 -> 6 -> 3 -> 2 -> 1), not one per event.
    assert!(summary.calls <= 11, "{} calls", summary.calls);
}

/// Issue 11 defect 8: outcomes settled before sending (here `included`, `remainder`) count in
/// `meterd_events_total` like those a marketplace answer settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_8_outcomes_settled_before_sending_count_in_events_total() {
    let handle = meterd::ops::metrics::install().expect("recorder");
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    r.ingest("api_calls", "2026-03-10T09:30:00Z", "10").await;
    r.ingest("compute_blocks", "2026-03-10T09:30:00Z", "100")
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "included"
    );
    let text = handle.render();
    for outcome in ["included", "remainder"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("meterd_events_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .unwrap_or_else(|| panic!("no meterd_events_total for {outcome}:\n{text}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1.0, "{line}");
    }
    assert!(r.emu.accepted_events().is_empty());
}

/// Issue 11 defect 8: a managed application metered by its `resourceUsageId` GUID is in no SaaS list; it is sent
/// as it is (the marketplace judges it) instead of being held until its window runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_8_a_managed_app_metered_by_its_resource_usage_id_is_sent() {
    const APP: &str = "aaaaaaaa-1111-4111-8111-111111111111";
    let r = Rig::new("2026-03-10T09:00:00Z", "default_plan = \"gold\"\n").await;
    r.emu.add_managed_app(meterd::emulator::ManagedApp {
        resource_uri: "/subscriptions/bf7adf12-c3a8-426c-8976-29f145f37e2b/resourceGroups/rg/providers/Microsoft.Solutions/applications/app".into(),
        resource_usage_id: Some(APP.into()),
        offer_id: "contoso-app".into(),
    });
    let recs = vec![NewRecord {
        resource: APP.into(),
        plan: None,
        dimension: "compute_blocks".into(),
        time: t("2026-03-10T09:30:00Z"),
        quantity: Micros::parse_decimal("2400").unwrap(),
        key: None,
    }];
    r.0.ingest(r.clock.now_utc(), recs).await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    let got: Vec<_> = r
        .emu
        .accepted_events()
        .into_iter()
        .filter(|e| e.resource_id.as_deref() == Some(APP))
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].quantity, 2.0);
}

/// Issue 11 defect 8: a term unit change announced as a term that starts later (monthly into yearly at the
/// renewal) does not reset the allowance of the running term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_8_a_term_unit_change_does_not_reset_the_allowance_mid_term() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    r.ingest("api_calls", "2026-03-10T09:30:00Z", "80").await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.outcome("api_calls", "2026-03-10T09:00:00Z").await,
        "included"
    );
    // The list now shows the next term: yearly, from the renewal on 1 April.
    let mut sub = Subscription::new(A, "gold");
    sub.term.start_date = Some("2026-04-01".into());
    sub.term.end_date = Some("2027-03-31".into());
    sub.term.term_unit = "P1Y".into();
    r.emu.add_subscription(sub);
    r.ingest("api_calls", "2026-03-10T10:30:00Z", "80").await;
    r.pass_at("2026-03-10T11:20:00Z").await;
    // Still the March term: 160 consumed of 100 included, 60 billed.
    assert_eq!(r.sent("api_calls", "2026-03-10T10:00:00Z"), Some(60.0));
    assert_eq!(
        r.balance("api_calls").await.term_start,
        "2026-03-01T00:00:00Z"
    );
}
