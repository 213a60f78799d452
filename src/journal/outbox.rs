//! The fleet outbox: records ingested in fleet mode wait here (`usage_records.forward_pending = 1`) until the
//! forwarder (`crate::fleet`) has committed them into the shared PostgreSQL journal; then it clears the mark.
//!
//! The order is PostgreSQL first, SQLite second: a crash between the two leaves a record marked that is already
//! in PostgreSQL, and forwarding it again adds nothing there (`INSERT ... ON CONFLICT DO NOTHING` on its key,
//! fleet invariant F1). Retention never compacts a marked record (`usage::compact_records`).

use super::{Journal, JournalError};
use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, OptionalExtension, params};

/// One record waiting in the outbox, as the forwarder ships it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Local row id (to clear the mark).
    pub seq: i64,
    /// Idempotency key: the client's id or the key generated at ingest; the fleet-wide primary key.
    pub idem_key: String,
    /// Resource as journaled locally (its first local spelling).
    pub resource: String,
    /// Plan given on the record, `''` for none.
    pub plan: String,
    /// Dimension.
    pub dimension: String,
    /// When the usage happened (unix seconds).
    pub event_time: i64,
    /// Micro-units.
    pub quantity: i64,
    /// When this replica acknowledged it (unix seconds, replica clock).
    pub received_at: i64,
}

/// How much is waiting in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records not yet forwarded.
    pub unforwarded: i64,
    /// `received_at` of the oldest of them.
    pub oldest_received_at: Option<i64>,
}

/// The first `limit` records waiting, oldest first. A record without a key (only a journal written by hand can
/// hold one: fleet-mode ingest always stores a key) gets one derived from its row, stable for this journal.
pub fn batch(conn: &Connection, limit: usize) -> Result<Vec<OutboxRecord>, JournalError> {
    batch_after(conn, i64::MIN, limit)
}

