//! Late usage in its own hour, per-key freezing, the sendable limit and resource letter case, in process.
//!
//! The shared in-process rig ([`common::rig`]): a journal in a temporary directory, an emitter against an
//! in-process emulator, and one `ManualClock` shared by both, so hours pass by `clock.set(..)`. UTC on 2026-03-10,
//! grace 5 minutes, safety margin 15 minutes, `emit.min_send_time` 1 hour (the defaults), resource A Subscribed on
//! plan `gold`.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::rig::{Rig, next_day, record, t};
use meterd::emulator::{EmulatorConfig, ManagedApp, ResultOrder, SubscriptionStatus};
use meterd::journal::usage::{self, IngestOutcome, NewRecord};
use meterd::quantity::Micros;

const A: &str = "11111111-1111-4111-8111-111111111111";
const API: &str = "api_calls";
const GB: &str = "gb_processed";
const APP: &str = "/subscriptions/aaaa0000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Solutions/applications/app1";

/// What these tests add to the shared rig.
impl Rig {
    async fn new(start: DateTime<Utc>, top: &str, emu_config: EmulatorConfig) -> Rig {
        Rig::at(start).top(top).emulator(emu_config).start().await
    }

    /// Accepted events as (resource, dimension, hour, quantity), in acceptance order.
    fn accepted(&self) -> Vec<(String, String, String, f64)> {
        self.emu
            .accepted_events()
            .iter()
            .map(|e| {
                (
                    e.resource_id
                        .clone()
                        .or_else(|| e.resource_uri.clone())
                        .unwrap_or_default(),
                    e.dimension.clone(),
                    e.effective_start_time.clone(),
                    e.quantity,
                )
            })
            .collect()
    }
}

fn hour_text(s: &str) -> String {
    usage::fmt_time(t(s).timestamp())
}

// ---------------------------------------------------------------------------------------------------------------

/// A daemon started at 12:00 (its startup pass finds nothing) receives usage for 07:00-10:00 (2-5 hours ago): each
/// key is sent in its own hour with its exact sum; nothing is re-dated into the open hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_daemon_receives_usage_for_hours_ago() {
    let rig = Rig::new(t("12:00"), "", EmulatorConfig::default()).await;
    let startup = rig.pass_at(t("12:00")).await;
    assert_eq!(startup.frozen, 0);
    let mut records = Vec::new();
    for (i, h) in ["07", "08", "09", "10"].iter().enumerate() {
        records.push(record(A, API, t(&format!("{h}:10")), "1.5"));
        records.push(record(A, API, t(&format!("{h}:50")), &format!("{}", i + 1)));
        records.push(record(A, GB, t(&format!("{h}:30")), "0.25"));
    }
    let outcome = rig.ingest(t("12:01"), records).await;
    assert_eq!(
        outcome,
        IngestOutcome {
            accepted: 12,
            duplicates: 0,
            carried: 0
        }
    );
    assert!(rig.carries().await.is_empty());
    let pass = rig.pass_at(t("12:02")).await;
    assert_eq!(pass.frozen, 8, "{pass:?}");
    let mut accepted = rig.accepted();
    accepted.sort_by(|a, b| (&a.2, &a.1).cmp(&(&b.2, &b.1)));
    let mut expected = Vec::new();
    for (i, h) in ["07", "08", "09", "10"].iter().enumerate() {
        let hour = hour_text(&format!("{h}:00"));
        expected.push((
            A.to_string(),
            API.to_string(),
            hour.clone(),
            1.5 + (i + 1) as f64,
        ));
        expected.push((A.to_string(), GB.to_string(), hour, 0.25));
    }
    expected.sort_by(|a, b| (&a.2, &a.1).cmp(&(&b.2, &b.1)));
    assert_eq!(accepted, expected);
    // Nothing in the open hour.
    assert!(
        rig.report().await.iter().all(|r| r.outcome == "accepted"),
        "{:#?}",
        rig.report().await
    );
}

