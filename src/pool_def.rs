//! Pool definitions (rules layer, below `config`): what a pool is, how it is written in `[[pools]]` and
//! `POST /v1/pools` (the same field names), its periods and what each period makes available. The drawing rules
//! are in [`crate::pools`].

use chrono::{DateTime, Datelike, TimeZone, Utc};
use std::collections::BTreeMap;

/// The id prefix of the plan allowance pools: `plan:<plan>`.
pub const PLAN_POOL_PREFIX: &str = "plan:";

/// A pool's size per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// This much, micro-units.
    Quantity(i64),
    /// Never runs out.
    Infinite,
}

impl Amount {
    /// The decimal string of the API (`"infinite"` when unlimited).
    pub fn to_decimal_string(self) -> String {
        match self {
            Amount::Quantity(q) => crate::quantity::Micros(q).to_decimal_string(),
            Amount::Infinite => "infinite".into(),
        }
    }
}

/// Whose usage a pool covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// One subscription (resource id).
    Resource(String),
    /// Every subscription of one customer (the SaaS list's `beneficiary.tenantId`).
    Customer(String),
    /// Every subscription of a `[[groups]]` entry.
    Group(String),
}

impl Scope {
    /// `resource`, `customer` or `group`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Resource(_) => "resource",
            Scope::Customer(_) => "customer",
            Scope::Group(_) => "group",
        }
    }

    /// The resource id, tenant id or group name.
    pub fn value(&self) -> &str {
        match self {
            Scope::Resource(v) | Scope::Customer(v) | Scope::Group(v) => v,
        }
    }

    /// From its kind and value; `None` for an unknown kind.
    pub fn from_parts(kind: &str, value: &str) -> Option<Scope> {
        match kind {
            "resource" => Some(Scope::Resource(value.to_string())),
            "customer" => Some(Scope::Customer(value.to_string())),
            "group" => Some(Scope::Group(value.to_string())),
            _ => None,
        }
    }
}

/// When a pool starts a new period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    /// At each term of the subscription (resource scope only).
    Term,
    /// On the first of each UTC calendar month.
    Month,
}

impl Every {
    /// `term` or `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Every::Term => "term",
            Every::Month => "month",
        }
    }
}

/// A pool's refresh rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refresh {
    /// When a period starts.
    pub every: Every,
    /// The unused part of a period is added to the next one.
    pub rollover: bool,
    /// At most this much rolls over (micro-units); `None`: no cap.
    pub cap: Option<i64>,
}

/// A pool as declared (config or API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDef {
    /// Unique id.
    pub id: String,
    /// The dimension it covers.
    pub dimension: String,
    /// Size per period.
    pub amount: Amount,
    /// Draw order: lower first.
    pub priority: i64,
    /// Whose usage it covers.
    pub scope: Scope,
    /// Covers usage from this time (unix seconds).
    pub effective_at: i64,
    /// Covers usage before this time (unix seconds), if set.
    pub expires_at: Option<i64>,
    /// Refresh rule, if any.
    pub refresh: Option<Refresh>,
}

/// First second of the UTC month holding `at`.
pub fn month_start(at: i64) -> i64 {
    let d = DateTime::<Utc>::from_timestamp(at, 0).unwrap_or_default();
    Utc.with_ymd_and_hms(d.year(), d.month(), 1, 0, 0, 0)
        .single()
        .map(|x| x.timestamp())
        .unwrap_or(at)
}

/// First second of the UTC month after the one holding `at`.
pub fn next_month_start(at: i64) -> i64 {
    let d = DateTime::<Utc>::from_timestamp(month_start(at), 0).unwrap_or_default();
    d.checked_add_months(chrono::Months::new(1))
        .map(|x| x.timestamp())
        .unwrap_or(i64::MAX)
}

/// Most periods looked back over for a rollover (100 years of months).
const MAX_PERIODS: usize = 1200;

impl PoolDef {
    /// Whether the pool covers usage at `at` (its window, not whether anything is left).
    pub fn covers(&self, at: i64) -> bool {
        at >= self.effective_at && self.expires_at.is_none_or(|e| at < e)
    }

