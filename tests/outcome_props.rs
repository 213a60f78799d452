//! Property test over marketplace answers (issue 11, "Done when"): random sequences of answers (Accepted,
//! Duplicate of the same or another quantity, Expired, ResourceNotFound, an unknown status, InvalidDimension,
//! whole-call 4xx and 5xx, connections dropped before or after processing) and clock moves, in process with one
//! `ManualClock` shared by meterd and the emulator. After every key has settled:
//!
//! - billed once at most: the emulator holds at most one event per key, and an hour meterd carried or gave up
//!   on (`expired`, `rejected`, `not_active`, ...) is not recorded there;
//! - every unit is in exactly one visible outcome: each hour ends in one terminal outcome, and
//!   `units sent x unit + remainder + usage of hours not billed == usage` for the subscription and dimension.
//!
//! `PROPTEST_CASES` raises the case count (default 12, a few seconds).

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::rig::{Extended as Rig, march_subscription};
use meterd::emulator::{EmulatorConfig, Fault, FaultKind, Phase, Plan, Route};
use meterd::journal::Journal;
use meterd::journal::usage::NewRecord;
use meterd::quantity::Micros;
use proptest::prelude::*;
use std::collections::BTreeMap;

const A: &str = "11111111-1111-4111-8111-111111111111";
const UNIT: i64 = 1200;
const HOURS: i64 = 5;
const DIMS: [&str; 2] = ["compute_blocks", "api_calls"];

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap()
}

/// One marketplace answer for the next batch call.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// The emulator judges the events itself (Accepted, or Duplicate when it already holds the hour).
    Real,
    /// Every event answered with this per-event status (nothing recorded).
    PerEvent(&'static str),
    /// The whole call fails with this HTTP status (nothing recorded).
    Call(u16),
    /// The connection drops before the emulator processes the batch.
    DropBefore,
    /// The emulator records the batch, then the connection drops.
    DropAfter,
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        4 => Just(Answer::Real),
        1 => Just(Answer::PerEvent("Expired")),
        1 => Just(Answer::PerEvent("ResourceNotFound")),
        1 => Just(Answer::PerEvent("ResourceNotActive")),
        1 => Just(Answer::PerEvent("InvalidDimension")),
        1 => Just(Answer::PerEvent("Error")),
        1 => Just(Answer::PerEvent("SomethingNew")),
        1 => Just(Answer::Call(400)),
        1 => Just(Answer::Call(429)),
        1 => Just(Answer::Call(503)),
        1 => Just(Answer::DropBefore),
        2 => Just(Answer::DropAfter),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    /// Seconds of usage per (dimension, hour).
    usage: Vec<[i64; 2]>,
    /// Hours another sender already recorded, with its quantity (a `Duplicate` of the same or another quantity).
    foreign: Vec<(usize, usize, i64)>,
    /// (answer for the next call, minutes the clock moves before the pass).
    steps: Vec<(Answer, i64)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec([1i64..5000, 1i64..5000], HOURS as usize),
        proptest::collection::vec((0usize..2, 0usize..HOURS as usize, 1i64..4), 0..3),
        proptest::collection::vec((answer(), 1i64..400), 1..14),
    )
        .prop_map(|(usage, mut foreign, steps)| {
            // One foreign event per key (the marketplace keeps the first).
            foreign.sort();
            foreign.dedup_by_key(|(d, h, _)| (*d, *h));
            Case {
                usage,
                foreign,
                steps,
            }
        })
}

/// A scripted HTTP 200 batch answer giving `status` to every key this case can send. As the marketplace does, a
/// key it already holds is answered `Duplicate` (with the quantity it holds), except `Expired`, which the window
/// decides before anything else.
fn per_event(status: &str, recorded: &[meterd::emulator::AcceptedEvent]) -> Fault {
    let mut results = Vec::new();
    for dim in DIMS {
        for h in 0..(HOURS + 48) {
            let at = base() + Duration::hours(h);
            let hour = at.format("%Y-%m-%dT%H:%M:%SZ").to_string();
            let held = recorded
                .iter()
                .find(|e| e.dimension == dim && e.effective_start == at);
            results.push(match held {
                Some(e) if status != "Expired" => serde_json::json!({
                    "status": "Duplicate", "resourceId": A, "dimension": dim, "planId": "gold",
                    "effectiveStartTime": hour,
                    "error": {"code": "Conflict", "message": "This usage event already exist.",
                        "additionalInfo": {"acceptedMessage": {"usageEventId": e.usage_event_id, "status": "Duplicate",
                            "quantity": e.quantity, "dimension": dim, "effectiveStartTime": hour, "planId": "gold",
                            "resourceId": A}}}
                }),
                _ => serde_json::json!({
                    "status": status, "resourceId": A, "dimension": dim, "planId": "gold",
                    "effectiveStartTime": hour,
                    "error": {"code": status, "message": format!("scripted {status}")}
                }),
            });
        }
    }
    Fault::new(
        Route::BatchUsageEvent,
        FaultKind::Fail {
            status: 200,
            retry_after: None,
            body: Some(serde_json::json!({"count": results.len(), "result": results})),
        },
        1,
    )
}