/// Usage of 10:20 arrives at 11:30, after A was cancelled at 11:10 (and after a pass at 11:05 froze the hours
/// closed then). No event exists for A/api_calls/10:00, so it is billed in 10:00 (an hour that closed before the
/// cancellation), not re-dated into 11:00, which would be `skipped_unsubscribed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_before_a_cancellation_arriving_late_is_billed_in_its_own_hour() {
    let rig = Rig::new(t("09:00"), "", EmulatorConfig::default()).await;
    rig.ingest(t("09:30"), vec![record(A, API, t("09:30"), "4")])
        .await;
    rig.pass_at(t("10:05")).await;
    rig.pass_at(t("11:05")).await;
    rig.clock.set(t("11:10"));
    assert!(rig.emu.set_status(A, SubscriptionStatus::Unsubscribed));
    let outcome = rig
        .ingest(t("11:30"), vec![record(A, API, t("10:20"), "2.5")])
        .await;
    assert_eq!(outcome.carried, 0, "{outcome:?}");
    let pass = rig.pass_at(t("11:35")).await;
    assert_eq!(pass.outcomes.get("accepted"), Some(&1), "{pass:?}");
    let row = rig.row(A, API, t("10:00")).await;
    assert_eq!(
        (row.quantity.as_str(), row.outcome.as_str()),
        ("2.5", "accepted")
    );
    rig.pass_at(t("12:05")).await;
    assert_eq!(
        rig.accepted(),
        vec![
            (A.into(), API.into(), hour_text("09:00"), 4.0),
            (A.into(), API.into(), hour_text("10:00"), 2.5)
        ]
    );
    assert!(rig.carries().await.is_empty());
    assert!(
        rig.report()
            .await
            .iter()
            .all(|r| r.outcome != "skipped_unsubscribed"),
        "{:#?}",
        rig.report().await
    );
}

/// Usage for 09:00 whose key has no event yet: at 07:40 next day (before 09:00 + 24h - 15m - 1h = 07:45) it
/// still goes into 09:00 and is sent; at 07:45 and later it is late: carried into the open hour (and refused
/// under `reject`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_sendable_limit_is_carried() {
    let rig = Rig::new(t("09:00"), "", EmulatorConfig::default()).await;
    let inside = rig
        .ingest(next_day("07:40"), vec![record(A, GB, t("09:30"), "3")])
        .await;
    assert_eq!(inside.carried, 0);
    let late = rig
        .ingest(next_day("07:45"), vec![record(A, API, t("09:30"), "2")])
        .await;
    assert_eq!(late.carried, 1);
    let carries = rig.carries().await;
    assert_eq!(carries.len(), 1, "{carries:?}");
    assert_eq!(
        (
            carries[0].dimension.as_str(),
            carries[0].from_hour.as_str(),
            carries[0].to_hour.as_str(),
            carries[0].quantity.as_str(),
            carries[0].reason.as_str()
        ),
        (
            API,
            hour_text("09:00").as_str(),
            usage::fmt_time(next_day("07:00").timestamp()).as_str(),
            "2",
            "late"
        )
    );
    rig.pass_at(next_day("07:46")).await;
    assert_eq!(rig.row(A, GB, t("09:00")).await.outcome, "accepted");
    let carried = rig.row(A, API, next_day("07:00")).await;
    assert_eq!(
        (carried.quantity.as_str(), carried.carried_in_micros),
        ("2", 2_000_000)
    );
    rig.pass_at(next_day("08:05")).await;
    assert_eq!(
        rig.accepted(),
        vec![
            (A.into(), GB.into(), hour_text("09:00"), 3.0),
            (
                A.into(),
                API.into(),
                usage::fmt_time(next_day("07:00").timestamp()),
                2.0
            )
        ]
    );

    // Under reject: 422 (nothing stored) with a message naming the limit.
    let rig = Rig::new(
        t("09:00"),
        "late_usage = \"reject\"",
        EmulatorConfig::default(),
    )
    .await;
    let refused = rig
        .try_ingest(next_day("07:45"), vec![record(A, API, t("09:30"), "2")])
        .await
        .unwrap_err();
    assert!(
        refused[0].message.contains("can no longer be sent")
            && refused[0].message.contains("emit.min_send_time"),
        "{refused:?}"
    );
    assert!(rig.report().await.is_empty());
}

/// One key of 09:00 is frozen (and sent), another has no event: late usage of the frozen key is carried, late
/// usage of the other goes into 09:00 and is sent by the next pass as its own event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_of_a_frozen_key_is_carried_while_another_key_of_that_hour_goes_into_it() {
    let rig = Rig::new(t("09:00"), "", EmulatorConfig::default()).await;
    rig.ingest(t("09:05"), vec![record(A, API, t("09:05"), "4")])
        .await;
    rig.pass_at(t("10:05")).await;
    let outcome = rig
        .ingest(
            t("10:20"),
            vec![
                record(A, API, t("09:30"), "1"),
                record(A, GB, t("09:30"), "7"),
            ],
        )
        .await;
    assert_eq!(outcome.carried, 1);
    assert_eq!(rig.row(A, GB, t("09:00")).await.outcome, "closed");
    let pass = rig.pass_at(t("10:21")).await;
    assert_eq!(pass.frozen, 1, "{pass:?}");
    assert_eq!(rig.row(A, API, t("09:00")).await.quantity, "4");
    assert_eq!(rig.row(A, GB, t("09:00")).await.outcome, "accepted");
    rig.pass_at(t("11:05")).await;
    assert_eq!(
        rig.accepted(),
        vec![
            (A.into(), API.into(), hour_text("09:00"), 4.0),
            (A.into(), GB.into(), hour_text("09:00"), 7.0),
            (A.into(), API.into(), hour_text("10:00"), 1.0),
        ]
    );
    let carries = rig.carries().await;
    assert_eq!(carries.len(), 1, "{carries:?}");
    assert_eq!(
        (carries[0].from_hour.as_str(), carries[0].to_hour.as_str()),
        (hour_text("09:00").as_str(), hour_text("10:00").as_str())
    );
}

