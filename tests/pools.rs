//! Credit pools, in process: golden scenarios with exact numbers (`docs/billing.md`, "Credit pools").
//!
//! The shared in-process rig ([`common::rig`]): a journal, an emitter and an emulator share one `ManualClock`.
//! Subscriptions A and B are on `gold` (100 `api_calls` per term) for monthly terms from 2026-03-01, both of the
//! customer `tenant-1`; `compute_blocks` bills in units of 1200 and no plan includes any.

mod common;

use common::rig::{Extended as Rig, march_subscription, t};
use meterd::clock::Clock;
use meterd::emulator::{EmulatorConfig, Plan};
use meterd::journal::usage::NewRecord;
use meterd::quantity::Micros;

const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";
const TENANT: &str = "tenant-1";

const BILLING: &str = r#"
[[dimensions]]
id = "api_calls"
thresholds = ["80%"]
[[dimensions]]
id = "compute_blocks"
unit = 1200

[[plans]]
id = "gold"
included = { api_calls = 100 }
[[plans]]
id = "silver"
included = { api_calls = 10 }
"#;

impl Rig {
    /// The rig with [`BILLING`] and `pools` (TOML appended to it).
    async fn new(start: &str, pools: &str) -> Rig {
        let mut subs = vec![march_subscription(A, "gold"), march_subscription(B, "gold")];
        for s in &mut subs {
            s.beneficiary.tenant_id = TENANT.into();
        }
        let emu = EmulatorConfig {
            subscriptions: subs,
            plans: vec![
                Plan {
                    id: "gold".into(),
                    dimensions: None,
                },
                Plan {
                    id: "silver".into(),
                    dimensions: None,
                },
                Plan {
                    id: "bronze".into(),
                    dimensions: None,
                },
            ],
            ..Default::default()
        };
        Rig(common::rig::Rig::at(t(start))
            .dimensions(&format!("{BILLING}\n{pools}"))
            .emulator(emu)
            .start()
            .await)
    }

    async fn use_(
        &self,
        resource: &str,
        dimension: &str,
        time: &str,
        qty: &str,
        plan: Option<&str>,
    ) {
        let recs = vec![NewRecord {
            resource: resource.into(),
            plan: plan.map(str::to_string),
            dimension: dimension.into(),
            time: t(time),
            quantity: Micros::parse_decimal(qty).unwrap(),
            key: None,
        }];
        let out = self.0.ingest(self.clock.now(), recs).await;
        assert_eq!(out.accepted, 1);
    }

    async fn pass_at(&self, at: &str) {
        self.0.pass_at(t(at)).await;
    }

    /// Retention of 30 hours (and a 7-day dedupe window) applied at `at`: the hourly totals deleted.
    async fn retention_30h_at(&self, at: &str) -> usize {
        let now = t(at);
        let (deleted, _) = self
            .journal
            .write(move |c| {
                meterd::journal::usage::apply_retention(
                    c,
                    now,
                    chrono::Duration::hours(30),
                    chrono::Duration::days(7),
                )
            })
            .await
            .unwrap();
        deleted
    }

    /// Quantity the emulator accepted for (resource, dimension, hour), if any.
    fn sent(&self, resource: &str, dimension: &str, hour: &str) -> Option<f64> {
        self.emu
            .accepted_events()
            .into_iter()
            .find(|e| {
                e.resource_id.as_deref() == Some(resource)
                    && e.dimension == dimension
                    && e.effective_start_time == hour
            })
            .map(|e| e.quantity)
    }

    /// The report row of (resource, dimension, hour): outcome and which pools covered how much.
    async fn covered(
        &self,
        resource: &str,
        dimension: &str,
        hour: &str,
    ) -> (String, Vec<(String, String)>) {
        let row = self
            .report()
            .await
            .into_iter()
            .find(|r| r.resource == resource && r.dimension == dimension && r.hour == hour)
            .unwrap_or_else(|| panic!("no report row for {resource} {dimension} {hour}"));
        (
            row.outcome,
            row.pools.into_iter().map(|p| (p.id, p.quantity)).collect(),
        )
    }

