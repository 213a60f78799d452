//! Emission: one pass freezes closed hours, checks subscriptions, sends due events in batches of at most 25,
//! and writes each event's outcome back into the journal.
//!
//! A pass works from the journal alone, so a missed wake-up, a crash or a restart loses nothing: the next pass
//! finds the same pending events. Passes are single-flight twice over: a mutex inside the process and a lease
//! row in the journal across processes. An event is finished only by a classified answer, never by "request
//! sent"; only the transient subset of a batch is retried, with the retry state persisted in the journal.

mod connect;
pub mod schedule;
mod send;
mod subscriptions;

// The fleet emitter (`fleet::emit`) shares the sending, the classification and the subscription view.
pub(crate) use send::{Called, call};
pub(crate) use subscriptions::{Decision, SubscriptionStore, SubscriptionView};

pub use connect::{client, token_provider};

use crate::clock::{SharedClock, fmt_time, to_utc};
use crate::config::Settings;
use crate::journal::outbound::KnownSubscription;
use crate::journal::outbound::{self, PendingEvent};
use crate::journal::{Disposition, Journal, Opened, PassStart};
use crate::marketplace::client::MarketplaceClient;
use crate::marketplace::types::event_json;
use crate::ops::telemetry::{EventsSettled, InternalEvent};
use crate::outcome::Outcome;
use crate::resource::ResourceRef;
use crate::retry::RetryDelays;
use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use send::sender;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most events in one marketplace call.
pub const BATCH_SIZE: usize = 25;
/// Most due events taken into one pass (the rest follow in the next).
const PASS_LIMIT: i64 = 200_000;
/// Due events read, decided and billed per page (the pass streams them; memory holds a few pages).
const PAGE: i64 = 500;
/// Hourly totals frozen per writer job: the first call waits for one chunk, not for every closed key.
const FREEZE_CHUNK: usize = 1_000;
/// Batches of 25 queued for the senders ahead of them (two pages): enough that a sender never waits for the
/// next page's writer job, bounded so memory does not grow with the number of events.
const QUEUE_BATCHES: usize = 2 * (PAGE as usize) / BATCH_SIZE;
/// How long a pass may hold the emitter lease before another process may take it over.
const LEASE_TTL_SECS: i64 = 600;

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassSummary {
    /// When the pass started (RFC 3339).
    pub started: String,
    /// Outbound events frozen from newly closed hours.
    pub frozen: usize,
    /// Marketplace calls made.
    pub calls: usize,
    /// Events sent (counting each attempt).
    pub sent: usize,
    /// Outcomes written in this pass, by name (`retry`, `held`, `deferred` for events still pending).
    pub outcomes: BTreeMap<String, usize>,
    /// Events ended by their deadline.
    pub expired: Vec<outbound::Expired>,
    /// Set when another process holds the emitter lease (nothing was done).
    pub lease_held_by: Option<String>,
    /// Pending events left after the pass.
    pub pending_after: i64,
}

impl PassSummary {
    /// The systemd `STATUS=` line after this pass: pending count and when the pass ran.
    pub fn status_line(&self) -> String {
        format!(
            "pending {}; last pass {} (frozen {}, sent {}){}",
            self.pending_after,
            self.started,
            self.frozen,
            self.sent,
            self.lease_held_by
                .as_ref()
                .map(|h| format!("; lease held by {h}"))
                .unwrap_or_default()
        )
    }
}

/// What happened at the last pass, for status and systemd `STATUS=`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LastPass {
    /// Summary of the last pass.
    pub last_pass: Option<PassSummary>,
    /// Error of the last pass, if it failed.
    pub last_error: Option<String>,
    /// When a pass last completed, RFC 3339.
    pub last_completed: Option<String>,
}

/// The emitter.
pub struct Emitter {
    settings: Arc<Settings>,
    journal: Journal,
    clock: SharedClock,
    client: Arc<MarketplaceClient>,
    /// Lease owner name: host, pid and a random suffix, so two processes never share it.
    owner: String,
    /// The subscription list as meterd sees it, and the decision per due event.
    subscriptions: SubscriptionView,
    /// An operator asked for a pass (flush): held events are looked at in it, not only after a list refresh.
    release_held: std::sync::atomic::AtomicBool,
    /// In-process single flight.
    pass_lock: tokio::sync::Mutex<()>,
    last: std::sync::Mutex<LastPass>,
}

