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
pub(crate) use send::{BatchJournal, send_splitting};
pub(crate) use subscriptions::{Decision, SubscriptionStore, SubscriptionView};

pub use connect::{client, token_provider};

use crate::clock::{SharedClock, fmt_time, to_utc};
use crate::config::Settings;
use crate::journal::outbound::{self, PendingEvent};
use crate::journal::{Disposition, Journal, PassStart};
use crate::marketplace::client::MarketplaceClient;
use crate::marketplace::types::event_json;
use crate::ops::telemetry::{EventsSettled, InternalEvent};
use crate::outcome::Outcome;
use crate::resource::ResourceRef;
use crate::retry::RetryDelays;
use anyhow::Context;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most events in one marketplace call.
pub const BATCH_SIZE: usize = 25;
/// Most due events taken into one pass (the rest follow in the next).
const PASS_LIMIT: i64 = 200_000;
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
        let (frozen, expired) = self
            .journal
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
                },
            )
            .await?;
        summary.frozen = frozen.frozen;
        if frozen.frozen > 0 {
            tracing::info!(message = "Closed hours frozen.", events = frozen.frozen, through = %fmt_time(frozen.through));
        }
        for e in &expired {
            match e.state {
                // Logged at error level with its alert, in `raise_expired_unconfirmed`.
                Outcome::ExpiredUnconfirmed => {}
                state => {
                    tracing::warn!(message = "Event ran out of window.", resource = %e.resource, dimension = %e.dimension, hour = %e.hour, outcome = state.as_str())
                }
            }
            *summary.outcomes.entry(e.state.to_string()).or_default() += 1;
            EventsSettled {
                outcome: e.state.as_str(),
                count: 1,
            }
            .emit();
        }
        summary.expired = expired;

        let due = self.journal.due_events(now, PASS_LIMIT).await?;
        if due.is_empty() {
            return Ok(());
        }
        let known = self
            .subscriptions
            .known(&self.client, &self.journal, &due, now)
            .await;
        let mut decisions = Vec::with_capacity(due.len());
        for ev in &due {
            decisions.push(self.subscriptions.decide(ev, &known, now));
        }
        // Write holds/skips, bill and freeze bodies (once) for what will be sent.
        let settings = self.settings.clone();
        let to_write: Vec<(PendingEvent, Disposition)> = due
            .into_iter()
            .zip(decisions)
            .map(|(e, d)| {
                let d = match d {
                    Decision::Send { plan } => Disposition::Send { plan },
                    Decision::Settle(s) => Disposition::Settle(s),
                };
                (e, d)
            })
            .collect();
        let decide_policy = policy.clone();
        let (sendable, counts) = self
            .journal
            .dispose(to_write, settings, now, decide_policy, |ev, plan, send| {
                event_json(
                    &ResourceRef::parse(&ev.resource),
                    plan,
                    &ev.dimension,
                    to_utc(ev.hour),
                    send,
                )
            })
            .await?;
        for (k, n) in counts {
            // Outcomes settled without a call (included, remainder, skipped_unsubscribed, held, ...) count too.
            EventsSettled {
                outcome: &k,
                count: n as u64,
            }
            .emit();
            *summary.outcomes.entry(k).or_default() += n;
        }
        if sendable.is_empty() {
            return Ok(());
        }
        // Oldest first, 25 per call, `emit.concurrency` calls in flight.
        let batches: Vec<Vec<PendingEvent>> =
            sendable.chunks(BATCH_SIZE).map(|c| c.to_vec()).collect();
        let semaphore = Arc::new(tokio::sync::Semaphore::new(self.settings.emit.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        let mut renewed = std::time::Instant::now();
        for batch in batches {
            let permit = semaphore.clone().acquire_owned().await?;
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
            let (client, journal, clock) = (
                self.client.clone(),
                self.journal.clone(),
                self.clock.clone(),
            );
            let delays = self.delays();
            let policy = policy.clone();
            let hold_recheck = self.subscriptions.hold_recheck();
            tasks.spawn(async move {
                let r = send_splitting(
                    &client,
                    &journal,
                    &clock,
                    policy,
                    (delays, hold_recheck),
                    batch,
                )
                .await;
                drop(permit);
                r
            });
        }
        let mut force_refresh = false;
        while let Some(joined) = tasks.join_next().await {
            let result = joined.context("batch task")??;
            summary.calls += result.calls;
            summary.sent += result.sent;
            force_refresh |= result.recheck_subscriptions;
            for (k, n) in result.outcomes {
                *summary.outcomes.entry(k).or_default() += n;
            }
        }
        if force_refresh {
            self.subscriptions.force_refresh().await;
        }
        Ok(())
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
