//! Alert kinds and their dedupe keys (rules layer).
//!
//! An alert fires once per dedupe key: the key says what "the same problem" is for each kind (one event, one
//! threshold of one term, one hour of refused credentials). The kind strings are stored in `alerts.kind`, sent
//! in the webhook body and used as the `kind` label of `meterd_alerts_total`; they never change.

use std::fmt;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertKind {
    /// Consumption crossed a configured threshold.
    Threshold,
    /// An event has been pending longer than `alerts.pending_age`.
    PendingAge,
    /// The marketplace refused meterd's identity (401/403).
    MarketplaceAuth,
    /// An event expired after an ambiguous attempt: run `meterd reconcile`.
    ExpiredUnconfirmed,
    /// The marketplace holds another quantity for an event's key.
    DuplicateMismatch,
    /// The marketplace refused an event with `ResourceNotAuthorized`.
    ResourceNotAuthorized,
    /// The marketplace refused an event.
    Rejected,
    /// A credit pool crossed a threshold of its period (`80%`, `exhausted`).
    PoolThreshold,
    /// A credit pool expires soon with much of it unused.
    PoolExpiring,
}

impl AlertKind {
    /// The stored and exported string.
    pub const fn as_str(self) -> &'static str {
        match self {
            AlertKind::Threshold => "threshold",
            AlertKind::PendingAge => "pending_age",
            AlertKind::MarketplaceAuth => "marketplace_auth",
            AlertKind::ExpiredUnconfirmed => "expired_unconfirmed",
            AlertKind::DuplicateMismatch => "duplicate_mismatch",
            AlertKind::ResourceNotAuthorized => "resource_not_authorized",
            AlertKind::Rejected => "rejected",
            AlertKind::PoolThreshold => "pool_threshold",
            AlertKind::PoolExpiring => "pool_expiring",
        }
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An alert's kind with its dedupe key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertKey {
    /// The kind.
    pub kind: AlertKind,
    /// Fires once per key.
    pub dedupe: String,
}

impl AlertKey {
    /// An alert about one outbound event (`pending_age`, `expired_unconfirmed`, `duplicate_mismatch`, `rejected`,
    /// `resource_not_authorized`): once per event.
    pub fn event(kind: AlertKind, id: i64) -> Self {
        AlertKey {
            kind,
            dedupe: format!("{kind}:{id}"),
        }
    }

    /// A threshold crossed: once per resource, dimension, term and threshold.
    pub fn threshold(resource: &str, dimension: &str, term_start: i64, threshold: &str) -> Self {
        AlertKey {
            kind: AlertKind::Threshold,
            dedupe: format!("threshold:{resource}:{dimension}:{term_start}:{threshold}"),
        }
    }

    /// A pool threshold (`80%`, `exhausted`, `expiring`): once per pool, period and threshold.
    pub fn pool(kind: AlertKind, pool: &str, period_start: i64, threshold: &str) -> Self {
        AlertKey {
            kind,
            dedupe: format!("pool:{pool}:{period_start}:{threshold}"),
        }
    }

    /// Credentials refused with `status`: once per UTC hour (`hour`, unix seconds) while it lasts.
    pub fn marketplace_auth(status: u16, hour: i64) -> Self {
        AlertKey {
            kind: AlertKind::MarketplaceAuth,
            dedupe: format!("auth:{status}:{hour}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_keys_are_todays() {
        assert_eq!(
            AlertKey::event(AlertKind::PendingAge, 7).dedupe,
            "pending_age:7"
        );
        assert_eq!(
            AlertKey::threshold("r", "d", 3600, "80%").dedupe,
            "threshold:r:d:3600:80%"
        );
        assert_eq!(
            AlertKey::marketplace_auth(401, 7200).dedupe,
            "auth:401:7200"
        );
    }
}