impl Emitter {
    /// An emitter over `journal`, sending through `client`.
    pub fn new(
        settings: Arc<Settings>,
        journal: Journal,
        clock: SharedClock,
        client: MarketplaceClient,
    ) -> Self {
        let owner = format!(
            "pid{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Emitter {
            subscriptions: SubscriptionView::new(settings.clone()),
            settings,
            journal,
            clock,
            client: Arc::new(client),
            owner,
            release_held: std::sync::atomic::AtomicBool::new(false),
            pass_lock: tokio::sync::Mutex::new(()),
            last: std::sync::Mutex::new(LastPass::default()),
        }
    }

    /// The last pass, for status.
    pub fn last(&self) -> LastPass {
        self.last.lock().expect("last pass lock").clone()
    }

    fn delays(&self) -> RetryDelays {
        delays_of(&self.settings)
    }

    /// Makes the next pass re-read the subscription list (an operator's flush: a subscription may just have been
    /// activated).
    pub async fn request_subscription_refresh(&self) {
        self.subscriptions.force_refresh().await;
        self.release_held
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The journal this emitter works from.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Runs one pass and remembers its result.
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
                tracing::error!(message = "Emission pass failed; it will be retried at the next wake-up.", error = %format!("{e:#}"));
                last.last_error = Some(format!("{e:#}"));
            }
        }
        result
    }

    async fn pass_inner(&self) -> anyhow::Result<PassSummary> {
        let now = self.clock.now();
        let mut summary = PassSummary {
            started: now.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            ..Default::default()
        };
        let (owner, policy) = (
            self.owner.clone(),
            outbound::SettlePolicy::from_settings(&self.settings),
        );
        let (grace, margin) = (self.settings.emit.grace, self.settings.emit.safety_margin);
        let pending_age = self.settings.alerts.pending_age;
        let lease = self
            .journal
            .acquire_lease("emitter", owner, now, Duration::seconds(LEASE_TTL_SECS))
            .await?;
        if let Err(holder) = lease {
            tracing::info!(message = "Another emitter holds the lease; skipping this pass.", holder = %holder);
            summary.lease_held_by = Some(holder);
            return Ok(summary);
        }
        let result = self
            .pass_locked(now, policy, grace, margin, pending_age, &mut summary)
            .await;
        let owner = self.owner.clone();
        self.journal.release_lease("emitter", owner).await?;
        result?;
        summary.pending_after = self.journal.pending_count().await?;
        metrics::gauge!("meterd_pending_events").set(summary.pending_after as f64);
        Ok(summary)
    }

    async fn pass_locked(
        &self,
        now: DateTime<Utc>,
        policy: outbound::SettlePolicy,
        grace: Duration,
        margin: Duration,
        pending_age: Duration,
        summary: &mut PassSummary,
    ) -> anyhow::Result<()> {
        let (retention, dedupe_window) = (
            self.settings.journal.retention,
            self.settings.ingest.dedupe_window,
        );
        let expire_policy = policy.clone();
        let release_held = self
            .release_held
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let start = async {
            // Credit pools: the configured ones journaled, expiry warnings raised (journal::pools).
            self.journal.pools_pass(self.settings.clone(), now).await?;
            self.journal
                .open_pass(
                    now,
                    PassStart {
                        release_held,
                        grace,
                        margin,
                        policy: expire_policy,
                        pending_age,
                        retention,
                        dedupe_window,
                        freeze_limit: FREEZE_CHUNK,
                    },
                )
                .await
        };
        let opened = match start.await {
            Ok(o) => o,
            Err(e) => {
                // Nothing of the pass committed: the operator's request to look at held events stands for the
                // next pass (else held events would wait for the next subscription-list refresh).
                if release_held {
                    self.release_held
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                return Err(e.into());
            }
        };
        let mut produced = Produced::default();
        let more = opened.more;
        produced.add_opened(opened);

        // The senders: `emit.concurrency` call slots taking batches from a bounded queue, which the producer
        // below fills page by page (freezing the next chunk between pages), so the first call starts after the
        // first chunk and memory holds a few pages, not every due event (issue 15).
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<PendingEvent>>(QUEUE_BATCHES);
        let queue: send::Queue = Arc::new(tokio::sync::Mutex::new(rx));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..self.settings.emit.concurrency.max(1) {
            let (client, journal, clock, queue) = (
                self.client.clone(),
                self.journal.clone(),
                self.clock.clone(),
                queue.clone(),
            );
            let delays = (self.delays(), self.subscriptions.hold_recheck());
            let policy = policy.clone();
            tasks.spawn(
                async move { sender(&client, &journal, &clock, policy, delays, queue).await },
            );
        }
        drop(queue);
        let mut force_refresh = false;
        let produced_result = {
            let producer = self.produce(now, policy, (grace, margin), more, tx, &mut produced);
            tokio::pin!(producer);
            let mut produced_result: Option<anyhow::Result<()>> = None;
            loop {
                tokio::select! {
                    r = &mut producer, if produced_result.is_none() => produced_result = Some(r),
                    joined = tasks.join_next() => {
                        let Some(joined) = joined else { break };
                        // A sender that fails ends the pass (the others are stopped when `tasks` is dropped); its
                        // events left in flight are ambiguous at the next pass.
                        let result = joined.context("batch task")??;
                        summary.calls += result.calls;
                        summary.sent += result.sent;
                        force_refresh |= result.recheck_subscriptions;
                        for (k, n) in result.outcomes {
                            *summary.outcomes.entry(k).or_default() += n;
                        }
                    }
                }
            }
            match produced_result {
                Some(r) => r,
                None => producer.await,
            }
        };
        summary.frozen += produced.frozen;
        for (k, n) in std::mem::take(&mut produced.outcomes) {
            *summary.outcomes.entry(k).or_default() += n;
        }
        summary.expired = std::mem::take(&mut produced.expired);
        if force_refresh {
            self.subscriptions.force_refresh().await;
        }
        produced_result
    }

    /// Feeds the senders: pages of due events (decided, disposed and cut into batches of 25), and between pages
    /// the next chunk of freezing while `more` is left. Dropping `tx` at the end tells the senders to finish.
    async fn produce(
        &self,
        now: DateTime<Utc>,
        policy: outbound::SettlePolicy,
        (grace, margin): (Duration, Duration),
        mut more: bool,
        tx: tokio::sync::mpsc::Sender<Vec<PendingEvent>>,
        produced: &mut Produced,
    ) -> anyhow::Result<()> {
        let mut after = self.journal.first_pending_id().await?;
        let mut taken: i64 = 0;
        // The subscription list, looked at once per pass (refreshed when stale): by the first page, or again by
        // the first page with a SaaS subscription if the earlier pages had none.
        let mut known: Option<(Option<BTreeMap<String, KnownSubscription>>, bool)> = None;
        let mut renewed = std::time::Instant::now();
        // Disposed events not yet queued: fewer than a batch, carried from one page to the next so that only the
        // pass's last batch can be short (a page cut short by a freeze chunk that yielded, or with events settled
        // without a call, would otherwise end in a short batch and the pass make more calls than it needs).
        let mut ready: Vec<PendingEvent> = Vec::new();
        loop {
            let step = std::time::Instant::now();
            let page = if taken < PASS_LIMIT && after != i64::MAX {
                let page = self
                    .journal
                    .due_page(now, after, PAGE.min(PASS_LIMIT - taken))
                    .await?;
                producer_step("page", step);
                page
            } else {
                Vec::new()
            };
            let got = !page.is_empty();
            if got {
                after = page.last().map_or(after, |e| e.id);
                taken += page.len() as i64;
                let saas = page
                    .iter()
                    .any(|e| ResourceRef::parse(&e.resource).is_saas_subscription());
                if known
                    .as_ref()
                    .is_none_or(|(_, with_saas)| saas && !with_saas)
                {
                    let k = self
                        .subscriptions
                        .known(&self.client, &self.journal, &page, now)
                        .await;
                    known = Some((k, saas));
                }
                let k = &known.as_ref().expect("looked at above").0;
                let mut to_write: Vec<(PendingEvent, Disposition)> = page
                    .into_iter()
                    .map(|e| {
                        let d = match self.subscriptions.decide(&e, k, now) {
                            Decision::Send { plan } => Disposition::Send { plan },
                            Decision::Settle(s) => Disposition::Settle(s),
                        };
                        (e, d)
                    })
                    .collect();
                // Write holds/skips, bill and freeze bodies (once) for what will be sent. A dispose job may stop
                // early to let a waiting job have the writer (`Journal::dispose`): the rest follows in the next,
                // and the full batches disposed so far go to the senders meanwhile.
                while !to_write.is_empty() {
                    let step = std::time::Instant::now();
                    let (sendable, counts, rest) = self
                        .journal
                        .dispose(
                            std::mem::take(&mut to_write),
                            self.settings.clone(),
                            now,
                            policy.clone(),
                            event_body,
                        )
                        .await?;
                    producer_step("dispose", step);
                    to_write = rest;
                    for (k, n) in counts {
                        // Outcomes settled without a call (included, remainder, skipped_unsubscribed, held, ...).
                        EventsSettled {
                            outcome: &k,
                            count: n as u64,
                        }
                        .emit();
                        *produced.outcomes.entry(k).or_default() += n;
                    }
                    // Oldest first (by id: frozen in hour order), 25 per call; whole batches only (see `ready`).
                    ready.extend(sendable);
                    if !queue_batches(&tx, &mut ready, false).await {
                        // Every sender stopped (one failed): the pass ends with its error.
                        return Ok(());
                    }
                }
                // A long pass keeps its lease: renew it well before it could expire.
                if renewed.elapsed() > std::time::Duration::from_secs(LEASE_TTL_SECS as u64 / 3) {
                    let (owner, at) = (self.owner.clone(), self.clock.now());
                    let kept = self
                        .journal
                        .acquire_lease("emitter", owner, at, Duration::seconds(LEASE_TTL_SECS))
                        .await?;
                    if let Err(holder) = kept {
                        anyhow::bail!(
                            "lost the emission lease to {holder} during a pass; stopping this pass"
                        );
                    }
                    renewed = std::time::Instant::now();
                }
            }
            if more {
                let step = std::time::Instant::now();
                let opened = self
                    .journal
                    .freeze_more(now, grace, margin, policy.clone(), FREEZE_CHUNK)
                    .await?;
                producer_step("freeze", step);
                more = opened.more;
                produced.add_opened(opened);
                if after == i64::MAX {
                    after = self.journal.first_pending_id().await?;
                }
                continue;
            }
            if !got {
                // The pass's last batch, short or not.
                queue_batches(&tx, &mut ready, true).await;
                return Ok(());
            }
        }
    }
}

