//! The emulator's mutable world, behind one mutex: catalogue (plans, subscriptions, managed apps), issued tokens,
//! every usage event received, the accepted ones with their deduplication index, faults and request counters.
//!
//! One lock keeps each call atomic (a batch is judged and recorded as a whole, like a single marketplace call), and
//! no lock is ever held across an `.await`.

use super::config::EmulatorConfig;
use super::faults::{Faults, Route};
use super::model::{AcceptedEvent, ManagedApp, Plan, ReceivedEvent, Subscription};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};

/// First write wins per (resource, dimension, UTC hour): resource lowercased, hour as a Unix timestamp.
pub(super) type DedupeKey = (String, String, i64);

/// Everything the emulator knows and remembers.
#[derive(Debug)]
pub(crate) struct State {
    /// The catalogue and knobs as they stand now: the [`EmulatorConfig`] it started from (page size at least 1),
    /// changed since by admin calls. One field list for both.
    pub current: EmulatorConfig,
    /// Issued token -> expiry (emulator clock).
    pub tokens: HashMap<String, DateTime<Utc>>,
    /// Every event received, with the status it got.
    pub received: Vec<ReceivedEvent>,
    /// Accepted events only, in acceptance order.
    pub accepted: Vec<AcceptedEvent>,
    /// Index into `accepted`.
    pub dedupe: HashMap<DedupeKey, usize>,
    pub faults: Faults,
    /// Calls per route name, faulted ones included.
    pub requests: BTreeMap<&'static str, u64>,
    /// [`State::subscription`]'s memo: lowercased id -> index in `current.subscriptions`. Checked against the
    /// list on every use and rebuilt when it misses, so the code that edits the list need not maintain it.
    subscription_index: std::cell::RefCell<HashMap<String, usize>>,
}

