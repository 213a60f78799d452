//! Emission: one pass freezes closed hours, checks subscriptions, sends due events in batches of at most 25,
//! and writes each event's outcome back into the journal.
//!
//! A pass works from the journal alone, so a missed wake-up, a crash or a restart loses nothing: the next pass
//! finds the same pending events. Passes are single-flight twice over: a mutex inside the process and a lease
//! row in the journal across processes. An event is finished only by a classified answer, never by "request
//! sent"; only the transient subset of a batch is retried, with the retry state persisted in the journal.

pub mod schedule;

use crate::clock::SharedClock;
use crate::config::{AuthKind, EndpointVersion, MarketplaceMode, Settings};
use crate::journal::Journal;
use crate::journal::outbound::{self, KnownSubscription, ListedSubscription, PendingEvent, Settle};
use crate::clock::{HOUR, fmt_time, to_utc};
use crate::marketplace::auth::{AuthConfig, CachedTokenProvider, TokenProvider};
use crate::marketplace::client::{CallError, MarketplaceClient};
use crate::marketplace::outcome::{Classified, SentKey, classify, match_results, unmatched};
use crate::marketplace::types::{SubscriptionStatus, batch_body, event_json};
use crate::resource::ResourceRef;
use crate::alert_kind::AlertKey;
use crate::outcome::Outcome;
use crate::quantity::Micros;
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
/// With held events waiting, the subscription list is re-read at most this often (passes can be frequent).
const HELD_REFRESH_SECS: i64 = 60;

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

/// Builds the token provider for the configured auth kind, loading the secret.
pub fn token_provider(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    clock: SharedClock,
) -> anyhow::Result<Arc<dyn TokenProvider>> {
    let a = &settings.marketplace.auth;
    let config = match a.kind {
        AuthKind::StaticToken => {
            let token = crate::secret::load_secret(
                a.static_token_file.as_deref(),
                "static-token",
                "METERD_MARKETPLACE__AUTH__STATIC_TOKEN",
                env,
            )?;
            let token = match (token, settings.marketplace.mode) {
                (Some(t), _) => t,
                (None, MarketplaceMode::Emulator) => {
                    crate::secret::Secret::new(crate::emulator::config::DEFAULT_STATIC_TOKEN)
                }
                (None, MarketplaceMode::Azure) => anyhow::bail!(
                    "marketplace.auth.kind = \"static_token\" needs a token: set static_token_file, \
                     $CREDENTIALS_DIRECTORY/static-token or METERD_MARKETPLACE__AUTH__STATIC_TOKEN"
                ),
            };
            AuthConfig::StaticToken { token }
        }
        AuthKind::ClientSecret => {
            let secret = crate::secret::load_secret(a.client_secret_file.as_deref(), "client-secret", "METERD_MARKETPLACE__AUTH__CLIENT_SECRET", env)?
                .context(
                    "no client secret: set marketplace.auth.client_secret_file, pass it as the systemd credential \
                     `client-secret` (LoadCredential=client-secret:/path), or set METERD_MARKETPLACE__AUTH__CLIENT_SECRET; \
                     to try meterd without credentials run `meterd run --emulator`",
                )?;
            AuthConfig::ClientSecret {
                tenant_id: a.tenant_id.clone(),
                client_id: a.client_id.clone(),
                secret,
                token_url: a.token_url.clone(),
                version: match a.endpoint_version {
                    EndpointVersion::V1 => crate::marketplace::auth::EndpointVersion::V1,
                    EndpointVersion::V2 => crate::marketplace::auth::EndpointVersion::V2,
                },
            }
        }
        AuthKind::ManagedIdentity => {
            let client_id = Some(a.client_id.clone()).filter(|c| !c.is_empty());
            match &a.identity_endpoint {
                Some(e) => AuthConfig::ManagedIdentity {
                    endpoint: Some(e.clone()),
                    client_id,
                    identity_header: env
                        .get("IDENTITY_HEADER")
                        .map(|h| crate::secret::Secret::new(h.clone())),
                },
                None => AuthConfig::managed_identity_from_env(client_id),
            }
        }
    };
    Ok(Arc::new(CachedTokenProvider::new(config, clock)?))
}