/// Queues `ready` for the senders in batches of [`BATCH_SIZE`], oldest first: every whole batch, and with `last`
/// the short one left at the end too; what is not queued stays in `ready`. False when every sender has stopped.
async fn queue_batches(
    tx: &tokio::sync::mpsc::Sender<Vec<PendingEvent>>,
    ready: &mut Vec<PendingEvent>,
    last: bool,
) -> bool {
    let whole = if last {
        ready.len()
    } else {
        ready.len() / BATCH_SIZE * BATCH_SIZE
    };
    let mut queued = ready.drain(..whole).peekable();
    while queued.peek().is_some() {
        let batch: Vec<PendingEvent> = queued.by_ref().take(BATCH_SIZE).collect();
        let step = std::time::Instant::now();
        let sent = tx.send(batch).await;
        producer_step("queue", step);
        if sent.is_err() {
            return false;
        }
    }
    true
}

/// The frozen JSON of `ev` sent under `plan` with `send` micro-units: the body both emitters bill once and send
/// byte for byte (`fleet::emit` too).
pub(crate) fn event_body(ev: &PendingEvent, plan: &str, send: i64) -> String {
    event_json(
        &ResourceRef::parse(&ev.resource),
        plan,
        &ev.dimension,
        to_utc(ev.hour),
        send,
    )
}