/// The first `limit` records waiting whose `seq` is above `after` (the forwarder reads the next batch this way
/// while the one before it, up to `after`, is still on its way to PostgreSQL).
pub fn batch_after(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<OutboxRecord>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, idem_key, resource, plan, dimension, event_time, quantity, received_at
         FROM usage_records WHERE forward_pending = 1 AND seq > ?2 ORDER BY seq LIMIT ?1",
    )?;
    let rows = stmt.query_map(params![limit as i64, after], |r| {
        let seq: i64 = r.get(0)?;
        let key: Option<String> = r.get(1)?;
        let received_at: i64 = r.get(7)?;
        Ok(OutboxRecord {
            seq,
            idem_key: key.unwrap_or_else(|| format!("meterd-unkeyed:{received_at}:{seq}")),
            resource: r.get(2)?,
            plan: r.get(3)?,
            dimension: r.get(4)?,
            event_time: r.get(5)?,
            quantity: r.get(6)?,
            received_at,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Clears the outbox mark of `seqs` (after their PostgreSQL commit). Returns how many were marked.
///
/// A batch from [`batch`] is the waiting records with the smallest `seq`s, so when `seqs` is such a batch (sorted,
/// and every waiting record up to its last `seq` is in it) one range update clears exactly it: records ingested
/// since have larger `seq`s (SQLite gives a new row `max(rowid) + 1`). Otherwise each `seq` is cleared alone.
pub fn mark_forwarded(conn: &Connection, seqs: &[i64]) -> Result<usize, JournalError> {
    let Some(&last) = seqs.last() else {
        return Ok(0);
    };
    if seqs.windows(2).all(|w| w[0] < w[1]) {
        let waiting_up_to_last: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM usage_records WHERE forward_pending = 1 AND seq <= ?1",
            )?
            .query_row([last], |r| r.get(0))?;
        if waiting_up_to_last == seqs.len() as i64 {
            return Ok(conn
                .prepare_cached(
                    "UPDATE usage_records SET forward_pending = 0 WHERE forward_pending = 1 AND seq <= ?1",
                )?
                .execute([last])?);
        }
    }
    let mut stmt = conn.prepare_cached(
        "UPDATE usage_records SET forward_pending = 0 WHERE seq = ?1 AND forward_pending = 1",
    )?;
    let mut n = 0;
    for s in seqs {
        n += stmt.execute([s])?;
    }
    Ok(n)
}

/// What is waiting: count and oldest `received_at` (through the partial index `usage_records_outbox`).
pub fn stats(conn: &Connection) -> Result<OutboxStats, JournalError> {
    let unforwarded: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM usage_records WHERE forward_pending = 1")?
        .query_row([], |r| r.get(0))?;
    let oldest: Option<i64> = conn
        .prepare_cached(
            "SELECT received_at FROM usage_records WHERE forward_pending = 1 ORDER BY seq LIMIT 1",
        )?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(OutboxStats {
        unforwarded,
        oldest_received_at: oldest,
    })
}

/// Fleet mode's local retention (the SQLite emitter, which applies `journal.retention`, does not run there):
/// forwarded records older than the dedupe window, and the local hourly totals and carries of hours older than
/// `retention` (in fleet mode they are never frozen locally; the shared journal holds the fleet's). Never a record
/// still waiting in the outbox. Returns records deleted.
pub fn compact_forwarded(
    conn: &Connection,
    now: DateTime<Utc>,
    retention: Duration,
    dedupe_window: Duration,
) -> Result<usize, JournalError> {
    let cutoff = super::usage::hour_of(now - retention);
    conn.prepare_cached("DELETE FROM hourly_totals WHERE hour < ?1 AND outbound_id IS NULL")?
        .execute(params![cutoff])?;
    conn.prepare_cached("DELETE FROM carries WHERE from_hour < ?1 AND outbound_id IS NULL")?
        .execute(params![cutoff])?;
    super::usage::compact_records(conn, now, dedupe_window, 100_000)
}

/// The outbox operations on the journal's face (one job each).
impl Journal {
    /// The first `limit` records waiting to be forwarded (a read).
    pub async fn outbox_batch(&self, limit: usize) -> Result<Vec<OutboxRecord>, JournalError> {
        self.read(move |c| batch(c, limit)).await
    }

    /// The first `limit` records waiting with a `seq` above `after` (a read; see [`batch_after`]).
    pub async fn outbox_batch_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRecord>, JournalError> {
        self.read(move |c| batch_after(c, after, limit)).await
    }

    /// Clears the outbox mark of `seqs` (one write job).
    pub async fn outbox_mark_forwarded(&self, seqs: Vec<i64>) -> Result<usize, JournalError> {
        self.write(move |c| mark_forwarded(c, &seqs)).await
    }

    /// How much is waiting (a read).
    pub async fn outbox_stats(&self) -> Result<OutboxStats, JournalError> {
        self.read(stats).await
    }

    /// Fleet mode's local retention, see [`compact_forwarded`] (one write job).
    pub async fn outbox_compact(
        &self,
        now: DateTime<Utc>,
        retention: Duration,
        dedupe_window: Duration,
    ) -> Result<usize, JournalError> {
        self.write(move |c| compact_forwarded(c, now, retention, dedupe_window))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_with(n: i64) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::journal::migrate(&mut conn).unwrap();
        for i in 0..n {
            conn.execute(
                "INSERT INTO usage_records (idem_key, resource, plan, dimension, event_time, origin_hour, hour,
                                            quantity, received_at, forward_pending)
                 VALUES (?1, 'r', '', 'd', 0, 0, 0, 1, ?2, 1)",
                params![format!("k{i}"), 100 + i],
            )
            .unwrap();
        }
        conn
    }

    /// A whole batch is cleared by one range update; any other set of seqs clears exactly those, never a record
    /// that was not forwarded.
    #[test]
    fn marking_clears_exactly_the_forwarded_records() {
        let conn = journal_with(10);
        let first: Vec<i64> = batch(&conn, 4).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(mark_forwarded(&conn, &first).unwrap(), 4);
        let s = stats(&conn).unwrap();
        assert_eq!((s.unforwarded, s.oldest_received_at), (6, Some(104)));
        // Not a prefix of what waits (a hole at the 6th record): only these two.
        let rest: Vec<i64> = batch(&conn, 6).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(mark_forwarded(&conn, &[rest[0], rest[2]]).unwrap(), 2);
        let left: Vec<i64> = batch(&conn, 10).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(left, vec![rest[1], rest[3], rest[4], rest[5]]);
        assert_eq!(mark_forwarded(&conn, &[]).unwrap(), 0);
    }
}