/// Totals nobody froze because the daemon was down: the first pass after it freezes and sends those still in
/// their window, and those past it expire and are carried into the open hour. Nothing vanishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_nobody_froze_while_the_daemon_was_down_are_sent_or_carried() {
    let rig = Rig::new(t("09:00"), "", EmulatorConfig::default()).await;
    rig.ingest(t("09:30"), vec![record(A, API, t("09:30"), "1")])
        .await;
    rig.ingest(t("10:30"), vec![record(A, API, t("10:30"), "2")])
        .await;
    // Down until 09:50 next day: the windows of 09:00 and 10:00 ended at 08:45 and 09:45, so they expire and are
    // carried; 11:00 (window until 10:45) is sent.
    rig.ingest(t("11:10"), vec![record(A, GB, t("11:10"), "5")])
        .await;
    let pass = rig.pass_at(next_day("09:50")).await;
    assert_eq!(pass.frozen, 3, "{pass:?}");
    assert_eq!(rig.row(A, GB, t("11:00")).await.outcome, "accepted");
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "carried");
    assert_eq!(rig.row(A, API, t("10:00")).await.outcome, "carried");
    let open = rig.row(A, API, next_day("09:00")).await;
    assert_eq!(
        (open.quantity.as_str(), open.carried_in_micros),
        ("3", 3_000_000)
    );
    rig.pass_at(next_day("10:05")).await;
    let total: f64 = rig.accepted().iter().map(|a| a.3).sum();
    assert_eq!(total, 8.0);
}

/// A record racing with the freeze of its key is in the frozen quantity or carried, never both, never neither:
/// many ingest jobs for A/api_calls/09:00 and one freeze job are queued at once; afterwards the frozen quantity
/// is exactly what was stored in 09:00 before the freeze, the carried quantity exactly the rest, and together
/// they are what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_racing_with_the_freeze_of_its_key_is_frozen_or_carried_exactly_once() {
    let rig = Rig::new(t("10:10"), "", EmulatorConfig::default()).await;
    let now = t("10:10");
    let mut tasks = Vec::new();
    let jobs = 200i64;
    for i in 0..jobs {
        let journal = rig.journal.clone();
        let rules = rig.rules(now);
        if i == jobs / 2 {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                journal
                    .write(move |c| {
                        meterd::journal::outbound::freeze(
                            c,
                            now,
                            Duration::minutes(5),
                            Duration::minutes(15),
                        )
                        .map(|_| 0)
                    })
                    .await
                    .unwrap()
            }));
        }
        tasks.push(tokio::spawn(async move {
            // Distinct quantities (i + 1 micro-units): a record counted twice or not at all changes the sums.
            let rec = vec![NewRecord {
                resource: A.into(),
                plan: None,
                dimension: API.into(),
                time: t("09:30"),
                quantity: Micros(i + 1),
                key: Some(format!("k{i}")),
            }];
            let out = journal
                .write(move |c| usage::ingest(c, &rec, &rules))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(out.accepted, 1);
            i + 1
        }));
    }
    let mut acknowledged = 0i64;
    for task in tasks {
        acknowledged += task.await.unwrap();
    }
    assert_eq!(acknowledged, jobs * (jobs + 1) / 2);
    let (frozen, in_nine, carried_rows, carried_total): (i64, i64, i64, i64) = rig
        .journal
        .read(move |c| {
            let frozen: i64 = c.query_row(
                "SELECT COALESCE(SUM(quantity), 0) FROM outbound_events WHERE resource = ?1 AND hour = ?2",
                rusqlite::params![A, t("09:00").timestamp()],
                |r| r.get(0),
            )?;
            let in_nine: i64 = c.query_row(
                "SELECT COALESCE(SUM(quantity), 0) FROM usage_records WHERE hour = ?1",
                [t("09:00").timestamp()],
                |r| r.get(0),
            )?;
            let carried_rows: i64 = c.query_row(
                "SELECT COALESCE(SUM(quantity), 0) FROM usage_records WHERE hour = ?1 AND origin_hour = ?2",
                [t("10:00").timestamp(), t("09:00").timestamp()],
                |r| r.get(0),
            )?;
            let carried_total: i64 = c.query_row(
                "SELECT COALESCE(SUM(quantity), 0) FROM carries WHERE from_hour = ?1",
                [t("09:00").timestamp()],
                |r| r.get(0),
            )?;
            Ok((frozen, in_nine, carried_rows, carried_total))
        })
        .await
        .unwrap();
    assert_eq!(frozen, in_nine, "the frozen quantity is what 09:00 held");
    assert_eq!(
        carried_rows, carried_total,
        "every carried record has its carry"
    );
    assert_eq!(
        frozen + carried_total,
        acknowledged,
        "frozen + carried == acknowledged"
    );
    // Whatever the interleaving, later usage of the key is carried.
    let out = rig.ingest(now, vec![record(A, API, t("09:40"), "1")]).await;
    assert_eq!(out.carried, 1);
}

