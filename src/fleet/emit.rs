//! The fleet emitter: any replica freezes, claims, bills, sends and settles from the shared PostgreSQL journal.
//!
//! A pass opens with one transaction ([`PgJournal::open_pass`]: holds released on a flush, the freeze under the
//! fleet rule, expiry of overdue events, pending-age alerts), then `emit.concurrency` workers each loop: one
//! durable transaction ([`PgJournal::settle_and_mark`]) settles the answers of the worker's last call while the
//! fence still matches, marks its next call's events in flight (only if the stored bodies are the bytes to send)
//! and claims the batch after that (up to 25 due events under a lease, `FOR UPDATE SKIP LOCKED`, `fleet.lease`
//! by the database clock, fence + 1); then the call is made with the marketplace client and the classification of
//! `emit/send.rs`, and meanwhile the claimed batch is decided with the subscription view (stored in PostgreSQL,
//! refreshed by whichever replica finds it stale) and billed with its bodies written in one transaction. A
//! worker stops when nothing is left to claim, so replicas share the due events by claiming them in turn, never
//! by locks held across a call. No session advisory locks (see docs/fleet.md, "Emission").

use crate::clock::{SharedClock, fmt_time};
use crate::config::{FleetSettings, Settings};
use crate::emit::{
    BATCH_SIZE, Called, Decision, LastPass, PassSummary, SubscriptionStore, SubscriptionView, call,
    delays_of,
};
use crate::journal::Disposition;
use crate::journal::outbound::{KnownSubscription, ListedSubscription, PendingEvent, SettlePolicy};
use crate::journal::pg::freeze::FreezeRule;
use crate::journal::pg::outbound::{ClaimArgs, Claimed};
use crate::journal::pg::{FencedAnswers, FleetPassStart, PgJournal};
use crate::marketplace::client::MarketplaceClient;
use crate::ops::telemetry::{EventsSettled, InternalEvent};
use crate::outcome::Outcome;
use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The fence of event `id`'s claim (every event sent was claimed in its batch; a missing fence, which cannot
/// happen, never matches).
fn fence_of(fences: &HashMap<i64, i64>, id: i64) -> i64 {
    fences.get(&id).copied().unwrap_or(-1)
}

/// A batch to send with the fence of each of its events' claims.
type Fenced = (Vec<PendingEvent>, Arc<HashMap<i64, i64>>);

/// Adds outcome counts to a worker's tally (and to the settled-events telemetry).
fn add_counts(done: &mut Worked, counts: BTreeMap<String, usize>) {
    for (k, n) in counts {
        EventsSettled {
            outcome: &k,
            count: n as u64,
        }
        .emit();
        *done.outcomes.entry(k).or_default() += n;
    }
}

/// The subscription view stored in the shared journal.
struct SharedSubscriptions(PgJournal);

impl SubscriptionStore for SharedSubscriptions {
    async fn known_subscriptions(&self) -> anyhow::Result<BTreeMap<String, KnownSubscription>> {
        Ok(self.0.known_subscriptions().await?)
    }

    async fn store_subscriptions(
        &self,
        listed: Vec<ListedSubscription>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        Ok(self.0.store_subscriptions(listed, now).await?)
    }
}

/// What one worker of a pass needs (cloned per worker).
#[derive(Clone)]
struct Worker {
    settings: Arc<Settings>,
    pg: PgJournal,
    clock: SharedClock,
    client: Arc<MarketplaceClient>,
    owner: String,
    lease: Duration,
    subscriptions: Arc<SubscriptionView>,
}

/// What the workers of one pass did.
#[derive(Debug, Default)]
struct Worked {
    calls: usize,
    sent: usize,
    outcomes: BTreeMap<String, usize>,
    recheck_subscriptions: bool,
}

/// A claimed batch after its transaction: the events to send (with their fences) and the count per outcome of
/// those settled without a call.
type Disposed = (Vec<Claimed>, BTreeMap<String, usize>);