    /// The pools of `resource`'s `dimension` balance: (id, available, total, used).
    async fn pools_of(
        &self,
        resource: &str,
        dimension: &str,
    ) -> Vec<(String, String, String, String)> {
        let (s, now, r) = (
            self.settings.clone(),
            self.clock.now(),
            resource.to_string(),
        );
        let all = self
            .journal
            .read(move |c| meterd::billing::balance(c, &s, &r, now))
            .await
            .unwrap();
        all.into_iter()
            .find(|b| b.dimension == dimension)
            .unwrap()
            .pools
            .into_iter()
            .map(|p| (p.id, p.available, p.total, p.used))
            .collect()
    }

    async fn alerts(&self, kind: &str) -> Vec<serde_json::Value> {
        let kind = kind.to_string();
        self.journal
            .read(move |c| meterd::alerts::list(c, 1000))
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a["kind"] == kind.as_str())
            .collect()
    }
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn pool4(v: &[(&str, &str, &str, &str)]) -> Vec<(String, String, String, String)> {
    v.iter()
        .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
        .collect()
}

/// Scenario P1: free tier (10 a month), then a prepaid block (50, until 2026-04-30), then the plan's 100, then
/// overage, across A's term boundary on 2026-04-01.
///
/// | hour | usage | free | prepaid | plan:gold | sent | outcome |
/// |---|---|---|---|---|---|---|
/// | 03-31 10:00 | 40 | 10 | 30 | 0 | - | included |
/// | 03-31 11:00 | 150 | 0 | 20 | 100 | 30 | accepted |
/// | 04-01 09:00 (new term, new month) | 25 | 10 | 0 | 15 | - | included |
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p1_free_tier_then_prepaid_then_plan_then_overage_across_a_term_boundary() {
    let pools = format!(
        r#"
[[pools]]
id = "free"
dimension = "api_calls"
amount = 10
priority = 0
scope = {{ resource = "{A}" }}
refresh = {{ every = "month" }}
[[pools]]
id = "prepaid"
dimension = "api_calls"
amount = 50
priority = 1
scope = {{ resource = "{A}" }}
effective_at = "2026-03-01T00:00:00Z"
expires_at = "2026-04-30T00:00:00Z"
"#
    );
    let r = Rig::new("2026-03-31T10:00:00Z", &pools).await;
    r.use_(A, "api_calls", "2026-03-31T10:10:00Z", "40", None)
        .await;
    r.pass_at("2026-03-31T11:05:00Z").await;
    assert_eq!(
        r.covered(A, "api_calls", "2026-03-31T10:00:00Z").await,
        (
            "included".into(),
            pairs(&[("free", "10"), ("prepaid", "30")])
        )
    );
    r.use_(A, "api_calls", "2026-03-31T11:10:00Z", "150", None)
        .await;
    r.pass_at("2026-03-31T12:05:00Z").await;
    assert_eq!(r.sent(A, "api_calls", "2026-03-31T11:00:00Z"), Some(30.0));
    assert_eq!(
        r.covered(A, "api_calls", "2026-03-31T11:00:00Z").await,
        (
            "accepted".into(),
            pairs(&[("prepaid", "20"), ("plan:gold", "100")])
        )
    );
    assert_eq!(
        r.pools_of(A, "api_calls").await,
        pool4(&[
            ("free", "0", "10", "10"),
            ("prepaid", "0", "50", "50"),
            ("plan:gold", "0", "100", "100"),
        ])
    );
    // Each pool's 80% and exhaustion fire once in March.
    let fired: Vec<(String, String)> = r
        .alerts("pool_threshold")
        .await
        .iter()
        .map(|a| {
            (
                a["pool"].as_str().unwrap().into(),
                a["threshold"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(fired.len(), 4, "{fired:?}");
    for want in [
        ("free", "80%"),
        ("free", "exhausted"),
        ("prepaid", "80%"),
        ("prepaid", "exhausted"),
    ] {
        assert!(
            fired.contains(&(want.0.into(), want.1.into())),
            "{want:?} in {fired:?}"
        );
    }

    r.clock.set(t("2026-04-01T09:10:00Z"));
    r.use_(A, "api_calls", "2026-04-01T09:10:00Z", "25", None)
        .await;
    r.pass_at("2026-04-01T10:05:00Z").await;
    assert_eq!(
        r.covered(A, "api_calls", "2026-04-01T09:00:00Z").await,
        (
            "included".into(),
            pairs(&[("free", "10"), ("plan:gold", "15")])
        )
    );
    assert_eq!(
        r.pools_of(A, "api_calls").await,
        pool4(&[
            ("free", "0", "10", "10"),
            ("prepaid", "0", "50", "50"),
            ("plan:gold", "85", "100", "15"),
        ])
    );
    // April is a new period of `free`: its thresholds fire again, once; the prepaid block's do not.
    assert_eq!(r.alerts("pool_threshold").await.len(), 6);
    assert_eq!(r.emu.accepted_events().len(), 1);
}

/// Scenario P2: a customer pool of 50 shared by A and B (both of `tenant-1`), frozen in one pass. Billed oldest
/// hour first, then by resource id: B 08:00 (10) draws 10, A 09:00 (30) draws 30, B 09:00 (40) draws the last 10
/// and sends 30. The plan is `bronze` (declared nowhere: nothing included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_a_team_pool_shared_by_two_subscriptions_racing_in_one_pass() {
    let pools = format!(
        r#"
[[pools]]
id = "team"
dimension = "api_calls"
amount = 50
scope = {{ customer = "{TENANT}" }}
"#
    );
    let r = Rig::new("2026-03-10T08:00:00Z", &pools).await;
    r.clock.set(t("2026-03-10T09:50:00Z"));
    r.use_(B, "api_calls", "2026-03-10T08:10:00Z", "10", Some("bronze"))
        .await;
    r.use_(B, "api_calls", "2026-03-10T09:10:00Z", "40", Some("bronze"))
        .await;
    r.use_(A, "api_calls", "2026-03-10T09:20:00Z", "30", Some("bronze"))
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.covered(B, "api_calls", "2026-03-10T08:00:00Z").await,
        ("included".into(), pairs(&[("team", "10")]))
    );
    assert_eq!(
        r.covered(A, "api_calls", "2026-03-10T09:00:00Z").await,
        ("included".into(), pairs(&[("team", "30")]))
    );
    assert_eq!(
        r.covered(B, "api_calls", "2026-03-10T09:00:00Z").await,
        ("accepted".into(), pairs(&[("team", "10")]))
    );
    assert_eq!(r.sent(B, "api_calls", "2026-03-10T09:00:00Z"), Some(30.0));
    assert_eq!(r.sent(A, "api_calls", "2026-03-10T09:00:00Z"), None);
    // The team's view: one shared pool, used 50 of 50, and both subscriptions.
    let (s, now) = (r.settings.clone(), r.clock.now());
    let team = r
        .journal
        .read(move |c| meterd::billing::customer_balance(c, &s, "TENANT-1", now))
        .await
        .unwrap();
    assert_eq!(team["pools"][0]["id"], "team");
    assert_eq!(team["pools"][0]["available"], "0");
    assert_eq!(team["pools"][0]["used"], "50");
    assert_eq!(team["subscriptions"].as_array().unwrap().len(), 2);
}

/// Scenario P3: a promotional pool of 100 expires at 09:30. Records at 09:10 (4), 09:20 (3) and 09:40 (5): the
/// pool covers the 7 before its expiry, the 5 after it are sent (plan `bronze`: nothing included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_a_pool_expiring_mid_hour_covers_only_usage_before_its_expiry() {
    let pools = format!(
        r#"
[[pools]]
id = "promo"
dimension = "api_calls"
amount = 100
scope = {{ resource = "{A}" }}
expires_at = "2026-03-10T09:30:00Z"
"#
    );
    let r = Rig::new("2026-03-10T09:00:00Z", &pools).await;
    r.clock.set(t("2026-03-10T09:50:00Z"));
    r.use_(A, "api_calls", "2026-03-10T09:40:00Z", "5", Some("bronze"))
        .await;
    r.use_(A, "api_calls", "2026-03-10T09:10:00Z", "4", Some("bronze"))
        .await;
    r.use_(A, "api_calls", "2026-03-10T09:20:00Z", "3", Some("bronze"))
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(r.sent(A, "api_calls", "2026-03-10T09:00:00Z"), Some(5.0));
    assert_eq!(
        r.covered(A, "api_calls", "2026-03-10T09:00:00Z").await,
        ("accepted".into(), pairs(&[("promo", "7")]))
    );
    // After its expiry it shows nothing available; 7 of 100 were used.
    let promo = r.pools_of(A, "api_calls").await.remove(0);
    assert_eq!(
        promo,
        ("promo".into(), "0".into(), "100".into(), "7".into())
    );
}

/// Scenario P4: monthly pools of 20, A's without rollover, B's with rollover capped at 10. March uses 5 each; on
/// 2026-04-01 each uses 40. A has 20 in April and sends 20; B has 20 + 10 (15 unused, capped) and sends 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_a_refresh_with_and_without_rollover() {
    let pools = format!(
        r#"
[[pools]]
id = "monthly-a"
dimension = "api_calls"
amount = 20
scope = {{ resource = "{A}" }}
effective_at = "2026-03-01T00:00:00Z"
refresh = {{ every = "month" }}
[[pools]]
id = "monthly-b"
dimension = "api_calls"
amount = 20
scope = {{ resource = "{B}" }}
effective_at = "2026-03-01T00:00:00Z"
refresh = {{ every = "month", rollover = true, cap = 10 }}
"#
    );
    let r = Rig::new("2026-03-31T10:00:00Z", &pools).await;
    for res in [A, B] {
        r.use_(
            res,
            "api_calls",
            "2026-03-31T10:10:00Z",
            "5",
            Some("bronze"),
        )
        .await;
    }
    r.pass_at("2026-03-31T11:05:00Z").await;
    r.clock.set(t("2026-04-01T00:10:00Z"));
    for res in [A, B] {
        r.use_(
            res,
            "api_calls",
            "2026-04-01T00:10:00Z",
            "40",
            Some("bronze"),
        )
        .await;
    }
    r.pass_at("2026-04-01T01:05:00Z").await;
    assert_eq!(r.sent(A, "api_calls", "2026-04-01T00:00:00Z"), Some(20.0));
    assert_eq!(r.sent(B, "api_calls", "2026-04-01T00:00:00Z"), Some(10.0));
    let a = r.pools_of(A, "api_calls").await;
    assert_eq!(
        a[0],
        ("monthly-a".into(), "0".into(), "20".into(), "20".into())
    );
    let b = r.pools_of(B, "api_calls").await;
    assert_eq!(
        b[0],
        ("monthly-b".into(), "0".into(), "30".into(), "30".into())
    );
}

