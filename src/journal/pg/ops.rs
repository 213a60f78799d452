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

/// A call's answers, each with the fence of its event's claim: what [`PgJournal::settle_and_mark`] settles.
#[derive(Debug, Clone)]
pub struct FencedAnswers {
    /// The call's alert, if it raised one.
    pub call_alert: Option<(AlertKey, serde_json::Value)>,
    /// (id, fence, how the event settles).
    pub settles: Vec<(i64, i64, Settle)>,
    /// When the answer came.
    pub now: DateTime<Utc>,
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
        let claim = outbound::ClaimArgs {
            now,
            limit,
            lease,
            excluding: excluding.to_vec(),
        };
        Ok(self
            .settle_and_mark(owner, None, &[], lease, Some(&claim))
            .await?
            .2)
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

    /// Marks a call's events in flight, all or none (see [`PgJournal::settle_and_mark`], with nothing to settle);
    /// false when the lease on any of them was lost or a stored body is not the one given.
    pub async fn mark_attempt(
        &self,
        owner: &str,
        marks: &[(i64, i64, &str)],
        lease: Duration,
    ) -> Result<bool, PgError> {
        Ok(self
            .settle_and_mark(owner, None, marks, lease, None)
            .await?
            .1)
    }

    /// One transaction: the answers of a worker's last call settled (its alert, each answer fenced), the events
    /// of its next call marked in flight (`marks`: id, fence, body to send; all or none, see
    /// [`outbound::mark_attempt`]), and (`claim`) the batch after that claimed, to be billed while the call is in
    /// flight. Returns the count per outcome (`stale` for settles refused because the lease was lost), whether
    /// the mark applied (the call may be made only then) and the events claimed.
    ///
    /// With a mark or a claim the commit is synchronous (`synchronous_commit = on`, whatever the server's
    /// default): the mark must be durable before its call starts, and that flush also makes durable every commit
    /// before it in the WAL (the claims and bills of the events it marks, which it checks); a claim must be
    /// durable so that its fence is never handed out twice. Settling alone commits without waiting for the
    /// flush: losing it to a PostgreSQL crash leaves the events pending and in flight under a lease that runs
    /// out, so the next claim makes them ambiguous and resends the same stored bytes (their billing and bodies
    /// were flushed by their mark), and the marketplace's same-quantity `Duplicate` counts each once.
    ///
    /// The common case (no call alert; every answer accepted or duplicate) is one round trip: `BEGIN`, the
    /// one-statement settle ([`outbound::SETTLE_SIMPLE`]), the mark, the claim and `COMMIT`, pipelined.
    pub async fn settle_and_mark(
        &self,
        owner: &str,
        answered: Option<(&FencedAnswers, &SettlePolicy)>,
        marks: &[(i64, i64, &str)],
        lease: Duration,
        claim: Option<&outbound::ClaimArgs>,
    ) -> Result<(BTreeMap<String, usize>, bool, Vec<Claimed>), PgError> {
        let durable = if marks.is_empty() && claim.is_none() {
            "off"
        } else {
            "on"
        };
        let simple = answered
            .is_none_or(|(a, _)| a.call_alert.is_none() && outbound::all_simple(&a.settles));
        if let Some((answered, policy)) = answered.filter(|_| !simple) {
            return in_tx!(self, tx => {
                tx.batch_execute(&format!("SET LOCAL synchronous_commit = {durable}")).await?;
                let counts = outbound::settle_answers(
                    &tx, owner, answered.call_alert.clone(), &answered.settles, answered.now, policy,
                )
                .await?;
                let marked = if marks.is_empty() {
                    false
                } else {
                    let stmt = tx.prepare_cached(outbound::MARK_SQL).await?;
                    outbound::mark_attempt(&*tx, &stmt, owner, marks, lease).await?
                };
                let claimed = match claim {
                    None => Vec::new(),
                    Some(a) => {
                        let stmt = tx.prepare_cached(&outbound::CLAIM_SQL).await?;
                        tx.batch_execute(outbound::GENERIC_PLANS).await?;
                        outbound::claim_with(&*tx, &stmt, a, owner).await?
                    }
                };
                Ok((counts, marked, claimed))
            });
        }
        let mut attempt = 0u32;
        loop {
            let client = self.client().await?;
            let (settle_stmt, mark_stmt, claim_stmt) = tokio::try_join!(
                client.prepare_cached(outbound::SETTLE_SIMPLE),
                client.prepare_cached(outbound::MARK_SQL),
                client.prepare_cached(&outbound::CLAIM_SQL),
            )?;
            let settles: Vec<&(i64, i64, Settle)> = answered
                .map(|(a, _)| a.settles.iter().collect())
                .unwrap_or_default();
            let now = answered.map(|(a, _)| a.now).unwrap_or_default();
            let begin = format!("BEGIN; SET LOCAL synchronous_commit = {durable}");
            let mut counts = BTreeMap::new();
            // Sent in this order on the one connection, answered in one round trip; an error aborts the
            // transaction and the COMMIT then rolls it back.
            let (begun, settled, marked, planned, claimed, committed) = tokio::join!(
                client.batch_execute(&begin),
                async {
                    if settles.is_empty() {
                        return Ok(());
                    }
                    outbound::settle_simple(
                        &**client,
                        &settle_stmt,
                        owner,
                        &settles,
                        now,
                        &mut counts,
                    )
                    .await
                },
                async {
                    if marks.is_empty() {
                        return Ok(false);
                    }
                    outbound::mark_attempt(&**client, &mark_stmt, owner, marks, lease).await
                },
                async {
                    match claim {
                        None => Ok(()),
                        Some(_) => client.batch_execute(outbound::GENERIC_PLANS).await,
                    }
                },
                async {
                    match claim {
                        None => Ok(Vec::new()),
                        Some(a) => outbound::claim_with(&**client, &claim_stmt, a, owner).await,
                    }
                },
                client.batch_execute("COMMIT"),
            );
            let result = begun
                .map_err(PgError::from)
                .and(settled)
                .and(marked)
                .and_then(|m| planned.map(|()| m).map_err(PgError::from))
                .and_then(|m| claimed.map(|c| (m, c)))
                .and_then(|(m, c)| committed.map(|()| (counts, m, c)).map_err(PgError::from));
            match result {
                Err(e) if e.is_conflict() && attempt < CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(message = "Fleet transaction aborted by a conflict; running it again.", error = %e, attempt);
                }
                other => return other,
            }
        }
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
