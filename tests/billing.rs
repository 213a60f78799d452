//! Billing policy, in process: scenarios 12-14 of `shared/scenarios.md` and the rules around them.
//!
//! A journal, an emitter and an emulator share one `ManualClock`, so terms and hours pass without sleeping.

use chrono::{DateTime, Duration, Utc};
use meterd::clock::{ManualClock, SharedClock};
use meterd::config::{self, Settings};
use meterd::emit::{self, Emitter};
use meterd::emulator::{Emulator, EmulatorConfig, Plan, Route, Subscription};
use meterd::journal::Journal;
use meterd::journal::usage::{self, IngestRules, NewRecord, ReportFilter};
use meterd::quantity::Micros;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

const A: &str = "11111111-1111-4111-8111-111111111111";

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn env() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "METERD_MARKETPLACE__AUTH__STATIC_TOKEN".to_string(),
        "emulator-token".to_string(),
    )])
}

struct Rig {
    clock: ManualClock,
    emu: Emulator,
    settings: Arc<Settings>,
    journal: Journal,
    emitter: Emitter,
    _dir: tempfile::TempDir,
}

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

impl Rig {
    async fn new(start: &str, extra: &str) -> Rig {
        let clock = ManualClock::new(t(start));
        let shared: SharedClock = Arc::new(clock.clone());
        let mut sub = Subscription::new(A, "gold");
        sub.term.start_date = Some("2026-03-01".into());
        sub.term.end_date = Some("2026-03-31".into());
        sub.term.term_unit = "P1M".into();
        let emu_config = EmulatorConfig {
            clock: Some(shared.clone()),
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
        let (addr, emu, _server) = Emulator::spawn_local(emu_config).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let text = format!(
            r#"{extra}
[journal]
path = "{}"
[marketplace]
mode = "azure"
base_url = "http://{addr}/api"
[marketplace.auth]
kind = "static_token"
[emit]
grace = "5m"
retry_min = "30s"
{BILLING}"#,
            path.display()
        );
        let settings = Arc::new(config::load_str(&text, "billing test", &env()).unwrap());
        let journal = Journal::open(&path).unwrap();
        let client = emit::client(&settings, &env(), shared.clone()).unwrap();
        let emitter = Emitter::new(settings.clone(), journal.clone(), shared, client);
        Rig {
            clock,
            emu,
            settings,
            journal,
            emitter,
            _dir: dir,
        }
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
        let rules = IngestRules {
            now: self.clock.now_utc(),
            late: self.settings.late_usage,
            safety_margin: self.settings.emit.safety_margin,
        };
        let out = self
            .journal
            .write(move |c| usage::ingest(c, &recs, &rules))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.accepted, 1);
    }

    /// Sets the clock and runs a pass.
    async fn pass_at(&self, at: &str) -> emit::PassSummary {
        self.clock.set(t(at));
        self.emitter.pass().await.unwrap()
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
        let now = self.clock.now_utc();
        let rows = self
            .journal
            .read(move |c| {
                usage::hourly_report(
                    c,
                    &ReportFilter::default(),
                    now,
                    chrono::Duration::minutes(5),
                )
            })
            .await
            .unwrap();
        rows.into_iter()
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
    let rules = IngestRules {
        now: t("2026-03-10T10:10:00Z"),
        late: r.settings.late_usage,
        safety_margin: r.settings.emit.safety_margin,
    };
    r.journal
        .write(move |c| usage::ingest(c, &recs, &rules))
        .await
        .unwrap()
        .unwrap();
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