/// Scenario P5: a prepaid pool of 50 covers 20 at 09:00, is voided at 10:30 (through the journal's API face, who =
/// `api`); the 20 of 10:00 are sent. What it drew stays drawn; the balance shows it voided with nothing available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_a_voided_pool_takes_no_further_draws() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    let spec: meterd::pools::PoolSpec = serde_json::from_value(serde_json::json!({
        "id": "prepaid", "dimension": "api_calls", "amount": 50, "priority": 1, "scope": {"resource": A}
    }))
    .unwrap();
    let created = r
        .journal
        .create_pool(spec.validate().unwrap(), "api".into(), r.clock.now())
        .await
        .unwrap();
    assert!(matches!(
        created,
        meterd::journal::pools::Created::Created(_)
    ));
    r.use_(A, "api_calls", "2026-03-10T09:10:00Z", "20", Some("bronze"))
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    r.use_(A, "api_calls", "2026-03-10T10:10:00Z", "20", Some("bronze"))
        .await;
    r.clock.set(t("2026-03-10T10:30:00Z"));
    r.journal
        .void_pool("prepaid".into(), "api".into(), r.clock.now())
        .await
        .unwrap()
        .unwrap();
    r.pass_at("2026-03-10T11:05:00Z").await;
    assert_eq!(r.sent(A, "api_calls", "2026-03-10T09:00:00Z"), None);
    assert_eq!(r.sent(A, "api_calls", "2026-03-10T10:00:00Z"), Some(20.0));
    let list = r
        .journal
        .list_pools(
            r.settings.clone(),
            Some(A.to_ascii_uppercase()),
            r.clock.now(),
        )
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    let p = &list[0];
    assert_eq!(
        (
            p["voided"].as_bool(),
            p["used"].as_str(),
            p["available"].as_str()
        ),
        (Some(true), Some("20"), Some("0"))
    );
    let trail: Vec<(&str, &str)> = p["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["who"].as_str().unwrap(), c["action"].as_str().unwrap()))
        .collect();
    assert_eq!(trail, [("api", "created"), ("api", "voided")]);
    assert_eq!(p["changes"][1]["at"], "2026-03-10T10:30:00Z");
}

