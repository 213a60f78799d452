//! What an emulator starts with: credentials, plans, subscriptions, paging and timing knobs.
//!
//! Three sources build an [`EmulatorConfig`]: [`Default`] (the documented "try it" marketplace), a seed file (TOML or
//! JSON by extension, every key optional, see `docs/emulator-seed.example.toml`) and the command-line flags, which
//! override the seed. The config is also what `POST /emulator/reset` returns to.

use super::model::{ManagedApp, Plan, Subscription, SubscriptionStatus, Term};
use crate::clock::SharedClock;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default tenant of the token endpoints.
pub const DEFAULT_TENANT: &str = "emulator-tenant";
/// Default client id accepted by the token endpoints.
pub const DEFAULT_CLIENT_ID: &str = "00000000-0000-0000-0000-00000000c11e";
/// Default client secret.
pub const DEFAULT_CLIENT_SECRET: &str = "emulator-secret";
/// A bearer token that is always accepted on `/api` (meterd's `static_token` auth kind): the token meterd sends
/// in emulator mode, defined once in [`crate::config::EMULATOR_STATIC_TOKEN`].
pub const DEFAULT_STATIC_TOKEN: &str = crate::config::EMULATOR_STATIC_TOKEN;
/// The `X-IDENTITY-HEADER` value the App Service style managed identity endpoint expects.
pub const DEFAULT_IDENTITY_HEADER: &str = "emulator-identity-header";
/// The marketplace API's Entra application id (token `scope`/`resource`).
pub const MARKETPLACE_RESOURCE: &str = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7";
/// Default subscription A: Subscribed, plan gold.
pub const DEFAULT_SUBSCRIPTION_A: &str = "11111111-1111-4111-8111-111111111111";
/// Default subscription B: Subscribed, plan gold.
pub const DEFAULT_SUBSCRIPTION_B: &str = "22222222-2222-4222-8222-222222222222";
/// Default subscription C: Unsubscribed, plan gold (the list returns every status).
pub const DEFAULT_SUBSCRIPTION_C: &str = "33333333-3333-4333-8333-333333333333";
/// Default page size of `GET /saas/subscriptions/`: smaller than the default seed, so paging is exercised.
pub const DEFAULT_PAGE_SIZE: usize = 2;

/// Errors of seed files and duration strings; callers (the CLI, tests) match on them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The seed file could not be read.
    #[error("cannot read seed file {path}: {source}")]
    Read {
        /// The seed file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The seed file is not valid TOML (or does not fit the seed's shape).
    #[error("invalid TOML in seed file {path}: {message}")]
    Toml {
        /// The seed file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The seed file is not valid JSON (or does not fit the seed's shape).
    #[error("invalid JSON in seed file {path}: {source}")]
    Json {
        /// The seed file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The seed file's name ends in neither `.toml` nor `.json`.
    #[error("seed file {0} must end in .toml or .json")]
    Extension(PathBuf),
    /// A `result_order` other than `as-sent`, `reversed` or `shuffled`.
    #[error("invalid result_order {0:?}: expected as-sent, reversed or shuffled")]
    ResultOrder(String),
    /// A duration that is not a number and a unit.
    #[error(
        "invalid duration {0:?}: expected a number and a unit (ms, s, m, h, d), like 30s, 5m or -2h"
    )]
    Duration(String),
}

/// Where `@nextLink` of the subscription list points.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NextLinkMode {
    /// The host the request came to (`Host` header).
    #[default]
    SameHost,
    /// Another name for the same server, as production does (`main.prod.marketplaceapi.azure.com`): always
    /// `http://localhost:PORT/api`, so a client that starts at `http://127.0.0.1:PORT/api` is sent to another host.
    ForeignHost,
    /// A fixed base URL ending in `/api`, e.g. `http://localhost:8788/api`.
    Base(String),
}

/// The order of `result` items in a batch answer (undocumented in production; clients must match by fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResultOrder {
    /// In the order of the request's `request` items.
    #[default]
    AsSent,
    /// Last item first.
    Reversed,
    /// In random order.
    Shuffled,
}

/// Credentials accepted by the token endpoints and the API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Credentials {
    /// The tenant of the token endpoint paths (`/{tenant}/oauth2/...`).
    pub tenant: String,
    /// The client id accepted by client credentials (and the default of managed identity tokens).
    pub client_id: String,
    /// The client secret accepted by client credentials.
    pub client_secret: String,
    /// Always accepted as a bearer token on `/api`; empty disables it.
    pub static_token: String,
    /// `X-IDENTITY-HEADER` expected by `GET /msi/token`.
    pub identity_header: String,
}