/// Builds the marketplace client from the settings.
pub fn client(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    clock: SharedClock,
) -> anyhow::Result<MarketplaceClient> {
    let auth = token_provider(settings, env, clock.clone())?;
    let timeout = settings
        .marketplace
        .timeout
        .to_std()
        .unwrap_or(std::time::Duration::from_secs(30));
    Ok(MarketplaceClient::new(
        settings.marketplace.base_url.clone(),
        auth,
        clock,
        timeout,
    )?)
}

/// The emitter.
pub struct Emitter {
    settings: Arc<Settings>,
    journal: Journal,
    clock: SharedClock,
    client: Arc<MarketplaceClient>,
    /// Lease owner name: host, pid and a random suffix, so two processes never share it.
    owner: String,
    /// When the subscription list was last fetched, and whether a refresh is forced.
    subscriptions: tokio::sync::Mutex<(Option<DateTime<Utc>>, bool)>,
    /// An operator asked for a pass (flush): held events are looked at in it, not only after a list refresh.
    release_held: std::sync::atomic::AtomicBool,
    /// In-process single flight.
    pass_lock: tokio::sync::Mutex<()>,
    last: std::sync::Mutex<LastPass>,
}

/// What to do with one due event.
enum Decision {
    Send { plan: String },
    Settle(Settle),
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
            settings,
            journal,
            clock,
            client: Arc::new(client),
            owner,
            subscriptions: tokio::sync::Mutex::new((None, false)),
            release_held: std::sync::atomic::AtomicBool::new(false),
            pass_lock: tokio::sync::Mutex::new(()),
            last: std::sync::Mutex::new(LastPass::default()),
        }
    }

    /// The last pass, for status.
    pub fn last(&self) -> LastPass {
        self.last.lock().expect("last pass lock").clone()
    }

    /// How long a held event waits before it is looked at again: one subscription list refresh, so a refused
    /// hour is neither re-sent nor re-checked more often than the list can change in meterd's view.
    fn hold_recheck(&self) -> Duration {
        self.settings
            .subscriptions
            .refresh
            .max(Duration::seconds(1))
    }

    fn delays(&self) -> RetryDelays {
        RetryDelays {
            min: self
                .settings
                .emit
                .retry_min
                .to_std()
                .unwrap_or(std::time::Duration::from_secs(30)),
            max: self
                .settings
                .emit
                .retry_max
                .to_std()
                .unwrap_or(std::time::Duration::from_secs(1800)),
        }
    }

    /// Makes the next pass re-read the subscription list (an operator's flush: a subscription may just have been
    /// activated).
    pub async fn request_subscription_refresh(&self) {
        self.subscriptions.lock().await.1 = true;
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
            .write(move |c| {
                outbound::acquire_lease(
                    c,
                    "emitter",
                    &owner,
                    now,
                    Duration::seconds(LEASE_TTL_SECS),
                )
            })
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
        self.journal
            .write(move |c| outbound::release_lease(c, "emitter", &owner))
            .await?;
        result?;
        summary.pending_after = self
            .journal
            .read(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM outbound_events WHERE state = 'pending'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await?;
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
            .write(move |c| {
                if release_held {
                    outbound::release_holds(c, now)?;
                }
                let recovered = outbound::recover_in_flight(c)?;
                if recovered > 0 {
                    tracing::warn!(message = "Events were in flight when meterd stopped; they count as possibly recorded.", events = recovered);
                }
                let f = outbound::freeze(c, now, grace, margin)?;
                let e = outbound::expire_overdue(c, now, &expire_policy)?;
                for x in e.iter().filter(|x| x.state == Outcome::ExpiredUnconfirmed) {
                    outbound::raise_expired_unconfirmed(c, x.id, now)?;
                }
                outbound::raise_pending_age_alerts(c, now, pending_age)?;
                let (hours, records) = crate::journal::usage::apply_retention(c, now, retention, dedupe_window)?;
                if hours + records > 0 {
                    tracing::info!(message = "Retention applied.", hourly_totals_deleted = hours, raw_records_compacted = records);
                }
                Ok((f, e))
            })
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
            metrics::counter!("meterd_events_total", "outcome" => e.state.as_str()).increment(1);
        }
        summary.expired = expired;

        let due = self
            .journal
            .read(move |c| outbound::due_events(c, now, PASS_LIMIT))
            .await?;
        if due.is_empty() {
            return Ok(());
        }
        let known = self.subscription_view(&due, now).await;
        let mut decisions = Vec::with_capacity(due.len());
        for ev in &due {
            decisions.push(self.decide(ev, &known, now));
        }
        // Write holds/skips, bill and freeze bodies (once) for what will be sent.
        let settings = self.settings.clone();
        let to_write: Vec<(i64, Decision, PendingEvent)> = due
            .into_iter()
            .zip(decisions)
            .map(|(e, d)| (e.id, d, e))
            .collect();
        let decide_policy = policy.clone();
        let (sendable, counts) = self
            .journal
            .write(move |c| {
                let mut sendable = Vec::new();
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for (id, decision, ev) in to_write {
                    match decision {
                        Decision::Settle(s) => {
                            let state = outbound::settle(c, id, &s, now, &decide_policy)?;
                            let name = match (&s, state) {
                                (Settle::Hold { .. }, _) => "held",
                                (Settle::Defer { .. }, _) => "deferred",
                                (_, st) => st.as_str(),
                            };
                            *counts.entry(name.to_string()).or_default() += 1;
                        }
                        Decision::Send { plan } => {
                            if !ev.body.is_empty() {
                                sendable.push(PendingEvent { plan, ..ev });
                                continue;
                            }
                            // Billed once, with the body: allowance, billing units, thresholds.
                            let bill = crate::journal::billing::bill(c, &settings, &ev, &plan, now)?;
                            if bill.send == 0 {
                                let state = outbound::settle_unbilled(c, id, &plan, &bill, now)?;
                                *counts.entry(state.to_string()).or_default() += 1;
                                continue;
                            }
                            let json = event_json(
                                &ResourceRef::parse(&ev.resource),
                                &plan,
                                &ev.dimension,
                                to_utc(ev.hour),
                                bill.send,
                            );
                            let body = outbound::set_body(c, id, &plan, &json, &bill)?;
                            sendable.push(PendingEvent {
                                body,
                                plan,
                                send_quantity: Some(bill.send),
                                ..ev
                            });
                        }
                    }
                }
                Ok((sendable, counts))
            })
            .await?;
        for (k, n) in counts {
            // Outcomes settled without a call (included, remainder, skipped_unsubscribed, held, ...) count too.
            metrics::counter!("meterd_events_total", "outcome" => k.clone()).increment(n as u64);
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
                    .write(move |c| {
                        outbound::acquire_lease(
                            c,
                            "emitter",
                            &owner,
                            at,
                            Duration::seconds(LEASE_TTL_SECS),
                        )
                    })
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
            let hold_recheck = self.hold_recheck();
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
            self.subscriptions.lock().await.1 = true;
        }
        Ok(())
    }

    /// The subscriptions as known to the journal, refreshed from the marketplace when stale or when forced.
    async fn subscription_view(
        &self,
        due: &[PendingEvent],
        now: DateTime<Utc>,
    ) -> Option<BTreeMap<String, KnownSubscription>> {
        if !self.settings.subscriptions.check || !due.iter().any(|e| ResourceRef::parse(&e.resource).is_saas_subscription()) {
            return self.journal.read(outbound::known_subscriptions).await.ok();
        }
        let mut cache = self.subscriptions.lock().await;
        let any_held = due.iter().any(|e| e.held);
        let stale = match cache.0 {
            None => true,
            Some(t) => {
                cache.1
                    || now - t >= self.settings.subscriptions.refresh
                    || (any_held && now - t >= Duration::seconds(HELD_REFRESH_SECS))
                    || now < t
            }
        };
        if stale {
            let started = std::time::Instant::now();
            match self.client.list_subscriptions().await {
                Ok(list) => {
                    metrics::counter!("meterd_subscription_refreshes_total", "result" => "ok")
                        .increment(1);
                    metrics::histogram!("meterd_subscription_refresh_seconds")
                        .record(started.elapsed().as_secs_f64());
                    let listed: Vec<ListedSubscription> = list
                        .iter()
                        .map(|s| ListedSubscription {
                            id: s.id.clone(),
                            status: s.saas_subscription_status.trim().to_string(),
                            plan: s.plan_id.clone().unwrap_or_default(),
                            offer: s.offer_id.clone().unwrap_or_default(),
                            term_start: s
                                .term
                                .as_ref()
                                .and_then(|t| t.start_date)
                                .map(|d| d.timestamp()),
                            term_end: s
                                .term
                                .as_ref()
                                .and_then(|t| t.end_date)
                                .map(|d| d.timestamp()),
                            term_unit: s.term.as_ref().and_then(|t| t.term_unit.clone()),
                        })
                        .collect();
                    let n = listed.len();
                    match self
                        .journal
                        .write(move |c| outbound::store_subscriptions(c, &listed, now))
                        .await
                    {
                        Ok(()) => {
                            tracing::info!(
                                message = "Subscription list refreshed.",
                                subscriptions = n
                            );
                            *cache = (Some(now), false);
                        }
                        Err(e) => {
                            tracing::warn!(message = "Could not store the subscription list.", error = %e)
                        }
                    }
                }
                Err(e) => {
                    metrics::counter!("meterd_subscription_refreshes_total", "result" => "error")
                        .increment(1);
                    tracing::warn!(
                        message = "Could not fetch the subscription list; using what meterd saw last.",
                        error = %e, advice = e.advice().unwrap_or("")
                    );
                    cache.0?;
                }
            }
        }
        self.journal.read(outbound::known_subscriptions).await.ok()
    }

    fn decide(
        &self,
        ev: &PendingEvent,
        known: &Option<BTreeMap<String, KnownSubscription>>,
        now: DateTime<Utc>,
    ) -> Decision {
        // A held event is looked at again after one list refresh, not at every pass.
        let recheck = now + self.hold_recheck();
        let sub = known
            .as_ref()
            .and_then(|k| k.get(&ev.resource.to_ascii_lowercase()));
        let checked = self.settings.subscriptions.check && ResourceRef::parse(&ev.resource).is_saas_subscription();
        if checked {
            let Some(known) = known else {
                return Decision::Settle(Settle::Defer {
                    reason: "the subscription list could not be fetched; waiting to check the subscription".into(),
                    next_at: now + Duration::seconds(60),
                });
            };
            match known.get(&ev.resource.to_ascii_lowercase()) {
                // A GUID the SaaS list does not know is sent as it is: it may be a managed application metered by
                // its `resourceUsageId` (which no list shows), and the marketplace judges it. An unknown SaaS id is
                // refused (`ResourceNotFound`) and held like any refusal, re-checked once per list refresh.
                None => {}
                Some(s) if SubscriptionStatus::from_wire(&s.status) == SubscriptionStatus::Subscribed => {}
                Some(s) if s.status == "Unsubscribed" => {
                    let seen = s.unsubscribed_seen_at.unwrap_or(now.timestamp());
                    // The marketplace refused this hour and the list now shows the cancellation: the hour
                    // closed after the real cancellation, before meterd saw it. Sending again cannot help.
                    if ev.hour + HOUR > seen || ev.refused {
                        return Decision::Settle(Settle::SkippedUnsubscribed);
                    }
                }
                Some(s) => {
                    return Decision::Settle(Settle::Hold {
                        reason: format!(
                            "subscription is {}; holding until it is Subscribed",
                            s.status
                        ),
                        next_at: recheck,
                    });
                }
            }
        }
        let plan = if !ev.plan.is_empty() {
            ev.plan.clone()
        } else if let Some(p) = sub.and_then(|s| s.plan.clone()) {
            p
        } else if let Some(p) = &self.settings.default_plan {
            p.clone()
        } else {
            return Decision::Settle(Settle::Defer {
                reason: "no plan id: the records name none, the subscription list has none for this resource, and \
                         default_plan is empty; set default_plan or send `plan` with the records"
                    .into(),
                next_at: recheck,
            });
        };
        Decision::Send { plan }
    }
}

