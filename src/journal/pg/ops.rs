//! The fleet journal's face for emission: one method per operation, each one PostgreSQL transaction (run again
//! from the start when PostgreSQL aborts it to resolve a deadlock or serialization conflict; it was rolled back).

use super::outbound::{self, Claimed};
use super::{PgError, PgJournal, billing, freeze};
use crate::alert_kind::AlertKey;
use crate::config::Settings;
use crate::journal::Disposition;
use crate::journal::outbound::{Expired, FreezeSummary, PendingEvent, Settle, SettlePolicy};
use crate::journal::subscriptions::{KnownSubscription, ListedSubscription};
use crate::outcome::Outcome;
use chrono::{DateTime, Duration, Utc};
use std::collections::BTreeMap;

/// How often a transaction aborted by a conflict is run again before the error is returned.
const CONFLICT_RETRIES: u32 = 8;

/// Runs `$body` (with `$tx` the open transaction) and commits; again from the start on a conflict.
macro_rules! in_tx {
    ($pg:expr, $tx:ident => $body:expr) => {{
        let mut attempt = 0u32;
        loop {
            let mut client = $pg.client().await?;
            let $tx = client.transaction().await?;
            let result: Result<_, PgError> = async { $body }.await;
            let result = match result {
                Ok(v) => $tx.commit().await.map(|()| v).map_err(PgError::from),
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(message = "Fleet transaction aborted by a conflict; running it again.", error = %e, attempt);
                }
                other => break other,
            }
        }
    }};
}

/// What a fleet pass's opening transaction does (see [`PgJournal::open_pass`]).
#[derive(Debug, Clone)]
pub struct FleetPassStart {
    /// Release subscription holds first (a flush asked for it).
    pub release_held: bool,
    /// The freeze timing (`emit.grace`, `emit.safety_margin`, `fleet.max_wait`, `fleet.replica_timeout`).
    pub rule: freeze::FreezeRule,
    /// How expiries settle.
    pub policy: SettlePolicy,
    /// `alerts.pending_age`.
    pub pending_age: Duration,
}

impl PgJournal {
    /// One transaction: release holds (if asked), freeze what the fleet rule allows, expire overdue events (not
    /// under a live lease) and raise pending-age alerts.
    pub async fn open_pass(
        &self,
        now: DateTime<Utc>,
        p: FleetPassStart,
    ) -> Result<(FreezeSummary, Vec<Expired>), PgError> {
        in_tx!(self, tx => {
            if p.release_held {
                outbound::release_holds(&tx, now).await?;
            }
            let f = freeze::freeze(&tx, now, &p.rule).await?;
            let e = outbound::expire_overdue(&tx, now, &p.policy).await?;
            outbound::raise_pending_age_alerts(&tx, now, p.pending_age).await?;
            Ok((f, e))
        })
    }

    /// Freezes what the fleet rule allows at `now` (one transaction; the freeze of [`PgJournal::open_pass`]).
    pub async fn freeze(
        &self,
        now: DateTime<Utc>,
        rule: freeze::FreezeRule,
    ) -> Result<FreezeSummary, PgError> {
        in_tx!(self, tx => freeze::freeze(&tx, now, &rule).await)
    }