impl Default for Credentials {
    fn default() -> Self {
        Self {
            tenant: DEFAULT_TENANT.into(),
            client_id: DEFAULT_CLIENT_ID.into(),
            client_secret: DEFAULT_CLIENT_SECRET.into(),
            static_token: DEFAULT_STATIC_TOKEN.into(),
            identity_header: DEFAULT_IDENTITY_HEADER.into(),
        }
    }
}

/// Everything an [`Emulator`](super::Emulator) starts with.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// What the token endpoints and the API accept.
    pub credentials: Credentials,
    /// Known plans; an event on a plan not listed here is `InvalidDimension`.
    pub plans: Vec<Plan>,
    /// SaaS subscriptions, in the order the list pages through them.
    pub subscriptions: Vec<Subscription>,
    /// Managed application instances that may be metered by `resourceUri` (or `resourceUsageId`).
    pub managed_apps: Vec<ManagedApp>,
    /// Lifetime of the tokens the token endpoints issue.
    pub token_lifetime: Duration,
    /// Subscriptions per page of `GET /saas/subscriptions/` (at least 1).
    pub page_size: usize,
    /// Where `@nextLink` of the subscription list points.
    pub next_link: NextLinkMode,
    /// The order of `result` items in a batch answer.
    pub result_order: ResultOrder,
    /// Added to every marketplace call (not to admin calls).
    pub latency: Duration,
    /// Whether accepted SaaS events carry the extra `resourceUri` production adds (see `batch_response_mixed.json`).
    pub echo_saas_resource_uri: bool,
    /// The base of the emulator's own clock (default: the wall clock); the admin API shifts on top of it.
    pub clock: Option<SharedClock>,
}

impl std::fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("tenant", &self.credentials.tenant)
            .field("client_id", &self.credentials.client_id)
            .field("plans", &self.plans)
            .field("subscriptions", &self.subscriptions.len())
            .field("managed_apps", &self.managed_apps.len())
            .field("token_lifetime", &self.token_lifetime)
            .field("page_size", &self.page_size)
            .field("next_link", &self.next_link)
            .field("result_order", &self.result_order)
            .field("latency", &self.latency)
            .finish_non_exhaustive()
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        let term = current_monthly_term(chrono::Utc::now());
        let mut a = Subscription::new(DEFAULT_SUBSCRIPTION_A, "gold");
        a.name = "Emulator customer A".into();
        a.term = term.clone();
        let mut b = Subscription::new(DEFAULT_SUBSCRIPTION_B, "gold");
        b.name = "Emulator customer B".into();
        b.term = term;
        b.azure_subscription_id = "cccccccc-0000-0000-0000-000000000002".into();
        let mut c = Subscription::new(DEFAULT_SUBSCRIPTION_C, "gold")
            .with_status(SubscriptionStatus::Unsubscribed);
        c.name = "Emulator former customer".into();
        c.term = Term {
            start_date: Some("2025-01-01T00:00:00Z".into()),
            end_date: Some("2025-01-31T00:00:00Z".into()),
            term_unit: "P1M".into(),
        };
        c.azure_subscription_id = "cccccccc-0000-0000-0000-000000000003".into();
        Self {
            credentials: Credentials::default(),
            plans: vec![Plan {
                id: "gold".into(),
                dimensions: Some(vec!["api_calls".into(), "gb_processed".into()]),
            }],
            subscriptions: vec![a, b, c],
            managed_apps: Vec::new(),
            token_lifetime: Duration::from_secs(3600),
            page_size: DEFAULT_PAGE_SIZE,
            next_link: NextLinkMode::SameHost,
            result_order: ResultOrder::AsSent,
            latency: Duration::ZERO,
            echo_saas_resource_uri: true,
            clock: None,
        }
    }
}

/// A monthly term around `now`: from the first of this month to the first of the next, like a purchase made on the
/// first.
fn current_monthly_term(now: chrono::DateTime<chrono::Utc>) -> Term {
    use chrono::{Datelike, Months, NaiveDate};
    let start = NaiveDate::from_ymd_opt(now.year(), now.month(), 1).unwrap_or_default();
    let end = start.checked_add_months(Months::new(1)).unwrap_or(start);
    Term {
        start_date: Some(format!("{start}T00:00:00Z")),
        end_date: Some(format!("{end}T00:00:00Z")),
        term_unit: "P1M".into(),
    }
}

