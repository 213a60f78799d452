//! The outcomes of an outbound event (rules layer): the one list, stored and exported as today's strings.
//!
//! Every event is `pending` until it settles into exactly one of the others (invariant 7). `carried` is the
//! outcome of a usage record moved into a later hour: reports and the metrics show it next to the event outcomes.
//! The strings are the stored `outbound_events.state` values and the `outcome` label of the metrics; they never
//! change.

use serde::{Serialize, Serializer};
use std::fmt;

/// What became of an outbound event (or, for [`Outcome::Carried`], of a record moved into a later hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Not settled yet.
    Pending,
    /// The allowance covered it: nothing to send.
    Included,
    /// Below one billing unit: carried to the next hour as a remainder, nothing sent.
    Remainder,
    /// The marketplace recorded it.
    Accepted,
    /// The marketplace already held the same quantity for this key.
    Duplicate,
    /// The marketplace holds another quantity for this key.
    DuplicateMismatch,
    /// Its window ran out; under carry-forward its units moved to the open hour.
    Expired,
    /// Its window ran out after an ambiguous attempt: nothing carried, `meterd reconcile` asked for.
    ExpiredUnconfirmed,
    /// The marketplace refused it, with a reason.
    Rejected,
    /// The subscription was cancelled before its hour closed.
    SkippedUnsubscribed,
    /// The subscription never became billable inside the window.
    NotActive,
    /// A record moved into a later hour (which names where it went).
    Carried,
}

impl Outcome {
    /// Every outcome, in report order.
    pub const ALL: [Outcome; 12] = [
        Outcome::Pending,
        Outcome::Included,
        Outcome::Remainder,
        Outcome::Accepted,
        Outcome::Duplicate,
        Outcome::DuplicateMismatch,
        Outcome::Expired,
        Outcome::ExpiredUnconfirmed,
        Outcome::Rejected,
        Outcome::SkippedUnsubscribed,
        Outcome::NotActive,
        Outcome::Carried,
    ];

    /// The stored and exported string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Included => "included",
            Outcome::Remainder => "remainder",
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::DuplicateMismatch => "duplicate_mismatch",
            Outcome::Expired => "expired",
            Outcome::ExpiredUnconfirmed => "expired_unconfirmed",
            Outcome::Rejected => "rejected",
            Outcome::SkippedUnsubscribed => "skipped_unsubscribed",
            Outcome::NotActive => "not_active",
            Outcome::Carried => "carried",
        }
    }

    /// The outcome a stored string names; `None` for anything else.
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for Outcome {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_and_are_unique() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        let mut names: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Outcome::ALL.len());
        assert_eq!(Outcome::parse("held"), None);
    }
}
