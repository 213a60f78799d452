//! The fast paths of issue 15 against the paths they replace: the one-statement ingest under `late_usage =
//! "carry"` stores what the two-phase path stores; freezing in chunks freezes every key once with its exact sum,
//! also with records arriving between chunks; due events stream by id, each once; one job settles a call's
//! answers and marks the next call in flight.

use chrono::{DateTime, Duration, TimeZone, Utc};
use meterd::config::LateUsage;
use meterd::journal::outbound::{self, Settle};
use meterd::journal::usage::{self, IngestRules, NewRecord};
use meterd::journal::{Answers, Journal};
use meterd::quantity::Micros;
use proptest::prelude::*;
use rusqlite::Connection;

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap()
}

fn rules(now: DateTime<Utc>, late: LateUsage) -> IngestRules {
    IngestRules {
        now,
        late,
        safety_margin: Duration::minutes(15),
        min_send_time: Duration::hours(1),
        outbox: false,
    }
}

/// Two spellings of one managed application (resource ids are case-insensitive), and a SaaS id.
const RESOURCES: [&str; 3] = [
    "11111111-1111-4111-8111-111111111111",
    "/subscriptions/s/resourceGroups/g/providers/Microsoft.Solutions/applications/App",
    "/SUBSCRIPTIONS/s/resourceGroups/g/providers/Microsoft.Solutions/applications/app",
];
const DIMENSIONS: [&str; 2] = ["api_calls", "gb_processed"];
const PLANS: [Option<&str>; 3] = [None, Some("basic"), Some("pro")];

fn record(
    resource: usize,
    dimension: usize,
    plan: usize,
    minute: i64,
    micros: i64,
    key: Option<u8>,
) -> NewRecord {
    NewRecord {
        resource: RESOURCES[resource].to_string(),
        plan: PLANS[plan].map(str::to_string),
        dimension: DIMENSIONS[dimension].to_string(),
        time: base() + Duration::minutes(minute),
        quantity: Micros(micros),
        key: key.map(|k| format!("key-{k}")),
    }
}

fn rec() -> impl Strategy<Value = NewRecord> {
    (
        0usize..3,
        0usize..2,
        0usize..3,
        0i64..(5 * 60),
        1i64..=9_000_000,
        proptest::option::of(0u8..30),
    )
        .prop_map(|(r, d, p, m, q, k)| record(r, d, p, m, q, k))
}

/// Every row of the tables ingest writes, as text, in a fixed order.
fn tables(c: &Connection) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT seq, idem_key, resource, plan, dimension, event_time, origin_hour, hour, quantity, received_at FROM usage_records ORDER BY seq",
        "SELECT resource, plan, dimension, hour, quantity, records, carried_in, outbound_id FROM hourly_totals ORDER BY resource, plan, dimension, hour",
        "SELECT folded, spelling FROM resource_spellings ORDER BY folded",
        "SELECT resource, plan, dimension, from_hour, to_hour, quantity, reason FROM carries ORDER BY 1, 2, 3, 4, 5, 6, 7",
    ] {
        let mut st = c.prepare(sql).unwrap();
        let n = st.column_count();
        let rows = st
            .query_map([], |r| {
                let mut line = String::new();
                for i in 0..n {
                    let v: rusqlite::types::Value = r.get(i)?;
                    line.push_str(&format!("{v:?}|"));
                }
                Ok(line)
            })
            .unwrap();
        out.extend(rows.map(Result::unwrap));
    }
    out
}

