//! Per-event settlements (rules layer): what one answer of the marketplace means for one event.
//!
//! [`Settle`] is how an attempt (or a decision not to send) ends, as the journal records it
//! (`journal::outbound::settle` stores it and derives the [`crate::outcome::Outcome`]); a [`Settlement`] is what
//! one marketplace answer means for one event. The pure mapping from the classified answer
//! (`marketplace::outcome::classify`) onto it is `marketplace::outcome::settle`, next to the classification.

use chrono::{DateTime, Duration, Utc};

/// How one event's attempt ended, as the journal records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// Recorded by the marketplace.
    Accepted {
        /// The marketplace's id.
        usage_event_id: Option<String>,
    },
    /// Already recorded with the same quantity.
    Duplicate {
        /// Quantity the marketplace holds (as it said it, billing units in micro-units).
        market_quantity: Option<i64>,
        /// The marketplace's id of the recorded event, when it said it.
        usage_event_id: Option<String>,
    },
    /// Already recorded with another quantity.
    DuplicateMismatch {
        /// Quantity the marketplace holds.
        market_quantity: i64,
    },
    /// The marketplace said `Expired`.
    Expired {
        /// What it said.
        message: String,
    },
    /// Terminal refusal (`InvalidDimension`, `ResourceNotAuthorized`, ...).
    Rejected {
        /// The marketplace's reason.
        reason: String,
    },
    /// The subscription was cancelled before this hour closed.
    SkippedUnsubscribed,
    /// Not sendable now (subscription not active); re-check at `next_at`.
    Hold {
        /// Why.
        reason: String,
        /// When to look again.
        next_at: DateTime<Utc>,
    },
    /// Not sent this time for a passing reason (subscription list unavailable); look again at `next_at`.
    Defer {
        /// Why.
        reason: String,
        /// When to look again.
        next_at: DateTime<Utc>,
    },
    /// The attempt failed; try again at `next_at`.
    Retry {
        /// What went wrong.
        error: String,
        /// When.
        next_at: DateTime<Utc>,
        /// The attempt may have been recorded.
        ambiguous: bool,
    },
}

/// What `marketplace::outcome::settle` needs of the event and the settings.
#[derive(Debug, Clone, Copy)]
pub struct SettleContext {
    /// The quantity sent (billing units, micro-units).
    pub sent_quantity: i64,
    /// Attempts before this one.
    pub attempts: i64,
    /// Backoff bounds.
    pub delays: crate::retry::RetryDelays,
    /// How long a held event waits before it is looked at again.
    pub hold_recheck: Duration,
}

/// One event's settlement, and whether the subscription list should be re-read.
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    /// What the journal records.
    pub settle: Settle,
    /// The answer says the resource is unknown or not active: re-read the subscription list.
    pub recheck_subscriptions: bool,
}

/// How a hold after a marketplace refusal (`ResourceNotFound`, `ResourceNotActive`) starts its reason (the
/// journal finds those holds by it).
pub const REFUSED: &str = "the marketplace answered ";