/// Scenario P6: billing units of 1200 with a pool of 1000 covering part of an hour. 3000 at 09:00: the pool
/// covers 1000, 2000 remain: 1 unit sent, 800 carried. 500 at 10:00: the pool is empty, 500 + 800 = 1300: 1 unit
/// sent, 100 carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_billing_units_with_a_pool_covering_part_of_an_hour() {
    let pools = format!(
        r#"
[[pools]]
id = "blocks"
dimension = "compute_blocks"
amount = 1000
scope = {{ resource = "{A}" }}
"#
    );
    let r = Rig::new("2026-03-10T09:00:00Z", &pools).await;
    r.use_(A, "compute_blocks", "2026-03-10T09:10:00Z", "3000", None)
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.sent(A, "compute_blocks", "2026-03-10T09:00:00Z"),
        Some(1.0)
    );
    r.use_(A, "compute_blocks", "2026-03-10T10:10:00Z", "500", None)
        .await;
    r.pass_at("2026-03-10T11:05:00Z").await;
    assert_eq!(
        r.sent(A, "compute_blocks", "2026-03-10T10:00:00Z"),
        Some(1.0)
    );
    let (s, now) = (r.settings.clone(), r.clock.now());
    let b = r
        .journal
        .read(move |c| meterd::billing::balance(c, &s, A, now))
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.dimension == "compute_blocks")
        .unwrap();
    assert_eq!(
        (
            b.carried_remainder.as_str(),
            b.overage_frozen.as_str(),
            b.usage.as_str()
        ),
        ("100", "2", "3500")
    );
    // 1000 drawn + 2 units x 1200 + 100 carried = 3500 used.
    assert_eq!(b.pools[0].id, "blocks");
    assert_eq!(b.pools[0].used, "1000");
}