/// What one batch call did.
#[derive(Debug, Default)]
struct BatchResult {
    /// Marketplace calls made.
    calls: usize,
    sent: usize,
    /// A whole call refused with 400: the two halves to send instead (one bad event must not block the rest).
    split: Option<(Vec<PendingEvent>, Vec<PendingEvent>)>,
    outcomes: BTreeMap<String, usize>,
    recheck_subscriptions: bool,
}

/// Sends `batch`; a whole call refused with HTTP 400 is retried at once in halves, down to single events, so one
/// malformed event keeps only itself pending (retried and alerted as before) and the good ones go through.
async fn send_splitting(
    client: &MarketplaceClient,
    journal: &Journal,
    clock: &SharedClock,
    policy: outbound::SettlePolicy,
    delays: (RetryDelays, Duration),
    batch: Vec<PendingEvent>,
) -> anyhow::Result<BatchResult> {
    let mut total = BatchResult::default();
    let mut todo = vec![batch];
    while let Some(batch) = todo.pop() {
        let mut r = send_batch(client, journal, clock, policy.clone(), delays, batch).await?;
        total.calls += 1;
        total.sent += r.sent;
        total.recheck_subscriptions |= r.recheck_subscriptions;
        if let Some((first, second)) = r.split.take() {
            todo.push(second);
            todo.push(first);
            continue;
        }
        for (k, n) in r.outcomes {
            *total.outcomes.entry(k).or_default() += n;
        }
    }
    Ok(total)
}