    /// The period `[start, end)` holding `at` (`term_of` gives the subscription's term holding a time).
    pub fn period_at(&self, at: i64, term_of: &dyn Fn(i64) -> (i64, i64)) -> (i64, i64) {
        let (s, e) = match self.refresh.map(|r| r.every) {
            None => (self.effective_at, i64::MAX),
            Some(Every::Month) => (month_start(at), next_month_start(at)),
            Some(Every::Term) => term_of(at),
        };
        (
            s.max(self.effective_at),
            self.expires_at.map_or(e, |x| e.min(x)),
        )
    }

    /// What the period starting at `period_start` makes available: `amount`, plus with rollover the unused part
    /// of the periods before it (at most the cap), given the draws per period start in `drawn`.
    pub fn allotment(
        &self,
        period_start: i64,
        drawn: &BTreeMap<i64, i64>,
        term_of: &dyn Fn(i64) -> (i64, i64),
    ) -> Amount {
        let Amount::Quantity(amount) = self.amount else {
            return Amount::Infinite;
        };
        let Some(refresh) = self.refresh.filter(|r| r.rollover) else {
            return Amount::Quantity(amount);
        };
        let mut carry = 0i64;
        let (mut start, mut end) = self.period_at(self.effective_at, term_of);
        for _ in 0..MAX_PERIODS {
            if start >= period_start || end <= start {
                break;
            }
            let allot = amount.saturating_add(carry);
            let unused = (allot - drawn.get(&start).copied().unwrap_or(0)).max(0);
            carry = refresh.cap.map_or(unused, |c| unused.min(c));
            (start, end) = self.period_at(end, term_of);
        }
        Amount::Quantity(amount.saturating_add(carry))
    }
}

/// A pool as written in `[[pools]]` or sent to `POST /v1/pools` (the same field names).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Unique id (not starting with `plan:`).
    pub id: String,
    /// Dimension it covers (declared in `[[dimensions]]`).
    pub dimension: String,
    /// A quantity (up to 6 decimals, number or decimal string) or `"infinite"`.
    pub amount: AmountSpec,
    /// Draw order, lower first (default 0; the plan pool has `billing.plan_pool_priority`, default 100).
    #[serde(default)]
    pub priority: i64,
    /// `{ resource = "<id>" }`, `{ customer = "<tenant id>" }` or `{ group = "<name>" }`.
    pub scope: ScopeSpec,
    /// RFC 3339; default: always (1970).
    pub effective_at: Option<String>,
    /// RFC 3339, optional.
    pub expires_at: Option<String>,
    /// Refresh rule, optional.
    pub refresh: Option<RefreshSpec>,
}

/// A pool amount as written.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum AmountSpec {
    /// A whole number.
    Integer(i64),
    /// A number with decimals.
    Float(f64),
    /// `"infinite"` or a decimal string.
    Text(String),
}

/// A pool scope as written: exactly one of its keys.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ScopeSpec {
    /// One subscription.
    Resource(String),
    /// Every subscription of one customer (`beneficiary.tenantId`).
    Customer(String),
    /// Every subscription of a `[[groups]]` entry.
    Group(String),
}

/// A refresh rule as written.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSpec {
    /// `"term"` or `"month"` (`"none"`: no refresh).
    pub every: String,
    /// Unused units roll over into the next period (default false).
    #[serde(default)]
    pub rollover: bool,
    /// At most this much rolls over (default: no cap).
    pub cap: Option<AmountSpec>,
}

fn parse_amount(a: &AmountSpec, what: &str) -> Result<Amount, String> {
    let text = match a {
        AmountSpec::Text(t) if t.trim().eq_ignore_ascii_case("infinite") => {
            return Ok(Amount::Infinite);
        }
        AmountSpec::Text(t) => t.trim().to_string(),
        AmountSpec::Integer(n) => n.to_string(),
        AmountSpec::Float(f) => f.to_string(),
    };
    let m = crate::quantity::Micros::parse_decimal(&text).map_err(|e| {
        format!("`{what}`: `{text}` is not a quantity ({e}); write e.g. 50, 12.5 or \"infinite\"")
    })?;
    if m.0 < 0 {
        return Err(format!("`{what}` must not be negative, got {text}"));
    }
    Ok(Amount::Quantity(m.0))
}