/// Scenario P7: a plan change mid-term. A prepaid pool of 30 (priority 0) is drawn before the plan. 09:00 on gold:
/// 50 = prepaid 30 + gold 20. 10:00 on silver (10 included): 25 = silver 10 (its own full allowance) + 15 sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_a_plan_change_mid_term() {
    let pools = format!(
        r#"
[[pools]]
id = "prepaid"
dimension = "api_calls"
amount = 30
scope = {{ resource = "{A}" }}
"#
    );
    let r = Rig::new("2026-03-10T09:00:00Z", &pools).await;
    r.use_(A, "api_calls", "2026-03-10T09:10:00Z", "50", Some("gold"))
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(
        r.covered(A, "api_calls", "2026-03-10T09:00:00Z").await,
        (
            "included".into(),
            pairs(&[("prepaid", "30"), ("plan:gold", "20")])
        )
    );
    r.use_(A, "api_calls", "2026-03-10T10:10:00Z", "25", Some("silver"))
        .await;
    r.pass_at("2026-03-10T11:05:00Z").await;
    assert_eq!(r.sent(A, "api_calls", "2026-03-10T10:00:00Z"), Some(15.0));
    assert_eq!(
        r.covered(A, "api_calls", "2026-03-10T10:00:00Z").await,
        ("accepted".into(), pairs(&[("plan:silver", "10")]))
    );
}

