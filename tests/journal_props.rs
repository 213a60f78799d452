//! Property tests of the journal's arithmetic: hourly totals are the exact sums of the distinct records,
//! bucketed by UTC hour, whatever the quantities, times, keys and repeats; and group commit loses nothing.

use chrono::{DateTime, Duration, TimeZone, Utc};
use meterd::config::LateUsage;
use meterd::journal::Journal;
use meterd::journal::usage::{self, IngestRules, NewRecord, ReportFilter};
use meterd::quantity::Micros;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashSet};

fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap()
}

fn rules(now: DateTime<Utc>) -> IngestRules {
    IngestRules {
        now,
        late: LateUsage::CarryForward,
        safety_margin: Duration::minutes(15),
        min_send_time: Duration::hours(1),
        outbox: false,
    }
}

#[derive(Debug, Clone)]
struct Rec {
    resource: usize,
    dimension: usize,
    second: i64,
    micros: i64,
    key: Option<u8>,
}

fn rec() -> impl Strategy<Value = Rec> {
    (
        0usize..3,
        0usize..2,
        0i64..(6 * 3600),
        1i64..=5_000_000_000,
        proptest::option::of(0u8..40),
    )
        .prop_map(|(resource, dimension, second, micros, key)| Rec {
            resource,
            dimension,
            second,
            micros,
            key,
        })
}

const RESOURCES: [&str; 3] = [
    "11111111-1111-4111-8111-111111111111",
    "22222222-2222-4222-8222-222222222222",
    "/subscriptions/s/resourceGroups/g/providers/Microsoft.Solutions/applications/app",
];
const DIMENSIONS: [&str; 2] = ["api_calls", "gb_processed"];

fn to_new(r: &Rec) -> NewRecord {
    NewRecord {
        resource: RESOURCES[r.resource].to_string(),
        plan: None,
        dimension: DIMENSIONS[r.dimension].to_string(),
        time: base() + Duration::seconds(r.second),
        quantity: Micros(r.micros),
        key: r.key.map(|k| format!("key-{k}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Records arrive in random requests (with repeats of whole requests, as a retrying client does); the hourly
    /// totals equal the exact sum of the distinct records (first occurrence of each key) per UTC hour.
    #[test]
    fn hourly_totals_are_exact_sums_of_distinct_records(
        records in proptest::collection::vec(rec(), 1..120),
        split in proptest::collection::vec(1usize..20, 1..30),
        repeat in proptest::collection::vec(any::<bool>(), 1..30),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("j.db")).unwrap();
        let now = base() + Duration::hours(7);
        // Expected: first occurrence of each key wins; keyless records always count.
        let mut seen = HashSet::new();
        let mut expected: BTreeMap<(String, String, i64), i64> = BTreeMap::new();
        for r in &records {
            if let Some(k) = r.key && !seen.insert(k) {
                continue;
            }
            let hour = usage::hour_of(base() + Duration::seconds(r.second));
            *expected.entry((RESOURCES[r.resource].to_string(), DIMENSIONS[r.dimension].to_string(), hour)).or_default() += r.micros;
        }
        // Send in chunks; some chunks twice. A repeated chunk must add nothing for keyed records, so only
        // repeat chunks whose records all carry keys.
        let mut i = 0;
        let mut c = 0;
        while i < records.len() {
            let n = split[c % split.len()].min(records.len() - i);
            let chunk: Vec<NewRecord> = records[i..i + n].iter().map(to_new).collect();
            let all_keyed = chunk.iter().all(|r| r.key.is_some());
            let times = if repeat[c % repeat.len()] && all_keyed { 2 } else { 1 };
            for _ in 0..times {
                let chunk = chunk.clone();
                let rules = rules(now);
                let out = journal.write_blocking(move |conn| usage::ingest(conn, &chunk, &rules)).unwrap().unwrap();
                prop_assert_eq!(out.carried, 0);
            }
            i += n;
            c += 1;
        }
        let got: BTreeMap<(String, String, i64), i64> = journal
            .read_blocking(|conn| usage::hourly_report(conn, &ReportFilter::default(), now, Duration::minutes(5)))
            .unwrap()
            .into_iter()
            .map(|h| {
                let hour = DateTime::parse_from_rfc3339(&h.hour).unwrap().timestamp();
                ((h.resource, h.dimension, hour), h.quantity_micros)
            })
            .fold(BTreeMap::new(), |mut m, (k, v)| { *m.entry(k).or_default() += v; m });
        prop_assert_eq!(got, expected);
        journal.close();
    }

    /// Frozen hours: records for them are carried to the open hour, never lost and never in two places.
    #[test]
    fn late_records_are_carried_not_lost(
        records in proptest::collection::vec(rec(), 1..60),
        freeze_after in 0usize..60,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("j.db")).unwrap();
        let now = base() + Duration::hours(6) + Duration::minutes(30);
        let total: i64 = {
            let mut seen = HashSet::new();
            records.iter().filter(|r| r.key.is_none_or(|k| seen.insert(k))).map(|r| r.micros).sum()
        };
        for (i, r) in records.iter().enumerate() {
            if i == freeze_after.min(records.len() - 1) {
                journal
                    .write_blocking(move |c| meterd::journal::outbound::freeze(c, now, Duration::minutes(5), Duration::minutes(15)))
                    .unwrap();
            }
            let one = vec![to_new(r)];
            let rules = rules(now);
            journal.write_blocking(move |c| usage::ingest(c, &one, &rules)).unwrap().unwrap();
        }
        let sum: i64 = journal
            .read_blocking(|c| Ok(c.query_row("SELECT COALESCE(SUM(quantity), 0) FROM hourly_totals", [], |r| r.get(0))?))
            .unwrap();
        prop_assert_eq!(sum, total);
        journal.close();
    }
}

/// Many writers at once share commits (group commit) and every acknowledged job is there afterwards.
#[test]
fn concurrent_requests_share_commits_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("j.db")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let now = base() + Duration::hours(2);
    let acked: usize = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..400 {
            let j = journal.clone();
            tasks.push(tokio::spawn(async move {
                let rec = vec![NewRecord {
                    resource: RESOURCES[0].into(),
                    plan: None,
                    dimension: "api_calls".into(),
                    time: base() + Duration::minutes(30),
                    quantity: Micros(1_000_000),
                    key: Some(format!("c{i}")),
                }];
                let rules = rules(now);
                j.write(move |c| usage::ingest(c, &rec, &rules))
                    .await
                    .unwrap()
                    .unwrap()
                    .accepted
            }));
        }
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        n
    });
    assert_eq!(acked, 400);
    let (commits, jobs) = journal.writer_stats();
    assert_eq!(jobs, 400);
    assert!(
        commits < 400,
        "group commit: {commits} commits for {jobs} jobs"
    );
    let total: i64 = journal
        .read_blocking(|c| {
            Ok(c.query_row("SELECT SUM(quantity) FROM hourly_totals", [], |r| r.get(0))?)
        })
        .unwrap();
    assert_eq!(total, 400_000_000);
    journal.close();
}

