//! (Over 600 lines for one role: the one schema of `meterd.toml`, its environment overrides and their validation;
//! splitting it would split each key from its check.)
//!
//! Configuration in three steps: the TOML file is read into [`RawConfig`] (every key optional, unknown keys
//! rejected), environment variables `METERD_<SECTION>__<KEY>` are laid over it, and [`Settings::validate`] turns
//! it into [`Settings`], where every value has been checked and every default applied.
//!
//! Errors name the source (the file, or the environment variable), the key, and what is wrong, so an operator
//! can fix the line without reading the code.

use chrono::Duration;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Environment variables that carry secrets rather than configuration keys; they are read by the secret
/// loaders and never laid over the file.
const SECRET_ENV_VARS: &[&str] = &[
    "METERD_MARKETPLACE__AUTH__CLIENT_SECRET",
    "METERD_MARKETPLACE__AUTH__STATIC_TOKEN",
    "METERD_INGEST__TOKEN",
    "METERD_FLEET__URL",
    "METERD_CONFIG",
    // The fleet tests' PostgreSQL server (`journal::pg::testing`), set by `.ci/run` for the whole test run, so
    // every `meterd` a test starts inherits it: not a configuration key.
    "METERD_TEST_POSTGRES_URL",
];

/// Default journal location when neither the file nor `$STATE_DIRECTORY` says otherwise.
pub const DEFAULT_JOURNAL_PATH: &str = "/var/lib/meterd/journal.db";

/// The bearer token meterd sends in `marketplace.mode = "emulator"` when no static token is configured. The one
/// definition: the emulator's `DEFAULT_STATIC_TOKEN` (what it accepts by default) refers to it.
pub const EMULATOR_STATIC_TOKEN: &str = "emulator-token";

/// A configuration problem, naming where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file (or an override) is not valid TOML or names an unknown key.
    #[error("{source_name}: {message}")]
    Parse {
        /// The file, or the environment variable.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// A key has a value that is not allowed.
    #[error("{source_name}: key `{key}`: {message}")]
    Invalid {
        /// The file, or the environment variable.
        source_name: String,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// What to do with usage whose hour is already frozen or outside the 24-hour window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateUsage {
    /// Add it to the open hour and record it as `carried`.
    CarryForward,
    /// Answer 422 and store nothing.
    Reject,
}

/// Where the ingest API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address such as `127.0.0.1:8787`.
    Tcp(String),
    /// A unix socket path (`unix:/run/meterd/ingest.sock`).
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Which marketplace meterd talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarketplaceMode {
    /// The real Azure Marketplace at `marketplace.base_url`.
    Azure,
    /// The built-in emulator, started in-process (for trying meterd out and for development).
    Emulator,
}

/// How meterd obtains its bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// Entra ID client credentials (client id + secret).
    ClientSecret,
    /// Azure managed identity (IMDS, or App Service's `IDENTITY_ENDPOINT`).
    ManagedIdentity,
    /// A fixed token (the emulator and tests).
    StaticToken,
}

/// Entra token endpoint flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointVersion {
    /// `/oauth2/v2.0/token` with `scope`.
    V2,
    /// `/oauth2/token` with `resource`; numbers come back as strings.
    V1,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalSettings {
    /// SQLite file; its directory must be on a local disk (WAL needs shared memory).
    pub path: PathBuf,
    /// How long hourly totals are kept.
    pub retention: Duration,
}

/// Ingest API settings.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Listener address.
    pub listen: ListenAddr,
    /// File holding the bearer token; `None` leaves the API open (it listens on loopback by default).
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How far in the future a record's time may be (clock skew between app and meterd).
    pub max_future_skew: Duration,
    /// How long an idempotency key is remembered.
    pub dedupe_window: Duration,
    /// Time allowed to read one request (slow-client protection).
    pub request_timeout: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
}

impl IngestSettings {
    /// `request_timeout` as a std duration (30 s if it does not fit one, which validation prevents).
    pub fn request_timeout_std(&self) -> std::time::Duration {
        self.request_timeout
            .to_std()
            .unwrap_or(std::time::Duration::from_secs(30))
    }
}

/// Marketplace auth settings (secrets are loaded from files or the environment when the client is built).
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Token provider.
    pub kind: AuthKind,
    /// Entra tenant of the offer's app registration.
    pub tenant_id: String,
    /// Entra application (client) id, or the user-assigned identity's client id.
    pub client_id: String,
    /// File holding the client secret.
    pub client_secret_file: Option<PathBuf>,
    /// File holding the static token (kind `static_token`).
    pub static_token_file: Option<PathBuf>,
    /// Token endpoint; empty means Entra's for `tenant_id` and `endpoint_version`.
    pub token_url: Option<String>,
    /// Entra endpoint flavour.
    pub endpoint_version: EndpointVersion,
    /// Managed identity endpoint; empty means IMDS (or `$IDENTITY_ENDPOINT` when set).
    pub identity_endpoint: Option<String>,
}

/// Marketplace settings.
#[derive(Debug, Clone)]
pub struct MarketplaceSettings {
    /// Real marketplace or built-in emulator.
    pub mode: MarketplaceMode,
    /// API base, `https://marketplaceapi.microsoft.com/api`.
    pub base_url: String,
    /// Per-call timeout.
    pub timeout: Duration,
    /// Token provider settings.
    pub auth: AuthSettings,
    /// Credentials the marketplace commands need but the file leaves out, each naming the key and what to do.
    /// Empty unless loaded with [`Credentials::Optional`] (commands that read only the journal); the daemon
    /// and every command that talks to the marketplace load with [`Credentials::Required`] and refuse instead.
    pub missing_credentials: Vec<String>,
}

/// Whether loading refuses a configuration whose marketplace credentials are incomplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// The daemon and the commands that talk to the marketplace: missing credentials are an error.
    Required,
    /// Commands that read only the journal (`status`, `report`, `balance`, offline `check-config`): missing
    /// credentials are listed in [`MarketplaceSettings::missing_credentials`] for a warning.
    Optional,
}

/// Emission settings.
#[derive(Debug, Clone)]
pub struct EmitSettings {
    /// Six-field cron expression (seconds first), evaluated in UTC.
    pub schedule: String,
    /// Wait after an hour ends before it is frozen and sent.
    pub grace: Duration,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Retries stop this long before the 24-hour window closes.
    pub safety_margin: Duration,
    /// Late usage for a closed hour whose key is not frozen yet still goes into its own hour while at least this
    /// long is left to send it (`H + 24h - safety_margin - min_send_time` ahead of now); after that it is late.
    pub min_send_time: Duration,
    /// Upper bound on the final pass at shutdown.
    pub shutdown_timeout: Duration,
    /// First retry delay after a failed attempt (doubles each time, jittered).
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

/// Subscription check settings.
#[derive(Debug, Clone)]
pub struct SubscriptionSettings {
    /// Consult the SaaS subscription list before sending.
    pub check: bool,
    /// How long a fetched list is trusted.
    pub refresh: Duration,
}

/// A declared dimension.
#[derive(Debug, Clone)]
pub struct DimensionSettings {
    /// Dimension id as in Partner Center.
    pub id: String,
    /// Plans that have this dimension; empty means every plan.
    pub plans: Vec<String>,
    /// Usage per billed unit (e.g. 1200 seconds per unit): meterd sends whole units and carries the remainder.
    pub unit: Option<i64>,
    /// Consumption thresholds that raise an alert once per subscription, dimension and term.
    pub thresholds: Vec<Threshold>,
}

/// A consumption threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    /// Hundredths of a percent of the included quantity (`80%` is 8000).
    Percent(i64),
    /// An absolute quantity, micro-units.
    Absolute(i64),
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threshold::Percent(bp) if bp % 100 == 0 => write!(f, "{}%", bp / 100),
            Threshold::Percent(bp) => write!(f, "{}.{:02}%", bp / 100, bp % 100),
            Threshold::Absolute(m) => write!(f, "{}", crate::quantity::Micros(*m)),
        }
    }
}

