//! Golden tests of the worked scenarios 1-11 of `shared/scenarios.md`, in process.
//!
//! Each test drives the library directly through the shared in-process rig ([`common::rig`]): a journal in a
//! temporary directory, an emitter against an in-process emulator, and one `ManualClock` shared by meterd and the
//! emulator, so hours pass by `clock.set(..)` without sleeping. Times and numbers are those of the scenarios: UTC on
//! 2026-03-10, grace 5 minutes, resource A Subscribed on plan `gold`. Outcomes are read through
//! `usage::hourly_report`, `status::status` and what the emulator received and accepted.
//!
//! A property test at the end checks invariant 6 ("nothing vanishes") over random records, clock steps and faults.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::rig::{Rig, TOKEN, next_day, record, t};
use meterd::emulator::{
    AcceptedEvent, EmulatorConfig, Phase, Route, Subscription, SubscriptionStatus,
};
use meterd::journal::outbound;
use meterd::journal::usage::{self, IngestOutcome, NewRecord};
use meterd::quantity::Micros;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";
const API: &str = "api_calls";
const GB: &str = "gb_processed";

fn keyed(mut r: NewRecord, key: &str) -> NewRecord {
    r.key = Some(key.to_string());
    r
}

/// What the scenarios add to the shared rig.
impl Rig {
    /// A rig with the clock at `start`, default emulator, and extra configuration lines.
    async fn new(start: &str) -> Rig {
        Rig::with(t(start), "", "", "", EmulatorConfig::default()).await
    }

    /// `top` goes before the sections, `marketplace` into `[marketplace]`, `emit` into `[emit]`.
    async fn with(
        start: DateTime<Utc>,
        top: &str,
        marketplace: &str,
        emit: &str,
        emu_config: EmulatorConfig,
    ) -> Rig {
        Rig::at(start)
            .top(top)
            .marketplace(marketplace)
            .emit(emit)
            .emulator(emu_config)
            .start()
            .await
    }

    /// Records that arrive when they happen.
    async fn record_now(&self, resource: &str, dimension: &str, time: &str, qty: &str) {
        self.ingest(t(time), vec![record(resource, dimension, t(time), qty)])
            .await;
    }

    /// Bodies the emulator received on `batchUsageEvent`, grouped by call, in arrival order.
    fn calls(&self) -> Vec<Vec<Value>> {
        let mut calls: Vec<(String, Vec<Value>)> = Vec::new();
        for r in self.emu.received_events() {
            match calls.last_mut() {
                Some((id, events)) if *id == r.request_id => events.push(r.event),
                _ => calls.push((r.request_id, vec![r.event])),
            }
        }
        calls.into_iter().map(|(_, e)| e).collect()
    }
}

/// The event meterd must send for (resource, dimension, hour) with `qty`, as JSON.
/// `qty` is written as meterd writes it: `4`, `1.25`.
fn expected_event(resource: &str, dimension: &str, hour: &str, qty: &str) -> Value {
    let quantity: Value = serde_json::from_str(qty).unwrap();
    json!({"resourceId": resource, "planId": "gold", "dimension": dimension,
           "effectiveStartTime": usage::fmt_time(t(hour).timestamp()), "quantity": quantity})
}

fn accepted_key(e: &AcceptedEvent) -> (String, String, String) {
    (
        e.resource_id.clone().unwrap_or_default(),
        e.dimension.clone(),
        e.effective_start_time.clone(),
    )
}

// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_01_one_hour_one_event() {
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:05", "2.5").await;
    rig.record_now(A, API, "09:40", "1.0").await;
    rig.record_now(A, API, "09:59:59", "0.5").await;

    // 10:04: the hour has ended but the grace has not: nothing is frozen or sent.
    let early = rig.pass_at(t("10:04")).await;
    assert_eq!((early.frozen, early.calls), (0, 0), "{early:?}");
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "closing");

    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!((pass.frozen, pass.calls, pass.sent), (1, 1, 1), "{pass:?}");
    assert_eq!(pass.outcomes.get("accepted"), Some(&1), "{pass:?}");

    let received = rig.emu.received_events();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].event, expected_event(A, API, "09:00", "4"));
    assert_eq!(received[0].status, "Accepted");
    let accepted = rig.emu.accepted_events();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].effective_start_time, "2026-03-10T09:00:00Z");
    assert_eq!(accepted[0].quantity, 4.0);
    assert_eq!(accepted[0].plan_id, "gold");

    let row = rig.row(A, API, t("09:00")).await;
    assert_eq!(row.outcome, "accepted");
    assert_eq!(row.quantity, "4");
    assert_eq!(row.quantity_micros, 4_000_000);
    assert_eq!(row.records, 3);
    assert_eq!(row.plan, "gold");
    assert_eq!(
        row.usage_event_id.as_deref(),
        Some(accepted[0].usage_event_id.as_str())
    );

    let status = rig.status().await;
    assert_eq!(status.outcomes.get("accepted"), Some(&1));
    assert_eq!(status.pending_events, 0);
    assert_eq!(status.last_success.as_deref(), Some("2026-03-10T10:05:00Z"));

    // Another pass sends nothing: the hour is accepted once, ever.
    let again = rig.pass_at(t("10:30")).await;
    assert_eq!(again.calls, 0);
    assert_eq!(rig.emu.request_count(Route::BatchUsageEvent), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_02_the_open_hour_waits() {
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:05", "2.5").await;
    rig.record_now(A, API, "09:40", "1.0").await;
    rig.record_now(A, API, "09:59:59", "0.5").await;
    // Arrives at 10:02, stamped 10:01.
    rig.ingest(t("10:02"), vec![record(A, API, t("10:01"), "1.25")])
        .await;

    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!((pass.frozen, pass.sent), (1, 1), "{pass:?}");
    assert_eq!(
        rig.calls(),
        vec![vec![expected_event(A, API, "09:00", "4")]],
        "only the closed hour"
    );
    let open = rig.row(A, API, t("10:00")).await;
    assert_eq!(
        (open.outcome.as_str(), open.quantity.as_str()),
        ("open", "1.25")
    );

    // Still waiting within the grace after its end.
    let pass = rig.pass_at(t("11:04:59")).await;
    assert_eq!(pass.sent, 0);
    assert_eq!(rig.row(A, API, t("10:00")).await.outcome, "closing");

    let pass = rig.pass_at(t("11:05")).await;
    assert_eq!((pass.frozen, pass.sent), (1, 1), "{pass:?}");
    let calls = rig.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1], vec![expected_event(A, API, "10:00", "1.25")]);
    assert_eq!(rig.row(A, API, t("10:00")).await.outcome, "accepted");
    assert_eq!(rig.row(A, API, t("09:00")).await.quantity, "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_03_retry_of_an_ingest_request() {
    let rig = Rig::new("09:00").await;
    let request = vec![
        keyed(record(A, API, t("09:10"), "1.5"), "k1"),
        keyed(record(A, API, t("09:20"), "2.5"), "k2"),
    ];
    let first = rig.ingest(t("09:21"), request.clone()).await;
    assert_eq!(
        first,
        IngestOutcome {
            accepted: 2,
            duplicates: 0,
            carried: 0
        }
    );
    // The app timed out reading the answer and posts the same request again.
    let second = rig.ingest(t("09:22"), request).await;
    assert_eq!(
        second,
        IngestOutcome {
            accepted: 0,
            duplicates: 2,
            carried: 0
        }
    );
    let row = rig.row(A, API, t("09:00")).await;
    assert_eq!((row.quantity.as_str(), row.records), ("4", 2));
    assert_eq!(rig.status().await.records, 2);

    rig.pass_at(t("10:05")).await;
    assert_eq!(
        rig.calls(),
        vec![vec![expected_event(A, API, "09:00", "4")]]
    );
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_04_late_record() {
    // Carry forward (the default).
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:05", "2.5").await;
    rig.record_now(A, API, "09:40", "1.5").await;
    rig.pass_at(t("10:05")).await;
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "accepted");

    let late = rig
        .ingest(t("10:20"), vec![record(A, API, t("09:30"), "1")])
        .await;
    assert_eq!(
        late,
        IngestOutcome {
            accepted: 1,
            duplicates: 0,
            carried: 1
        }
    );
    // 09:00 keeps its frozen 4; the late unit is in the 10:00 hour, shown as carried from 09:00.
    let h9 = rig.row(A, API, t("09:00")).await;
    assert_eq!(
        (h9.quantity.as_str(), h9.outcome.as_str()),
        ("4", "accepted")
    );
    let h10 = rig.row(A, API, t("10:00")).await;
    assert_eq!(h10.quantity, "1");
    assert_eq!(h10.carried_in_micros, 1_000_000);
    assert_eq!(h10.outcome, "open");
    let carries = rig.carries().await;
    assert_eq!(carries.len(), 1, "{carries:?}");
    assert_eq!(
        (
            carries[0].from_hour.as_str(),
            carries[0].to_hour.as_str(),
            carries[0].quantity.as_str(),
            carries[0].reason.as_str()
        ),
        ("2026-03-10T09:00:00Z", "2026-03-10T10:00:00Z", "1", "late")
    );
    // It goes out with the 10:00 hour; the 09:00 hour is never sent again.
    rig.pass_at(t("11:05")).await;
    assert_eq!(
        rig.calls(),
        vec![
            vec![expected_event(A, API, "09:00", "4")],
            vec![expected_event(A, API, "10:00", "1")]
        ]
    );

    // Reject: the whole request is refused (the HTTP layer answers 422) and nothing is stored.
    let rig = Rig::with(
        t("09:00"),
        "late_usage = \"reject\"",
        "",
        "",
        EmulatorConfig::default(),
    )
    .await;
    rig.record_now(A, API, "09:05", "4").await;
    rig.pass_at(t("10:05")).await;
    let refused = rig
        .try_ingest(
            t("10:20"),
            vec![
                record(A, API, t("10:10"), "2"),
                record(A, API, t("09:30"), "1"),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].index, 1);
    assert!(refused[0].message.contains("already closed"), "{refused:?}");
    assert_eq!(
        rig.status().await.records,
        1,
        "nothing of the request stored"
    );
    assert!(rig.carries().await.is_empty());
    assert_eq!(rig.report().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_05_crash_between_send_and_record() {
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:05", "2.5").await;
    rig.record_now(A, API, "09:40", "1.5").await;
    // The marketplace records the batch, then takes long to answer; meterd is killed while it waits.
    rig.emu.delay_next(
        Route::BatchUsageEvent,
        1,
        std::time::Duration::from_secs(30),
        Phase::After,
    );
    rig.clock.set(t("10:05"));
    let first = Arc::new(rig.restarted_emitter());
    let running = {
        let e = first.clone();
        tokio::spawn(async move { e.pass().await })
    };
    let waited = std::time::Instant::now();
    while rig.emu.accepted_events().is_empty() {
        assert!(waited.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "pending");

    // Restart: a new process clears the dead one's lease (as `daemon` does under the journal lock) and resends.
    rig.journal.write(outbound::clear_leases).await.unwrap();
    let restarted = rig.restarted_emitter();
    rig.clock.set(t("10:06"));
    let pass = restarted.pass().await.unwrap();
    assert_eq!(pass.outcomes.get("duplicate"), Some(&1), "{pass:?}");
    let row = rig.row(A, API, t("09:00")).await;
    assert_eq!(
        (row.outcome.as_str(), row.quantity.as_str()),
        ("duplicate", "4")
    );

    let received = rig.emu.received_events();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].event, received[1].event,
        "the same bytes resent"
    );
    assert_eq!(received[1].status, "Duplicate");
    assert_eq!(rig.emu.accepted_events().len(), 1, "billed once");
    let status = rig.status().await;
    assert_eq!(status.outcomes.get("duplicate"), Some(&1));
    assert_eq!(status.last_success.as_deref(), Some("2026-03-10T10:06:00Z"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_05_answer_lost_after_the_marketplace_recorded_it() {
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:30", "4").await;
    // The connection drops after the marketplace recorded the batch: meterd cannot know.
    rig.emu.drop_next(Route::BatchUsageEvent, 1, Phase::After);
    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!(pass.outcomes.get("retry"), Some(&1), "{pass:?}");
    assert_eq!(rig.emu.accepted_events().len(), 1);
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "pending");

    let pass = rig.pass_at(t("10:10")).await;
    assert_eq!(pass.outcomes.get("duplicate"), Some(&1), "{pass:?}");
    let row = rig.row(A, API, t("09:00")).await;
    assert_eq!(
        (row.outcome.as_str(), row.quantity.as_str()),
        ("duplicate", "4")
    );
    let received = rig.emu.received_events();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].event, received[1].event);
    assert_eq!(
        rig.emu.accepted_events().len(),
        1,
        "never a second accepted event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_06_mismatch() {
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:05", "2.5").await;
    rig.record_now(A, API, "09:40", "1.5").await;
    // The hour was already recorded with 3 (say, by a meterd whose journal was later restored from a backup).
    rig.clock.set(t("10:01"));
    let answer: Value = meterd::tls::client()
        .post(format!(
            "{}/api/batchUsageEvent?api-version=2018-08-31",
            rig.base
        ))
        .bearer_auth(TOKEN)
        .json(&json!({"request": [expected_event(A, API, "09:00", "3")]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["result"][0]["status"], "Accepted", "{answer}");

    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!(
        pass.outcomes.get("duplicate_mismatch"),
        Some(&1),
        "{pass:?}"
    );
    let row = rig.row(A, API, t("09:00")).await;
    assert_eq!(row.outcome, "duplicate_mismatch");
    assert_eq!(row.quantity, "4");
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("another quantity"),
        "{row:?}"
    );
    let market: i64 = rig
        .journal
        .read(|c| {
            Ok(
                c.query_row("SELECT market_quantity FROM outbound_events", [], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
        .unwrap();
    assert_eq!(market, 3_000_000, "the marketplace's quantity is kept");
    let status = rig.status().await;
    assert_eq!(status.outcomes.get("duplicate_mismatch"), Some(&1));
    assert_eq!(
        status
            .outcome_quantities
            .get("duplicate_mismatch")
            .map(String::as_str),
        Some("4")
    );
    assert_eq!(status.pending_events, 0);
    assert_eq!(status.last_success, None, "a mismatch is not a success");
    let accepted = rig.emu.accepted_events();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].quantity, 3.0, "first write wins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_07_throttled_then_accepted() {
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:30", "4").await;
    rig.emu.fail_next(Route::BatchUsageEvent, 1, 429, Some(30));

    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!(pass.outcomes.get("retry"), Some(&1), "{pass:?}");
    assert_eq!(rig.emu.request_count(Route::BatchUsageEvent), 1);
    let row = rig.row(A, API, t("09:00")).await;
    assert_eq!(row.outcome, "pending");
    assert!(
        row.last_error.as_deref().unwrap_or("").contains("429"),
        "{row:?}"
    );

    // Sooner than 30 s: nothing is sent.
    for at in ["10:05:10", "10:05:29"] {
        let pass = rig.pass_at(t(at)).await;
        assert_eq!((pass.calls, pass.sent), (0, 0), "{at}: {pass:?}");
    }
    assert_eq!(rig.emu.request_count(Route::BatchUsageEvent), 1);

    let pass = rig.pass_at(t("10:05:30")).await;
    assert_eq!(pass.outcomes.get("accepted"), Some(&1), "{pass:?}");
    assert_eq!(rig.emu.request_count(Route::BatchUsageEvent), 2);
    let body: String = rig
        .journal
        .read(|c| Ok(c.query_row("SELECT body FROM outbound_events", [], |r| r.get(0))?))
        .await
        .unwrap();
    let received = rig.emu.received_events();
    // The throttled call never reached the handler; the accepted one carries the frozen body byte for byte.
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].event,
        serde_json::from_str::<Value>(&body).unwrap()
    );
    assert_eq!(received[0].event, expected_event(A, API, "09:00", "4"));
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "accepted");
}

/// Passes every 30 minutes from `from` while before `until`.
async fn passes_every_half_hour(rig: &Rig, from: DateTime<Utc>, until: DateTime<Utc>) -> usize {
    let mut at = from;
    let mut n = 0;
    while at < until {
        rig.pass_at(at).await;
        at += Duration::minutes(30);
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_08_outage_past_the_window() {
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:05", "2.5").await;
    rig.record_now(A, API, "09:40", "1.5").await;
    // The marketplace answers 503 to every usage call from 09:10 until 09:10 the next day. The subscription list
    // stays up: were it down too, the event would never be sent (deferred) and the outcome at 08:45 the same.
    rig.clock.set(t("09:10"));
    rig.emu.fail_next(Route::BatchUsageEvent, 10_000, 503, None);

    passes_every_half_hour(&rig, t("10:05"), next_day("08:44")).await;
    let tries = rig.emu.request_count(Route::BatchUsageEvent);
    assert!(tries >= 10, "retried through the outage: {tries}");
    let pass = rig.pass_at(next_day("08:44:59")).await;
    assert!(pass.expired.is_empty());
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "pending");

    // 24 h minus the 15 min margin: retries stop, the 4 units move into the open hour.
    let pass = rig.pass_at(next_day("08:45")).await;
    assert_eq!(pass.expired.len(), 1, "{pass:?}");
    assert_eq!(pass.expired[0].state, "expired");
    assert_eq!(pass.expired[0].hour, "2026-03-10T09:00:00Z");
    let old = rig.row(A, API, t("09:00")).await;
    assert_eq!(old.outcome, "carried");
    assert_eq!(old.carried_to.as_deref(), Some("2026-03-11T08:00:00Z"));
    let open = rig.row(A, API, next_day("08:00")).await;
    assert_eq!(open.quantity, "4");
    assert_eq!(open.carried_in_micros, 4_000_000);
    assert_eq!(open.outcome, "open");
    let carries = rig.carries().await;
    assert_eq!(carries.len(), 1);
    assert_eq!(
        (
            carries[0].from_hour.as_str(),
            carries[0].to_hour.as_str(),
            carries[0].reason.as_str()
        ),
        ("2026-03-10T09:00:00Z", "2026-03-11T08:00:00Z", "expired")
    );
    assert_eq!(rig.status().await.outcomes.get("carried"), Some(&1));
    assert!(rig.emu.accepted_events().is_empty());

    // The outage ends; the carried units go out with the 08:00 hour.
    rig.emu.clear_faults();
    let pass = rig.pass_at(next_day("09:10")).await;
    assert_eq!(pass.outcomes.get("accepted"), Some(&1), "{pass:?}");
    let accepted = rig.emu.accepted_events();
    assert_eq!(accepted.len(), 1);
    assert_eq!(
        (
            accepted[0].effective_start_time.as_str(),
            accepted[0].quantity
        ),
        ("2026-03-11T08:00:00Z", 4.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_08_outage_after_an_ambiguous_attempt_is_expired_unconfirmed() {
    let rig = Rig::with(
        t("09:00"),
        "",
        "timeout = \"1s\"",
        "",
        EmulatorConfig::default(),
    )
    .await;
    rig.record_now(A, API, "09:05", "2.5").await;
    rig.record_now(A, API, "09:40", "1.5").await;
    rig.clock.set(t("09:10"));
    // 503, then one attempt that the marketplace records but answers after meterd's 1 s timeout, then 503s.
    rig.emu.fail_next(Route::BatchUsageEvent, 1, 503, None);
    rig.emu.delay_next(
        Route::BatchUsageEvent,
        1,
        std::time::Duration::from_millis(1500),
        Phase::After,
    );
    rig.emu.fail_next(Route::BatchUsageEvent, 10_000, 503, None);

    passes_every_half_hour(&rig, t("10:05"), next_day("08:45")).await;
    assert!(rig.emu.request_count(Route::BatchUsageEvent) >= 3);
    let ambiguous: i64 = rig
        .journal
        .read(|c| Ok(c.query_row("SELECT ambiguous FROM outbound_events", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(ambiguous, 1, "the timed-out attempt is remembered");

    let pass = rig.pass_at(next_day("08:45")).await;
    assert_eq!(pass.expired.len(), 1, "{pass:?}");
    assert_eq!(pass.expired[0].state, "expired_unconfirmed");
    let row = rig.row(A, API, t("09:00")).await;
    assert_eq!(row.outcome, "expired_unconfirmed");
    assert_eq!(row.carried_to, None);
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("reconcile"),
        "{row:?}"
    );
    assert!(rig.carries().await.is_empty(), "nothing carried");
    assert_eq!(rig.report().await.len(), 1, "no row in the open hour");
    assert_eq!(
        rig.status().await.outcomes.get("expired_unconfirmed"),
        Some(&1)
    );
    // Carrying would have billed twice: the marketplace did record the timed-out attempt.
    assert_eq!(rig.emu.accepted_events().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_09_cancellation() {
    let rig = Rig::new("09:00").await;
    rig.record_now(A, API, "09:30", "1").await;
    rig.record_now(A, API, "10:30", "2").await;
    rig.record_now(A, API, "11:30", "3").await;

    // 10:05: A is Subscribed.
    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!(pass.outcomes.get("accepted"), Some(&1), "{pass:?}");
    let lists = rig.emu.request_count(Route::Subscriptions);
    assert!(lists >= 1);

    // 11:05: A has been cancelled; meterd first sees it now (the list cached at 10:05 is an hour old).
    rig.clock.set(t("11:05"));
    assert!(rig.emu.set_status(A, SubscriptionStatus::Unsubscribed));
    let pass = rig.pass_at(t("11:05")).await;
    assert!(
        rig.emu.request_count(Route::Subscriptions) > lists,
        "refreshed"
    );
    assert_eq!(pass.outcomes.get("accepted"), Some(&1), "{pass:?}");
    let seen: Option<i64> = rig
        .journal
        .read(move |c| {
            Ok(c.query_row(
                "SELECT unsubscribed_seen_at FROM subscriptions WHERE id = ?1",
                [A],
                |r| r.get(0),
            )?)
        })
        .await
        .unwrap();
    assert_eq!(seen, Some(t("11:05").timestamp()));
    assert_eq!(rig.row(A, API, t("10:00")).await.outcome, "accepted");

    // 12:05: the 11:00 hour closed after the cancellation was seen.
    let pass = rig.pass_at(t("12:05")).await;
    assert_eq!(pass.calls, 0, "{pass:?}");
    assert_eq!(pass.outcomes.get("skipped_unsubscribed"), Some(&1));
    let row = rig.row(A, API, t("11:00")).await;
    assert_eq!(
        (row.outcome.as_str(), row.quantity.as_str()),
        ("skipped_unsubscribed", "3")
    );

    let accepted: Vec<_> = rig.emu.accepted_events().iter().map(accepted_key).collect();
    assert_eq!(
        accepted,
        vec![
            (
                A.to_string(),
                API.to_string(),
                "2026-03-10T09:00:00Z".to_string()
            ),
            (
                A.to_string(),
                API.to_string(),
                "2026-03-10T10:00:00Z".to_string()
            ),
        ]
    );
    assert_eq!(
        rig.status().await.outcomes.get("skipped_unsubscribed"),
        Some(&1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_10_not_yet_activated() {
    let rig = Rig::new("09:00").await;
    assert!(
        rig.emu
            .set_status(B, SubscriptionStatus::PendingFulfillmentStart)
    );
    rig.record_now(B, API, "09:00", "2").await;

    let mut lists = rig.emu.request_count(Route::Subscriptions);
    for h in 10..=14 {
        let pass = rig.pass_at(t(&format!("{h}:05"))).await;
        assert_eq!(pass.outcomes.get("held"), Some(&1), "{h}:05 {pass:?}");
        assert_eq!(pass.calls, 0);
        let now = rig.emu.request_count(Route::Subscriptions);
        assert!(now > lists, "{h}:05 re-checks the subscription");
        lists = now;
    }
    let row = rig.row(B, API, t("09:00")).await;
    assert_eq!(row.outcome, "pending");
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("PendingFulfillmentStart"),
        "{row:?}"
    );

    rig.clock.set(t("15:00"));
    assert!(rig.emu.set_status(B, SubscriptionStatus::Subscribed));
    let pass = rig.pass_at(t("15:05")).await;
    assert_eq!(pass.outcomes.get("accepted"), Some(&1), "{pass:?}");
    assert_eq!(
        rig.calls(),
        vec![vec![expected_event(B, API, "09:00", "2")]]
    );
    assert_eq!(rig.row(B, API, t("09:00")).await.outcome, "accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_10_never_activated_is_not_active() {
    let rig = Rig::new("09:00").await;
    assert!(
        rig.emu
            .set_status(B, SubscriptionStatus::PendingFulfillmentStart)
    );
    rig.record_now(B, API, "09:00", "2").await;
    let mut at = t("10:05");
    while at < next_day("08:45") {
        let pass = rig.pass_at(at).await;
        assert_eq!(pass.outcomes.get("held"), Some(&1), "{at}: {pass:?}");
        at += Duration::hours(1);
    }
    let pass = rig.pass_at(next_day("08:45")).await;
    assert_eq!(pass.expired.len(), 1, "{pass:?}");
    assert_eq!(pass.expired[0].state, "not_active");
    let row = rig.row(B, API, t("09:00")).await;
    assert_eq!(
        (row.outcome.as_str(), row.quantity.as_str()),
        ("not_active", "2")
    );
    assert!(rig.carries().await.is_empty());
    assert_eq!(rig.status().await.outcomes.get("not_active"), Some(&1));
    assert_eq!(rig.emu.request_count(Route::BatchUsageEvent), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_11_more_than_25() {
    let rig = Rig::with(
        t("09:00"),
        "",
        "",
        "concurrency = 1",
        EmulatorConfig::default(),
    )
    .await;
    let subs: Vec<String> = (0..30)
        .map(|i| format!("{i:08x}-aaaa-4aaa-8aaa-{i:012x}"))
        .collect();
    for s in &subs {
        rig.emu
            .add_subscription(Subscription::new(s.clone(), "gold"));
    }
    let records: Vec<NewRecord> = subs
        .iter()
        .flat_map(|s| [API, GB].map(|d| record(s, d, t("09:30"), "1")))
        .collect();
    rig.ingest(t("09:30"), records).await;

    // The order meterd sends in: oldest hour, then resource, then dimension.
    let order: Vec<(String, String)> = subs
        .iter()
        .flat_map(|s| [API, GB].map(|d| (s.clone(), d.to_string())))
        .collect();
    let keys = |events: &[Value]| -> BTreeSet<(String, String)> {
        events
            .iter()
            .map(|e| {
                (
                    e["resourceId"].as_str().unwrap().to_string(),
                    e["dimension"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let expected = |range: std::ops::Range<usize>| -> BTreeSet<(String, String)> {
        order[range].iter().cloned().collect()
    };

    // The second call fails (the first call consumes a harmless zero delay).
    rig.emu.delay_next(
        Route::BatchUsageEvent,
        1,
        std::time::Duration::ZERO,
        Phase::Before,
    );
    rig.emu.fail_next(Route::BatchUsageEvent, 1, 503, None);
    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!(
        (pass.frozen, pass.calls, pass.sent),
        (60, 3, 60),
        "{pass:?}"
    );
    assert_eq!(pass.outcomes.get("accepted"), Some(&35), "{pass:?}");
    assert_eq!(pass.outcomes.get("retry"), Some(&25), "{pass:?}");
    assert_eq!(rig.emu.request_count(Route::BatchUsageEvent), 3);
    let calls = rig.calls();
    assert_eq!(
        calls.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![25, 10],
        "25, (25 refused with 503), 10"
    );
    assert_eq!(keys(&calls[0]), expected(0..25));
    assert_eq!(keys(&calls[1]), expected(50..60));

    // Only the failed call's 25 are retried, in one call.
    let pass = rig.pass_at(t("10:10")).await;
    assert_eq!((pass.calls, pass.sent), (1, 25), "{pass:?}");
    assert_eq!(pass.outcomes.get("accepted"), Some(&25));
    let calls = rig.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(keys(&calls[2]), expected(25..50));
    assert_eq!(rig.emu.accepted_events().len(), 60);
    assert_eq!(rig.status().await.outcomes.get("accepted"), Some(&60));

    // A batch answered with 24 Accepted and 1 Error: only that one is retried.
    let records: Vec<NewRecord> = subs[..25]
        .iter()
        .map(|s| record(s, API, t("10:30"), "2"))
        .collect();
    rig.ingest(t("10:30"), records).await;
    rig.emu.fail_next_events(1);
    let pass = rig.pass_at(t("11:05")).await;
    assert_eq!((pass.calls, pass.sent), (1, 25), "{pass:?}");
    assert_eq!(pass.outcomes.get("accepted"), Some(&24), "{pass:?}");
    assert_eq!(pass.outcomes.get("retry"), Some(&1), "{pass:?}");
    let errored: Vec<_> = rig
        .emu
        .received_events()
        .into_iter()
        .filter(|r| r.status == "Error")
        .collect();
    assert_eq!(errored.len(), 1);

    let pass = rig.pass_at(t("11:10")).await;
    assert_eq!((pass.calls, pass.sent), (1, 1), "{pass:?}");
    assert_eq!(pass.outcomes.get("accepted"), Some(&1));
    let calls = rig.calls();
    assert_eq!(calls.last().unwrap(), &vec![errored[0].event.clone()]);
    assert_eq!(rig.emu.accepted_events().len(), 85);
    assert_eq!(rig.status().await.outcomes.get("accepted"), Some(&85));
}

/// A pass reads due events in pages of 500. Events settled without a call (here 10 held: their subscriptions
/// wait for activation) leave a page
/// with a number of sendable events that is not a multiple of 25; the remainder waits for the next page, so only
/// the pass's last call is short: 500 events to send take 20 calls, not 21 (20 for the first page's 490, one for
/// the second page's 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_sends_whole_batches_across_its_pages() {
    let rig = Rig::with(
        t("09:00"),
        "",
        "",
        "concurrency = 2",
        EmulatorConfig::default(),
    )
    .await;
    let subs: Vec<String> = (0..510)
        .map(|i| format!("{i:08x}-aaaa-4aaa-8aaa-{i:012x}"))
        .collect();
    for (i, s) in subs.iter().enumerate() {
        let mut sub = Subscription::new(s.clone(), "gold");
        if i < 10 {
            // The first page's first ten (events are sent in resource order within an hour).
            sub.saas_subscription_status = SubscriptionStatus::PendingFulfillmentStart;
        }
        rig.emu.add_subscription(sub);
    }
    let records: Vec<NewRecord> = subs
        .iter()
        .map(|s| record(s, API, t("09:30"), "1"))
        .collect();
    rig.ingest(t("09:30"), records).await;

    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!(pass.frozen, 510, "{pass:?}");
    assert_eq!(pass.outcomes.get("held"), Some(&10), "{pass:?}");
    assert_eq!(pass.outcomes.get("accepted"), Some(&500), "{pass:?}");
    assert_eq!((pass.calls, pass.sent), (20, 500), "{pass:?}");
    let sizes: Vec<usize> = rig.calls().iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&n| n == 25), "call sizes {sizes:?}");
    assert_eq!(rig.emu.accepted_events().len(), 500);
}

// ---------------------------------------------------------------------------------------------------------------
// Invariant 6, "nothing vanishes", over random histories.

mod nothing_vanishes {
    use super::*;
    use proptest::prelude::*;

    /// One record of a random ingest request.
    #[derive(Debug, Clone)]
    struct Rec {
        resource_b: bool,
        gb: bool,
        /// Stamped this many minutes before the clock (late ones land in frozen hours).
        minutes_back: i64,
        /// At most six decimals.
        micros: i64,
        /// Idempotency key from a small pool, so that some repeat.
        key: Option<u8>,
    }

    #[derive(Debug, Clone)]
    enum Fault {
        Fail { status: u16, times: u32 },
        EventErrors(u32),
        Drop(Phase),
        SubscriptionsDown(u32),
    }

    #[derive(Debug, Clone)]
    enum Step {
        Ingest(Vec<Rec>),
        Pass,
        /// Minutes; negative moves the clock back.
        Advance(i64),
        Fault(Fault),
    }

    fn rec() -> impl Strategy<Value = Rec> {
        (
            any::<bool>(),
            any::<bool>(),
            prop_oneof![6 => 0i64..60, 3 => 60i64..240, 1 => 240i64..1800],
            1i64..=50_000_000,
            prop::option::weighted(0.5, 0u8..8),
        )
            .prop_map(|(resource_b, gb, minutes_back, micros, key)| Rec {
                resource_b,
                gb,
                minutes_back,
                micros,
                key,
            })
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            (prop::sample::select(vec![429u16, 500, 503]), 1u32..8)
                .prop_map(|(status, times)| Fault::Fail { status, times }),
            (1u32..3).prop_map(Fault::EventErrors),
            prop::sample::select(vec![Phase::Before, Phase::After]).prop_map(Fault::Drop),
            (1u32..3).prop_map(Fault::SubscriptionsDown),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => prop::collection::vec(rec(), 1..6).prop_map(Step::Ingest),
            2 => Just(Step::Pass),
            3 => (1i64..150).prop_map(Step::Advance),
            1 => (600i64..1500).prop_map(Step::Advance),
            2 => fault().prop_map(Step::Fault),
        ]
    }

    /// Steps with one backwards clock step inserted somewhere.
    fn history() -> impl Strategy<Value = Vec<Step>> {
        (
            prop::collection::vec(step(), 4..24),
            any::<prop::sample::Index>(),
            1i64..90,
        )
            .prop_map(|(mut steps, at, back)| {
                let i = at.index(steps.len() + 1);
                steps.insert(i, Step::Advance(-back));
                steps
            })
    }

    const FINAL: &[&str] = &[
        "accepted",
        "duplicate",
        "duplicate_mismatch",
        "expired",
        "expired_unconfirmed",
        "rejected",
        "skipped_unsubscribed",
        "not_active",
        "carried",
    ];

    async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
        let rig = Rig::new("09:00").await;
        let mut now = t("09:00");
        let mut seen_keys: BTreeSet<String> = BTreeSet::new();
        let mut expected: i64 = 0;
        for step in steps {
            match step {
                Step::Ingest(recs) => {
                    let records: Vec<NewRecord> = recs
                        .iter()
                        .map(|r| NewRecord {
                            resource: if r.resource_b { B } else { A }.to_string(),
                            plan: None,
                            dimension: if r.gb { GB } else { API }.to_string(),
                            time: now - Duration::minutes(r.minutes_back),
                            quantity: Micros(r.micros),
                            key: r.key.map(|k| format!("k{k}")),
                        })
                        .collect();
                    for r in &records {
                        if r.key.as_ref().is_none_or(|k| seen_keys.insert(k.clone())) {
                            expected += r.quantity.0;
                        }
                    }
                    rig.ingest(now, records).await;
                }
                Step::Pass => {
                    rig.pass_at(now).await;
                }
                Step::Advance(minutes) => {
                    now += Duration::minutes(minutes);
                    rig.clock.set(now);
                }
                Step::Fault(Fault::Fail { status, times }) => {
                    let retry_after = (status == 429).then_some(30);
                    rig.emu
                        .fail_next(Route::BatchUsageEvent, times, status, retry_after);
                }
                Step::Fault(Fault::EventErrors(n)) => rig.emu.fail_next_events(n),
                Step::Fault(Fault::Drop(phase)) => {
                    rig.emu.drop_next(Route::BatchUsageEvent, 1, phase)
                }
                Step::Fault(Fault::SubscriptionsDown(n)) => {
                    rig.emu.fail_next(Route::Subscriptions, n, 503, None)
                }
            }
        }
        // The marketplace recovers; hours pass until every hour has a final outcome.
        rig.emu.clear_faults();
        let mut settled = false;
        for _ in 0..40 {
            now += Duration::hours(1);
            rig.pass_at(now).await;
            if rig
                .report()
                .await
                .iter()
                .all(|r| FINAL.contains(&r.outcome.as_str()))
            {
                settled = true;
                break;
            }
        }
        let report = rig.report().await;
        prop_assert!(settled, "not settled: {report:#?}");
        let mut by_outcome: BTreeMap<&str, i64> = BTreeMap::new();
        for r in &report {
            *by_outcome.entry(r.outcome.as_str()).or_default() += r.quantity_micros;
        }
        let total: i64 = report
            .iter()
            .filter(|r| r.outcome != "carried")
            .map(|r| r.quantity_micros)
            .sum();
        prop_assert_eq!(total, expected, "outcomes: {:?}", by_outcome);
        for bad in [
            "duplicate_mismatch",
            "rejected",
            "not_active",
            "skipped_unsubscribed",
        ] {
            prop_assert!(!by_outcome.contains_key(bad), "{bad}: {report:#?}");
        }

        // The marketplace holds at most one event per (resource, dimension, hour), with meterd's frozen quantity,
        // and only for events meterd counts as billed (or possibly billed).
        let frozen: BTreeMap<(String, String, String), (i64, String)> = rig
            .journal
            .read(|c| {
                let mut stmt = c.prepare(
                    "SELECT resource, dimension, hour, quantity, state FROM outbound_events",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        (
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            usage::fmt_time(r.get(2)?),
                        ),
                        (r.get::<_, i64>(3)?, r.get::<_, String>(4)?),
                    ))
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        let mut keys = BTreeSet::new();
        for e in rig.emu.accepted_events() {
            let key = accepted_key(&e);
            prop_assert!(keys.insert(key.clone()), "two accepted events for {key:?}");
            let Some((qty, state)) = frozen.get(&key) else {
                return Err(TestCaseError::fail(format!(
                    "accepted {key:?} unknown to meterd"
                )));
            };
            prop_assert_eq!((e.quantity * 1e6).round() as i64, *qty, "{:?}", key);
            prop_assert!(
                ["accepted", "duplicate", "expired_unconfirmed"].contains(&state.as_str()),
                "{key:?} is {state} in the journal but billed"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 32,
            max_shrink_iters: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn nothing_vanishes(steps in history()) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(steps))?;
        }
    }
}
