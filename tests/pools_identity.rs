//! Configurations without `[[pools]]` bill exactly as before pools existed: the same scenario, run through this
//! build, gives byte-identical outbound event bodies and identical billing figures (outcome, included, billable,
//! units sent, the term's consumption and overage, the remainders) to the ones captured from the build before
//! pools (`tests/fixtures/pools_identity.json`, written by this very test on commit e54029a with
//! `METERD_WRITE_IDENTITY_FIXTURE=1`; see `tests/fixtures/README.md`).

mod common;

use common::rig::{Rig, march_subscription, record, t};
use meterd::emulator::{EmulatorConfig, Plan};

const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";

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
[[plans]]
id = "silver"
included = { api_calls = 10 }
"#;

fn dump(c: &rusqlite::Connection) -> serde_json::Value {
    let mut events = Vec::new();
    let mut s = c
        .prepare(
            "SELECT resource, dimension, hour, plan, quantity, state, included, billable, send_quantity, term_start, body
             FROM outbound_events ORDER BY hour, resource, dimension",
        )
        .unwrap();
    let rows = s
        .query_map([], |r| {
            Ok(serde_json::json!({
                "resource": r.get::<_, String>(0)?,
                "dimension": r.get::<_, String>(1)?,
                "hour": r.get::<_, i64>(2)?,
                "plan": r.get::<_, String>(3)?,
                "quantity": r.get::<_, i64>(4)?,
                "state": r.get::<_, String>(5)?,
                "included": r.get::<_, Option<i64>>(6)?,
                "billable": r.get::<_, Option<i64>>(7)?,
                "send_quantity": r.get::<_, Option<i64>>(8)?,
                "term_start": r.get::<_, Option<i64>>(9)?,
                "body": r.get::<_, String>(10)?,
            }))
        })
        .unwrap();
    for r in rows {
        events.push(r.unwrap());
    }
    let mut terms = Vec::new();
    let mut s = c
        .prepare("SELECT resource, dimension, plan, term_start, term_end, consumed, overage FROM term_usage ORDER BY 1, 2, 3, 4")
        .unwrap();
    let rows = s
        .query_map([], |r| {
            Ok(serde_json::json!([
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?
            ]))
        })
        .unwrap();
    for r in rows {
        terms.push(r.unwrap());
    }
    let mut rems = Vec::new();
    let mut s = c
        .prepare("SELECT resource, dimension, remainder FROM remainders ORDER BY 1, 2")
        .unwrap();
    let rows = s
        .query_map([], |r| {
            Ok(serde_json::json!([
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?
            ]))
        })
        .unwrap();
    for r in rows {
        rems.push(r.unwrap());
    }
    serde_json::json!({"events": events, "term_usage": terms, "remainders": rems})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_without_pools_bill_byte_identically_to_the_build_before_pools() {
    let mut b = march_subscription(B, "gold");
    b.term.start_date = Some("2026-03-15".into());
    b.term.end_date = Some("2026-04-14".into());
    let emu = EmulatorConfig {
        subscriptions: vec![march_subscription(A, "gold"), b],
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
    let r = Rig::at(t("2026-03-30T20:00:00Z"))
        .dimensions(BILLING)
        .emulator(emu)
        .start()
        .await;
    // Eight hours across A's term boundary (2026-04-01): allowance crossings, units with remainders, an
    // infinite dimension, a plan given on the records (silver) mid-term, two subscriptions.
    let hours = [
        "2026-03-30T20",
        "2026-03-30T21",
        "2026-03-31T22",
        "2026-03-31T23",
        "2026-04-01T00",
        "2026-04-01T01",
        "2026-04-01T02",
        "2026-04-01T03",
    ];
    for (k, h) in hours.iter().enumerate() {
        let at = t(&format!("{h}:10:00Z"));
        r.clock.set(at);
        let k = k as i64;
        let mut recs = vec![
            record(A, "api_calls", at, &format!("{}.25", 20 + 7 * k)),
            record(A, "compute_blocks", at, &format!("{}", 700 + 450 * k)),
            record(A, "gb_processed", at, "12.5"),
            record(B, "api_calls", at, &format!("{}", 30 + k)),
            record(B, "compute_blocks", at, "1000.5"),
        ];
        if k >= 5 {
            let mut silver = record(A, "api_calls", at, "4");
            silver.plan = Some("silver".into());
            recs.push(silver);
        }
        r.ingest(at, recs).await;
        r.pass_at(at + chrono::Duration::minutes(55)).await;
    }
    r.pass_at(t("2026-04-01T06:00:00Z")).await;
    let got = r.journal.read(|c| Ok(dump(c))).await.unwrap();
    assert!(got["events"].as_array().unwrap().len() >= 40);
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pools_identity.json");
    if std::env::var("METERD_WRITE_IDENTITY_FIXTURE").is_ok() {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap()).unwrap();
        return;
    }
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (g, w) = (
        got["events"].as_array().unwrap(),
        want["events"].as_array().unwrap(),
    );
    assert_eq!(g.len(), w.len(), "event count");
    for (a, b) in g.iter().zip(w) {
        assert_eq!(a, b, "event differs from the build before pools");
    }
    assert_eq!(got["term_usage"], want["term_usage"]);
    assert_eq!(got["remainders"], want["remainders"]);
}
