//! Per-event settlements (rules layer): what one answer of the marketplace means for one event.
//!
//! [`Settle`] is how an attempt (or a decision not to send) ends, as the journal records it
//! (`journal::outbound::settle` stores it and derives the [`crate::outcome::Outcome`]). [`settle`] maps the
//! classification of one event's result (`marketplace::outcome::classify`, a value with no I/O) onto it.

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

/// The classification of one event's result, in the terms this module needs (see
/// `marketplace::outcome::Classified`, which converts into it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Recorded; the marketplace's id.
    Accepted {
        /// The marketplace's id for the event.
        usage_event_id: Option<String>,
    },
    /// Already recorded with our quantity (or it did not say which).
    Duplicate {
        /// The quantity the marketplace holds, when it said it.
        theirs_micros: Option<i64>,
        /// The marketplace's id of the original event.
        usage_event_id: Option<String>,
    },
    /// Already recorded with another quantity.
    DuplicateMismatch {
        /// What was recorded first.
        theirs_micros: i64,
    },
    /// Outside the 24-hour window.
    Expired,
    /// `ResourceNotFound` or `ResourceNotActive` (the status string).
    NotFoundOrNotActive {
        /// The status as the marketplace spells it.
        status: String,
    },
    /// `ResourceNotAuthorized`, with the marketplace's explanation.
    NotAuthorized {
        /// The explanation.
        message: String,
    },
    /// A payload the marketplace refused for good (`InvalidDimension`, ...).
    Invalid {
        /// The status as the marketplace spells it.
        status: String,
        /// The explanation.
        message: String,
    },
    /// Retry later.
    Transient {
        /// What the marketplace said.
        message: String,
        /// The attempt may have been recorded.
        ambiguous: bool,
    },
}

/// What [`settle`] needs of the event and the settings.
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

/// Maps one event's answer onto its settlement at `now`. Pure.
pub fn settle(answer: Answer, event: &SettleContext, now: DateTime<Utc>) -> Settlement {
    let mut recheck_subscriptions = false;
    let settle = match answer {
        Answer::Accepted { usage_event_id } => Settle::Accepted { usage_event_id },
        Answer::Duplicate {
            theirs_micros,
            usage_event_id,
        } => Settle::Duplicate {
            market_quantity: theirs_micros.or(Some(event.sent_quantity)),
            usage_event_id,
        },
        Answer::DuplicateMismatch { theirs_micros } => Settle::DuplicateMismatch {
            market_quantity: theirs_micros,
        },
        Answer::Expired => Settle::Expired {
            message: "the marketplace answered Expired".into(),
        },
        Answer::NotFoundOrNotActive { status } => {
            recheck_subscriptions = true;
            Settle::Hold {
                reason: format!(
                    "{REFUSED}{status}; holding and re-checking the subscription at the next list refresh"
                ),
                next_at: now + event.hold_recheck,
            }
        }
        Answer::NotAuthorized { message } => Settle::Rejected {
            reason: format!("ResourceNotAuthorized: {message}"),
        },
        Answer::Invalid { status, message } => Settle::Rejected {
            reason: format!("{status}: {message}"),
        },
        Answer::Transient { message, ambiguous } => Settle::Retry {
            error: message,
            next_at: now + event.delays.after(event.attempts + 1),
            ambiguous,
        },
    };
    Settlement {
        settle,
        recheck_subscriptions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> SettleContext {
        SettleContext {
            sent_quantity: 5_000_000,
            attempts: 0,
            delays: crate::retry::RetryDelays {
                min: std::time::Duration::from_secs(30),
                max: std::time::Duration::from_secs(60),
            },
            hold_recheck: Duration::seconds(300),
        }
    }

    #[test]
    fn answers_map_onto_settlements() {
        let now = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let s = settle(
            Answer::Duplicate {
                theirs_micros: None,
                usage_event_id: None,
            },
            &ctx(),
            now,
        );
        assert_eq!(
            s.settle,
            Settle::Duplicate {
                market_quantity: Some(5_000_000),
                usage_event_id: None
            }
        );
        let s = settle(
            Answer::NotFoundOrNotActive {
                status: "ResourceNotFound".into(),
            },
            &ctx(),
            now,
        );
        assert!(s.recheck_subscriptions);
        assert_eq!(
            s.settle,
            Settle::Hold {
                reason: "the marketplace answered ResourceNotFound; holding and re-checking the subscription at the next list refresh".into(),
                next_at: now + Duration::seconds(300)
            }
        );
        let s = settle(
            Answer::Transient {
                message: "Error".into(),
                ambiguous: true,
            },
            &ctx(),
            now,
        );
        assert!(
            matches!(s.settle, Settle::Retry { ambiguous: true, next_at, .. } if next_at > now && next_at <= now + Duration::seconds(60))
        );
    }
}
