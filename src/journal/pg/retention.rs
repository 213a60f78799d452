//! Retention of the shared journal: the single journal's rule (`journal::usage::apply_retention`) for the
//! fleet's PostgreSQL tables, safe when every replica runs it at once, in bounded chunks.
//!
//! - **Settled hours.** An outbound event of an hour older than `journal.retention` that is settled (any state
//!   but `pending`, not in flight) is deleted with its hourly totals. Their quantities are added to
//!   `usage_months` first (consumption by month and by dimension reaches back further), and what the event had
//!   frozen and the marketplace accepted to `retired_overage` (a balance's `overage_frozen` / `overage_accepted`
//!   stay exact). A pending, in-flight or ambiguous event, its totals, and every total not frozen yet are never
//!   deleted. `term_usage`, `remainders` and `thresholds_fired` are never deleted: billing and balances read them.
//! - **The late rule still holds.** A forward judges a record late when its key has an outbound event or its
//!   hour is no longer sendable (`H + 24h - emit.safety_margin - emit.min_send_time`). Retention deletes only
//!   hours older than `max(journal.retention, 25h)`, which no replica can still send (the config keeps
//!   `journal.retention >= 25h + emit.grace`), so a late record of a deleted hour is carried, never counted
//!   into that hour again.
//! - **Raw records** (`records`) are compacted past `ingest.dedupe_window`, judged by when a replica received
//!   them, and only once no replica can still forward a duplicate from inside the window: a record received at
//!   `t` stays while any replica heard from within the window (`heartbeat_at >= now - dedupe_window`) has a
//!   forward watermark before `t + dedupe_window` (a duplicate it received inside the window may still be in its
//!   outbox). The idempotency key of the record is what dedupes the late copy (`ON CONFLICT (idem_key)`), so it
//!   must be there when the copy arrives. A replica silent for longer than the window stops holding compaction
//!   back.
//! - **Carries** whose origin and target hours are both past the cutoff, and delivered alerts created before it.
//!
//! Concurrency: each chunk is one transaction of at most `chunk` rows, taken with `FOR UPDATE SKIP LOCKED`, so
//! replicas running retention at once delete disjoint rows and never wait on each other or on a pass (a claimed
//! or settling event is `pending`, and its row lock is skipped). Sums go into `usage_months` and
//! `retired_overage` in key order, so two chunks cannot deadlock; a conflict PostgreSQL aborts anyway is run
//! again. No session advisory locks.

use super::{PgError, PgJournal};
use crate::clock::hour_of;
use chrono::{DateTime, Duration, Utc};
use std::collections::BTreeMap;

/// How often a chunk aborted by a conflict is run again before the error is returned.
const CONFLICT_RETRIES: u32 = 8;

/// Rows per chunk (one transaction) unless told otherwise.
pub const DEFAULT_CHUNK: i64 = 1000;

/// Chunks of each kind one run does at most (the next run goes on).
pub const DEFAULT_MAX_CHUNKS: usize = 1000;

/// What one retention run applies.
#[derive(Debug, Clone, Copy)]
pub struct RetentionRules {
    /// Now, by the clock of the replica running it.
    pub now: DateTime<Utc>,
    /// `journal.retention`.
    pub retention: Duration,
    /// `ingest.dedupe_window`.
    pub dedupe_window: Duration,
    /// Rows per transaction.
    pub chunk: i64,
    /// Chunks of each kind this run does at most.
    pub max_chunks: usize,
}

impl RetentionRules {
    /// The rules at `now` with the default chunking.
    pub fn new(now: DateTime<Utc>, retention: Duration, dedupe_window: Duration) -> RetentionRules {
        RetentionRules {
            now,
            retention,
            dedupe_window,
            chunk: DEFAULT_CHUNK,
            max_chunks: DEFAULT_MAX_CHUNKS,
        }
    }

    /// The first hour kept: hours before it are deleted once settled. Never later than 25 hours ago (an hour
    /// that recent may still be sendable, and the late rule needs its event).
    pub fn cutoff(&self) -> i64 {
        hour_of(self.now - self.retention.max(Duration::hours(25)))
    }
}

/// What one retention run deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionSummary {
    /// Settled outbound events deleted.
    pub events: u64,
    /// Their hourly totals deleted (summed into `usage_months`).
    pub hourly_totals: u64,
    /// Raw records compacted.
    pub records: u64,
    /// Carries deleted.
    pub carries: u64,
    /// Delivered alerts deleted.
    pub alerts: u64,
    /// Transactions committed.
    pub chunks: u64,
    /// Stopped at `max_chunks` with more to delete (the next run goes on).
    pub more: bool,
    /// Raw records received before this instant (unix seconds) were eligible for compaction.
    pub records_before: i64,
}