impl State {
    /// Applies the scripted cancellations whose time has come: the subscription becomes `Unsubscribed`, cancelled
    /// at the scripted time.
    pub(crate) fn apply_cancellations(&mut self, now: DateTime<Utc>) {
        let due: Vec<(String, DateTime<Utc>)> = self
            .faults
            .cancellations
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, at)| (id.clone(), *at))
            .collect();
        for (id, at) in due {
            if let Some(s) = self
                .current
                .subscriptions
                .iter_mut()
                .find(|s| s.id.eq_ignore_ascii_case(&id))
                .filter(|s| {
                    s.saas_subscription_status != super::model::SubscriptionStatus::Unsubscribed
                })
            {
                s.saas_subscription_status = super::model::SubscriptionStatus::Unsubscribed;
                s.unsubscribed_at = Some(at);
            }
        }
    }

    /// The state an emulator starts (and resets) with.
    pub(crate) fn from_config(config: &EmulatorConfig) -> Self {
        let mut current = config.clone();
        current.page_size = current.page_size.max(1);
        Self {
            current,
            tokens: HashMap::new(),
            received: Vec::new(),
            accepted: Vec::new(),
            dedupe: HashMap::new(),
            faults: Faults::default(),
            requests: Route::ALL.iter().map(|r| (r.name(), 0)).collect(),
            subscription_index: Default::default(),
        }
    }

    /// A subscription by id (GUIDs compare case-insensitively); the first of the list with that id.
    ///
    /// Through a memo of the list's positions: a scan of the list per event was a fifth of the fleet emission
    /// benchmark's own CPU (5,000 subscriptions, an emulator in the same process as the senders).
    pub(crate) fn subscription(&self, id: &str) -> Option<&Subscription> {
        let id = id.trim();
        let list = &self.current.subscriptions;
        let at = |i: usize| list.get(i).filter(|s| s.id.eq_ignore_ascii_case(id));
        let key = id.to_ascii_lowercase();
        let known = self.subscription_index.borrow().get(&key).copied();
        if let Some(found) = known.and_then(at) {
            return Some(found);
        }
        let mut index = self.subscription_index.borrow_mut();
        index.clear();
        for (i, s) in list.iter().enumerate() {
            index.entry(s.id.to_ascii_lowercase()).or_insert(i);
        }
        index.get(&key).copied().and_then(at)
    }

    /// Adds `subscription`, or replaces the one with its id (keeping its place in the list).
    pub(crate) fn upsert_subscription(&mut self, subscription: Subscription) {
        match self
            .current
            .subscriptions
            .iter_mut()
            .find(|s| s.id.eq_ignore_ascii_case(&subscription.id))
        {
            Some(existing) => *existing = subscription,
            None => self.current.subscriptions.push(subscription),
        }
    }

    /// A plan by id.
    pub(crate) fn plan(&self, id: &str) -> Option<&Plan> {
        self.current.plans.iter().find(|p| p.id == id)
    }

    /// Adds `plan`, or replaces the one with its id.
    pub(crate) fn upsert_plan(&mut self, plan: Plan) {
        match self.current.plans.iter_mut().find(|p| p.id == plan.id) {
            Some(existing) => *existing = plan,
            None => self.current.plans.push(plan),
        }
    }

    /// Adds a managed application, or replaces the one with its `resourceUri`.
    pub(crate) fn upsert_managed_app(&mut self, app: ManagedApp) {
        match self
            .current
            .managed_apps
            .iter_mut()
            .find(|a| a.resource_uri.eq_ignore_ascii_case(&app.resource_uri))
        {
            Some(existing) => *existing = app,
            None => self.current.managed_apps.push(app),
        }
    }

    /// Issues a new opaque token valid until `now + token_lifetime`.
    pub(crate) fn issue_token(&mut self, now: DateTime<Utc>) -> (String, DateTime<Utc>) {
        let token = format!(
            "emu.{}.{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let lifetime = chrono::Duration::from_std(self.current.token_lifetime)
            .unwrap_or_else(|_| chrono::Duration::hours(1));
        let expires = now + lifetime;
        // Forget expired tokens so a long run does not grow without bound.
        self.tokens.retain(|_, exp| *exp > now);
        self.tokens.insert(token.clone(), expires);
        (token, expires)
    }

    /// Whether `token` may call the API at `now`: the static token, or an issued one not yet expired.
    pub(crate) fn token_is_valid(&self, token: &str, now: DateTime<Utc>) -> bool {
        (!self.current.credentials.static_token.is_empty()
            && token == self.current.credentials.static_token)
            || self.tokens.get(token).is_some_and(|exp| *exp > now)
    }

    /// Counts one call of `route`.
    pub(crate) fn count(&mut self, route: Route) {
        *self.requests.entry(route.name()).or_default() += 1;
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn ids(state: &State, asked: &[&str]) -> Vec<Option<String>> {
        asked
            .iter()
            .map(|id| state.subscription(id).map(|s| s.id.clone()))
            .collect()
    }

    /// The cached lookup answers as a scan of the list would, through every way the list changes: any case and
    /// surrounding spaces, an upsert, a removal in place (admin delete), a status change, and a reset.
    #[test]
    fn subscription_lookup_follows_every_change_of_the_list() {
        let (a, b, c) = (
            "aaaaaaaa-0000-4000-8000-000000000001",
            "bbbbbbbb-0000-4000-8000-000000000002",
            "cccccccc-0000-4000-8000-000000000003",
        );
        let config = EmulatorConfig {
            subscriptions: vec![Subscription::new(a, "gold"), Subscription::new(b, "gold")],
            ..Default::default()
        };
        let mut state = State::from_config(&config);
        let scan = |state: &State, id: &str| {
            state
                .current
                .subscriptions
                .iter()
                .find(|s| s.id.eq_ignore_ascii_case(id.trim()))
                .map(|s| s.id.clone())
        };
        let asked = [a, b, c, " AAAAAAAA-0000-4000-8000-000000000001 ", "nope"];
        let check = |state: &State| {
            let want: Vec<Option<String>> = asked.iter().map(|id| scan(state, id)).collect();
            assert_eq!(ids(state, &asked), want);
        };
        check(&state);
        assert_eq!(state.subscription(a).map(|s| s.id.as_str()), Some(a));
        // Removed in place (indexes shift): b is now first.
        state.current.subscriptions.retain(|s| s.id != a);
        check(&state);
        assert!(state.subscription(a).is_none());
        state.upsert_subscription(Subscription::new(c, "silver"));
        state.upsert_subscription(Subscription::new(a, "silver"));
        check(&state);
        assert_eq!(
            state.subscription(c).map(|s| s.plan_id.as_str()),
            Some("silver")
        );
        // A replaced list (a reset to another catalogue).
        state.current.subscriptions = vec![Subscription::new(c, "gold")];
        check(&state);
        assert!(state.subscription(b).is_none());
        assert_eq!(
            state.subscription(c).map(|s| s.plan_id.as_str()),
            Some("gold")
        );
    }
}
