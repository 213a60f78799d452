//! Replicas: each one's heartbeat and forward watermark (`replicas`), which the freeze reads (fleet invariant F3)
//! and `status` lists. Times are unix seconds from the replica's own clock (so `ManualClock` tests work).

use super::outbound::DB_NOW;
use super::{PgError, PgJournal};

/// One replica's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    /// `fleet.replica_id`.
    pub replica_id: String,
    /// When this run of it started.
    pub started_at: i64,
    /// Its last heartbeat.
    pub heartbeat_at: i64,
    /// Every record it received before this instant is in the shared journal.
    pub watermark: i64,
    /// Records still in its local outbox at the last heartbeat.
    pub unforwarded: i64,
    /// meterd version.
    pub version: String,
}

impl PgJournal {
    /// Publishes `row` (insert, or replace the replica's previous row). When the replica's clock (its
    /// `heartbeat_at`) is ahead of the database's, the watermark is moved back by the gap: "every record received
    /// before T by my clock" means before T - gap on the database's time line, which the freeze judges hours on
    /// (`freeze::judged_at`). A watermark taken at face value would let the others freeze an hour whose records
    /// this replica has not forwarded yet. A clock behind publishes an earlier watermark: the freeze only waits.
    pub async fn heartbeat(&self, row: &ReplicaRow) -> Result<(), PgError> {
        let client = self.client().await?;
        client
            .execute(
                &format!("INSERT INTO replicas (replica_id, started_at, heartbeat_at, watermark, unforwarded, version)
                 VALUES ($1, $2, $3, $4 - GREATEST(0, $3 - {DB_NOW}), $5, $6)
                 ON CONFLICT (replica_id) DO UPDATE SET
                     started_at = excluded.started_at,
                     heartbeat_at = excluded.heartbeat_at,
                     watermark = excluded.watermark,
                     unforwarded = excluded.unforwarded,
                     version = excluded.version"),
                &[
                    &row.replica_id,
                    &row.started_at,
                    &row.heartbeat_at,
                    &row.watermark,
                    &row.unforwarded,
                    &row.version,
                ],
            )
            .await?;
        Ok(())
    }

    /// Every replica that ever published a heartbeat, by id.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>, PgError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT replica_id, started_at, heartbeat_at, watermark, unforwarded, version
                 FROM replicas ORDER BY replica_id",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| ReplicaRow {
                replica_id: r.get(0),
                started_at: r.get(1),
                heartbeat_at: r.get(2),
                watermark: r.get(3),
                unforwarded: r.get(4),
                version: r.get(5),
            })
            .collect())
    }

    /// The replicas live at `now` (heartbeat within `timeout` seconds): the ones freezing waits for.
    pub async fn live_replicas(&self, now: i64, timeout: i64) -> Result<Vec<ReplicaRow>, PgError> {
        Ok(self
            .replicas()
            .await?
            .into_iter()
            .filter(|r| r.heartbeat_at >= now - timeout)
            .collect())
    }
}