async fn send_batch(
    client: &MarketplaceClient,
    journal: &Journal,
    clock: &SharedClock,
    policy: outbound::SettlePolicy,
    (delays, hold_recheck): (RetryDelays, Duration),
    batch: Vec<PendingEvent>,
) -> anyhow::Result<BatchResult> {
    let ids: Vec<i64> = batch.iter().map(|e| e.id).collect();
    let mark = ids.clone();
    journal
        .write(move |c| outbound::mark_attempt(c, &mark))
        .await?;
    let bodies: Vec<&str> = batch.iter().map(|e| e.body.as_str()).collect();
    let body = batch_body(&bodies);
    let started = std::time::Instant::now();
    let answer = client.batch_usage(&body).await;
    metrics::histogram!("meterd_marketplace_call_seconds", "call" => "batchUsageEvent")
        .record(started.elapsed().as_secs_f64());
    let now = clock.now();
    let mut result = BatchResult {
        sent: batch.len(),
        calls: 1,
        ..Default::default()
    };
    let mut settles: Vec<(i64, Settle)> = Vec::with_capacity(batch.len());
    let mut call_alert: Option<(AlertKey, serde_json::Value)> = None;
    match answer {
        Ok(call) => {
            metrics::counter!("meterd_marketplace_calls_total", "call" => "batchUsageEvent", "status" => call.status.to_string()).increment(1);
            let keys: Vec<SentKey> = batch
                .iter()
                .map(|e| {
                    SentKey::new(
                        ResourceRef::parse(&e.resource),
                        e.plan.clone(),
                        e.dimension.clone(),
                        to_utc(e.hour),
                    )
                })
                .collect();
            let pairs = match_results(&keys, &call.response);
            for (i, r) in &pairs {
                let ev = &batch[*i];
                let sent_quantity = ev.send_quantity.unwrap_or(ev.quantity);
                let settle = match classify(r, sent_quantity) {
                    Classified::Accepted { usage_event_id } => Settle::Accepted { usage_event_id },
                    Classified::Duplicate {
                        theirs_micros,
                        usage_event_id,
                    } => Settle::Duplicate {
                        market_quantity: theirs_micros.or(Some(sent_quantity)),
                        usage_event_id,
                    },
                    Classified::DuplicateMismatch {
                        ours_micros,
                        theirs_micros,
                    } => {
                        tracing::error!(
                            message = "The marketplace already holds another quantity for this hour; ours can never replace it.",
                            resource = %ev.resource, dimension = %ev.dimension, hour = %fmt_time(ev.hour),
                            ours = %Micros(ours_micros), theirs = %Micros(theirs_micros), alert = "duplicate_mismatch",
                            request_id = %call.ids.request_id
                        );
                        Settle::DuplicateMismatch {
                            market_quantity: theirs_micros,
                        }
                    }
                    Classified::Expired => Settle::Expired {
                        message: "the marketplace answered Expired".into(),
                    },
                    Classified::NotFoundOrNotActive { status } => {
                        result.recheck_subscriptions = true;
                        Settle::Hold {
                            reason: format!(
                                "{}{}; holding and re-checking the subscription at the next list refresh",
                                outbound::REFUSED,
                                status.as_str()
                            ),
                            next_at: now + hold_recheck,
                        }
                    }
                    Classified::NotAuthorized { message } => {
                        tracing::error!(
                            message = "This identity may not report usage for the resource (ResourceNotAuthorized).",
                            resource = %ev.resource, detail = %message, alert = "resource_not_authorized"
                        );
                        Settle::Rejected {
                            reason: format!("ResourceNotAuthorized: {message}"),
                        }
                    }
                    Classified::Invalid { status, message } => {
                        tracing::error!(
                            message = "The marketplace rejected the event.", resource = %ev.resource, dimension = %ev.dimension,
                            plan = %ev.plan, status = %status.as_str(), detail = %message, alert = "rejected"
                        );
                        Settle::Rejected {
                            reason: format!("{}: {message}", status.as_str()),
                        }
                    }
                    Classified::Transient { message, ambiguous } => Settle::Retry {
                        error: message,
                        next_at: now + delays.after(ev.attempts + 1),
                        ambiguous,
                    },
                };
                settles.push((ev.id, settle));
            }
            for i in unmatched(&keys, &pairs) {
                let ev = &batch[i];
                settles.push((
                    ev.id,
                    Settle::Retry {
                        error: "the batch answer had no result for this event".into(),
                        next_at: now + delays.after(ev.attempts + 1),
                        ambiguous: true,
                    },
                ));
            }
            tracing::info!(
                message = "Batch sent.",
                request_id = %call.ids.request_id, correlation_id = %call.ids.correlation_id,
                events = batch.len(), results = call.response.result.len()
            );
        }
        Err(e) => {
            let status = e
                .status()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none".into());
            metrics::counter!("meterd_marketplace_calls_total", "call" => "batchUsageEvent", "status" => status).increment(1);
            let ambiguous = e.is_ambiguous();
            let ids = e.ids();
            let split = e.status() == Some(400) && batch.len() > 1;
            match &e {
                _ if split => tracing::warn!(
                    message = "Batch call refused with 400; sending it again in halves to isolate the event that caused it.",
                    error = %e, request_id = %ids.request_id, correlation_id = %ids.correlation_id, events = batch.len()
                ),
                CallError::Fatal { advice, .. } => tracing::error!(
                    message = "Batch call refused; the events stay pending and are retried.",
                    error = %e, advice = advice.as_deref().unwrap_or(""), request_id = %ids.request_id,
                    correlation_id = %ids.correlation_id, events = batch.len(), alert = "marketplace_call_refused"
                ),
                CallError::Transient { .. } => tracing::warn!(
                    message = "Batch call failed; retrying later.",
                    error = %e, ambiguous, request_id = %ids.request_id, correlation_id = %ids.correlation_id, events = batch.len()
                ),
            }
            if let Some(status @ (401 | 403)) = e.status() {
                // Repeated 401/403 means the identity is wrong: one alert per hour while it lasts.
                call_alert = Some((
                    AlertKey::marketplace_auth(status, crate::clock::hour_of(now)),
                    serde_json::json!({"status": status, "error": e.to_string(), "advice": e.advice().unwrap_or("")}),
                ));
            }
            if split {
                // Nothing was recorded (a 400 is a definite refusal); the halves are sent right away.
                for ev in &batch {
                    settles.push((
                        ev.id,
                        Settle::Retry {
                            error: e.to_string(),
                            next_at: now,
                            ambiguous: false,
                        },
                    ));
                }
                let mut first: Vec<PendingEvent> = batch
                    .iter()
                    .map(|ev| PendingEvent {
                        attempts: ev.attempts + 1,
                        ..ev.clone()
                    })
                    .collect();
                let second = first.split_off(first.len() / 2);
                result.split = Some((first, second));
            }
            for ev in batch.iter().filter(|_| !split) {
                let delay = delays.after_answer(ev.attempts + 1, e.retry_after());
                settles.push((
                    ev.id,
                    Settle::Retry {
                        error: e.to_string(),
                        next_at: now + delay,
                        ambiguous,
                    },
                ));
            }
        }
    }
    let call_alert = call_alert;
    let outcomes = journal
        .write(move |c| {
            if let Some((dedupe, body)) = &call_alert {
                crate::journal::alerts::raise(c, dedupe, body.clone(), now)?;
            }
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for (id, s) in &settles {
                let state = outbound::settle(c, *id, s, now, &policy)?;
                outbound::raise_for_settle(c, *id, s, now)?;
                if state == Outcome::ExpiredUnconfirmed {
                    // A per-event `Expired` after an earlier ambiguous attempt: the same alert as an expiry.
                    outbound::raise_expired_unconfirmed(c, *id, now)?;
                }
                let name = match (s, state) {
                    (Settle::Hold { .. }, _) => "held",
                    (Settle::Retry { .. }, _) => "retry",
                    (_, st) => st.as_str(),
                };
                *counts.entry(name.to_string()).or_default() += 1;
            }
            Ok(counts)
        })
        .await?;
    for (k, n) in &outcomes {
        metrics::counter!("meterd_events_total", "outcome" => k.clone()).increment(*n as u64);
    }
    result.outcomes = outcomes;
    Ok(result)
}