fn open() -> (tempfile::TempDir, Journal) {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(&dir.path().join("j.db")).unwrap();
    (dir, j)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// The carrying path (one `INSERT ... ON CONFLICT DO NOTHING` per record) answers and stores exactly what the
    /// two-phase path (lookup, then insert) stores, for requests with repeated keys within and across requests,
    /// two spellings of one resource and several plans per key. (`reject` with nothing late takes the two-phase
    /// path and must store the same.)
    #[test]
    fn carrying_ingest_stores_what_the_two_phase_path_stores(
        requests in proptest::collection::vec(proptest::collection::vec(rec(), 1..25), 1..6),
    ) {
        let now = base() + Duration::hours(6);
        let (_d1, fast) = open();
        let (_d2, two_phase) = open();
        for req in &requests {
            let (a, b) = (req.clone(), req.clone());
            let fast_answer = fast
                .write_blocking(move |c| usage::ingest(c, &a, &rules(now, LateUsage::CarryForward)))
                .unwrap()
                .unwrap();
            let slow_answer = two_phase
                .write_blocking(move |c| usage::ingest(c, &b, &rules(now, LateUsage::Reject)))
                .unwrap()
                .unwrap();
            prop_assert_eq!(fast_answer, slow_answer);
        }
        let a = fast.read_blocking(|c| Ok(tables(c))).unwrap();
        let b = two_phase.read_blocking(|c| Ok(tables(c))).unwrap();
        prop_assert_eq!(a, b);
    }
}

/// A late record (its key frozen) on the carrying path is carried into the open hour with a `carries` row, as the
/// two-phase path did; a repeat of its key is a duplicate and is not carried again.
#[test]
fn a_late_record_on_the_carrying_path_is_carried_once() {
    let (_d, j) = open();
    let first = base() + Duration::hours(2);
    j.write_blocking(move |c| {
        usage::ingest(
            c,
            &[record(0, 0, 0, 10, 1_000_000, Some(1))],
            &rules(first, LateUsage::CarryForward),
        )
    })
    .unwrap()
    .unwrap();
    j.write_blocking(move |c| {
        outbound::freeze(c, first, Duration::minutes(5), Duration::minutes(15))
    })
    .unwrap();
    let later = base() + Duration::hours(3);
    let late = vec![
        record(0, 0, 0, 20, 2_000_000, Some(2)),
        record(0, 0, 0, 20, 2_000_000, Some(2)),
    ];
    let o = j
        .write_blocking(move |c| usage::ingest(c, &late, &rules(later, LateUsage::CarryForward)))
        .unwrap()
        .unwrap();
    assert_eq!((o.accepted, o.duplicates, o.carried), (1, 1, 1));
    let (carries, open_hour): (i64, i64) = j
        .read_blocking(move |c| {
            Ok((
                c.query_row(
                    "SELECT COUNT(*) FROM carries WHERE reason = 'late'",
                    [],
                    |r| r.get(0),
                )?,
                c.query_row(
                    "SELECT quantity FROM hourly_totals WHERE hour = ?1",
                    [usage::hour_of(later)],
                    |r| r.get(0),
                )?,
            ))
        })
        .unwrap();
    assert_eq!((carries, open_hour), (1, 2_000_000));
}

/// Closed totals for `keys` keys (hour 0), every third key with records under two plans (two totals, one key).
fn closed_totals(j: &Journal, keys: usize) {
    let mut records = Vec::new();
    for k in 0..keys {
        let resource = format!("{:08x}-0000-4000-8000-{:012x}", k + 1, k + 1);
        let plans: &[Option<&str>] = if k % 3 == 0 {
            &[Some("basic"), Some("pro")]
        } else {
            &[None]
        };
        for (p, plan) in plans.iter().enumerate() {
            records.push(NewRecord {
                resource: resource.clone(),
                plan: plan.map(str::to_string),
                dimension: "api_calls".into(),
                time: base() + Duration::minutes(5),
                quantity: Micros(1_000_000 * (k as i64 + 1) + p as i64),
                key: None,
            });
        }
    }
    let now = base() + Duration::minutes(30);
    j.write_blocking(move |c| usage::ingest(c, &records, &rules(now, LateUsage::CarryForward)))
        .unwrap()
        .unwrap();
}