/// How much of a dimension a plan includes per term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Included {
    /// This much (micro-units); usage above it is billed.
    Quantity(i64),
    /// Never billed.
    Infinite,
}

/// A plan's included quantities.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    /// Plan id as in Partner Center.
    pub id: String,
    /// Included quantity per dimension; a dimension not listed includes nothing (everything is billed).
    pub included: BTreeMap<String, Included>,
}

/// Billing policy settings.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// Term length in months for resources whose subscription has no term (managed applications): terms start
    /// on the first of a UTC month.
    pub fallback_term_months: u32,
    /// The draw priority of the plan allowance pools (`plan:<plan>`); pools with a lower priority draw first.
    pub plan_pool_priority: i64,
}

/// A `[[groups]]` entry: subscriptions that share `group`-scoped pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSettings {
    /// Group name (what `scope = { group = "..." }` names).
    pub name: String,
    /// Member resource ids (ASCII lower case).
    pub resources: Vec<String>,
}

/// Alert settings.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// Where alerts are POSTed as JSON; `None`: log and metric only.
    pub webhook_url: Option<String>,
    /// An event pending longer than this (since its hour ended) raises an alert.
    pub pending_age: Duration,
    /// A pool expiring within this long with at least `pool_expiry_unused` of its period unused raises an alert.
    pub pool_expiry_warning: Duration,
    /// Hundredths of a percent of a pool's period total (`40%` is 4000).
    pub pool_expiry_unused: i64,
}

/// A CloudEvents meter: maps an event `type` to a dimension and says where the quantity is.
#[derive(Debug, Clone)]
pub struct MeterSettings {
    /// CloudEvents `type`.
    pub event_type: String,
    /// Dimension the quantity is counted in.
    pub dimension: String,
    /// Path into `data`, `$.a.b`; the value must be a number (or a numeric string).
    pub value_path: Vec<String>,
    /// Path into `data` for an optional plan id.
    pub plan_path: Option<Vec<String>>,
}

/// Fleet mode (`[fleet]`, docs/fleet.md): many replicas forwarding into one shared PostgreSQL journal. On when a
/// PostgreSQL URL is configured (`fleet.url_file`, `$CREDENTIALS_DIRECTORY/postgres-url` or `METERD_FLEET__URL`).
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// The PostgreSQL URL (`postgres://...`, or `key=value` form); it may hold a password, so it never prints.
    pub url: crate::secret::Secret,
    /// The file the URL was read from, if it came from one (for messages; the file name is not secret).
    pub url_file: Option<PathBuf>,
    /// This replica's name in the fleet (`replicas.replica_id`, `records.replica`): `$POD_NAME`, else the host
    /// name.
    pub replica_id: String,
    /// An hour is frozen at the latest this long after it could have been (even if a live replica has not
    /// forwarded past it).
    pub max_wait: Duration,
    /// How often a replica publishes its heartbeat and forward watermark.
    pub heartbeat: Duration,
    /// A replica whose heartbeat is older than this no longer holds back freezing (default 3 x heartbeat).
    pub replica_timeout: Duration,
    /// How long a claimed outbound event stays with its sender (database clock).
    pub lease: Duration,
    /// Most records forwarded in one PostgreSQL transaction.
    pub forward_batch: usize,
    /// Most PostgreSQL connections of one replica.
    pub pool_size: usize,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Late usage policy.
    pub late_usage: LateUsage,
    /// Plan id when neither the record nor the subscription list gives one.
    pub default_plan: Option<String>,
    /// Journal.
    pub journal: JournalSettings,
    /// Ingest API.
    pub ingest: IngestSettings,
    /// Marketplace.
    pub marketplace: MarketplaceSettings,
    /// Emission.
    pub emit: EmitSettings,
    /// Subscription check.
    pub subscriptions: SubscriptionSettings,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log_level: String,
    /// Declared dimensions.
    pub dimensions: Vec<DimensionSettings>,
    /// CloudEvents meters.
    pub meters: Vec<MeterSettings>,
    /// Plans with included quantities.
    pub plans: Vec<PlanSettings>,
    /// Billing policy.
    pub billing: BillingSettings,
    /// Credit pools declared in `[[pools]]` (journaled with who = `config` when meterd starts).
    pub pools: Vec<crate::pool_def::PoolDef>,
    /// Groups of subscriptions for `group`-scoped pools.
    pub groups: Vec<GroupSettings>,
    /// Alerts.
    pub alerts: AlertSettings,
    /// Fleet mode: `Some` when a PostgreSQL URL is configured.
    pub fleet: Option<FleetSettings>,
    /// Where the settings came from, for messages.
    pub source: String,
}

// ---------------------------------------------------------------------------------------------------------------
// Raw form