/// Pools declared in config are journaled with who = `config`; removing one from the config voids it (who =
/// `config`), and an expiring pool with most of it unused raises `pool_expiring` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_pools_are_journaled_and_an_expiring_pool_warns_once() {
    let pools = format!(
        r#"
[[pools]]
id = "trial"
dimension = "api_calls"
amount = 100
scope = {{ resource = "{A}" }}
expires_at = "2026-03-15T00:00:00Z"
"#
    );
    let r = Rig::new("2026-03-10T09:00:00Z", &pools).await;
    r.use_(A, "api_calls", "2026-03-10T09:10:00Z", "10", Some("bronze"))
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    // Under 7 days before expiry, all of it unused when the pass starts (the hour is drawn after): one warning,
    // not one per pass.
    r.pass_at("2026-03-10T11:05:00Z").await;
    let warned = r.alerts("pool_expiring").await;
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(
        (warned[0]["pool"].as_str(), warned[0]["available"].as_str()),
        (Some("trial"), Some("100"))
    );
    assert_eq!(r.pools_of(A, "api_calls").await[0].1, "90");
    let list = r
        .journal
        .list_pools(r.settings.clone(), None, r.clock.now())
        .await
        .unwrap();
    assert_eq!(list[0]["source"], "config");
    assert_eq!(list[0]["changes"][0]["who"], "config");
    // The same journal under a configuration without the pool: it is voided by `config`.
    let mut without = (*r.settings).clone();
    without.pools.clear();
    r.journal
        .pools_pass(std::sync::Arc::new(without), r.clock.now())
        .await
        .unwrap();
    let list = r
        .journal
        .list_pools(r.settings.clone(), None, r.clock.now())
        .await
        .unwrap();
    assert_eq!(list[0]["voided"], true);
    assert_eq!(list[0]["changes"][1]["action"], "voided");
    assert_eq!(list[0]["changes"][1]["who"], "config");
}