/// A job that fails rolls back alone; the others in the same transaction commit.
#[test]
fn a_failing_job_does_not_take_its_batch_down() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("j.db")).unwrap();
    let r = journal.write_blocking(|c| {
        c.execute("INSERT INTO meta (key, value) VALUES ('a', 1)", [])?;
        Err::<(), _>(meterd::journal::JournalError::Invalid("no".into()))
    });
    assert!(r.is_err());
    journal
        .write_blocking(|c| Ok(c.execute("INSERT INTO meta (key, value) VALUES ('b', 2)", [])?))
        .unwrap();
    let keys: Vec<String> = journal
        .read_blocking(|c| {
            let mut s = c.prepare("SELECT key FROM meta ORDER BY key")?;
            Ok(s.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
        })
        .unwrap();
    assert_eq!(keys, vec!["b".to_string()]);
    // A second writer process on the same journal is refused with a clear message.
    let err = Journal::open(&dir.path().join("j.db"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("another meterd process"), "{err}");
    journal.close();
    // Reopening runs no migration twice and keeps the schema version.
    let again = Journal::open(&dir.path().join("j.db")).unwrap();
    let v: i64 = again
        .read_blocking(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(v, meterd::journal::current_version());
    again.close();
}

/// Retention: old hourly totals (with settled events) go; pending ones and recent ones stay; raw records past
/// the dedupe window are compacted while their sums stay.
#[test]
fn retention_keeps_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("j.db")).unwrap();
    let old = base() - Duration::days(800);
    let recent = base() + Duration::hours(1);
    for (t, key) in [(old, "old"), (recent, "new")] {
        let rec = vec![NewRecord {
            resource: RESOURCES[0].into(),
            plan: None,
            dimension: "api_calls".into(),
            time: t,
            quantity: Micros(1_000_000),
            key: Some(key.into()),
        }];
        let r = IngestRules {
            now: t + Duration::minutes(1),
            late: LateUsage::CarryForward,
            safety_margin: Duration::minutes(15),
            min_send_time: Duration::hours(1),
            outbox: false,
        };
        journal
            .write_blocking(move |c| usage::ingest(c, &rec, &r))
            .unwrap()
            .unwrap();
    }
    // The old hour was frozen and ran out of window (retention deletes only settled totals).
    journal
        .write_blocking(move |c| {
            meterd::journal::outbound::freeze(
                c,
                old + Duration::hours(2),
                Duration::minutes(5),
                Duration::minutes(15),
            )?;
            meterd::journal::outbound::expire_overdue(
                c,
                old + Duration::hours(25),
                &meterd::journal::outbound::SettlePolicy::late(LateUsage::Reject),
            )
        })
        .unwrap();
    let now = base() + Duration::days(10);
    let (hours, records) = journal
        .write_blocking(move |c| {
            usage::apply_retention(c, now, Duration::days(730), Duration::days(7))
        })
        .unwrap();
    assert_eq!(
        (hours, records),
        (1, 2),
        "the 800-day-old hour goes; both raw records are past 7 days"
    );
    let left: Vec<(i64, i64)> = journal
        .read_blocking(|c| {
            let mut s = c.prepare("SELECT hour, quantity FROM hourly_totals")?;
            Ok(s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?)
        })
        .unwrap();
    assert_eq!(left, vec![(usage::hour_of(recent), 1_000_000)]);
    journal.close();
}