/// The file as written: every key optional, unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    late_usage: Option<String>,
    default_plan: Option<String>,
    #[serde(default)]
    journal: RawJournal,
    #[serde(default)]
    ingest: RawIngest,
    #[serde(default)]
    marketplace: RawMarketplace,
    #[serde(default)]
    emit: RawEmit,
    #[serde(default)]
    subscriptions: RawSubscriptions,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    dimensions: Vec<RawDimension>,
    #[serde(default)]
    meters: Vec<RawMeter>,
    #[serde(default)]
    plans: Vec<RawPlan>,
    #[serde(default)]
    billing: RawBilling,
    #[serde(default)]
    alerts: RawAlerts,
    fleet: Option<RawFleet>,
    #[serde(default)]
    pools: Vec<crate::pool_def::PoolSpec>,
    #[serde(default)]
    groups: Vec<RawGroup>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    url_file: Option<String>,
    replica_id: Option<String>,
    max_wait: Option<String>,
    heartbeat: Option<String>,
    replica_timeout: Option<String>,
    lease: Option<String>,
    forward_batch: Option<i64>,
    pool_size: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    #[serde(default)]
    resources: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    path: Option<String>,
    retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    listen: Option<String>,
    token_file: Option<String>,
    max_body_bytes: Option<i64>,
    max_future_skew: Option<String>,
    dedupe_window: Option<String>,
    request_timeout: Option<String>,
    max_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMarketplace {
    mode: Option<String>,
    base_url: Option<String>,
    timeout: Option<String>,
    #[serde(default)]
    auth: RawAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    kind: Option<String>,
    tenant_id: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<String>,
    static_token_file: Option<String>,
    token_url: Option<String>,
    endpoint_version: Option<String>,
    identity_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmit {
    schedule: Option<String>,
    grace: Option<String>,
    concurrency: Option<i64>,
    safety_margin: Option<String>,
    min_send_time: Option<String>,
    shutdown_timeout: Option<String>,
    retry_min: Option<String>,
    retry_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscriptions {
    check: Option<bool>,
    refresh: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDimension {
    id: String,
    #[serde(default)]
    plans: Vec<String>,
    unit: Option<i64>,
    #[serde(default)]
    thresholds: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    id: String,
    #[serde(default)]
    included: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBilling {
    fallback_term: Option<String>,
    plan_pool_priority: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    webhook_url: Option<String>,
    pending_age: Option<String>,
    pool_expiry_warning: Option<String>,
    pool_expiry_unused: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeter {
    #[serde(rename = "type")]
    event_type: String,
    dimension: String,
    value_property: String,
    plan_property: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------------
// Loading

/// Reads `path`, lays the `METERD_*` variables of `env` over it and validates the result.
pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Settings, ConfigError> {
    load_for(path, env, Credentials::Required)
}

/// Like [`load`]; with [`Credentials::Optional`] missing marketplace credentials are listed, not refused.
pub fn load_for(
    path: &Path,
    env: &BTreeMap<String, String>,
    credentials: Credentials,
) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str_for(&text, &path.display().to_string(), env, credentials)
}

/// Like [`load`] for configuration text already in memory; `source_name` names it in errors.
pub fn load_str(
    text: &str,
    source_name: &str,
    env: &BTreeMap<String, String>,
) -> Result<Settings, ConfigError> {
    load_str_for(text, source_name, env, Credentials::Required)
}

/// Like [`load_str`], with the credentials policy of [`load_for`].
pub fn load_str_for(
    text: &str,
    source_name: &str,
    env: &BTreeMap<String, String>,
    credentials: Credentials,
) -> Result<Settings, ConfigError> {
    let mut value: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
    let applied = apply_env(&mut value, env)?;
    let raw: RawConfig = RawConfig::deserialize(value).map_err(|e| ConfigError::Parse {
        source_name: describe_source(source_name, &applied),
        message: e.to_string().trim().to_string(),
    })?;
    Settings::validate_for(
        raw,
        &describe_source(source_name, &applied),
        env,
        credentials,
    )
}

fn describe_source(file: &str, applied: &[String]) -> String {
    if applied.is_empty() {
        file.to_string()
    } else {
        format!("{file} (with environment overrides {})", applied.join(", "))
    }
}

/// The process environment as a sorted map (tests pass their own).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

/// Lays `METERD_<SECTION>__<KEY>=value` over the table. The value is read as a TOML value when it parses as
/// one (`4`, `true`, `"x"`), otherwise as a string (`5m`, `gold`).
fn apply_env(
    table: &mut toml::Table,
    env: &BTreeMap<String, String>,
) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    for (name, raw_value) in env {
        let Some(rest) = name.strip_prefix("METERD_") else {
            continue;
        };
        // `METERD_TEST_*` belong to the test harness (`METERD_TEST_POSTGRES_URL`, set by `.ci/run`), not to the
        // configuration: a daemon started by a test inherits them.
        if SECRET_ENV_VARS.contains(&name.as_str()) || rest.is_empty() || rest.starts_with("TEST_")
        {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Parse {
                source_name: format!("environment variable {name}"),
                message: "empty key segment; use METERD_<SECTION>__<KEY>".into(),
            });
        }
        let value = match format!("v = {raw_value}").parse::<toml::Table>() {
            Ok(mut t) => t
                .remove("v")
                .unwrap_or(toml::Value::String(raw_value.clone())),
            Err(_) => toml::Value::String(raw_value.clone()),
        };
        let mut cursor = &mut *table;
        for segment in &path[..path.len() - 1] {
            let entry = cursor
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Parse {
                        source_name: format!("environment variable {name}"),
                        message: format!("`{segment}` is not a section"),
                    });
                }
            };
        }
        cursor.insert(path[path.len() - 1].clone(), value);
        applied.push(name.clone());
    }
    Ok(applied)
}

/// Parses `30s`, `5m`, `6h`, `7d` (also `0s`, `1500ms`, `2w`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{t}` has no unit; write it like 30s, 5m, 6h or 7d"))?;
    let (num, unit) = t.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("`{t}` is not a duration; write it like 30s, 5m, 6h or 7d"))?;
    let d = match unit {
        "ms" => Duration::try_milliseconds(n),
        "s" => Duration::try_seconds(n),
        "m" => Duration::try_minutes(n),
        "h" => Duration::try_hours(n),
        "d" => Duration::try_days(n),
        "w" => Duration::try_weeks(n),
        _ => None,
    };
    d.ok_or_else(|| format!("`{t}` is not a duration; write it like 30s, 5m, 6h or 7d"))
}

/// Formats a duration the way the config file writes it.
pub fn format_duration(d: Duration) -> String {
    let s = d.num_seconds();
    if s != 0 && s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s != 0 && s % 3_600 == 0 {
        format!("{}h", s / 3_600)
    } else if s != 0 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

struct Validator<'a> {
    source: &'a str,
}

