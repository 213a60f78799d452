//! Wall-clock steps: meterd's injected clock jumps backwards and forwards (NTP corrections, a VM resumed, a
//! bad RTC) while records arrive and passes run. The marketplace keeps real, monotonic time (its own clock:
//! the furthest meterd's clock has been). No hour may be sent twice or before `hour + 1h + grace` of real
//! time, and every unit ingested ends in exactly one row.
//!
//! CI: 24 random step sequences. Long: `RELIABILITY_LONG=1 cargo test --release --test reliability_clock` (512).

mod common;

use chrono::{DateTime, Duration, Utc};
use common::rig::{Rig, ingest_rules};
use meterd::clock::{Clock, ManualClock};
use meterd::journal::usage::{self, NewRecord, ReportFilter};
use meterd::quantity::Micros;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";
const GRACE_MIN: i64 = 5;

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-10T09:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// One step: move the clock by `minutes` (negative = backwards), ingest `qty` micro-units stamped
/// `back` minutes before the (new) now, then maybe run a pass.
#[derive(Debug, Clone)]
struct Step {
    minutes: i64,
    back: i64,
    resource_b: bool,
    qty: i64,
    pass: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop_oneof![
            3 => 1i64..90,      // ordinary progress
            1 => -180i64..-1,   // a step backwards, up to 3 h
            1 => 60i64..300,    // a jump forwards, up to 5 h
        ],
        0i64..30,
        any::<bool>(),
        1i64..3_000_000,
        prop::bool::weighted(0.7),
    )
        .prop_map(|(minutes, back, resource_b, qty, pass)| Step {
            minutes,
            back,
            resource_b,
            qty,
            pass,
        })
}

fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let real = ManualClock::new(start());
        let rig = Rig::at(start())
            .emulator_clock(Arc::new(real.clone()))
            .grace(&format!("{GRACE_MIN}m"))
            .dimensions("[[dimensions]]\nid = \"api_calls\"\n")
            .start()
            .await;
        let Rig {
            clock,
            emu,
            settings,
            journal,
            emitter,
            dir: _dir,
            ..
        } = rig;

        let mut ingested = 0i64;
        let mut max_now = start();
        let mut first_seen: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
        let grace = Duration::minutes(GRACE_MIN);
        let mut all = steps.clone();
        // Finally: real time moves 3 h on and two passes settle everything.
        all.push(Step {
            minutes: 180,
            back: 0,
            resource_b: false,
            qty: 1,
            pass: true,
        });
        all.push(Step {
            minutes: 1,
            back: 0,
            resource_b: false,
            qty: 1,
            pass: true,
        });
        for s in &all {
            clock.advance(Duration::minutes(s.minutes));
            let now = clock.now();
            if now > max_now {
                max_now = now;
                real.set(now);
            }
            let rec = NewRecord {
                resource: if s.resource_b { B } else { A }.to_string(),
                plan: None,
                dimension: "api_calls".into(),
                time: now - Duration::minutes(s.back),
                quantity: Micros(s.qty),
                key: None,
            };
            let rules = ingest_rules(&settings, now);
            let out = journal
                .write(move |c| usage::ingest(c, &[rec], &rules))
                .await
                .unwrap();
            prop_assert!(out.is_ok(), "carry_forward never refuses: {out:?}");
            ingested += s.qty;
            if s.pass {
                emitter.pass().await.unwrap();
                // Every event the marketplace saw for the first time was for an hour closed in real time.
                for e in emu.received_events() {
                    let hour = e.event["effectiveStartTime"].as_str().unwrap().to_string();
                    let key = format!("{}|{hour}", e.event["resourceId"]);
                    first_seen.entry(key).or_insert(max_now);
                    let h = DateTime::parse_from_rfc3339(&hour)
                        .unwrap()
                        .with_timezone(&Utc);
                    prop_assert!(
                        h + Duration::hours(1) + grace <= max_now,
                        "hour {hour} sent early (real now {max_now})"
                    );
                }
            }
        }
        // No hour accepted twice; nothing lost.
        let accepted = emu.accepted_events();
        let mut keys = BTreeMap::new();
        for e in &accepted {
            *keys
                .entry((e.resource_id.clone(), e.effective_start_time.clone()))
                .or_insert(0) += 1;
        }
        prop_assert!(keys.values().all(|n| *n == 1), "{keys:?}");
        let now = clock.now();
        let rows = journal
            .read(move |c| {
                usage::hourly_report(c, &ReportFilter::default(), now, settings.emit.grace)
            })
            .await
            .unwrap();
        let mut in_rows = 0i64;
        for r in &rows {
            prop_assert!(r.outcome != "duplicate_mismatch", "{r:?}");
            if r.outcome != "carried" {
                in_rows += r.quantity_micros;
            }
        }
        prop_assert_eq!(
            in_rows,
            ingested,
            "units in the journal vs ingested: {:#?}",
            rows
        );
        let billed: i64 = accepted
            .iter()
            .map(|e| (e.quantity * 1e6).round() as i64)
            .sum();
        let frozen: i64 = rows
            .iter()
            .filter(|r| r.outcome == "accepted" || r.outcome == "duplicate")
            .map(|r| r.quantity_micros)
            .sum();
        prop_assert_eq!(billed, frozen, "billed vs accepted rows");
        Ok(())
    })
}

fn cases() -> u32 {
    if std::env::var("RELIABILITY_LONG").is_ok() {
        512
    } else {
        24
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn clock_steps_never_send_an_hour_twice_or_early_and_lose_nothing(steps in prop::collection::vec(step(), 1..25)) {
        run(steps)?;
    }
}

/// The named case: 2 h backwards right after an hour was sent, then forwards past it again.
#[test]
fn a_two_hour_step_back_after_sending_then_forward() {
    let s = |minutes, back| Step {
        minutes,
        back,
        resource_b: false,
        qty: 1_500_000,
        pass: true,
    };
    run(vec![
        s(30, 0),
        s(40, 0),
        s(-120, 0),
        s(20, 10),
        s(150, 0),
        s(-30, 29),
        s(90, 0),
    ])
    .unwrap();
}
