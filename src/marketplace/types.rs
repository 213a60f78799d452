//! Request and response bodies of the Metering and SaaS Fulfillment APIs.
//!
//! (Over 600 lines for one role: every body of the contract, with the lenient parsers real answers need.)
//!
//! Outbound: meterd freezes each usage event as JSON bytes once, when it is first billed, just before its first
//! send ([`event_json`]), and sends those bytes, wrapped by [`batch_body`], on every attempt. Re-serialising on retry could change the bytes (a timestamp
//! recomputed, a float printed differently) and turn a harmless resend into a `Duplicate` mismatch.
//!
//! Inbound: real answers differ from the published spec (per-event errors are BadRequest-shaped, numbers come as
//! strings, fields appear and disappear), so every response type ignores unknown fields, defaults missing ones and
//! parses numbers leniently.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

use crate::quantity::Micros;
use crate::resource::ResourceRef;

/// Formats an hour as the API wants it: `YYYY-MM-DDTHH:00:00Z` (minutes and seconds are dropped).
pub fn hour_string(hour: DateTime<Utc>) -> String {
    hour.format("%Y-%m-%dT%H:00:00Z").to_string()
}

/// The exact, frozen JSON of one usage event.
///
/// Field order is fixed (`resourceId`|`resourceUri`, `quantity`, `dimension`, `effectiveStartTime`, `planId`), the
/// quantity is printed exactly from micro-units and the time is the start of `hour`, so the same inputs always
/// give the same bytes.
pub fn event_json(
    resource: &ResourceRef,
    plan: &str,
    dimension: &str,
    hour: DateTime<Utc>,
    quantity_micros: i64,
) -> String {
    format!(
        "{{{}:{},\"quantity\":{},\"dimension\":{},\"effectiveStartTime\":\"{}\",\"planId\":{}}}",
        json_string(resource.field_name()),
        json_string(resource.as_str()),
        Micros(quantity_micros).to_decimal_string(),
        json_string(dimension),
        hour_string(hour),
        json_string(plan),
    )
}

/// Wraps frozen event JSON into a batch body `{"request":[...]}` without re-serialising the events.
pub fn batch_body(events: &[&str]) -> String {
    let mut body = String::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 13);
    body.push_str("{\"request\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(event);
    }
    body.push_str("]}");
    body
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// One usage event as the API takes it (a request item); see [`event_json`] for the frozen form meterd sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageEvent {
    /// SaaS subscription id; never together with `resource_uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Managed application ARM id; never together with `resource_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_uri: Option<String>,
    /// Units consumed; > 0.
    #[serde(deserialize_with = "lenient_f64")]
    pub quantity: f64,
    /// Dimension id from Partner Center.
    pub dimension: String,
    /// Start of the hour, UTC with `Z`.
    pub effective_start_time: String,
    /// Plan id from Partner Center.
    pub plan_id: String,
}

impl UsageEvent {
    /// The resource, whichever field carries it (`resourceId` first).
    pub fn resource(&self) -> Option<ResourceRef> {
        match (&self.resource_id, &self.resource_uri) {
            (Some(id), _) => Some(ResourceRef::SaasId(id.clone())),
            (None, Some(uri)) => Some(ResourceRef::ResourceUri(uri.clone())),
            (None, None) => None,
        }
    }
}

/// The body of `POST /batchUsageEvent`: the `request` wrapper is mandatory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchUsageRequest {
    /// 1..=25 events.
    pub request: Vec<UsageEvent>,
}

/// Per-event status of a batch answer. `Unknown` keeps anything new the service may invent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UsageStatus {
    /// Recorded.
    Accepted,
    /// The hour was already recorded (first write wins).
    Duplicate,
    /// Older than 24 h or in the future.
    Expired,
    /// Unknown resource.
    ResourceNotFound,
    /// Resource not in a billable state.
    ResourceNotActive,
    /// This identity may not report for the resource.
    ResourceNotAuthorized,
    /// Dimension not in the plan.
    InvalidDimension,
    /// Zero, negative or malformed quantity.
    InvalidQuantity,
    /// Some other malformed field.
    BadArgument,
    /// Generic server-side failure; retry later.
    Error,
    /// A status this version does not know.
    Unknown(String),
}