/// The HTTP routes: `POST /v1/pools` is idempotent by id (201, then 200; other content 409 with a message), a
/// pool with an undeclared dimension is refused with 400, `GET /v1/pools?resource=` lists it, the balance has a
/// `pools` list in draw order with the plan pool, `GET /v1/usage` and `GET /v1/consumption?group_by=` show
/// which pools covered how much, `POST /v1/pools/{id}/void` voids (a plan pool or an unknown id is refused), and
/// `GET /v1/customers/{tenant}/balance` lists the customer's subscriptions. Every route needs the bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_routes_over_http() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    let state = meterd::ingest::AppState {
        settings: r.settings.clone(),
        journal: r.journal.clone(),
        reads: meterd::journal::reads::Reads::Local(r.journal.clone()),
        clock: std::sync::Arc::new(r.clock.clone()),
        token: Some(std::sync::Arc::new(meterd::secret::Secret::new(
            "sekrit".to_string(),
        ))),
        emitter: None,
        metrics: None,
        ready: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        liveness: std::sync::Arc::new(meterd::ops::Liveness::default()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, meterd::ingest::router(state))
            .await
            .unwrap();
    });
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth("sekrit")
            .json(&body)
            .send()
    };
    let get = |path: &str| {
        http.get(format!("{base}{path}"))
            .bearer_auth("sekrit")
            .send()
    };
    let pool = serde_json::json!({
        "id": "prepaid", "dimension": "api_calls", "amount": 50, "priority": 1,
        "scope": {"resource": A}, "effective_at": "2026-03-01T00:00:00Z", "expires_at": "2026-04-10T00:00:00Z"
    });
    let unauthorized = http
        .post(format!("{base}/v1/pools"))
        .json(&pool)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let created = post("/v1/pools", pool.clone()).await.unwrap();
    assert_eq!(created.status(), 201);
    let created: serde_json::Value = created.json().await.unwrap();
    assert_eq!(
        (
            created["id"].as_str(),
            created["amount"].as_str(),
            created["source"].as_str()
        ),
        (Some("prepaid"), Some("50"), Some("api"))
    );
    assert_eq!(
        post("/v1/pools", pool.clone()).await.unwrap().status(),
        200,
        "the same pool again changes nothing"
    );
    let mut other = pool.clone();
    other["amount"] = 60.into();
    let conflict = post("/v1/pools", other).await.unwrap();
    assert_eq!(conflict.status(), 409);
    let msg = conflict.text().await.unwrap();
    assert!(
        msg.contains("exists with other content") && msg.contains("void"),
        "{msg}"
    );
    let mut undeclared = pool.clone();
    undeclared["id"] = "x".into();
    undeclared["dimension"] = "nope".into();
    assert_eq!(post("/v1/pools", undeclared).await.unwrap().status(), 400);

    let listed: serde_json::Value = get(&format!("/v1/pools?resource={A}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["pools"].as_array().unwrap().len(), 1);
    let none: serde_json::Value = get(&format!("/v1/pools?resource={B}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(none["pools"].as_array().unwrap().is_empty());

    r.use_(A, "api_calls", "2026-03-10T09:10:00Z", "20", None)
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    let balance: serde_json::Value = get(&format!("/v1/subscriptions/{A}/balance"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api = &balance["dimensions"][0];
    assert_eq!(api["dimension"], "api_calls");
    assert_eq!(
        (
            api["included"].as_str(),
            api["consumed"].as_str(),
            api["remaining"].as_str()
        ),
        (Some("100"), Some("0"), Some("100"))
    );
    let pools: Vec<(String, String, String)> = api["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().into(),
                p["available"].as_str().unwrap().into(),
                p["total"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        pools,
        [
            ("prepaid".to_string(), "30".to_string(), "50".to_string()),
            ("plan:gold".into(), "100".into(), "100".into())
        ]
    );
    assert_eq!(api["pools"][0]["expires_at"], "2026-04-10T00:00:00Z");
    assert_eq!(api["pools"][0]["scope"]["resource"], A);
    assert_eq!(api["pools"][1]["refreshes_at"], "2026-04-01T00:00:00Z");

    let usage: serde_json::Value = get(&format!("/v1/usage?resource={A}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hours = usage["hours"].as_array().unwrap();
    assert_eq!(hours[0]["pools"][0]["id"], "prepaid");
    assert_eq!(hours[0]["pools"][0]["quantity"], "20");

    let by_pool: serde_json::Value = get(&format!("/v1/consumption?resource={A}&group_by=pool"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        by_pool["groups"],
        serde_json::json!([{"dimension": "api_calls", "pool": "prepaid", "quantity": "20"}])
    );
    let by_hour: serde_json::Value = get(&format!("/v1/consumption?resource={A}&group_by=hour"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        by_hour["groups"],
        serde_json::json!([{"dimension": "api_calls", "period": "2026-03-10T09:00:00Z", "quantity": "20"}])
    );
    let by_month: serde_json::Value = get(&format!("/v1/consumption?resource={A}&group_by=month"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_month["groups"][0]["period"], "2026-03-01T00:00:00Z");
    assert_eq!(
        get(&format!("/v1/consumption?resource={A}&group_by=week"))
            .await
            .unwrap()
            .status(),
        400
    );

    assert_eq!(
        post("/v1/pools/plan:gold/void", serde_json::json!({}))
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post("/v1/pools/nope/void", serde_json::json!({}))
            .await
            .unwrap()
            .status(),
        404
    );
    let voided = post("/v1/pools/prepaid/void", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(voided.status(), 200);
    let voided: serde_json::Value = voided.json().await.unwrap();
    assert_eq!(
        (voided["voided"].as_bool(), voided["used"].as_str()),
        (Some(true), Some("20"))
    );

    let team: serde_json::Value = get(&format!("/v1/customers/{TENANT}/balance"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let members: Vec<&str> = team["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["resource"].as_str().unwrap())
        .collect();
    assert_eq!(members.len(), 2, "{team}");
    server.abort();
}

/// Retention deletes settled hourly totals, but their monthly sums stay: `group_by=month` (and `dimension`) still
/// report usage older than `journal.retention`, while `group_by=hour` covers only what is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_by_month_outlives_retention() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    r.use_(A, "api_calls", "2026-03-10T09:10:00Z", "20", None)
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    r.clock.set(t("2026-03-31T10:10:00Z"));
    r.use_(A, "api_calls", "2026-03-31T10:10:00Z", "5", None)
        .await;
    r.pass_at("2026-03-31T11:05:00Z").await;
    // Retention of 30 hours at 2026-03-31T12:00: the 10 March hour goes.
    let deleted = r.retention_30h_at("2026-03-31T12:00:00Z").await;
    assert_eq!(deleted, 1);
    let group = |by: meterd::billing::GroupBy| {
        r.journal
            .read(move |c| meterd::billing::consumption_grouped(c, A, None, i64::MIN, i64::MAX, by))
    };
    let month = group(meterd::billing::GroupBy::Month).await.unwrap();
    assert_eq!(
        month,
        [
            serde_json::json!({"dimension": "api_calls", "period": "2026-03-01T00:00:00Z", "quantity": "25"})
        ]
    );
    let dim = group(meterd::billing::GroupBy::Dimension).await.unwrap();
    assert_eq!(
        dim,
        [serde_json::json!({"dimension": "api_calls", "quantity": "25"})]
    );
    let hour = group(meterd::billing::GroupBy::Hour).await.unwrap();
    assert_eq!(hour.len(), 1);
}

/// A billing term longer than `journal.retention` (a 3-year plan against the default 730 days) keeps its balance
/// exact after retention deletes its first hours: what their events froze and the marketplace accepted, and
/// their usage, are kept per term (`retired_overage`). Before, `overage_frozen`, `overage_accepted` and `usage`
/// dropped to what the kept hours hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_term_longer_than_retention_keeps_its_balance() {
    let r = Rig::new("2026-03-10T09:00:00Z", "").await;
    // gold includes 100 api_calls per (monthly) term: 150 leaves 50 overage, then 5 more.
    r.use_(A, "api_calls", "2026-03-10T09:10:00Z", "150", None)
        .await;
    r.pass_at("2026-03-10T10:05:00Z").await;
    assert_eq!(r.sent(A, "api_calls", "2026-03-10T09:00:00Z"), Some(50.0));
    r.clock.set(t("2026-03-31T10:10:00Z"));
    r.use_(A, "api_calls", "2026-03-31T10:10:00Z", "5", None)
        .await;
    r.pass_at("2026-03-31T11:05:00Z").await;
    let balance = || {
        let (s, now) = (r.settings.clone(), t("2026-03-31T12:00:00Z"));
        r.journal.read(move |c| {
            let b = meterd::billing::balance(c, &s, A, now)?;
            let d = b.into_iter().find(|d| d.dimension == "api_calls").unwrap();
            Ok((d.overage_frozen, d.overage_accepted, d.usage, d.consumed))
        })
    };
    let before = balance().await.unwrap();
    assert_eq!(
        before,
        ("55".into(), "55".into(), "155".into(), "155".into())
    );
    // Retention of 30 hours at 2026-03-31T12:00: the 10 March hour (and its event) goes.
    let deleted = r.retention_30h_at("2026-03-31T12:00:00Z").await;
    assert_eq!(deleted, 1);
    assert_eq!(balance().await.unwrap(), before);
    // Retention again deletes nothing more and counts nothing twice.
    r.retention_30h_at("2026-03-31T12:00:00Z").await;
    assert_eq!(balance().await.unwrap(), before);
}