fn parse_time(t: &str, what: &str) -> Result<i64, String> {
    DateTime::parse_from_rfc3339(t.trim())
        .map(|d| d.timestamp())
        .map_err(|_| format!("`{what}`: `{t}` is not an RFC 3339 time like 2026-03-01T00:00:00Z"))
}

impl PoolSpec {
    /// The pool this spec declares, or what is wrong (naming the field). `resource` scopes are compared
    /// case-insensitively; the id is kept as written.
    pub fn validate(&self) -> Result<PoolDef, String> {
        let id = self.id.trim();
        if id.is_empty() || id.len() > 200 {
            return Err("`id` must be a non-empty string of at most 200 characters".into());
        }
        if id.starts_with(PLAN_POOL_PREFIX) {
            return Err(format!(
                "`id`: `{id}`: ids starting with `{PLAN_POOL_PREFIX}` name the plan allowance pools; choose another id"
            ));
        }
        if self.dimension.trim().is_empty() {
            return Err("`dimension` must name a declared dimension".into());
        }
        let amount = parse_amount(&self.amount, "amount")?;
        let scope = match &self.scope {
            ScopeSpec::Resource(r) => Scope::Resource(r.trim().to_ascii_lowercase()),
            ScopeSpec::Customer(c) => Scope::Customer(c.trim().to_ascii_lowercase()),
            ScopeSpec::Group(g) => Scope::Group(g.trim().to_string()),
        };
        if scope.value().is_empty() {
            return Err(format!("`scope.{}` must not be empty", scope.kind()));
        }
        let effective_at = match &self.effective_at {
            Some(t) => parse_time(t, "effective_at")?,
            None => 0,
        };
        let expires_at = match &self.expires_at {
            Some(t) => Some(parse_time(t, "expires_at")?),
            None => None,
        };
        if let Some(e) = expires_at
            && e <= effective_at
        {
            return Err("`expires_at` must be after `effective_at`".into());
        }
        let refresh = match &self.refresh {
            None => None,
            Some(r) => {
                let every = match r.every.trim() {
                    "none" => None,
                    "month" => Some(Every::Month),
                    "term" => Some(Every::Term),
                    other => {
                        return Err(format!(
                            "`refresh.every`: `{other}` is not one of \"term\", \"month\", \"none\""
                        ));
                    }
                };
                if every == Some(Every::Term) && !matches!(scope, Scope::Resource(_)) {
                    return Err("`refresh.every = \"term\"` needs a `resource` scope (a customer's subscriptions have terms of their own); use \"month\"".into());
                }
                let cap = match &r.cap {
                    Some(c) => match parse_amount(c, "refresh.cap")? {
                        Amount::Quantity(q) => Some(q),
                        Amount::Infinite => None,
                    },
                    None => None,
                };
                every.map(|every| Refresh {
                    every,
                    rollover: r.rollover,
                    cap,
                })
            }
        };
        Ok(PoolDef {
            id: id.to_string(),
            dimension: self.dimension.trim().to_string(),
            amount,
            priority: self.priority,
            scope,
            effective_at,
            expires_at,
            refresh,
        })
    }
}

impl PoolDef {
    /// The pool in the API's form (`POST /v1/pools`'s fields): also what idempotent creation compares.
    pub fn to_json(&self) -> serde_json::Value {
        let t = |s: i64| crate::clock::fmt_time(s);
        serde_json::json!({
            "id": self.id,
            "dimension": self.dimension,
            "amount": self.amount.to_decimal_string(),
            "priority": self.priority,
            "scope": { self.scope.kind(): self.scope.value() },
            "effective_at": t(self.effective_at),
            "expires_at": self.expires_at.map(t),
            "refresh": self.refresh.map(|r| serde_json::json!({
                "every": r.every.as_str(),
                "rollover": r.rollover,
                "cap": r.cap.map(|c| crate::quantity::Micros(c).to_decimal_string()),
            })),
        })
    }
}