/// Records how long one step of the producer took (`meterd_emit_producer_seconds`).
fn producer_step(step: &'static str, since: std::time::Instant) {
    metrics::histogram!("meterd_emit_producer_seconds", "step" => step)
        .record(since.elapsed().as_secs_f64());
}

/// What the producer of a pass did besides feeding the senders.
#[derive(Default)]
struct Produced {
    frozen: usize,
    outcomes: BTreeMap<String, usize>,
    expired: Vec<outbound::Expired>,
}

impl Produced {
    /// Counts, logs and reports what an opening job or freeze chunk froze and expired.
    fn add_opened(&mut self, opened: Opened) {
        self.frozen += opened.frozen.frozen;
        // One line per pass, when its last chunk is frozen (not one per chunk).
        if !opened.more && self.frozen > 0 {
            tracing::info!(message = "Closed hours frozen.", events = self.frozen, through = %fmt_time(opened.frozen.through));
        }
        for e in &opened.expired {
            match e.state {
                // Logged at error level with its alert, in `raise_expired_unconfirmed`.
                Outcome::ExpiredUnconfirmed => {}
                state => {
                    tracing::warn!(message = "Event ran out of window.", resource = %e.resource, dimension = %e.dimension, hour = %e.hour, outcome = state.as_str())
                }
            }
            *self.outcomes.entry(e.state.to_string()).or_default() += 1;
            EventsSettled {
                outcome: e.state.as_str(),
                count: 1,
            }
            .emit();
        }
        self.expired.extend(opened.expired);
    }
}

/// The retry delays of `settings` (`emit.retry_min`, `emit.retry_max`); the fleet emitter uses them too.
pub(crate) fn delays_of(settings: &Settings) -> RetryDelays {
    RetryDelays {
        min: settings
            .emit
            .retry_min
            .to_std()
            .unwrap_or(std::time::Duration::from_secs(30)),
        max: settings
            .emit
            .retry_max
            .to_std()
            .unwrap_or(std::time::Duration::from_secs(1800)),
    }
}