impl UsageStatus {
    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Accepted => "Accepted",
            Self::Duplicate => "Duplicate",
            Self::Expired => "Expired",
            Self::ResourceNotFound => "ResourceNotFound",
            Self::ResourceNotActive => "ResourceNotActive",
            Self::ResourceNotAuthorized => "ResourceNotAuthorized",
            Self::InvalidDimension => "InvalidDimension",
            Self::InvalidQuantity => "InvalidQuantity",
            Self::BadArgument => "BadArgument",
            Self::Error => "Error",
            Self::Unknown(s) => s,
        }
    }

    /// Parses a wire name (exact match; anything else is `Unknown`).
    pub fn from_wire(s: &str) -> Self {
        match s.trim() {
            "Accepted" => Self::Accepted,
            "Duplicate" => Self::Duplicate,
            "Expired" => Self::Expired,
            "ResourceNotFound" => Self::ResourceNotFound,
            "ResourceNotActive" => Self::ResourceNotActive,
            "ResourceNotAuthorized" => Self::ResourceNotAuthorized,
            "InvalidDimension" => Self::InvalidDimension,
            "InvalidQuantity" => Self::InvalidQuantity,
            "BadArgument" => Self::BadArgument,
            "Error" => Self::Error,
            other => Self::Unknown(other.to_owned()),
        }
    }
}

impl Default for UsageStatus {
    fn default() -> Self {
        Self::Unknown(String::new())
    }
}

impl fmt::Display for UsageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for UsageStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?.unwrap_or_default();
        Ok(Self::from_wire(&s))
    }
}

impl Serialize for UsageStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The answer of `POST /batchUsageEvent` (HTTP 200 even when every item failed).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct BatchUsageResponse {
    /// Number of results.
    #[serde(deserialize_with = "lenient_u64")]
    pub count: u64,
    /// One per event, in no documented order.
    pub result: Vec<UsageResult>,
}

/// One event's result: its status plus the echoed event fields.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UsageResult {
    /// Set on `Accepted`.
    pub usage_event_id: Option<String>,
    /// What happened to the event.
    pub status: UsageStatus,
    /// When the service processed it.
    pub message_time: Option<String>,
    /// Echoed; SaaS answers may carry both `resourceId` and `resourceUri`.
    pub resource_id: Option<String>,
    /// Echoed.
    pub resource_uri: Option<String>,
    /// Echoed (number or string on the wire).
    #[serde(deserialize_with = "lenient_opt_f64")]
    pub quantity: Option<f64>,
    /// Echoed.
    pub dimension: Option<String>,
    /// Echoed, as sent or with 7 fractional digits.
    pub effective_start_time: Option<String>,
    /// Echoed.
    pub plan_id: Option<String>,
    /// Set on failures.
    pub error: Option<ApiError>,
}

/// An error body: the union of the BadRequest shape (`code, message, target, details`) and the Conflict shape
/// (`additionalInfo.acceptedMessage`), because real per-event errors use the former where the spec says the latter.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ApiError {
    /// E.g. `BadArgument`, `Conflict`, `Forbidden`.
    pub code: Option<String>,
    /// Human-readable summary.
    pub message: Option<String>,
    /// The offending field or object.
    pub target: Option<String>,
    /// Per-field details.
    pub details: Vec<ApiErrorDetail>,
    /// For duplicates: the event that was recorded first.
    pub additional_info: Option<AdditionalInfo>,
}

impl ApiError {
    /// One line: `code: message (target: detail; ...)`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if let Some(code) = &self.code {
            out.push_str(code);
        }
        if let Some(message) = &self.message {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(message);
        }
        let details: Vec<String> = self
            .details
            .iter()
            .map(|d| match (&d.target, &d.message) {
                (Some(t), Some(m)) => format!("{t}: {m}"),
                (None, Some(m)) => m.clone(),
                (Some(t), None) => t.clone(),
                (None, None) => d.code.clone().unwrap_or_default(),
            })
            .filter(|s| !s.is_empty())
            .collect();
        if !details.is_empty() {
            out.push_str(" (");
            out.push_str(&details.join("; "));
            out.push(')');
        }
        out
    }
}