    /// Claims up to `limit` due events for `owner` under a lease of `lease` (database clock).
    pub async fn claim(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Claimed>, PgError> {
        self.claim_excluding(owner, now, limit, lease, &[]).await
    }

    /// [`PgJournal::claim`], never taking an event of `excluding` (the claimer's own call in flight).
    pub async fn claim_excluding(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        limit: i64,
        lease: Duration,
        excluding: &[i64],
    ) -> Result<Vec<Claimed>, PgError> {
        let client = self.client().await?;
        outbound::claim(&client, owner, now, limit, lease, excluding).await
    }

    /// Frees `owner`'s leases on claimed events it will not send (fences must match; events in flight stay).
    pub async fn release_leases(
        &self,
        owner: &str,
        fenced: Vec<(i64, i64)>,
    ) -> Result<u64, PgError> {
        let client = self.client().await?;
        outbound::release_leases(&client, owner, &fenced).await
    }

    /// One transaction: settles, bills and writes bodies for a claimed batch (see [`outbound::dispose`]).
    #[allow(clippy::type_complexity)]
    pub async fn dispose<B>(
        &self,
        owner: &str,
        decided: Vec<(Claimed, Disposition)>,
        settings: &Settings,
        now: DateTime<Utc>,
        policy: &SettlePolicy,
        body: B,
    ) -> Result<(Vec<Claimed>, BTreeMap<String, usize>), PgError>
    where
        B: Fn(&PendingEvent, &str, i64) -> String + Sync,
    {
        in_tx!(self, tx => outbound::dispose(&tx, owner, decided.clone(), settings, now, policy, &body).await)
    }

    /// Marks a call's events in flight, all or none; false when the lease on any of them was lost.
    pub async fn mark_attempt(
        &self,
        owner: &str,
        fenced: Vec<(i64, i64)>,
        lease: Duration,
    ) -> Result<bool, PgError> {
        let client = self.client().await?;
        outbound::mark_attempt(&client, owner, &fenced, lease).await
    }

    /// One transaction: the call's alert and each answer settled under `owner`'s fence (`(id, fence, settle)`).
    pub async fn settle_answers(
        &self,
        owner: &str,
        call_alert: Option<(AlertKey, serde_json::Value)>,
        settles: Vec<(i64, i64, Settle)>,
        now: DateTime<Utc>,
        policy: &SettlePolicy,
    ) -> Result<BTreeMap<String, usize>, PgError> {
        if call_alert.is_none() && outbound::all_simple(&settles) {
            // The common case (every answer accepted or duplicate): one statement, atomic by itself.
            // Its commit does not wait for the WAL flush: a PostgreSQL crash that loses it leaves the events
            // pending and in flight (marked by a synchronous commit before the call), so the next claim makes
            // them ambiguous and sends the same bytes again, and the marketplace's same-quantity `Duplicate`
            // counts each once. Any later synchronous commit (the next call's mark) makes it durable.
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let stmt = tx.prepare_cached(outbound::SETTLE_SIMPLE).await?;
            let simple: Vec<&(i64, i64, Settle)> = settles.iter().collect();
            let mut counts = BTreeMap::new();
            let (set, settled) = tokio::join!(
                tx.batch_execute("SET LOCAL synchronous_commit = off"),
                outbound::settle_simple(&*tx, &stmt, owner, &simple, now, &mut counts),
            );
            set?;
            settled?;
            tx.commit().await?;
            return Ok(counts);
        }
        in_tx!(self, tx => outbound::settle_answers(&tx, owner, call_alert.clone(), &settles, now, policy).await)
    }

    /// Settles one event under `owner`'s fence; `None` when the lease is no longer ours (nothing changed).
    pub async fn settle(
        &self,
        id: i64,
        owner: &str,
        fence: i64,
        outcome: Settle,
        now: DateTime<Utc>,
        policy: &SettlePolicy,
    ) -> Result<Option<Outcome>, PgError> {
        in_tx!(self, tx => outbound::settle(&tx, id, owner, fence, &outcome, now, policy).await)
    }

    /// The subscriptions as last listed by any replica.
    pub async fn known_subscriptions(
        &self,
    ) -> Result<BTreeMap<String, KnownSubscription>, PgError> {
        let client = self.client().await?;
        billing::known_subscriptions(&**client).await
    }

    /// Stores a fresh subscription list seen at `now`.
    pub async fn store_subscriptions(
        &self,
        listed: Vec<ListedSubscription>,
        now: DateTime<Utc>,
    ) -> Result<(), PgError> {
        in_tx!(self, tx => billing::store_subscriptions(&tx, &listed, now).await)
    }

    /// How many outbound events are `pending`.
    pub async fn pending_count(&self) -> Result<i64, PgError> {
        let client = self.client().await?;
        outbound::pending_count(&**client).await
    }

    /// When the next pending event is due (unix seconds), if any.
    pub async fn next_due(&self) -> Result<Option<i64>, PgError> {
        let client = self.client().await?;
        outbound::next_due(&**client).await
    }
}