impl Validator<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            source_name: self.source.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn duration(
        &self,
        key: &str,
        v: Option<String>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let text = v.unwrap_or_else(|| default.to_string());
        let d = parse_duration(&text).map_err(|m| self.err(key, m))?;
        if d < Duration::zero() {
            return Err(self.err(key, "must not be negative"));
        }
        Ok(d)
    }

    fn positive(
        &self,
        key: &str,
        v: Option<i64>,
        default: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let n = v.unwrap_or(default);
        if n < 1 || n > max {
            return Err(self.err(key, format!("must be between 1 and {max}, got {n}")));
        }
        Ok(n)
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `10000`, `12.5`, `"infinite"`.
fn parse_included(v: &toml::Value) -> Result<Included, String> {
    match v {
        toml::Value::String(s) if s.eq_ignore_ascii_case("infinite") => Ok(Included::Infinite),
        toml::Value::Integer(n) if *n >= 0 => Ok(Included::Quantity(
            n.checked_mul(1_000_000).ok_or("too large")?,
        )),
        toml::Value::Float(f) if *f >= 0.0 => {
            crate::quantity::Micros::parse_decimal(&f.to_string())
                .map(|m| Included::Quantity(m.0))
                .or(if *f == 0.0 {
                    Ok(Included::Quantity(0))
                } else {
                    Err("must have at most 6 decimals".to_string())
                })
        }
        _ => Err("must be a quantity >= 0 or \"infinite\"".to_string()),
    }
}

/// `"80%"` or an absolute quantity.
fn parse_threshold(v: &toml::Value) -> Result<Threshold, String> {
    match v {
        toml::Value::String(s) if s.trim().ends_with('%') => {
            let n = s.trim().trim_end_matches('%');
            let m = crate::quantity::Micros::parse_decimal(n).map_err(|e| format!("`{s}`: {e}"))?;
            if m.0 % 10_000 != 0 {
                return Err(format!("`{s}`: at most two decimals in a percentage"));
            }
            Ok(Threshold::Percent(m.0 / 10_000))
        }
        toml::Value::Integer(n) if *n > 0 => Ok(Threshold::Absolute(n * 1_000_000)),
        toml::Value::Float(f) if *f > 0.0 => crate::quantity::Micros::parse_decimal(&f.to_string())
            .map(|m| Threshold::Absolute(m.0))
            .map_err(|e| e.to_string()),
        _ => Err(
            "a threshold is a percentage of the included quantity (\"80%\") or a quantity (1000)"
                .into(),
        ),
    }
}

fn json_path(v: &str) -> Option<Vec<String>> {
    let rest = v
        .trim()
        .strip_prefix("$.")
        .or_else(|| v.trim().strip_prefix("$"))?;
    if rest.is_empty() {
        return None;
    }
    let parts: Vec<String> = rest.split('.').map(str::to_string).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(parts)
}

/// The host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`), for the default `fleet.replica_id`.
fn host_name(env: &BTreeMap<String, String>) -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .or_else(|| env.get("HOSTNAME").cloned())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// `[fleet]`: on when a URL is found (`url_file`, `$CREDENTIALS_DIRECTORY/postgres-url`, `METERD_FLEET__URL`). A
/// `[fleet]` section without any URL is refused (the operator meant fleet mode; running alone would under-bill).
fn fleet_settings(
    v: &Validator<'_>,
    raw: Option<RawFleet>,
    env: &BTreeMap<String, String>,
) -> Result<Option<FleetSettings>, ConfigError> {
    let section = raw.is_some();
    let raw = raw.unwrap_or_default();
    let url_file = non_empty(raw.url_file).map(PathBuf::from);
    let url = crate::secret::load_secret(
        url_file.as_deref(),
        "postgres-url",
        "METERD_FLEET__URL",
        env,
    )
    .map_err(|e| v.err("fleet.url_file", e.to_string()))?;
    let Some(url) = url else {
        if section {
            return Err(v.err(
                "fleet.url_file",
                "[fleet] is configured but no PostgreSQL URL was found: set fleet.url_file to a file holding \
                 postgres://..., pass the credential `postgres-url` ($CREDENTIALS_DIRECTORY), or set \
                 METERD_FLEET__URL; remove [fleet] to run a single replica",
            ));
        }
        return Ok(None);
    };
    let text = url.expose().trim();
    let looks_like_url = text.starts_with("postgres://") || text.starts_with("postgresql://");
    let looks_like_kv = !text.contains("://") && text.contains('=');
    if !(looks_like_url || looks_like_kv) {
        // Never the value: it may hold a password.
        return Err(v.err(
            "fleet.url_file",
            "the PostgreSQL URL must start with postgres:// or postgresql:// (or be `host=... dbname=...` \
             key=value pairs)",
        ));
    }
    let replica_id = non_empty(raw.replica_id)
        .or_else(|| env.get("POD_NAME").cloned().filter(|p| !p.trim().is_empty()))
        .or_else(|| host_name(env))
        .ok_or_else(|| {
            v.err(
                "fleet.replica_id",
                "no replica id: set fleet.replica_id (or $POD_NAME); the host name could not be read",
            )
        })?;
    if replica_id.len() > 200 || replica_id.chars().any(|c| c.is_control()) {
        return Err(v.err(
            "fleet.replica_id",
            "must be at most 200 characters without control characters",
        ));
    }
    let heartbeat = v.duration("fleet.heartbeat", raw.heartbeat, "10s")?;
    if heartbeat < Duration::seconds(1) || heartbeat > Duration::minutes(10) {
        return Err(v.err("fleet.heartbeat", "must be between 1s and 10m"));
    }
    let replica_timeout = match raw.replica_timeout {
        Some(t) => v.duration("fleet.replica_timeout", Some(t), "30s")?,
        None => heartbeat * 3,
    };
    if replica_timeout <= heartbeat {
        return Err(v.err(
            "fleet.replica_timeout",
            format!(
                "must be longer than fleet.heartbeat ({}), or every replica looks gone between two heartbeats; \
                 the default is 3 x fleet.heartbeat",
                format_duration(heartbeat)
            ),
        ));
    }
    let max_wait = v.duration("fleet.max_wait", raw.max_wait, "15m")?;
    if max_wait > Duration::hours(6) {
        return Err(v.err(
            "fleet.max_wait",
            "must be at most 6h (an hour waiting longer for a silent replica risks its 24-hour window)",
        ));
    }
    let lease = v.duration("fleet.lease", raw.lease, "60s")?;
    if lease < Duration::seconds(5) {
        return Err(v.err(
            "fleet.lease",
            "must be at least 5s (longer than one marketplace call)",
        ));
    }
    Ok(Some(FleetSettings {
        url,
        url_file,
        replica_id,
        max_wait,
        heartbeat,
        replica_timeout,
        lease,
        forward_batch: v.positive("fleet.forward_batch", raw.forward_batch, 1000, 50_000)? as usize,
        pool_size: v.positive("fleet.pool_size", raw.pool_size, 8, 256)? as usize,
    }))
}

impl Settings {
    /// Checks every value of `raw` and applies defaults.
    pub fn validate(
        raw: RawConfig,
        source: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        Self::validate_for(raw, source, env, Credentials::Required)
    }

    /// Like [`Settings::validate`], with the credentials policy `credentials`.
    pub fn validate_for(
        raw: RawConfig,
        source: &str,
        env: &BTreeMap<String, String>,
        credentials: Credentials,
    ) -> Result<Settings, ConfigError> {
        let v = Validator { source };
        let late_usage = match raw.late_usage.as_deref().unwrap_or("carry_forward") {
            "carry_forward" => LateUsage::CarryForward,
            "reject" => LateUsage::Reject,
            other => {
                return Err(v.err(
                    "late_usage",
                    format!("`{other}` is not one of \"carry_forward\", \"reject\""),
                ));
            }
        };

        let journal_path = non_empty(raw.journal.path)
            .map(PathBuf::from)
            .or_else(|| {
                env.get("STATE_DIRECTORY")
                    .map(|d| PathBuf::from(d).join("journal.db"))
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL_PATH));
        let journal = JournalSettings {
            path: journal_path,
            retention: v.duration("journal.retention", raw.journal.retention, "730d")?,
        };

        let listen_text = non_empty(raw.ingest.listen).unwrap_or_else(|| "127.0.0.1:8787".into());
        let listen = if let Some(p) = listen_text.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(v.err(
                    "ingest.listen",
                    "`unix:` needs a path, like unix:/run/meterd/ingest.sock",
                ));
            }
            ListenAddr::Unix(PathBuf::from(p))
        } else {
            if listen_text.parse::<std::net::SocketAddr>().is_err() {
                return Err(v.err(
                    "ingest.listen",
                    format!("`{listen_text}` is neither HOST:PORT with an IP address (127.0.0.1:8787) nor unix:/path"),
                ));
            }
            ListenAddr::Tcp(listen_text)
        };
        let max_body = v.positive(
            "ingest.max_body_bytes",
            raw.ingest.max_body_bytes,
            4 * 1024 * 1024,
            1 << 30,
        )?;
        let dedupe_window = v.duration("ingest.dedupe_window", raw.ingest.dedupe_window, "7d")?;
        if dedupe_window < Duration::days(1) {
            return Err(v.err(
                "ingest.dedupe_window",
                "must be at least 1d, so a retried request is recognised across the whole 24-hour window",
            ));
        }
        let ingest = IngestSettings {
            listen,
            token_file: non_empty(raw.ingest.token_file).map(PathBuf::from),
            max_body_bytes: max_body as usize,
            max_future_skew: v.duration(
                "ingest.max_future_skew",
                raw.ingest.max_future_skew,
                "5m",
            )?,
            dedupe_window,
            request_timeout: v.duration(
                "ingest.request_timeout",
                raw.ingest.request_timeout,
                "30s",
            )?,
            max_connections: v.positive(
                "ingest.max_connections",
                raw.ingest.max_connections,
                1024,
                1_000_000,
            )? as usize,
        };

        let mode = match raw.marketplace.mode.as_deref().unwrap_or("azure") {
            "azure" => MarketplaceMode::Azure,
            "emulator" => MarketplaceMode::Emulator,
            other => {
                return Err(v.err(
                    "marketplace.mode",
                    format!("`{other}` is not one of \"azure\", \"emulator\""),
                ));
            }
        };
        let base_url = non_empty(raw.marketplace.base_url)
            .unwrap_or_else(|| "https://marketplaceapi.microsoft.com/api".into())
            .trim_end_matches('/')
            .to_string();
        if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
            return Err(v.err(
                "marketplace.base_url",
                format!("`{base_url}` is not an http(s) URL"),
            ));
        }
        let a = raw.marketplace.auth;
        let kind = match a
            .kind
            .as_deref()
            .unwrap_or(if mode == MarketplaceMode::Emulator {
                "static_token"
            } else {
                "client_secret"
            }) {
            "client_secret" => AuthKind::ClientSecret,
            "managed_identity" => AuthKind::ManagedIdentity,
            "static_token" => AuthKind::StaticToken,
            other => {
                return Err(v.err(
                    "marketplace.auth.kind",
                    format!("`{other}` is not one of \"client_secret\", \"managed_identity\", \"static_token\""),
                ));
            }
        };
        let endpoint_version = match a.endpoint_version.as_deref().unwrap_or("v2") {
            "v2" => EndpointVersion::V2,
            "v1" => EndpointVersion::V1,
            other => {
                return Err(v.err(
                    "marketplace.auth.endpoint_version",
                    format!("`{other}` is not \"v1\" or \"v2\""),
                ));
            }
        };
        let tenant_id = non_empty(a.tenant_id).unwrap_or_default();
        if tenant_id.eq_ignore_ascii_case("common")
            || tenant_id.eq_ignore_ascii_case("organizations")
        {
            return Err(v.err(
                "marketplace.auth.tenant_id",
                "must be the tenant id of the offer's own Entra app registration, not `common`/`organizations`",
            ));
        }
        let auth = AuthSettings {
            kind,
            tenant_id,
            client_id: non_empty(a.client_id).unwrap_or_default(),
            client_secret_file: non_empty(a.client_secret_file).map(PathBuf::from),
            static_token_file: non_empty(a.static_token_file).map(PathBuf::from),
            token_url: non_empty(a.token_url),
            endpoint_version,
            identity_endpoint: non_empty(a.identity_endpoint),
        };
        let mut missing = Vec::new();
        if mode == MarketplaceMode::Azure && kind == AuthKind::ClientSecret {
            if auth.tenant_id.is_empty() && auth.token_url.is_none() {
                missing.push(v.err(
                    "marketplace.auth.tenant_id",
                    "is required for kind = \"client_secret\" (the tenant of the app registered on the offer); \
                     to try meterd without credentials run `meterd run --emulator`",
                ));
            }
            if auth.client_id.is_empty() {
                missing.push(v.err(
                    "marketplace.auth.client_id",
                    "is required for kind = \"client_secret\" (the application id registered on the offer)",
                ));
            }
        }
        if credentials == Credentials::Required && !missing.is_empty() {
            return Err(missing.remove(0));
        }
        let marketplace = MarketplaceSettings {
            mode,
            base_url,
            timeout: v.duration("marketplace.timeout", raw.marketplace.timeout, "30s")?,
            auth,
            missing_credentials: missing.iter().map(ToString::to_string).collect(),
        };

        let schedule = non_empty(raw.emit.schedule).unwrap_or_else(|| "0 5 * * * *".into());
        if schedule.split_whitespace().count() != 6 {
            return Err(v.err(
                "emit.schedule",
                format!("`{schedule}` must have six fields, seconds first, like \"0 5 * * * *\" (minute 5 of every hour, UTC)"),
            ));
        }
        let emit = EmitSettings {
            schedule,
            grace: v.duration("emit.grace", raw.emit.grace, "5m")?,
            concurrency: v.positive("emit.concurrency", raw.emit.concurrency, 4, 64)? as usize,
            safety_margin: v.duration("emit.safety_margin", raw.emit.safety_margin, "15m")?,
            min_send_time: v.duration("emit.min_send_time", raw.emit.min_send_time, "1h")?,
            shutdown_timeout: v.duration(
                "emit.shutdown_timeout",
                raw.emit.shutdown_timeout,
                "20s",
            )?,
            retry_min: v.duration("emit.retry_min", raw.emit.retry_min, "30s")?,
            retry_max: v.duration("emit.retry_max", raw.emit.retry_max, "30m")?,
        };
        if emit.retry_min < Duration::seconds(1) || emit.retry_max < emit.retry_min {
            return Err(v.err(
                "emit.retry_min",
                "must be at least 1s and not above emit.retry_max",
            ));
        }
        if emit.grace >= Duration::hours(12) {
            return Err(v.err(
                "emit.grace",
                "must be less than 12h (an hour must still be sendable inside the 24-hour window)",
            ));
        }
        if emit.safety_margin >= Duration::hours(12) {
            return Err(v.err("emit.safety_margin", "must be less than 12h"));
        }
        if emit.min_send_time >= Duration::hours(12) {
            return Err(v.err(
                "emit.min_send_time",
                "must be less than 12h (late usage of a closed hour goes into its own hour only while at least this \
                 long is left to send it; the default is 1h)",
            ));
        }
        if Duration::hours(1) + emit.grace + emit.safety_margin + emit.min_send_time
            >= Duration::hours(24)
        {
            return Err(v.err(
                "emit.min_send_time",
                "1h + emit.grace + emit.safety_margin + emit.min_send_time must be less than 24h, or no closed hour \
                 is ever sendable; lower one of them (defaults: 5m, 15m, 1h)",
            ));
        }
        let retention_min = Duration::hours(25) + emit.grace;
        if journal.retention < retention_min {
            return Err(v.err(
                "journal.retention",
                format!(
                    "must be at least {} (25h + emit.grace of {}): a shorter retention could delete hourly totals \
                     before they are frozen and sent; the default is 730d",
                    format_duration(retention_min),
                    format_duration(emit.grace)
                ),
            ));
        }

        let subscriptions = SubscriptionSettings {
            check: raw.subscriptions.check.unwrap_or(true),
            refresh: v.duration("subscriptions.refresh", raw.subscriptions.refresh, "10m")?,
        };

        let log_format = match raw.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(v.err(
                    "log.format",
                    format!("`{other}` is not \"text\" or \"json\""),
                ));
            }
        };
        let log_level = non_empty(raw.log.level).unwrap_or_else(|| "info".into());

        let mut seen = BTreeSet::new();
        let mut dimensions = Vec::new();
        for (i, d) in raw.dimensions.into_iter().enumerate() {
            let id = d.id.trim().to_string();
            let key = format!("dimensions[{i}].id");
            if id.is_empty() || id.len() > 128 {
                return Err(v.err(
                    &key,
                    "must be a non-empty dimension id (as in Partner Center)",
                ));
            }
            if !seen.insert(id.clone()) {
                return Err(v.err(&key, format!("dimension `{id}` is declared twice")));
            }
            if let Some(u) = d.unit
                && !(1..=1_000_000_000).contains(&u)
            {
                return Err(v.err(
                    &format!("dimensions[{i}].unit"),
                    "must be a whole number from 1 to 1000000000",
                ));
            }
            let mut thresholds = Vec::new();
            for t in &d.thresholds {
                thresholds.push(
                    parse_threshold(t)
                        .map_err(|m| v.err(&format!("dimensions[{i}].thresholds"), m))?,
                );
            }
            dimensions.push(DimensionSettings {
                id,
                plans: d.plans,
                unit: d.unit.filter(|u| *u > 1),
                thresholds,
            });
        }
        if dimensions.len() > 30 {
            return Err(v.err("dimensions", "an offer has at most 30 dimensions"));
        }

        let mut meters = Vec::new();
        let mut types = BTreeSet::new();
        for (i, m) in raw.meters.into_iter().enumerate() {
            if !seen.contains(m.dimension.trim()) {
                return Err(v.err(
                    &format!("meters[{i}].dimension"),
                    format!(
                        "`{}` is not a declared dimension; add [[dimensions]] id = \"{}\"",
                        m.dimension, m.dimension
                    ),
                ));
            }
            if !types.insert(m.event_type.clone()) {
                return Err(v.err(
                    &format!("meters[{i}].type"),
                    format!("type `{}` has two meters", m.event_type),
                ));
            }
            let value_path = json_path(&m.value_property).ok_or_else(|| {
                v.err(
                    &format!("meters[{i}].value_property"),
                    format!("`{}` is not a path like $.count", m.value_property),
                )
            })?;
            let plan_path = match m.plan_property {
                Some(p) => Some(json_path(&p).ok_or_else(|| {
                    v.err(
                        &format!("meters[{i}].plan_property"),
                        format!("`{p}` is not a path like $.plan"),
                    )
                })?),
                None => None,
            };
            meters.push(MeterSettings {
                event_type: m.event_type,
                dimension: m.dimension.trim().to_string(),
                value_path,
                plan_path,
            });
        }

        let mut plans = Vec::new();
        let mut plan_ids = BTreeSet::new();
        for (i, p) in raw.plans.into_iter().enumerate() {
            if !plan_ids.insert(p.id.clone()) {
                return Err(v.err(
                    &format!("plans[{i}].id"),
                    format!("plan `{}` is declared twice", p.id),
                ));
            }
            let mut included = BTreeMap::new();
            for (dim, value) in p.included {
                let key = format!("plans[{i}].included.{dim}");
                if !seen.contains(&dim) {
                    return Err(v.err(&key, format!("`{dim}` is not a declared dimension")));
                }
                included.insert(dim, parse_included(&value).map_err(|m| v.err(&key, m))?);
            }
            plans.push(PlanSettings { id: p.id, included });
        }
        let fallback_term_months = match raw.billing.fallback_term.as_deref().unwrap_or("P1M") {
            "P1M" => 1,
            "P1Y" => 12,
            other => {
                return Err(v.err(
                    "billing.fallback_term",
                    format!("`{other}` is not \"P1M\" or \"P1Y\""),
                ));
            }
        };
        let webhook_url = non_empty(raw.alerts.webhook_url);
        if let Some(u) = &webhook_url
            && !(u.starts_with("https://") || u.starts_with("http://"))
        {
            return Err(v.err("alerts.webhook_url", format!("`{u}` is not an http(s) URL")));
        }
        let pool_expiry_unused = match &raw.alerts.pool_expiry_unused {
            None => 4000,
            Some(t) => match parse_threshold(t) {
                Ok(Threshold::Percent(bp)) if bp <= 10_000 => bp,
                _ => {
                    return Err(v.err(
                        "alerts.pool_expiry_unused",
                        "must be a percentage from \"0%\" to \"100%\", like \"40%\"",
                    ));
                }
            },
        };
        let alerts = AlertSettings {
            webhook_url,
            pending_age: v.duration("alerts.pending_age", raw.alerts.pending_age, "6h")?,
            pool_expiry_warning: v.duration(
                "alerts.pool_expiry_warning",
                raw.alerts.pool_expiry_warning,
                "7d",
            )?,
            pool_expiry_unused,
        };

        let fleet = fleet_settings(&v, raw.fleet, env)?;
        let mut groups: Vec<GroupSettings> = Vec::new();
        for (i, g) in raw.groups.into_iter().enumerate() {
            let name = g.name.trim().to_string();
            if name.is_empty() {
                return Err(v.err(&format!("groups[{i}].name"), "must be a non-empty name"));
            }
            if groups.iter().any(|x| x.name == name) {
                return Err(v.err(
                    &format!("groups[{i}].name"),
                    format!("group `{name}` is declared twice"),
                ));
            }
            groups.push(GroupSettings {
                name,
                resources: g
                    .resources
                    .iter()
                    .map(|r| r.trim().to_ascii_lowercase())
                    .collect(),
            });
        }
        let mut pools: Vec<crate::pool_def::PoolDef> = Vec::new();
        for (i, p) in raw.pools.iter().enumerate() {
            let def = p.validate().map_err(|m| v.err(&format!("pools[{i}]"), m))?;
            if !seen.contains(&def.dimension) {
                return Err(v.err(
                    &format!("pools[{i}].dimension"),
                    format!("`{}` is not a declared dimension", def.dimension),
                ));
            }
            if pools.iter().any(|x| x.id == def.id) {
                return Err(v.err(
                    &format!("pools[{i}].id"),
                    format!("pool `{}` is declared twice", def.id),
                ));
            }
            if let crate::pool_def::Scope::Group(g) = &def.scope
                && !groups.iter().any(|x| &x.name == g)
            {
                return Err(v.err(
                    &format!("pools[{i}].scope.group"),
                    format!("`{g}` is not a declared group; add [[groups]] name = \"{g}\""),
                ));
            }
            pools.push(def);
        }
        if fleet.is_some() && !pools.is_empty() {
            // The fleet's billing on the shared journal does not draw from pools: what a pool covers would be
            // billed as overage. Refused rather than billed wrongly.
            return Err(v.err(
                "pools",
                "credit pools ([[pools]]) are not available in fleet mode yet: the shared journal's billing does not \
                 draw from them, so the usage they cover would be billed as overage; remove [[pools]], or [fleet] to \
                 run a single replica (docs/fleet.md)",
            ));
        }

        Ok(Settings {
            fleet,
            plans,
            billing: BillingSettings {
                fallback_term_months,
                plan_pool_priority: raw.billing.plan_pool_priority.unwrap_or(100),
            },
            pools,
            groups,
            alerts,
            late_usage,
            default_plan: non_empty(raw.default_plan),
            journal,
            ingest,
            marketplace,
            emit,
            subscriptions,
            log_format,
            log_level,
            dimensions,
            meters,
            source: source.to_string(),
        })
    }

    /// The included quantity of `dimension` on `plan` (nothing configured: everything is billed).
    pub fn included(&self, plan: &str, dimension: &str) -> Included {
        self.plans
            .iter()
            .find(|p| p.id == plan)
            .and_then(|p| p.included.get(dimension).copied())
            .unwrap_or(Included::Quantity(0))
    }

    /// The `[[groups]]` that hold `resource` (compared case-insensitively).
    pub fn groups_of(&self, resource: &str) -> Vec<&str> {
        let r = resource.to_ascii_lowercase();
        self.groups
            .iter()
            .filter(|g| g.resources.contains(&r))
            .map(|g| g.name.as_str())
            .collect()
    }

    /// The dimension named `id`, if declared.
    pub fn dimension(&self, id: &str) -> Option<&DimensionSettings> {
        self.dimensions.iter().find(|d| d.id == id)
    }

    /// Settings for trying meterd out with the built-in emulator and no configuration file: a journal in
    /// `./meterd-dev/`, the emulator's dimensions, and emission a minute after each hour.
    pub fn dev_defaults(env: &BTreeMap<String, String>) -> Result<Settings, ConfigError> {
        let text = r#"
            [journal]
            path = "meterd-dev/journal.db"
            [marketplace]
            mode = "emulator"
            [emit]
            grace = "1m"
            schedule = "0 */1 * * * *"
            [[dimensions]]
            id = "api_calls"
            [[dimensions]]
            id = "gb_processed"
        "#;
        load_str(text, "built-in development settings", env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn example_file_parses_with_documented_defaults() {
        let text = include_str!("../config.toml.example");
        let s = load_str(
            text,
            "config.toml.example",
            &env(&[("METERD_MARKETPLACE__MODE", "emulator")]),
        )
        .expect("example parses");
        assert_eq!(s.late_usage, LateUsage::CarryForward);
        assert_eq!(s.ingest.listen, ListenAddr::Tcp("127.0.0.1:8787".into()));
        assert_eq!(s.ingest.max_body_bytes, 4_194_304);
        assert_eq!(s.ingest.max_future_skew, Duration::minutes(5));
        assert_eq!(s.ingest.dedupe_window, Duration::days(7));
        assert_eq!(s.emit.grace, Duration::minutes(5));
        assert_eq!(s.emit.safety_margin, Duration::minutes(15));
        assert_eq!(s.emit.concurrency, 4);
        assert_eq!(s.emit.schedule, "0 5 * * * *");
        assert_eq!(s.journal.retention, Duration::days(730));
        assert_eq!(s.subscriptions.refresh, Duration::minutes(10));
        assert!(s.dimension("api_calls").is_some());
    }

    #[test]
    fn empty_file_gets_defaults_but_azure_needs_credentials() {
        let err = load_str("", "t.toml", &env(&[])).unwrap_err().to_string();
        assert!(err.contains("marketplace.auth.tenant_id"), "{err}");
        assert!(err.contains("meterd run --emulator"), "{err}");
        let s = load_str("[marketplace]\nmode = \"emulator\"\n", "t.toml", &env(&[])).unwrap();
        assert_eq!(s.marketplace.auth.kind, AuthKind::StaticToken);
        assert_eq!(s.journal.path, PathBuf::from(DEFAULT_JOURNAL_PATH));
    }

    /// The test harness's `METERD_TEST_POSTGRES_URL` (set by `.ci/run` for every test, inherited by the daemons
    /// the black-box tests start) is not a configuration key: it used to fail every daemon with "unknown field".
    #[test]
    fn test_harness_variables_are_not_configuration() {
        let s = load_str(
            "[marketplace]\nmode = \"emulator\"\n",
            "t.toml",
            &env(&[(
                "METERD_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            )]),
        );
        assert!(s.is_ok(), "{:?}", s.err());
    }

    #[test]
    fn env_overrides_every_level() {
        let s = load_str(
            "[marketplace]\nmode = \"emulator\"\n",
            "t.toml",
            &env(&[
                ("METERD_EMIT__GRACE", "0s"),
                ("METERD_EMIT__CONCURRENCY", "8"),
                ("METERD_LATE_USAGE", "reject"),
                ("METERD_SUBSCRIPTIONS__CHECK", "false"),
                ("METERD_MARKETPLACE__AUTH__CLIENT_ID", "abc"),
                ("METERD_MARKETPLACE__AUTH__CLIENT_SECRET", "not-a-key"),
                ("STATE_DIRECTORY", "/var/lib/meterd-x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.emit.grace, Duration::zero());
        assert_eq!(s.emit.concurrency, 8);
        assert_eq!(s.late_usage, LateUsage::Reject);
        assert!(!s.subscriptions.check);
        assert_eq!(s.marketplace.auth.client_id, "abc");
        assert_eq!(
            s.journal.path,
            PathBuf::from("/var/lib/meterd-x/journal.db")
        );
    }

    #[test]
    fn errors_name_source_key_and_problem() {
        let e = load_str(
            "[marketplace]\nmode = \"emulator\"\n[emit]\ngrace = \"5 minutes\"\n",
            "/etc/meterd/meterd.toml",
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/etc/meterd/meterd.toml") && e.contains("emit.grace") && e.contains("30s"),
            "{e}"
        );
        let e = load_str("[emit]\ngrase = \"5m\"\n", "f.toml", &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.toml") && e.contains("grase"), "{e}");
        let e = load_str(
            "[marketplace]\nmode = \"emulator\"\n",
            "f.toml",
            &env(&[("METERD_EMIT__CONCURRENCY", "0")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("METERD_EMIT__CONCURRENCY") && e.contains("emit.concurrency"),
            "{e}"
        );
        let e = load_str(
            "[marketplace]\nmode = \"emulator\"\n[[meters]]\ntype = \"x\"\ndimension = \"nope\"\nvalue_property = \"$.n\"\n",
            "f.toml",
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("meters[0].dimension") && e.contains("[[dimensions]]"),
            "{e}"
        );
    }

    #[test]
    fn min_send_time_defaults_env_and_bounds() {
        let s = load_str("[marketplace]\nmode = \"emulator\"\n", "f.toml", &env(&[])).unwrap();
        assert_eq!(s.emit.min_send_time, Duration::hours(1));
        let s = load_str(
            "[marketplace]\nmode = \"emulator\"\n",
            "f.toml",
            &env(&[("METERD_EMIT__MIN_SEND_TIME", "30m")]),
        )
        .unwrap();
        assert_eq!(s.emit.min_send_time, Duration::minutes(30));
        for bad in ["12h", "-1h", "soon"] {
            let e = load_str(
                &format!("[marketplace]\nmode = \"emulator\"\n[emit]\nmin_send_time = \"{bad}\"\n"),
                "f.toml",
                &env(&[]),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("emit.min_send_time"), "{bad}: {e}");
        }
        let e = load_str(
            "[marketplace]\nmode = \"emulator\"\n[emit]\ngrace = \"11h\"\nsafety_margin = \"11h\"\nmin_send_time = \"1h\"\n",
            "f.toml",
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("emit.min_send_time") && e.contains("24h"), "{e}");
    }

    #[test]
    fn retention_shorter_than_25h_plus_grace_is_refused() {
        let e = load_str(
            "[marketplace]\nmode = \"emulator\"\n[journal]\nretention = \"1d\"\n",
            "f.toml",
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("journal.retention")
                && e.contains("1505m")
                && e.contains("25h + emit.grace"),
            "{e}"
        );
        let e = load_str(
            "[marketplace]\nmode = \"emulator\"\n[journal]\nretention = \"25h\"\n",
            "f.toml",
            &env(&[("METERD_EMIT__GRACE", "1h")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("journal.retention") && e.contains("26h"), "{e}");
        let s = load_str(
            "[marketplace]\nmode = \"emulator\"\n[journal]\nretention = \"1505m\"\n",
            "f.toml",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(s.journal.retention, Duration::minutes(1505));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::seconds(30));
        assert_eq!(parse_duration("7d").unwrap(), Duration::days(7));
        assert_eq!(parse_duration("0s").unwrap(), Duration::zero());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(format_duration(Duration::minutes(15)), "15m");
        assert_eq!(format_duration(Duration::days(730)), "730d");
    }

    const EMU: &str = "[marketplace]\nmode = \"emulator\"\n";

    #[test]
    fn credit_pools_are_refused_in_fleet_mode() {
        let pools = "[[dimensions]]\nid = \"api_calls\"\n[[pools]]\nid = \"free\"\ndimension = \"api_calls\"\namount = 10\npriority = 0\nscope = { resource = \"r1\" }\n";
        let text = format!("{EMU}{pools}");
        assert!(
            load_str(&text, "f.toml", &env(&[])).is_ok(),
            "single mode takes pools"
        );
        let e = load_str(
            &text,
            "f.toml",
            &env(&[("METERD_FLEET__URL", "postgres://h/db"), ("POD_NAME", "a")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pools") && e.contains("fleet mode") && e.contains("overage"),
            "{e}"
        );
    }

    #[test]
    fn fleet_is_off_without_a_url_and_on_with_one_from_env_file_or_credentials() {
        let s = load_str(EMU, "f.toml", &env(&[])).unwrap();
        assert!(s.fleet.is_none());
        let url = "postgres://meterd:pa55-w0rd@db.internal:5432/meterd?sslmode=verify-full";
        let s = load_str(
            EMU,
            "f.toml",
            &env(&[("METERD_FLEET__URL", url), ("POD_NAME", "app-2")]),
        )
        .unwrap();
        let f = s.fleet.as_ref().expect("fleet mode");
        assert_eq!(f.url.expose(), url);
        assert_eq!(f.replica_id, "app-2");
        assert_eq!(f.heartbeat, Duration::seconds(10));
        assert_eq!(f.replica_timeout, Duration::seconds(30));
        assert_eq!(f.max_wait, Duration::minutes(15));
        assert_eq!(f.lease, Duration::seconds(60));
        assert_eq!((f.forward_batch, f.pool_size), (1000, 8));
        // Never printed: not in Debug of the settings (which logs may show), nor of the fleet part.
        assert!(!format!("{s:?}").contains("pa55-w0rd"));
        assert!(!format!("{f:?}").contains("db.internal"));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postgres-url"), format!("{url}\n")).unwrap();
        let creds = dir.path().display().to_string();
        let s = load_str(
            "[marketplace]\nmode = \"emulator\"\n[fleet]\nreplica_id = \"r1\"\nheartbeat = \"2s\"\n",
            "f.toml",
            &env(&[("CREDENTIALS_DIRECTORY", &creds)]),
        )
        .unwrap();
        let f = s.fleet.unwrap();
        assert_eq!(
            f.url.expose(),
            url,
            "from $CREDENTIALS_DIRECTORY/postgres-url, newline trimmed"
        );
        assert_eq!(f.replica_timeout, Duration::seconds(6), "3 x heartbeat");
        let file = dir.path().join("pg.url");
        std::fs::write(&file, url).unwrap();
        let s = load_str(
            &format!(
                "{EMU}[fleet]\nurl_file = \"{}\"\nforward_batch = 50\n",
                file.display()
            ),
            "f.toml",
            &env(&[("METERD_FLEET__REPLICA_ID", "r9")]),
        )
        .unwrap();
        let f = s.fleet.unwrap();
        assert_eq!((f.replica_id.as_str(), f.forward_batch), ("r9", 50));
        assert_eq!(f.url_file.as_deref(), Some(file.as_path()));
    }

    /// `.ci/run` exports `METERD_TEST_POSTGRES_URL` for the whole test run; every daemon a test starts inherits
    /// it, and it must not be read as a key `test_postgres_url` (which refused every configuration).
    #[test]
    fn the_test_postgres_variable_is_not_a_configuration_key() {
        let s = load_str(
            EMU,
            "f.toml",
            &env(&[(
                "METERD_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            )]),
        )
        .unwrap();
        assert!(s.fleet.is_none());
    }

    #[test]
    fn fleet_mistakes_are_explained_without_the_url() {
        let e = load_str(
            &format!("{EMU}[fleet]\nreplica_id = \"a\"\n"),
            "f.toml",
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("fleet.url_file") && e.contains("METERD_FLEET__URL"),
            "{e}"
        );
        let e = load_str(
            EMU,
            "f.toml",
            &env(&[("METERD_FLEET__URL", "mysql://root:pa55-w0rd@db/x")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("postgres://") && !e.contains("pa55-w0rd"), "{e}");
        let e = load_str(
            &format!("{EMU}[fleet]\nurl_file = \"/nonexistent/pg.url\"\n"),
            "f.toml",
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/pg.url"), "{e}");
        let url = ("METERD_FLEET__URL", "postgres://u:pa55-w0rd@db/x");
        for (section, key) in [
            (
                "heartbeat = \"10s\"\nreplica_timeout = \"10s\"",
                "fleet.replica_timeout",
            ),
            ("heartbeat = \"0s\"", "fleet.heartbeat"),
            ("max_wait = \"1d\"", "fleet.max_wait"),
            ("lease = \"1s\"", "fleet.lease"),
            ("forward_batch = 0", "fleet.forward_batch"),
            ("pool_size = 100000", "fleet.pool_size"),
        ] {
            let e = load_str(
                &format!("{EMU}[fleet]\n{section}\n"),
                "f.toml",
                &env(&[url]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(key) && !e.contains("pa55-w0rd"),
                "{section}: {e}"
            );
        }
        let e = load_str(
            &format!("{EMU}[fleet]\nurl = \"postgres://x\"\n"),
            "f.toml",
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("url"),
            "a URL in the file is refused (unknown key): {e}"
        );
    }
}
