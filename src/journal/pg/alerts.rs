//! Fleet alert delivery: the alerts of the shared journal, claimed by one replica at a time.
//!
//! Any replica's delivery task may look at the shared `alerts` table; a claim moves the alert's
//! `next_attempt_at` past the claim's end (`FOR UPDATE SKIP LOCKED`), so two replicas never deliver the same alert
//! at once. A replica that dies holding a claim leaves the alert due again when the claim ends (the webhook may
//! then see it twice; it is delivered at least once and carries its dedupe key).

use super::{PgError, PgJournal};
use crate::journal::alerts::PendingAlert;
use chrono::{DateTime, Utc};

/// How long a claimed alert is left to its claimer before another replica may deliver it (seconds).
pub const CLAIM_SECS: i64 = 60;

impl PgJournal {
    /// Claims up to 100 alerts due at `now` (oldest first) for this replica's delivery task.
    pub async fn claim_alerts(&self, now: DateTime<Utc>) -> Result<Vec<PendingAlert>, PgError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE alerts SET next_attempt_at = $1 + $2
                 WHERE id IN (SELECT id FROM alerts WHERE delivered_at IS NULL AND next_attempt_at <= $1
                              ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
                 RETURNING id, body, attempts",
                &[&now.timestamp(), &CLAIM_SECS],
            )
            .await?;
        let mut due: Vec<PendingAlert> = rows
            .iter()
            .map(|r| PendingAlert {
                id: r.get(0),
                body: r.get(1),
                attempts: r.get(2),
            })
            .collect();
        due.sort_by_key(|a| a.id);
        Ok(due)
    }

    /// Records one delivery attempt of alert `id`: delivered at `Ok(now)`, or failed with its error and next
    /// attempt.
    pub async fn alert_attempted(
        &self,
        id: i64,
        attempts: i64,
        result: Result<DateTime<Utc>, (Option<String>, DateTime<Utc>)>,
    ) -> Result<(), PgError> {
        let client = self.client().await?;
        match result {
            Ok(now) => {
                client
                    .execute(
                        "UPDATE alerts SET delivered_at = $2, attempts = $3, last_error = NULL WHERE id = $1",
                        &[&id, &now.timestamp(), &attempts],
                    )
                    .await?
            }
            Err((err, next)) => {
                client
                    .execute(
                        "UPDATE alerts SET attempts = $2, last_error = $3, next_attempt_at = $4 WHERE id = $1",
                        &[&id, &attempts, &err, &next.timestamp()],
                    )
                    .await?
            }
        };
        Ok(())
    }
}