impl RetentionSummary {
    /// Anything deleted.
    pub fn any(&self) -> bool {
        self.events + self.hourly_totals + self.records + self.carries + self.alerts > 0
    }
}

/// Runs `f` again while PostgreSQL aborts it to resolve a conflict (it was rolled back).
async fn retrying<T, F, Fut>(mut f: F) -> Result<T, PgError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PgError>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => {
                attempt += 1;
                tracing::debug!(message = "Retention chunk aborted by a conflict; running it again.", error = %e, attempt);
            }
            other => return other,
        }
    }
}

/// Column arrays of an upsert keyed by (resource, dimension, one integer) with `N` integer values.
struct Sums<const N: usize> {
    resource: Vec<String>,
    dimension: Vec<String>,
    key: Vec<i64>,
    values: [Vec<i64>; N],
}

impl<const N: usize> Sums<N> {
    fn from_map(map: BTreeMap<(String, String, i64), [i64; N]>) -> Sums<N> {
        let mut s = Sums {
            resource: Vec::new(),
            dimension: Vec::new(),
            key: Vec::new(),
            values: std::array::from_fn(|_| Vec::new()),
        };
        for ((r, d, k), v) in map {
            s.resource.push(r);
            s.dimension.push(d);
            s.key.push(k);
            for (col, x) in s.values.iter_mut().zip(v) {
                col.push(x);
            }
        }
        s
    }
}

fn add(to: &mut i64, q: i64) -> Result<(), PgError> {
    *to = to
        .checked_add(q)
        .ok_or_else(|| PgError::Invalid("a retained sum overflows".into()))?;
    Ok(())
}