/// One entry of [`ApiError::details`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ApiErrorDetail {
    /// E.g. `BadArgument`.
    pub code: Option<String>,
    /// The offending field.
    pub target: Option<String>,
    /// What is wrong with it.
    pub message: Option<String>,
}

/// `additionalInfo` of a duplicate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AdditionalInfo {
    /// The event recorded first for this hour.
    pub accepted_message: Option<AcceptedMessage>,
}

/// The originally recorded event of a duplicate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AcceptedMessage {
    /// Id of the original.
    pub usage_event_id: Option<String>,
    /// Usually `Duplicate`.
    pub status: Option<String>,
    /// When the original was processed.
    pub message_time: Option<String>,
    /// Resource of the original.
    pub resource_id: Option<String>,
    /// Resource of the original.
    pub resource_uri: Option<String>,
    /// Quantity of the original: what was billed.
    #[serde(deserialize_with = "lenient_opt_f64")]
    pub quantity: Option<f64>,
    /// Dimension of the original.
    pub dimension: Option<String>,
    /// Hour of the original.
    pub effective_start_time: Option<String>,
    /// Plan of the original.
    pub plan_id: Option<String>,
}

/// `saasSubscriptionStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubscriptionStatus {
    /// Created, nothing else yet.
    NotStarted,
    /// Purchased, not activated by the publisher yet.
    PendingFulfillmentStart,
    /// Billable.
    Subscribed,
    /// Payment failed; grace period.
    Suspended,
    /// Cancelled.
    Unsubscribed,
    /// Anything else.
    Unknown(String),
}

impl SubscriptionStatus {
    /// Parses a wire name, ignoring surrounding whitespace.
    pub fn from_wire(s: &str) -> Self {
        match s.trim() {
            "NotStarted" => Self::NotStarted,
            "PendingFulfillmentStart" => Self::PendingFulfillmentStart,
            "Subscribed" => Self::Subscribed,
            "Suspended" => Self::Suspended,
            "Unsubscribed" => Self::Unsubscribed,
            other => Self::Unknown(other.to_owned()),
        }
    }
}

/// One SaaS subscription from `GET /saas/subscriptions/`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Subscription {
    /// The subscription id: the metering `resourceId`.
    pub id: String,
    /// Display name given by the customer.
    pub name: Option<String>,
    /// Offer id (`-preview` suffix for preview purchases).
    pub offer_id: Option<String>,
    /// Current plan id.
    pub plan_id: Option<String>,
    /// Status, whitespace trimmed; see [`Subscription::status`].
    #[serde(deserialize_with = "trimmed_string")]
    pub saas_subscription_status: String,
    /// The current term; absent when there is no active term.
    pub term: Option<Term>,
    /// Seats, for per-user plans (integer or string on the wire).
    #[serde(deserialize_with = "lenient_opt_i64")]
    pub quantity: Option<i64>,
    /// A test purchase.
    pub is_test: bool,
    /// A free trial.
    pub is_free_trial: bool,
    /// Who uses the subscription (its `tenantId` is the customer of `customer`-scoped pools).
    pub beneficiary: Option<Beneficiary>,
}

/// The `beneficiary` of a SaaS subscription (only the field meterd uses).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Beneficiary {
    /// The customer's Entra tenant.
    pub tenant_id: Option<String>,
}

impl Subscription {
    /// The parsed status.
    pub fn status(&self) -> SubscriptionStatus {
        SubscriptionStatus::from_wire(&self.saas_subscription_status)
    }
}

/// A subscription term: included quantities reset at `start_date`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Term {
    /// Start of the term (UTC).
    #[serde(deserialize_with = "lenient_opt_datetime")]
    pub start_date: Option<DateTime<Utc>>,
    /// End of the term (UTC).
    #[serde(deserialize_with = "lenient_opt_datetime")]
    pub end_date: Option<DateTime<Utc>>,
    /// `P1M`, `P1Y`, `P2Y`, ...
    pub term_unit: Option<String>,
}