/// The seed file: every key optional; what is absent keeps its default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Seed {
    credentials: Option<Credentials>,
    plans: Option<Vec<Plan>>,
    subscriptions: Option<Vec<Subscription>>,
    managed_apps: Option<Vec<ManagedApp>>,
    token_lifetime: Option<String>,
    page_size: Option<usize>,
    next_link_base: Option<String>,
    foreign_next_link: Option<bool>,
    result_order: Option<String>,
    latency: Option<String>,
    echo_saas_resource_uri: Option<bool>,
}

impl EmulatorConfig {
    /// Reads a seed file (TOML or JSON, by extension) over the defaults.
    pub fn from_seed_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let seed: Seed = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text).map_err(|e| ConfigError::Toml {
                path: path.to_owned(),
                message: e.to_string(),
            })?,
            Some("json") => serde_json::from_str(&text).map_err(|source| ConfigError::Json {
                path: path.to_owned(),
                source,
            })?,
            _ => return Err(ConfigError::Extension(path.to_owned())),
        };
        Self::default().with_seed(seed)
    }

    fn with_seed(mut self, seed: Seed) -> Result<Self, ConfigError> {
        if let Some(c) = seed.credentials {
            self.credentials = c;
        }
        if let Some(p) = seed.plans {
            self.plans = p;
        }
        if let Some(s) = seed.subscriptions {
            self.subscriptions = s;
        }
        if let Some(m) = seed.managed_apps {
            self.managed_apps = m;
        }
        if let Some(t) = seed.token_lifetime {
            self.token_lifetime = parse_std_duration(&t)?;
        }
        if let Some(p) = seed.page_size {
            self.page_size = p.max(1);
        }
        if seed.foreign_next_link == Some(true) {
            self.next_link = NextLinkMode::ForeignHost;
        }
        if let Some(base) = seed.next_link_base {
            self.next_link = NextLinkMode::Base(base);
        }
        if let Some(order) = seed.result_order {
            self.result_order =
                parse_result_order(&order).ok_or(ConfigError::ResultOrder(order))?;
        }
        if let Some(l) = seed.latency {
            self.latency = parse_std_duration(&l)?;
        }
        if let Some(e) = seed.echo_saas_resource_uri {
            self.echo_saas_resource_uri = e;
        }
        Ok(self)
    }
}

/// `as-sent`, `reversed` or `shuffled`.
pub fn parse_result_order(s: &str) -> Option<ResultOrder> {
    match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
        "as-sent" | "assent" | "in-order" => Some(ResultOrder::AsSent),
        "reversed" | "reverse" => Some(ResultOrder::Reversed),
        "shuffled" | "shuffle" => Some(ResultOrder::Shuffled),
        _ => None,
    }
}

/// Parses `1500ms`, `30s`, `5m`, `2h`, `1d`, optionally negative (`-2h`), into a signed duration.
pub fn parse_duration(s: &str) -> Result<chrono::Duration, ConfigError> {
    let err = || ConfigError::Duration(s.to_owned());
    let t = s.trim();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = t.split_at(split);
    let n: i64 = digits.parse().map_err(|_| err())?;
    let d = match unit {
        "ms" => chrono::Duration::try_milliseconds(n),
        "s" => chrono::Duration::try_seconds(n),
        "m" => chrono::Duration::try_minutes(n),
        "h" => chrono::Duration::try_hours(n),
        "d" => chrono::Duration::try_days(n),
        _ => None,
    }
    .ok_or_else(err)?;
    Ok(if negative { -d } else { d })
}

/// Like [`parse_duration`], but must not be negative.
pub fn parse_std_duration(s: &str) -> Result<Duration, ConfigError> {
    parse_duration(s)?
        .to_std()
        .map_err(|_| ConfigError::Duration(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30s").ok(),
            Some(chrono::Duration::seconds(30))
        );
        assert_eq!(
            parse_duration("-2h").ok(),
            Some(chrono::Duration::hours(-2))
        );
        assert_eq!(
            parse_duration("1500ms").ok(),
            Some(chrono::Duration::milliseconds(1500))
        );
        assert_eq!(parse_duration("1d").ok(), Some(chrono::Duration::days(1)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_std_duration("-1s").is_err());
    }

    #[test]
    fn example_seed_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/emulator-seed.example.toml");
        let config = EmulatorConfig::from_seed_file(&path).expect("example seed");
        assert!(!config.subscriptions.is_empty());
        assert!(!config.plans.is_empty());
    }
}