impl PgJournal {
    /// One retention run (see the module doc): settled hours, raw records, carries, alerts, each in chunks of
    /// one transaction. Safe to run on every replica at once.
    pub async fn apply_retention(
        &self,
        rules: &RetentionRules,
    ) -> Result<RetentionSummary, PgError> {
        let cutoff = rules.cutoff();
        let chunk = rules.chunk.max(1);
        let mut s = RetentionSummary::default();

        let mut full = false;
        for _ in 0..rules.max_chunks {
            let (events, totals) = retrying(|| self.settled_chunk(cutoff, chunk)).await?;
            if events == 0 {
                full = false;
                break;
            }
            s.events += events;
            s.hourly_totals += totals;
            s.chunks += 1;
            full = events as i64 >= chunk;
            if !full {
                break;
            }
        }
        s.more |= full;

        s.records_before = self.compaction_bound(rules).await?;
        let deletes = [
            (
                "DELETE FROM records WHERE idem_key IN (
                     SELECT idem_key FROM records WHERE received_at < $1 ORDER BY received_at LIMIT $2
                     FOR UPDATE SKIP LOCKED)",
                s.records_before,
            ),
            (
                "DELETE FROM carries WHERE id IN (
                     SELECT id FROM carries WHERE from_hour < $1 AND to_hour < $1 ORDER BY id LIMIT $2
                     FOR UPDATE SKIP LOCKED)",
                cutoff,
            ),
            (
                "DELETE FROM alerts WHERE id IN (
                     SELECT id FROM alerts WHERE created_at < $1 AND delivered_at IS NOT NULL ORDER BY id LIMIT $2
                     FOR UPDATE SKIP LOCKED)",
                cutoff,
            ),
        ];
        for (i, (sql, before)) in deletes.into_iter().enumerate() {
            let mut full = false;
            for _ in 0..rules.max_chunks {
                let n = retrying(|| async move {
                    let c = self.client().await?;
                    Ok(c.execute(sql, &[&before, &chunk]).await?)
                })
                .await?;
                match i {
                    0 => s.records += n,
                    1 => s.carries += n,
                    _ => s.alerts += n,
                }
                if n > 0 {
                    s.chunks += 1;
                }
                full = n as i64 >= chunk;
                if !full {
                    break;
                }
            }
            s.more |= full;
        }
        Ok(s)
    }

    /// Raw records received before the returned instant may be compacted: `now - dedupe_window`, or earlier
    /// while a replica heard from within the window has not forwarded everything it received up to
    /// `received_at + dedupe_window` (its watermark), since it may still hold a duplicate from inside the window.
    async fn compaction_bound(&self, rules: &RetentionRules) -> Result<i64, PgError> {
        let now = rules.now.timestamp();
        let window = rules.dedupe_window.num_seconds();
        let c = self.client().await?;
        let slowest: Option<i64> = c
            .query_one(
                "SELECT MIN(watermark) FROM replicas WHERE heartbeat_at >= $1",
                &[&(now - window)],
            )
            .await?
            .get(0);
        Ok(slowest.unwrap_or(now).min(now) - window)
    }

    /// One transaction: up to `limit` settled events of hours before `cutoff` (skipping rows another replica has
    /// locked), their totals summed into `usage_months`, their billing into `retired_overage`, then deleted.
    /// Returns (events, totals) deleted.
    async fn settled_chunk(&self, cutoff: i64, limit: i64) -> Result<(u64, u64), PgError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let events = tx
            .query(
                "SELECT id, resource, dimension, term_start, COALESCE(send_quantity, 0),
                        state IN ('accepted', 'duplicate')
                 FROM outbound_events
                 WHERE hour < $1 AND state <> 'pending' AND in_flight = 0
                 ORDER BY hour, id LIMIT $2
                 FOR UPDATE SKIP LOCKED",
                &[&cutoff, &limit],
            )
            .await?;
        if events.is_empty() {
            tx.commit().await?;
            return Ok((0, 0));
        }
        let mut ids = Vec::with_capacity(events.len());
        // Per (resource, dimension, term): frozen, accepted, events, usage of their totals.
        let mut overage: BTreeMap<(String, String, i64), [i64; 4]> = BTreeMap::new();
        let mut term_of: std::collections::HashMap<i64, (String, String, i64)> =
            std::collections::HashMap::with_capacity(events.len());
        for e in &events {
            let id: i64 = e.get(0);
            ids.push(id);
            if let Some(term_start) = e.get::<_, Option<i64>>(3) {
                let sent: i64 = e.get(4);
                let accepted: bool = e.get(5);
                let key = (e.get(1), e.get(2), term_start);
                let v = overage.entry(key.clone()).or_default();
                add(&mut v[0], sent)?;
                add(&mut v[1], if accepted { sent } else { 0 })?;
                add(&mut v[2], 1)?;
                term_of.insert(id, key);
            }
        }
        let totals = tx
            .query(
                "DELETE FROM hourly_totals WHERE outbound_id = ANY($1)
                 RETURNING resource, dimension, hour, quantity, quantity - prebilled, outbound_id",
                &[&ids],
            )
            .await?;
        let mut months: BTreeMap<(String, String, i64), [i64; 1]> = BTreeMap::new();
        for t in &totals {
            let hour: i64 = t.get(2);
            let v = months
                .entry((t.get(0), t.get(1), crate::pools::month_start(hour)))
                .or_default();
            add(&mut v[0], t.get(3))?;
            if let Some(key) = term_of.get(&t.get::<_, i64>(5)) {
                let v = overage.get_mut(key).expect("the term of a deleted event");
                add(&mut v[3], t.get(4))?;
            }
        }
        if !months.is_empty() {
            let m = Sums::from_map(months);
            tx.execute(
                "INSERT INTO usage_months AS u (resource, dimension, month, quantity)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS m(r, d, k, q)
                 ORDER BY r, d, k
                 ON CONFLICT (resource, dimension, month) DO UPDATE SET quantity = u.quantity + excluded.quantity",
                &[&m.resource, &m.dimension, &m.key, &m.values[0]],
            )
            .await?;
        }
        if !overage.is_empty() {
            let o = Sums::from_map(overage);
            tx.execute(
                "INSERT INTO retired_overage AS r (resource, dimension, term_start, frozen, accepted, events, usage)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
                                      $7::int8[])
                      AS o(r, d, k, f, a, n, u)
                 ORDER BY r, d, k
                 ON CONFLICT (resource, dimension, term_start) DO UPDATE SET
                     frozen = r.frozen + excluded.frozen,
                     accepted = r.accepted + excluded.accepted,
                     events = r.events + excluded.events,
                     usage = r.usage + excluded.usage",
                &[
                    &o.resource,
                    &o.dimension,
                    &o.key,
                    &o.values[0],
                    &o.values[1],
                    &o.values[2],
                    &o.values[3],
                ],
            )
            .await?;
        }
        let deleted = tx
            .execute("DELETE FROM outbound_events WHERE id = ANY($1)", &[&ids])
            .await?;
        tx.commit().await?;
        Ok((deleted, totals.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::HOUR;

    #[test]
    fn the_cutoff_is_never_later_than_25_hours_ago() {
        let now = DateTime::parse_from_rfc3339("2026-03-10T12:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let r = RetentionRules::new(now, Duration::hours(1), Duration::days(7));
        assert_eq!(r.cutoff(), hour_of(now) - 25 * HOUR);
        let r = RetentionRules::new(now, Duration::days(30), Duration::days(7));
        assert_eq!(r.cutoff(), hour_of(now - Duration::days(30)));
    }
}
