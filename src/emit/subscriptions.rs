//! The subscription view: the SaaS subscription list as meterd sees it (stored in the journal, refreshed from the
//! marketplace when stale, cached for `subscriptions.refresh`), and the decision for each due event: send (with
//! its plan), hold, defer or skip.

use crate::clock::HOUR;
use crate::config::Settings;
use crate::journal::Journal;
use crate::journal::outbound::{KnownSubscription, ListedSubscription, PendingEvent, Settle};
use crate::marketplace::client::MarketplaceClient;
use crate::marketplace::types::SubscriptionStatus;
use crate::ops::telemetry::{InternalEvent, SubscriptionListFailed, SubscriptionListFetched};
use crate::resource::ResourceRef;
use chrono::{DateTime, Duration, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;

/// With held events waiting, the subscription list is re-read at most this often (passes can be frequent).
const HELD_REFRESH_SECS: i64 = 60;

/// Where the subscription view is stored: the SQLite journal, or the fleet's shared journal (`fleet::emit`).
pub(crate) trait SubscriptionStore: Sync {
    /// The subscriptions as last listed.
    fn known_subscriptions(
        &self,
    ) -> impl std::future::Future<Output = anyhow::Result<BTreeMap<String, KnownSubscription>>> + Send;

    /// Stores a fresh list seen at `now`.
    fn store_subscriptions(
        &self,
        listed: Vec<ListedSubscription>,
        now: DateTime<Utc>,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

impl SubscriptionStore for Journal {
    async fn known_subscriptions(&self) -> anyhow::Result<BTreeMap<String, KnownSubscription>> {
        Ok(Journal::known_subscriptions(self).await?)
    }

    async fn store_subscriptions(
        &self,
        listed: Vec<ListedSubscription>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        Ok(Journal::store_subscriptions(self, listed, now).await?)
    }
}

/// What to do with one due event.
pub(crate) enum Decision {
    Send { plan: String },
    Settle(Settle),
}

/// The subscription list as meterd sees it, with its cache.
pub(crate) struct SubscriptionView {
    settings: Arc<Settings>,
    /// When the subscription list was last fetched, and whether a refresh is forced.
    cache: tokio::sync::Mutex<(Option<DateTime<Utc>>, bool)>,
}

impl SubscriptionView {
    pub(crate) fn new(settings: Arc<Settings>) -> Self {
        SubscriptionView {
            settings,
            cache: tokio::sync::Mutex::new((None, false)),
        }
    }

    /// Makes the next look re-read the list.
    pub(crate) async fn force_refresh(&self) {
        self.cache.lock().await.1 = true;
    }

    /// How long a held event waits before it is looked at again: one subscription list refresh, so a refused
    /// hour is neither re-sent nor re-checked more often than the list can change in meterd's view.
    pub(crate) fn hold_recheck(&self) -> Duration {
        self.settings
            .subscriptions
            .refresh
            .max(Duration::seconds(1))
    }

    /// The subscriptions as known to the journal, refreshed from the marketplace when stale or when forced.
    pub(crate) async fn known(
        &self,
        client: &MarketplaceClient,
        journal: &impl SubscriptionStore,
        due: &[PendingEvent],
        now: DateTime<Utc>,
    ) -> Option<BTreeMap<String, KnownSubscription>> {
        if !self.settings.subscriptions.check
            || !due
                .iter()
                .any(|e| ResourceRef::parse(&e.resource).is_saas_subscription())
        {
            return journal.known_subscriptions().await.ok();
        }
        let mut cache = self.cache.lock().await;
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
            match client.list_subscriptions().await {
                Ok(list) => {
                    SubscriptionListFetched {
                        elapsed: started.elapsed(),
                    }
                    .emit();
                    let listed: Vec<ListedSubscription> = list
                        .iter()
                        .map(|s| ListedSubscription {
                            id: s.id.clone(),
                            status: s.saas_subscription_status.trim().to_string(),
                            plan: s.plan_id.clone(),
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
                            tenant: s.beneficiary.as_ref().and_then(|b| b.tenant_id.clone()),
                        })
                        .collect();
                    let n = listed.len();
                    match journal.store_subscriptions(listed, now).await {
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
                    SubscriptionListFailed {
                        error: &e,
                        advice: e.advice().unwrap_or(""),
                    }
                    .emit();
                    cache.0?;
                }
            }
        }
        journal.known_subscriptions().await.ok()
    }

    pub(crate) fn decide(
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
        let checked = self.settings.subscriptions.check
            && ResourceRef::parse(&ev.resource).is_saas_subscription();
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
                Some(s)
                    if SubscriptionStatus::from_wire(&s.status)
                        == SubscriptionStatus::Subscribed => {}
                Some(s)
                    if SubscriptionStatus::from_wire(&s.status)
                        == SubscriptionStatus::Unsubscribed =>
                {
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