fn events(c: &Connection) -> Vec<(String, String, String, i64, i64)> {
    let mut st = c
        .prepare("SELECT resource, plan, dimension, hour, quantity FROM outbound_events ORDER BY resource, dimension, hour")
        .unwrap();
    st.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Freezing in chunks (limits 1, 2 and 5 totals, smaller than a two-plan key at 1) ends with the same outbound
/// events as one freeze of everything, each key once with its exact sum, every total pointing at its event.
#[test]
fn freezing_in_chunks_freezes_every_key_once_with_its_sum() {
    let now = base() + Duration::hours(2);
    let (grace, margin) = (Duration::minutes(5), Duration::minutes(15));
    let (_d0, whole) = open();
    closed_totals(&whole, 17);
    let all = whole
        .write_blocking(move |c| outbound::freeze(c, now, grace, margin))
        .unwrap();
    assert_eq!(all.frozen, 17);
    let expected = whole.read_blocking(|c| Ok(events(c))).unwrap();
    for limit in [1usize, 2, 5] {
        let (_d, j) = open();
        closed_totals(&j, 17);
        let (mut frozen, mut calls) = (0, 0);
        loop {
            let (f, more) = j
                .write_blocking(move |c| outbound::freeze_some(c, now, grace, margin, limit))
                .unwrap();
            frozen += f.frozen;
            calls += 1;
            if !more {
                break;
            }
            assert!(calls < 100, "freezing in chunks of {limit} does not end");
        }
        assert_eq!(frozen, 17, "limit {limit}");
        assert!(calls > 1, "limit {limit} froze in one call");
        assert_eq!(
            j.read_blocking(|c| Ok(events(c))).unwrap(),
            expected,
            "limit {limit}"
        );
        let unfrozen: i64 = j
            .read_blocking(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM hourly_totals WHERE outbound_id IS NULL",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(unfrozen, 0, "limit {limit}");
    }
}

/// Queues a no-op journal job without waiting for it (from inside another job, on the writer thread): while it
/// is on the writer's channel, `others_waiting` is true.
fn queue_noop(j: &Journal) {
    let mut f = Box::pin(j.write(|_| Ok(())));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = f.as_mut().poll(&mut cx);
    // Dropped: the job is abandoned (it does not run), but it was waiting until the writer took it.
}

/// Issue 15: an emission pass's freeze chunk stops after its next step (100 totals) when another job waits for
/// the writer (a sender's mark, an ingest request), instead of holding the writer for the whole chunk, and the
/// next chunk goes on from there: in the end the same events as one freeze, every key once with its sum. Alone
/// on the writer, one chunk freezes the lot.
#[test]
fn a_freeze_chunk_gives_the_writer_to_a_waiting_job_and_the_next_chunk_goes_on() {
    let now = base() + Duration::hours(2);
    let (grace, margin) = (Duration::minutes(5), Duration::minutes(15));
    let keys = 450;
    let (_d0, alone) = open();
    closed_totals(&alone, keys);
    let (all, more) = alone
        .write_blocking(move |c| outbound::freeze_chunk(c, now, grace, margin, 1_000))
        .unwrap();
    assert_eq!(
        (all.frozen, more),
        (keys, false),
        "alone, one chunk freezes every key"
    );
    let expected = alone.read_blocking(|c| Ok(events(c))).unwrap();

    let (_d, j) = open();
    closed_totals(&j, keys);
    let waiter = j.clone();
    let (first, more) = j
        .write_blocking(move |c| {
            queue_noop(&waiter);
            outbound::freeze_chunk(c, now, grace, margin, 1_000)
        })
        .unwrap();
    assert!(more, "a chunk with a job waiting says more is left");
    assert!(
        first.frozen > 0 && first.frozen < keys,
        "the chunk stopped early, after whole keys: {} of {keys}",
        first.frozen
    );
    let mut frozen = first.frozen;
    loop {
        let (f, more) = j
            .write_blocking(move |c| outbound::freeze_chunk(c, now, grace, margin, 1_000))
            .unwrap();
        frozen += f.frozen;
        if !more {
            break;
        }
    }
    assert_eq!(frozen, keys);
    assert_eq!(j.read_blocking(|c| Ok(events(c))).unwrap(), expected);
}

/// Issue 15: an emission pass's dispose job (billing and writing bodies for a page) stops after its next 100
/// events when another job waits for the writer, and gives back the rest of the page in billing order; disposing
/// the rest bills every event once, with the same bodies as one job would.
#[test]
fn a_dispose_job_gives_the_writer_to_a_waiting_job_and_returns_the_rest() {
    let now = base() + Duration::hours(2);
    let (grace, margin) = (Duration::minutes(5), Duration::minutes(15));
    let keys = 450;
    let text = "[marketplace]\nmode = \"emulator\"\n[[dimensions]]\nid = \"api_calls\"\n";
    let settings = std::sync::Arc::new(
        meterd::config::load_str(text, "test", &std::collections::BTreeMap::new()).unwrap(),
    );
    let policy = outbound::SettlePolicy::from_settings(&settings);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = |ev: &outbound::PendingEvent, plan: &str, send: i64| {
        format!("{}|{}|{plan}|{send}", ev.resource, ev.dimension)
    };
    // Bodies and the order of what is sendable: all in one job, then with a job waiting at the first body.
    let mut runs = Vec::new();
    for interrupt in [false, true] {
        let (_d, j) = open();
        closed_totals(&j, keys);
        j.write_blocking(move |c| outbound::freeze(c, now, grace, margin))
            .unwrap();
        let page = rt.block_on(j.due_page(now, 0, 1_000)).unwrap();
        assert_eq!(page.len(), keys);
        let mut to_write: Vec<_> = page
            .into_iter()
            .map(|e| {
                let plan = if e.plan.is_empty() {
                    "gold".to_string()
                } else {
                    e.plan.clone()
                };
                (e, meterd::journal::Disposition::Send { plan })
            })
            .collect();
        let (mut sent, mut jobs) = (Vec::new(), 0);
        while !to_write.is_empty() {
            let waiter = j.clone();
            let once = std::sync::atomic::AtomicBool::new(interrupt && jobs == 0);
            let (sendable, _counts, rest) = rt
                .block_on(j.dispose(
                    std::mem::take(&mut to_write),
                    settings.clone(),
                    now,
                    policy.clone(),
                    move |ev: &outbound::PendingEvent, plan: &str, send: i64| {
                        if once.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            queue_noop(&waiter);
                        }
                        body(ev, plan, send)
                    },
                ))
                .unwrap();
            if interrupt && jobs == 0 {
                assert_eq!(
                    (sendable.len(), rest.len()),
                    (100, keys - 100),
                    "with a job waiting the dispose job stops after 100 events"
                );
            }
            jobs += 1;
            sent.extend(sendable.into_iter().map(|e| (e.id, e.body)));
            to_write = rest;
        }
        assert_eq!(jobs, if interrupt { 2 } else { 1 });
        let stored: Vec<(i64, String)> = j
            .read_blocking(|c| {
                let mut st = c.prepare("SELECT id, body FROM outbound_events ORDER BY id")?;
                let rows = st
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .unwrap();
        let mut sorted = sent.clone();
        sorted.sort();
        assert_eq!(
            sorted, stored,
            "every event billed once, with the body it is sent with"
        );
        runs.push(sent);
    }
    let (mut one, mut two) = (runs[0].clone(), runs[1].clone());
    one.sort();
    two.sort();
    assert_eq!(
        one, two,
        "the same bodies whether or not the job stopped early"
    );
}

/// A record that arrives between two chunks of one pass's freezing: for a key frozen in the first chunk it is
/// carried (never added to a frozen total); for a key not frozen yet it goes into its own hour and the next chunk
/// freezes it with the rest of that key's total. Nothing is lost either way (invariants 5 and 6).
#[test]
fn records_between_freeze_chunks_are_carried_or_frozen_with_their_key() {
    let now = base() + Duration::hours(2);
    let (grace, margin) = (Duration::minutes(5), Duration::minutes(15));
    let (_d, j) = open();
    closed_totals(&j, 6);
    let (first, more) = j
        .write_blocking(move |c| outbound::freeze_some(c, now, grace, margin, 1))
        .unwrap();
    assert!(more && first.frozen == 1);
    let frozen_resource = "00000001-0000-4000-8000-000000000001";
    let waiting_resource = "00000006-0000-4000-8000-000000000006";
    let arriving = vec![
        NewRecord {
            resource: frozen_resource.into(),
            plan: Some("basic".into()),
            dimension: "api_calls".into(),
            time: base() + Duration::minutes(50),
            quantity: Micros(7),
            key: Some("between-1".into()),
        },
        NewRecord {
            resource: waiting_resource.into(),
            plan: None,
            dimension: "api_calls".into(),
            time: base() + Duration::minutes(50),
            quantity: Micros(11),
            key: Some("between-2".into()),
        },
    ];
    let o = j
        .write_blocking(move |c| usage::ingest(c, &arriving, &rules(now, LateUsage::CarryForward)))
        .unwrap()
        .unwrap();
    assert_eq!((o.accepted, o.carried), (2, 1));
    loop {
        let (_, more) = j
            .write_blocking(move |c| outbound::freeze_some(c, now, grace, margin, 2))
            .unwrap();
        if !more {
            break;
        }
    }
    let (frozen_qty, waiting_qty, carried): (i64, i64, i64) = j
        .read_blocking(move |c| {
            let q = |r: &str| -> rusqlite::Result<i64> {
                c.query_row(
                    "SELECT quantity FROM outbound_events WHERE resource = ?1 AND hour = ?2",
                    rusqlite::params![r, base().timestamp()],
                    |x| x.get(0),
                )
            };
            Ok((
                q(frozen_resource)?,
                q(waiting_resource)?,
                c.query_row(
                    "SELECT COALESCE(SUM(quantity), 0) FROM carries WHERE resource = ?1",
                    [frozen_resource],
                    |r| r.get(0),
                )?,
            ))
        })
        .unwrap();
    // Key 0 (two plans): 1,000,000 + 1,000,001 frozen in the first chunk; its late 7 carried.
    assert_eq!(frozen_qty, 2_000_001);
    assert_eq!(carried, 7);
    // Key 5: 6,000,000 plus the 11 that arrived before its chunk.
    assert_eq!(waiting_qty, 6_000_011);
}

/// Paging due events by id (pages of 4 from `first_pending_id`) yields every due event exactly once, the same set
/// as one read of all of them, and skips settled ones.
#[test]
fn due_pages_stream_every_due_event_once() {
    let now = base() + Duration::hours(2);
    let (_d, j) = open();
    closed_totals(&j, 15);
    j.write_blocking(move |c| {
        outbound::freeze(c, now, Duration::minutes(5), Duration::minutes(15))
    })
    .unwrap();
    // Settle two events so that they are no longer due.
    let settled: Vec<i64> = j
        .read_blocking(|c| {
            let mut st = c.prepare("SELECT id FROM outbound_events ORDER BY id LIMIT 2")?;
            let ids = st
                .query_map([], |r| r.get(0))?
                .collect::<Result<Vec<i64>, _>>()?;
            Ok(ids)
        })
        .unwrap();
    j.write_blocking(move |c| {
        for id in &settled {
            c.execute(
                "UPDATE outbound_events SET state = 'accepted' WHERE id = ?1",
                [id],
            )?;
        }
        Ok(())
    })
    .unwrap();
    let all: Vec<i64> = j
        .read_blocking(move |c| {
            Ok(outbound::due_events(c, now, 1000)?
                .into_iter()
                .map(|e| e.id)
                .collect())
        })
        .unwrap();
    assert_eq!(all.len(), 13);
    let mut after = j.read_blocking(outbound::first_pending_id).unwrap();
    let mut paged = Vec::new();
    loop {
        let page = j
            .read_blocking(move |c| outbound::due_page(c, now, after, 4))
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        after = page.last().unwrap().id;
        paged.extend(page.into_iter().map(|e| e.id));
    }
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(paged, sorted);
}

/// One job settles the answers of a sender's last call and marks its next call's events in flight (attempts
/// counted); a mark without answers marks only, answers without a mark settle only.
#[test]
fn settle_and_mark_settles_the_last_call_and_marks_the_next() {
    let now = base() + Duration::hours(2);
    let (_d, j) = open();
    closed_totals(&j, 4);
    j.write_blocking(move |c| {
        outbound::freeze(c, now, Duration::minutes(5), Duration::minutes(15))
    })
    .unwrap();
    let ids: Vec<i64> = j
        .read_blocking(|c| {
            let mut st = c.prepare("SELECT id FROM outbound_events ORDER BY id")?;
            let ids = st
                .query_map([], |r| r.get(0))?
                .collect::<Result<Vec<i64>, _>>()?;
            Ok(ids)
        })
        .unwrap();
    let policy = outbound::SettlePolicy::late(LateUsage::CarryForward);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let state = |j: &Journal| -> Vec<(String, i64, i64)> {
        j.read_blocking(|c| {
            let mut st =
                c.prepare("SELECT state, attempts, in_flight FROM outbound_events ORDER BY id")?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .unwrap()
    };
    rt.block_on(j.settle_and_mark(None, ids[..2].to_vec(), policy.clone()))
        .unwrap();
    assert_eq!(
        state(&j),
        vec![
            ("pending".into(), 1, 1),
            ("pending".into(), 1, 1),
            ("pending".into(), 0, 0),
            ("pending".into(), 0, 0)
        ]
    );
    let answers = Answers {
        call_alert: None,
        settles: vec![
            (
                ids[0],
                Settle::Accepted {
                    usage_event_id: Some("u-1".into()),
                },
            ),
            (
                ids[1],
                Settle::Retry {
                    error: "503".into(),
                    next_at: now + Duration::minutes(1),
                    ambiguous: false,
                },
            ),
        ],
        now,
    };
    let counts = rt
        .block_on(j.settle_and_mark(Some(answers), ids[2..].to_vec(), policy.clone()))
        .unwrap();
    assert_eq!(counts.get("accepted"), Some(&1));
    assert_eq!(counts.get("retry"), Some(&1));
    assert_eq!(
        state(&j),
        vec![
            ("accepted".into(), 1, 0),
            ("pending".into(), 1, 0),
            ("pending".into(), 1, 1),
            ("pending".into(), 1, 1)
        ]
    );
    let last = Answers {
        call_alert: None,
        settles: vec![
            (
                ids[2],
                Settle::Accepted {
                    usage_event_id: None,
                },
            ),
            (
                ids[3],
                Settle::Accepted {
                    usage_event_id: None,
                },
            ),
        ],
        now,
    };
    rt.block_on(j.settle_and_mark(Some(last), Vec::new(), policy))
        .unwrap();
    assert!(
        state(&j)[2..]
            .iter()
            .all(|(s, a, f)| s == "accepted" && *a == 1 && *f == 0)
    );
}

/// A later freeze chunk that freezes keys already past their retry deadline (a daemon down for a day) expires
/// them in the same job, as one freeze of everything followed by the expiry did; a chunk with none skips the
/// expiry's read of every pending event.
#[test]
fn a_chunk_frozen_past_its_window_expires_in_the_same_job() {
    let (_d, j) = open();
    closed_totals(&j, 5);
    let now = base() + Duration::hours(25);
    let policy = outbound::SettlePolicy::late(LateUsage::CarryForward);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut frozen, mut expired) = (0, 0);
    loop {
        let o = rt
            .block_on(j.freeze_more(
                now,
                Duration::minutes(5),
                Duration::minutes(15),
                policy.clone(),
                2,
            ))
            .unwrap();
        assert_eq!(
            o.frozen.overdue, o.frozen.frozen,
            "every key of hour 0 is past its deadline"
        );
        frozen += o.frozen.frozen;
        expired += o.expired.len();
        if !o.more {
            break;
        }
    }
    assert_eq!((frozen, expired), (5, 5));
    let pending: i64 = j
        .read_blocking(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM outbound_events WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(pending, 0);
}

/// One step of a mixed transaction: an ingest request, or a freeze chunk (an ordinary job between ingest jobs).
#[derive(Debug, Clone)]
enum Step {
    Ingest(Vec<NewRecord>),
    Freeze(usize),
}

fn step() -> impl Strategy<Value = Step> {
    // Quantities mostly small, sometimes a third of the i64 range, so that totals overflow now and then.
    let quantity = prop_oneof![9 => 1i64..=9_000_000, 1 => Just(i64::MAX / 3)];
    let record = (
        0usize..3,
        0usize..2,
        0usize..3,
        0i64..(6 * 60),
        quantity,
        proptest::option::of(0u8..30),
    )
        .prop_map(|(r, d, p, m, q, k)| record(r, d, p, m, q, k));
    prop_oneof![
        6 => proptest::collection::vec(record, 1..4).prop_map(Step::Ingest),
        1 => (1usize..4).prop_map(Step::Freeze),
    ]
}

/// Polls `f` once (so that a journal job is queued in this order), keeping it for later.
async fn queued<F: std::future::Future + Unpin>(mut f: F) -> F {
    std::future::poll_fn(|cx| {
        let _ = std::pin::Pin::new(&mut f).poll(cx);
        std::task::Poll::Ready(())
    })
    .await;
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Issue 15, hourly totals once per key per transaction: ingest requests queued into one writer transaction
    /// (grouped jobs, no savepoint, their totals summed per key and written once) with freeze chunks between them
    /// answer and store exactly what the same steps store one job per transaction, in turn, on the savepoint
    /// path: a freeze chunk sees the totals of every request before it (invariants 5, 6), a record after it is
    /// carried or frozen with its key, a request whose total could overflow fails alone, duplicates add nothing.
    #[test]
    fn grouped_ingest_in_one_transaction_stores_what_one_job_per_request_stores(
        steps in proptest::collection::vec(step(), 1..30),
    ) {
        let now = base() + Duration::hours(6);
        let (grace, margin) = (Duration::minutes(5), Duration::minutes(15));
        let policy = outbound::SettlePolicy::late(LateUsage::CarryForward);
        let carry = rules(now, LateUsage::CarryForward);
        // The reference: each step its own job and transaction, ingest in a savepoint.
        let (_d1, one_by_one) = open();
        let mut expected: Vec<Result<String, String>> = Vec::new();
        for s in steps.clone() {
            expected.push(match s {
                Step::Ingest(records) => one_by_one
                    .write_blocking(move |c| usage::ingest(c, &records, &carry))
                    .map(|o| format!("{:?}", o.unwrap()))
                    .map_err(|e| e.to_string()),
                Step::Freeze(limit) => one_by_one
                    .write_blocking(move |c| outbound::freeze_some(c, now, grace, margin, limit))
                    .map(|(f, more)| format!("{} {more}", f.frozen))
                    .map_err(|e| e.to_string()),
            });
        }
        // Grouped: every step queued while the writer is held, so that they run in one transaction.
        let (_d2, grouped) = open();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let holder = {
            let j = grouped.clone();
            std::thread::spawn(move || {
                j.write_blocking(move |_| {
                    started_tx.send(()).unwrap();
                    gate.recv().unwrap();
                    Ok(())
                })
            })
        };
        started.recv().unwrap();
        let (commits_before, _) = grouped.writer_stats();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let answers: Vec<Result<String, String>> = rt.block_on(async {
            type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>>>>;
            let mut pending: Vec<Answer> = Vec::new();
            for s in steps.clone() {
                let (j, policy) = (grouped.clone(), policy.clone());
                let f: Answer = match s {
                    Step::Ingest(records) => Box::pin(async move {
                        j.ingest(records, carry).await.map(|o| format!("{:?}", o.unwrap())).map_err(|e| e.to_string())
                    }),
                    Step::Freeze(limit) => Box::pin(async move {
                        j.freeze_more(now, grace, margin, policy, limit)
                            .await
                            .map(|o| format!("{} {}", o.frozen.frozen, o.more))
                            .map_err(|e| e.to_string())
                    }),
                };
                pending.push(queued(f).await);
            }
            release.send(()).unwrap();
            let mut out = Vec::new();
            for f in pending {
                out.push(f.await);
            }
            out
        });
        holder.join().unwrap().unwrap();
        let (commits_after, _) = grouped.writer_stats();
        // The holder's transaction and the steps' one (a lost transaction would add more and fail the answers).
        prop_assert!(commits_after - commits_before <= 2, "{} commits", commits_after - commits_before);
        prop_assert_eq!(answers, expected);
        let a = grouped.read_blocking(|c| Ok((tables(c), events(c)))).unwrap();
        let b = one_by_one.read_blocking(|c| Ok((tables(c), events(c)))).unwrap();
        prop_assert_eq!(a, b);
    }
}