/// The shared rig with subscription A on `gold`, `compute_blocks` in units of [`UNIT`], and this file's helpers.
impl Rig {
    async fn new() -> Rig {
        let sub = march_subscription(A, "gold");
        let rig = common::rig::Rig::at(base())
            .emulator(EmulatorConfig {
                subscriptions: vec![sub],
                plans: vec![Plan {
                    id: "gold".into(),
                    dimensions: None,
                }],
                ..Default::default()
            })
            .marketplace("timeout = \"5s\"")
            .retry_min("1m")
            .emit("retry_max = \"10m\"")
            .dimensions(&format!(
                r#"[[dimensions]]
id = "compute_blocks"
unit = {UNIT}
[[dimensions]]
id = "api_calls"
[[plans]]
id = "gold"
included = {{ compute_blocks = 0, api_calls = 0 }}
"#
            ))
            .start()
            .await;
        Rig(rig)
    }

    async fn ingest(&self, dimension: &str, hour: i64, seconds: i64) {
        let recs = vec![NewRecord {
            resource: A.into(),
            plan: None,
            dimension: dimension.into(),
            time: base() + Duration::hours(hour) + Duration::minutes(30),
            quantity: Micros(seconds * 1_000_000),
            key: None,
        }];
        let out = self
            .0
            .ingest(meterd::clock::Clock::now(&self.clock), recs)
            .await;
        assert_eq!(out.accepted, 1);
    }