/// One page of the subscription list.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SubscriptionPage {
    /// The subscriptions on this page (any size; never infer the end from it).
    pub subscriptions: Vec<Subscription>,
    /// The next page, absent or empty on the last one; may point at another host.
    #[serde(rename = "@nextLink")]
    pub next_link: Option<String>,
}

/// One daily total from `GET /usageEvents`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UsageEventsDaily {
    /// The day (UTC).
    #[serde(deserialize_with = "lenient_opt_datetime")]
    pub usage_date: Option<DateTime<Utc>>,
    /// The resource reported for.
    pub usage_resource_id: Option<String>,
    /// Dimension id.
    pub dimension: Option<String>,
    /// Plan id.
    pub plan_id: Option<String>,
    /// Plan display name.
    pub plan_name: Option<String>,
    /// Offer id.
    pub offer_id: Option<String>,
    /// Offer display name.
    pub offer_name: Option<String>,
    /// `SaaS`, `ManagedApp`, ...
    pub offer_type: Option<String>,
    /// The customer's Azure subscription.
    pub azure_subscription_id: Option<String>,
    /// `Submitted`, `Accepted`, `Rejected`, ...
    pub recon_status: Option<String>,
    /// Units submitted that day.
    #[serde(deserialize_with = "lenient_opt_f64")]
    pub submitted_quantity: Option<f64>,
    /// Units processed for billing.
    #[serde(deserialize_with = "lenient_opt_f64")]
    pub processed_quantity: Option<f64>,
    /// Number of events submitted.
    #[serde(deserialize_with = "lenient_opt_f64")]
    pub submitted_count: Option<f64>,
}

/// A JSON number or a string holding one.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrString {
    Int(i64),
    Float(f64),
    Str(String),
}

impl NumOrString {
    fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Int(i) => Some(*i as f64),
            Self::Float(f) => Some(*f),
            Self::Str(s) => s.trim().parse().ok(),
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            Self::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(*f as i64),
            Self::Float(_) => None,
            Self::Str(s) => {
                let s = s.trim();
                s.parse::<i64>().ok().or_else(|| {
                    s.parse::<f64>()
                        .ok()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                        .map(|f| f as i64)
                })
            }
        }
    }
}

fn lenient<'de, D: Deserializer<'de>, T>(
    d: D,
    what: &str,
    get: impl Fn(&NumOrString) -> Option<T>,
) -> Result<Option<T>, D::Error> {
    match Option::<NumOrString>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrString::Str(s)) if s.trim().is_empty() => Ok(None),
        Some(v) => get(&v)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("expected {what}"))),
    }
}

/// Number or numeric string, required.
pub(crate) fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    lenient(d, "a number", NumOrString::as_f64)?
        .ok_or_else(|| serde::de::Error::custom("expected a number"))
}

/// Number or numeric string, optional.
pub(crate) fn lenient_opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    lenient(d, "a number", NumOrString::as_f64)
}

/// Integer or integer string, optional.
pub(crate) fn lenient_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    lenient(d, "an integer", NumOrString::as_i64)
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(lenient(d, "an integer", NumOrString::as_i64)?
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0))
}

fn trimmed_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .map(|s| s.trim().to_owned())
        .unwrap_or_default())
}

fn lenient_opt_datetime<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => parse_utc(&s)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid date-time {s:?}"))),
    }
}