/// Defect 6: one managed application URI in two letter cases is one key: one event, accepted with the sum, sent
/// with the first spelling; results that come back in another order (and case) still match their events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_casings_of_a_managed_app_uri_are_one_event_accepted_with_the_sum() {
    let emu_config = EmulatorConfig {
        result_order: ResultOrder::Reversed,
        managed_apps: vec![ManagedApp {
            resource_uri: APP.to_string(),
            resource_usage_id: None,
            offer_id: "emulator-offer".into(),
        }],
        ..EmulatorConfig::default()
    };
    let rig = Rig::new(t("09:00"), "default_plan = \"gold\"", emu_config).await;
    let upper = APP
        .to_ascii_uppercase()
        .replace("/SUBSCRIPTIONS/", "/subscriptions/");
    let lower = APP.to_ascii_lowercase();
    rig.ingest(t("09:10"), vec![record(APP, API, t("09:10"), "1.5")])
        .await;
    rig.ingest(
        t("09:20"),
        vec![
            record(&upper, API, t("09:20"), "2"),
            record(A, API, t("09:20"), "9"),
        ],
    )
    .await;
    // GUIDs fold the same way (ingest's validation lower-cases them; the journal does not rely on it).
    rig.ingest(
        t("09:30"),
        vec![
            record(&lower, API, t("09:30"), "0.5"),
            record(&A.to_ascii_uppercase(), API, t("09:30"), "1"),
        ],
    )
    .await;
    let report = rig.report().await;
    assert_eq!(report.len(), 2, "{report:#?}");
    let pass = rig.pass_at(t("10:05")).await;
    assert_eq!(pass.outcomes.get("accepted"), Some(&2), "{pass:?}");
    let app_row = rig.row(APP, API, t("09:00")).await;
    assert_eq!(
        (app_row.quantity.as_str(), app_row.outcome.as_str()),
        ("4", "accepted")
    );
    assert_eq!(rig.row(A, API, t("09:00")).await.quantity, "10");
    let mut accepted = rig.accepted();
    accepted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        accepted,
        vec![
            (APP.to_string(), API.into(), hour_text("09:00"), 4.0),
            (A.to_string(), API.into(), hour_text("09:00"), 10.0),
        ]
    );
    // Usage after the freeze in yet another casing is carried (its key is frozen), and a report filtered by any
    // spelling finds the resource.
    let out = rig
        .ingest(t("10:10"), vec![record(&lower, API, t("09:40"), "1")])
        .await;
    assert_eq!(out.carried, 1);
    let filtered = rig.report_for(Some(&upper)).await;
    assert_eq!(filtered.len(), 2, "{filtered:#?}");
    assert!(filtered.iter().all(|r| r.resource == APP));
    // Consumption and balance of the application are the same whichever spelling asks for them.
    let up2 = upper.clone();
    let (s1, s2, up1) = (rig.settings.clone(), rig.settings.clone(), upper.clone());
    let (by_first, by_other) = rig
        .journal
        .read(move |c| {
            let now = t("10:20");
            Ok((
                meterd::journal::billing::balance(c, &s1, APP, now)?,
                meterd::journal::billing::balance(c, &s2, &up1, now)?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(by_first, by_other);
    let (c1, c2) = rig
        .journal
        .read(move |c| {
            let (from, to) = (t("09:00").timestamp(), t("11:00").timestamp());
            Ok((
                meterd::journal::billing::consumption(c, APP, Some(API), from, to)?,
                meterd::journal::billing::consumption(c, &up2, Some(API), from, to)?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(c1.len(), 1, "{c1:?}");
    assert_eq!(c1[0].1, 5_000_000, "{c1:?}");
    assert_eq!(c1, c2);
}

/// Scenario 4b, backfill after an outage: passes ran every hour while the app was cut off from meterd (05:00 to
/// 09:50); at 09:50 it posts its buffered usage for 05:00-09:40. Every key from 05:00 to 08:00 gets one event in
/// its own hour on the next pass; 09:00 waits for 10:05 as usual. Nothing is carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_after_an_outage_is_sent_in_its_own_hours() {
    let rig = Rig::new(t("05:00"), "", EmulatorConfig::default()).await;
    for h in ["06:05", "07:05", "08:05", "09:05"] {
        rig.pass_at(t(h)).await;
    }
    let mut records = Vec::new();
    for h in ["05", "06", "07", "08", "09"] {
        records.push(record(A, API, t(&format!("{h}:20")), "1"));
        records.push(record(A, API, t(&format!("{h}:40")), "0.5"));
    }
    let outcome = rig.ingest(t("09:50"), records).await;
    assert_eq!(outcome.carried, 0, "{outcome:?}");
    let pass = rig.pass_at(t("09:51")).await;
    assert_eq!(pass.frozen, 4, "{pass:?}");
    assert_eq!(rig.row(A, API, t("09:00")).await.outcome, "open");
    rig.pass_at(t("10:05")).await;
    let expected: Vec<_> = ["05:00", "06:00", "07:00", "08:00", "09:00"]
        .iter()
        .map(|h| (A.to_string(), API.to_string(), hour_text(h), 1.5))
        .collect();
    assert_eq!(rig.accepted(), expected);
    assert!(rig.carries().await.is_empty());
}

/// The same race with a known order: 100 ingest jobs, the freeze job, then 100 more are handed to the writer
/// before any is answered (they share group commits). The writer serialises them in that order, so the first 100
/// records are exactly the frozen quantity and the last 100 exactly the carried one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_queued_before_the_freeze_of_their_key_are_frozen_and_after_it_carried() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};
    type Job = Pin<Box<dyn Future<Output = i64> + Send>>;
    let rig = Rig::new(t("10:10"), "", EmulatorConfig::default()).await;
    let now = t("10:10");
    let mut jobs: Vec<Job> = Vec::new();
    for i in 0..200i64 {
        if i == 100 {
            let journal = rig.journal.clone();
            jobs.push(Box::pin(async move {
                journal
                    .write(move |c| {
                        meterd::journal::outbound::freeze(
                            c,
                            now,
                            Duration::minutes(5),
                            Duration::minutes(15),
                        )
                        .map(|_| 0)
                    })
                    .await
                    .unwrap()
            }));
        }
        let journal = rig.journal.clone();
        let rules = rig.rules(now);
        jobs.push(Box::pin(async move {
            let rec = vec![NewRecord {
                resource: A.into(),
                plan: None,
                dimension: API.into(),
                time: t("09:30"),
                quantity: Micros(i + 1),
                key: None,
            }];
            let out = journal
                .write(move |c| usage::ingest(c, &rec, &rules))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(out.carried, usize::from(i >= 100), "record {i}");
            i + 1
        }));
    }
    // The first poll of each hands its job to the writer, in order.
    let mut cx = Context::from_waker(Waker::noop());
    let mut done = 0i64;
    let mut waiting = Vec::new();
    for mut job in jobs {
        match job.as_mut().poll(&mut cx) {
            Poll::Ready(q) => done += q,
            Poll::Pending => waiting.push(job),
        }
    }
    for job in waiting {
        done += job.await;
    }
    assert_eq!(done, 200 * 201 / 2);
    let (frozen, carried): (i64, i64) = rig
        .journal
        .read(move |c| {
            Ok((
                c.query_row(
                    "SELECT quantity FROM outbound_events WHERE hour = ?1",
                    [t("09:00").timestamp()],
                    |r| r.get(0),
                )?,
                c.query_row(
                    "SELECT SUM(quantity) FROM carries WHERE from_hour = ?1",
                    [t("09:00").timestamp()],
                    |r| r.get(0),
                )?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(frozen, 100 * 101 / 2, "records 1..=100 are frozen");
    assert_eq!(
        carried,
        200 * 201 / 2 - 100 * 101 / 2,
        "records 101..=200 are carried"
    );
}