    /// Records an event at the emulator as another sender would.
    async fn foreign(&self, dimension: &str, hour: i64, quantity: i64) {
        let token = self.emu.issue_token();
        let at = (base() + Duration::hours(hour))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let r = meterd::tls::client()
            .post(format!(
                "http://{}/api/usageEvent?api-version=2018-08-31",
                self.addr
            ))
            .bearer_auth(token)
            .json(
                &serde_json::json!({"resourceId": A, "quantity": quantity, "dimension": dimension,
                "effectiveStartTime": at, "planId": "gold"}),
            )
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
}

/// (dimension, hour, quantity, state, send_quantity, carried_to)
type Row = (String, i64, i64, String, Option<i64>, Option<i64>);

async fn events(j: &Journal) -> Vec<Row> {
    j.read(|c| {
        let mut s = c.prepare(
            "SELECT dimension, hour, quantity, state, send_quantity, carried_to FROM outbound_events ORDER BY id",
        )?;
        let rows = s.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    })
    .await
    .unwrap()
}

async fn remainder(j: &Journal, dimension: &str) -> i64 {
    let d = dimension.to_string();
    j.read(move |c| {
        Ok(c.query_row(
            "SELECT COALESCE(SUM(remainder), 0) FROM remainders WHERE dimension = ?1",
            [d],
            |r| r.get(0),
        )?)
    })
    .await
    .unwrap()
}

async fn unfrozen(j: &Journal) -> i64 {
    j.read(|c| {
        Ok(c.query_row(
            "SELECT COALESCE(SUM(quantity), 0) FROM hourly_totals WHERE outbound_id IS NULL",
            [],
            |r| r.get(0),
        )?)
    })
    .await
    .unwrap()
}

async fn run(case: Case) -> Result<(), TestCaseError> {
    let r = Rig::new().await;
    r.clock
        .set(base() + Duration::hours(HOURS) + Duration::minutes(1));
    let mut usage: BTreeMap<&str, i64> = BTreeMap::new();
    for (h, per_dim) in case.usage.iter().enumerate() {
        for (d, seconds) in per_dim.iter().enumerate() {
            r.ingest(DIMS[d], h as i64, *seconds).await;
            *usage.entry(DIMS[d]).or_default() += seconds * 1_000_000;
        }
    }
    for (d, h, q) in &case.foreign {
        r.foreign(DIMS[*d], *h as i64, *q).await;
    }
    let mut now = base() + Duration::hours(HOURS) + Duration::minutes(6);
    for (answer, minutes) in &case.steps {
        match answer {
            Answer::Real => {}
            Answer::PerEvent(status) => {
                r.emu.add_fault(per_event(status, &r.emu.accepted_events()))
            }
            Answer::Call(status) => r.emu.fail_next(Route::BatchUsageEvent, 1, *status, None),
            Answer::DropBefore => r.emu.drop_next(Route::BatchUsageEvent, 1, Phase::Before),
            Answer::DropAfter => r.emu.drop_next(Route::BatchUsageEvent, 1, Phase::After),
        }
        r.pass_at(now).await;
        r.emu.clear_faults();
        now += Duration::minutes(*minutes);
    }
    // Let everything run out of window and the carried hours go out without faults.
    let end = now.max(base() + Duration::hours(HOURS + 26));
    for step in [0, 1, 2, 3, 4, 26, 27, 28, 52, 53, 54] {
        r.pass_at(end + Duration::hours(step) + Duration::minutes(10))
            .await;
    }

    let rows = events(&r.journal).await;
    let accepted = r.emu.accepted_events();
    let foreign: Vec<(String, i64)> = case
        .foreign
        .iter()
        .map(|(d, h, _)| (DIMS[*d].to_string(), base().timestamp() + *h as i64 * 3600))
        .collect();
    for (dimension, hour, quantity, state, send, carried_to) in &rows {
        let at = chrono::DateTime::from_timestamp(*hour, 0).unwrap();
        let recorded: Vec<_> = accepted
            .iter()
            .filter(|e| &e.dimension == dimension && e.effective_start == at)
            .collect();
        prop_assert!(recorded.len() <= 1, "{dimension} {at} recorded twice");
        let ours = !foreign.contains(&(dimension.clone(), *hour));
        match state.as_str() {
            "accepted" | "duplicate" => {
                prop_assert_eq!(recorded.len(), 1, "{} {} {}", dimension, at, state);
                if ours {
                    prop_assert_eq!(
                        (recorded[0].quantity * 1_000_000.0).round() as i64,
                        send.unwrap_or(*quantity),
                        "{} {}",
                        dimension,
                        at
                    );
                }
            }
            "duplicate_mismatch" => {
                prop_assert!(!ours, "{dimension} {at}: mismatch without a foreign event")
            }
            "expired_unconfirmed" | "included" | "remainder" => {}
            "expired" | "rejected" | "not_active" | "skipped_unsubscribed" => {
                if ours {
                    prop_assert!(
                        recorded.is_empty(),
                        "{dimension} {at} ended {state} (carried to {carried_to:?}) but the marketplace holds it"
                    );
                }
            }
            other => prop_assert!(
                false,
                "{dimension} {at} still {other} after every window ended"
            ),
        }
    }
    prop_assert_eq!(unfrozen(&r.journal).await, 0, "usage left unfrozen");
    for dim in DIMS {
        let unit = if dim == "compute_blocks" { UNIT } else { 1 };
        let mut billed = 0i64; // units sent x unit, raw micro-units
        let mut unbilled = 0i64; // usage of hours that ended not billed (and not carried)
        for (d, _, quantity, state, send, carried_to) in rows.iter().filter(|r| r.0 == dim) {
            let _ = d;
            match state.as_str() {
                "accepted"
                | "duplicate"
                | "duplicate_mismatch"
                | "expired_unconfirmed"
                | "included"
                | "remainder" => billed += send.unwrap_or(0) * unit,
                "expired" if carried_to.is_some() => {}
                _ => unbilled += quantity,
            }
        }
        let rem = remainder(&r.journal, dim).await;
        prop_assert_eq!(
            billed + rem + unbilled,
            usage[dim],
            "{}: units x unit {} + remainder {} + not billed {} != usage {}; events {:?}",
            dim,
            billed,
            rem,
            unbilled,
            usage[dim],
            rows
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_unit_ends_in_one_outcome_and_nothing_is_billed_twice(case in case()) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(case))?;
    }
}