/// Parses an RFC 3339 instant (`Z`, `+00:00`, any number of fractional digits), or one without a zone (taken as
/// UTC, as the marketplace writes `lastModified`), or a bare date.
pub fn parse_utc(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(t.and_utc());
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn hour() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 9, 0, 0)
            .single()
            .expect("valid")
    }

    #[test]
    fn event_json_exact_bytes() {
        let saas = ResourceRef::parse("11111111-2222-3333-4444-555555555555");
        assert_eq!(
            event_json(&saas, "gold", "gb_processed", hour(), 12_500_000),
            r#"{"resourceId":"11111111-2222-3333-4444-555555555555","quantity":12.5,"dimension":"gb_processed","effectiveStartTime":"2024-05-01T09:00:00Z","planId":"gold"}"#
        );
        let uri = ResourceRef::parse(
            "/subscriptions/aaaaaaaa-0000-0000-0000-000000000001/resourceGroups/customer-rg/providers/Microsoft.Solutions/applications/contoso-app-01",
        );
        assert!(matches!(uri, ResourceRef::ResourceUri(_)));
        // Minutes and seconds of the given instant are dropped: the hour's start is sent.
        let later = hour() + chrono::Duration::minutes(37) + chrono::Duration::seconds(5);
        assert_eq!(
            event_json(&uri, "standard", "nodes", later, 4_000_000),
            r#"{"resourceUri":"/subscriptions/aaaaaaaa-0000-0000-0000-000000000001/resourceGroups/customer-rg/providers/Microsoft.Solutions/applications/contoso-app-01","quantity":4,"dimension":"nodes","effectiveStartTime":"2024-05-01T09:00:00Z","planId":"standard"}"#
        );
        assert!(event_json(&saas, "p", "d", hour(), 1).contains(r#""quantity":0.000001,"#));
        // Strings are JSON-escaped.
        assert!(event_json(&saas, "a\"b", "d", hour(), 1).contains(r#""planId":"a\"b""#));
    }

    #[test]
    fn frozen_events_parse_back_like_the_fixture() {
        let a = event_json(
            &ResourceRef::parse("11111111-2222-3333-4444-555555555555"),
            "gold",
            "gb_processed",
            hour(),
            12_500_000,
        );
        let b = event_json(
            &ResourceRef::parse("11111111-2222-3333-4444-555555555555"),
            "gold",
            "api_calls_1k",
            hour(),
            3_000_000,
        );
        let body = batch_body(&[&a, &b]);
        assert!(body.starts_with(r#"{"request":[{"resourceId""#));
        let ours: BatchUsageRequest = serde_json::from_str(&body).expect("valid JSON");
        let theirs: BatchUsageRequest =
            serde_json::from_str(&fixture("batch_request_saas.json")).expect("fixture");
        assert_eq!(ours, theirs);
        assert_eq!(batch_body(&[]), r#"{"request":[]}"#);
        // The wrapped events are byte-for-byte what was frozen.
        assert_eq!(body, format!("{{\"request\":[{a},{b}]}}"));
    }

    #[test]
    fn managed_app_request_fixture_round_trips() {
        let req: BatchUsageRequest =
            serde_json::from_str(&fixture("batch_request_managed_app.json")).expect("fixture");
        let event = &req.request[0];
        assert!(matches!(
            event.resource(),
            Some(ResourceRef::ResourceUri(_))
        ));
        let json = serde_json::to_string(event).expect("serialise");
        assert!(!json.contains("resourceId"));
    }

    #[test]
    fn batch_response_parses_with_superset_errors() {
        let resp: BatchUsageResponse =
            serde_json::from_str(&fixture("batch_response_mixed.json")).expect("fixture");
        assert_eq!(resp.count, 5);
        assert_eq!(resp.result.len(), 5);
        assert_eq!(resp.result[0].status, UsageStatus::Accepted);
        assert_eq!(
            resp.result[0].usage_event_id.as_deref(),
            Some("0b9f6a52-0000-4000-8000-000000000001")
        );
        let dup = resp.result[1].error.as_ref().expect("error");
        let accepted = dup
            .additional_info
            .as_ref()
            .and_then(|a| a.accepted_message.as_ref())
            .expect("acceptedMessage");
        assert_eq!(accepted.quantity, Some(2.0));
        let not_found = resp.result[2].error.as_ref().expect("error");
        assert_eq!(not_found.details.len(), 1);
        assert!(
            not_found
                .summary()
                .contains("resourceId: The resourceId value")
        );
    }

    #[test]
    fn lenient_quantities_and_unknown_statuses() {
        let r: UsageResult = serde_json::from_str(
            r#"{"status":"Brand New","quantity":"2.5","extra":{"x":1},"dimension":"d"}"#,
        )
        .expect("parses");
        assert_eq!(r.status, UsageStatus::Unknown("Brand New".into()));
        assert_eq!(r.quantity, Some(2.5));
        let r: UsageResult = serde_json::from_str(r#"{"quantity":null}"#).expect("parses");
        assert_eq!(r.status, UsageStatus::Unknown(String::new()));
        assert_eq!(r.quantity, None);
        let e: ApiError = serde_json::from_str(&fixture("single_409_duplicate.json")).expect("409");
        assert_eq!(
            e.additional_info
                .and_then(|a| a.accepted_message)
                .and_then(|m| m.quantity),
            Some(12.5)
        );
        let e: ApiError =
            serde_json::from_str(&fixture("single_400_badargument.json")).expect("400");
        assert_eq!(e.code.as_deref(), Some("BadArgument"));
        let e: ApiError = serde_json::from_str(&fixture("single_403_forbidden.json")).expect("403");
        assert_eq!(e.code.as_deref(), Some("Forbidden"));
    }

    #[test]
    fn subscription_pages_parse() {
        let page: SubscriptionPage =
            serde_json::from_str(&fixture("saas_list_page1.json")).expect("page 1");
        assert_eq!(page.subscriptions.len(), 2);
        assert!(
            page.next_link
                .as_deref()
                .is_some_and(|l| l.starts_with("https://main.prod.marketplaceapi.azure.com/"))
        );
        let first = &page.subscriptions[0];
        assert_eq!(first.status(), SubscriptionStatus::Subscribed);
        assert_eq!(first.plan_id.as_deref(), Some("gold"));
        let term = first.term.as_ref().expect("term");
        assert_eq!(
            term.start_date,
            Some(
                Utc.with_ymd_and_hms(2024, 4, 7, 0, 0, 0)
                    .single()
                    .expect("valid")
            )
        );
        assert_eq!(term.term_unit.as_deref(), Some("P1M"));
        let second = &page.subscriptions[1];
        assert_eq!(second.status(), SubscriptionStatus::PendingFulfillmentStart);
        assert_eq!(second.quantity, Some(5));
        assert_eq!(second.term.as_ref().and_then(|t| t.start_date), None);
        assert_eq!(second.offer_id.as_deref(), Some("contoso-saas-preview"));

        let last: SubscriptionPage =
            serde_json::from_str(&fixture("saas_list_last_page.json")).expect("last page");
        assert_eq!(last.next_link, None);
        assert_eq!(
            last.subscriptions[0].status(),
            SubscriptionStatus::Unsubscribed
        );

        let odd: Subscription = serde_json::from_str(
            r#"{"id":"x","saasSubscriptionStatus":" Suspended\n","quantity":"12","isTest":true}"#,
        )
        .expect("odd");
        assert_eq!(odd.saas_subscription_status, "Suspended");
        assert_eq!(odd.status(), SubscriptionStatus::Suspended);
        assert_eq!(odd.quantity, Some(12));
        assert!(odd.is_test);
    }

    #[test]
    fn usage_events_daily_parses() {
        let days: Vec<UsageEventsDaily> =
            serde_json::from_str(&fixture("get_usage_events_response.json")).expect("fixture");
        assert_eq!(days.len(), 1);
        assert_eq!(days[0].submitted_quantity, Some(17.0));
        assert_eq!(days[0].recon_status.as_deref(), Some("Submitted"));
        assert_eq!(
            days[0].usage_date,
            Some(
                Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 0)
                    .single()
                    .expect("valid")
            )
        );
    }

    #[test]
    fn parse_utc_accepts_the_echoed_forms() {
        let want = hour();
        for s in [
            "2024-05-01T09:00:00Z",
            "2024-05-01T09:00:00.0000000Z",
            "2024-05-01T09:00:00+00:00",
            "2024-05-01T11:00:00+02:00",
            "2024-05-01T09:00:00",
        ] {
            assert_eq!(parse_utc(s), Some(want), "{s}");
        }
        assert_eq!(parse_utc("yesterday"), None);
    }
}