impl Worker {
    /// Claims, decides, bills and sends until nothing due at `now` is left to claim.
    ///
    /// One durable commit per call ([`PgJournal::settle_and_mark`]): the answers of the worker's last call are
    /// settled, its next call's events are marked in flight right before that call starts (never ahead of it),
    /// and the batch after that is claimed, all in one transaction (one round trip in the common case). While
    /// the call is in flight the worker decides and bills the batch it just claimed (the claim skips the events
    /// of its own calls), so that PostgreSQL work overlaps the marketplace latency instead of adding to it; a
    /// worker still has at most one call in flight. The worker is done when a claim finds nothing and no batch
    /// is waiting. A whole call refused with HTTP 400 is sent again at once in halves (still under the batch's
    /// leases), before the next batch. When a write fails, the leases of the batch claimed and not sent are
    /// given back.
    async fn run(self, now: DateTime<Utc>, policy: SettlePolicy) -> anyhow::Result<Worked> {
        let mut done = Worked::default();
        let delays = (delays_of(&self.settings), self.subscriptions.hold_recheck());
        let store = SharedSubscriptions(self.pg.clone());
        // A billed batch not yet marked; the halves of a batch refused with 400 (with the fences of their
        // claims); the answers of the last call, not yet settled.
        let mut next: Option<Disposed> = None;
        let mut halves: Vec<Fenced> = Vec::new();
        let mut answered: Option<FencedAnswers> = None;
        loop {
            // The batch to send now, if any: a half first, else the billed batch.
            let to_send = halves.pop().or_else(|| {
                next.take().map(|(sendable, _)| {
                    let fences: HashMap<i64, i64> =
                        sendable.iter().map(|c| (c.event.id, c.fence)).collect();
                    let batch: Vec<PendingEvent> = sendable.into_iter().map(|c| c.event).collect();
                    (batch, Arc::new(fences))
                })
            });
            // Claim the batch after it only when nothing else is lined up.
            let claim = (halves.is_empty() && next.is_none()).then(|| ClaimArgs {
                now,
                limit: BATCH_SIZE as i64,
                lease: self.lease,
                excluding: to_send
                    .iter()
                    .flat_map(|(b, _)| b.iter())
                    .chain(halves.iter().flat_map(|(h, _)| h.iter()))
                    .map(|e| e.id)
                    .collect(),
            });
            let marks: Vec<(i64, i64, &str)> = to_send
                .iter()
                .flat_map(|(b, fences)| {
                    b.iter()
                        .map(|e| (e.id, fence_of(fences, e.id), e.body.as_str()))
                })
                .collect();
            let last = answered.take();
            let written = self
                .pg
                .settle_and_mark(
                    &self.owner,
                    last.as_ref().map(|a| (a, &policy)),
                    &marks,
                    self.lease,
                    claim.as_ref(),
                )
                .await;
            drop(marks);
            let (marked, claimed) = match written {
                Ok((counts, marked, claimed)) => {
                    add_counts(&mut done, counts);
                    (marked, claimed)
                }
                Err(e) => {
                    self.give_back_disposed(next.take()).await;
                    return Err(e.into());
                }
            };
            let claimed_fences: Vec<(i64, i64)> =
                claimed.iter().map(|c| (c.event.id, c.fence)).collect();
            let nothing_claimed = claimed.is_empty();
            let billed = match to_send {
                Some((batch, fences)) if marked => {
                    // The call, and meanwhile the batch just claimed decided and billed.
                    let (called, billed) = tokio::join!(
                        call(&self.client, &self.clock, delays, batch),
                        self.bill(&store, now, &policy, claimed),
                    );
                    let Called {
                        answers,
                        sent,
                        split,
                        recheck_subscriptions,
                    } = called;
                    done.calls += 1;
                    done.sent += sent;
                    done.recheck_subscriptions |= recheck_subscriptions;
                    if let Some((first, second)) = split {
                        halves.push((second, fences.clone()));
                        halves.push((first, fences.clone()));
                    }
                    answered = Some(FencedAnswers {
                        call_alert: answers.call_alert,
                        settles: answers
                            .settles
                            .into_iter()
                            .map(|(id, s)| (id, fence_of(&fences, id), s))
                            .collect(),
                        now: answers.now,
                    });
                    billed
                }
                unsent => {
                    if unsent.is_some() {
                        metrics::counter!("meterd_fleet_leases_lost_total").increment(1);
                        tracing::warn!(message = "Lost the lease on a claimed batch before its call; another replica sends it.", owner = %self.owner);
                        *done.outcomes.entry("lease_lost".into()).or_default() += 1;
                    } else if nothing_claimed && halves.is_empty() && next.is_none() {
                        // Nothing sent, nothing waiting, nothing left to claim; the last answers are settled.
                        break;
                    }
                    self.bill(&store, now, &policy, claimed).await
                }
            };
            match billed {
                Ok(Some((sendable, counts))) => {
                    add_counts(&mut done, counts);
                    if !sendable.is_empty() {
                        next = Some((sendable, BTreeMap::new()));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.settle_last(answered.take(), &policy, &mut done).await;
                    if let Err(e) = self.pg.release_leases(&self.owner, claimed_fences).await {
                        tracing::warn!(message = "Could not give back the leases of a claimed batch; they expire by themselves.", error = %e);
                    }
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// Settles the last call's answers before a worker returns an error (best effort: answers not settled leave
    /// their events in flight until the lease ends, then ambiguous and resent as the same bytes).
    async fn settle_last(
        &self,
        answered: Option<FencedAnswers>,
        policy: &SettlePolicy,
        done: &mut Worked,
    ) {
        let Some(last) = answered else { return };
        match self
            .pg
            .settle_and_mark(&self.owner, Some((&last, policy)), &[], self.lease, None)
            .await
        {
            Ok((counts, _, _)) => add_counts(done, counts),
            Err(e) => {
                tracing::warn!(message = "Could not settle a call's answers; its events are resent as the same bytes once their leases end.", error = %e)
            }
        }
    }

    /// Decides each claimed event with the subscription view and runs the batch's transaction
    /// ([`PgJournal::dispose`]: settles what is not sent, bills and writes the bodies of what is). `None` when
    /// nothing was claimed.
    async fn bill(
        &self,
        store: &SharedSubscriptions,
        now: DateTime<Utc>,
        policy: &SettlePolicy,
        claimed: Vec<Claimed>,
    ) -> anyhow::Result<Option<Disposed>> {
        if claimed.is_empty() {
            return Ok(None);
        }
        let events: Vec<PendingEvent> = claimed.iter().map(|c| c.event.clone()).collect();
        let known = self
            .subscriptions
            .known(&self.client, store, &events, now)
            .await;
        let decided: Vec<(Claimed, Disposition)> = claimed
            .into_iter()
            .map(|c| {
                let d = match self.subscriptions.decide(&c.event, &known, now) {
                    Decision::Send { plan } => Disposition::Send { plan },
                    Decision::Settle(s) => Disposition::Settle(s),
                };
                (c, d)
            })
            .collect();
        let disposed = self
            .pg
            .dispose(
                &self.owner,
                decided,
                &self.settings,
                now,
                policy,
                crate::emit::event_body,
            )
            .await?;
        Ok(Some(disposed))
    }

    /// [`Worker::give_back`] for a claimed batch waiting to be sent, if any.
    async fn give_back_disposed(&self, disposed: Option<Disposed>) {
        if let Some((claimed, _)) = disposed {
            self.give_back(&claimed).await;
        }
    }

    /// Frees the leases of a claimed batch this worker will not send now (best effort: a lease not freed
    /// expires by itself); nothing of it was marked for a call. Their bodies and billing stay; whichever replica
    /// claims them next sends those bytes.
    async fn give_back(&self, claimed: &[Claimed]) {
        let fenced: Vec<(i64, i64)> = claimed.iter().map(|c| (c.event.id, c.fence)).collect();
        if let Err(e) = self.pg.release_leases(&self.owner, fenced).await {
            tracing::warn!(message = "Could not give back the leases of a claimed batch; they expire by themselves.", error = %e);
        }
    }
}

/// The fleet emitter of one replica.
pub struct FleetEmitter {
    settings: Arc<Settings>,
    fleet: FleetSettings,
    pg: PgJournal,
    clock: SharedClock,
    client: Arc<MarketplaceClient>,
    subscriptions: Arc<SubscriptionView>,
    release_held: std::sync::atomic::AtomicBool,
    pass_lock: tokio::sync::Mutex<()>,
    last: std::sync::Mutex<LastPass>,
    /// The schema is known to be current (migrated by this process, at start or by the first pass that could).
    migrated: std::sync::atomic::AtomicBool,
}

impl crate::emit::schedule::Passes for FleetEmitter {
    async fn pass(&self) -> anyhow::Result<PassSummary> {
        FleetEmitter::pass(self).await
    }

    async fn request_subscription_refresh(&self) {
        FleetEmitter::request_subscription_refresh(self).await
    }

    async fn next_due(&self) -> anyhow::Result<Option<i64>> {
        Ok(self.pg.next_due().await?)
    }

    fn now_secs(&self) -> i64 {
        self.clock.now().timestamp()
    }

    fn last(&self) -> LastPass {
        FleetEmitter::last(self)
    }
}

impl FleetEmitter {
    /// A fleet emitter for replica `fleet.replica_id` over the shared journal `pg`, sending through `client`.
    pub fn new(
        settings: Arc<Settings>,
        fleet: FleetSettings,
        pg: PgJournal,
        clock: SharedClock,
        client: MarketplaceClient,
    ) -> Self {
        FleetEmitter {
            subscriptions: Arc::new(SubscriptionView::new(settings.clone())),
            settings,
            fleet,
            pg,
            clock,
            client: Arc::new(client),
            release_held: std::sync::atomic::AtomicBool::new(false),
            pass_lock: tokio::sync::Mutex::new(()),
            last: std::sync::Mutex::new(LastPass::default()),
            migrated: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The shared journal.
    pub fn journal(&self) -> &PgJournal {
        &self.pg
    }

    /// This replica's lease owner name (`fleet.replica_id`).
    pub fn owner(&self) -> &str {
        &self.fleet.replica_id
    }

    /// The last pass, for status.
    pub fn last(&self) -> LastPass {
        self.last.lock().expect("last pass lock").clone()
    }

    /// Makes the next pass re-read the subscription list and look at held events (an operator's flush).
    pub async fn request_subscription_refresh(&self) {
        self.subscriptions.force_refresh().await;
        self.release_held
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Runs one fleet pass and remembers its result.
    pub async fn pass(&self) -> anyhow::Result<PassSummary> {
        let _single = self.pass_lock.lock().await;
        let started = std::time::Instant::now();
        let result = self.pass_inner().await;
        metrics::histogram!("meterd_emit_pass_seconds").record(started.elapsed().as_secs_f64());
        let mut last = self.last.lock().expect("last pass lock");
        match &result {
            Ok(s) => {
                last.last_pass = Some(s.clone());
                last.last_error = None;
                last.last_completed =
                    Some(self.clock.now().format("%Y-%m-%dT%H:%M:%SZ").to_string());
            }
            Err(e) => {
                tracing::error!(message = "Fleet emission pass failed; it will be retried at the next wake-up.", error = %format!("{e:#}"));
                last.last_error = Some(format!("{e:#}"));
            }
        }
        result
    }

    async fn pass_inner(&self) -> anyhow::Result<PassSummary> {
        if !self.migrated.load(std::sync::atomic::Ordering::SeqCst) {
            // A replica that started while PostgreSQL was down migrates at its first pass that reaches it.
            self.pg
                .migrate()
                .await
                .context("the fleet PostgreSQL journal could not be migrated")?;
            self.migrated
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let now = self.clock.now();
        let mut summary = PassSummary {
            started: now.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            ..Default::default()
        };
        let policy = SettlePolicy::from_settings(&self.settings);
        let release_held = self
            .release_held
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let (frozen, expired) = self
            .pg
            .open_pass(
                now,
                FleetPassStart {
                    release_held,
                    rule: FreezeRule {
                        grace: self.settings.emit.grace,
                        safety_margin: self.settings.emit.safety_margin,
                        max_wait: self.fleet.max_wait,
                        replica_timeout: self.fleet.replica_timeout,
                    },
                    policy: policy.clone(),
                    pending_age: self.settings.alerts.pending_age,
                },
            )
            .await
            .context("the fleet pass could not open (freeze and expiry)")?;
        summary.frozen = frozen.frozen;
        if frozen.frozen > 0 {
            tracing::info!(message = "Closed hours frozen (fleet).", events = frozen.frozen, through = %fmt_time(frozen.through));
        }
        for e in &expired {
            if e.state != Outcome::ExpiredUnconfirmed {
                tracing::warn!(message = "Event ran out of window.", resource = %e.resource, dimension = %e.dimension, hour = %e.hour, outcome = e.state.as_str());
            }
            *summary.outcomes.entry(e.state.to_string()).or_default() += 1;
            EventsSettled {
                outcome: e.state.as_str(),
                count: 1,
            }
            .emit();
        }
        summary.expired = expired;

        let worker = Worker {
            settings: self.settings.clone(),
            pg: self.pg.clone(),
            clock: self.clock.clone(),
            client: self.client.clone(),
            owner: self.fleet.replica_id.clone(),
            lease: self.fleet.lease,
            subscriptions: self.subscriptions.clone(),
        };
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.settings.emit.concurrency.max(1) {
            tasks.spawn(worker.clone().run(now, policy.clone()));
        }
        let mut first_error = None;
        let mut force_refresh = false;
        while let Some(joined) = tasks.join_next().await {
            match joined.context("fleet emission worker")? {
                Ok(w) => {
                    summary.calls += w.calls;
                    summary.sent += w.sent;
                    force_refresh |= w.recheck_subscriptions;
                    for (k, n) in w.outcomes {
                        *summary.outcomes.entry(k).or_default() += n;
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if force_refresh {
            self.subscriptions.force_refresh().await;
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        summary.pending_after = self.pg.pending_count().await?;
        metrics::gauge!("meterd_pending_events").set(summary.pending_after as f64);
        Ok(summary)
    }
}
