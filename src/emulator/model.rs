//! The marketplace's own objects as the emulator keeps them: SaaS subscriptions, plans, managed applications and
//! usage events.
//!
//! Subscriptions use the SaaS Fulfillment v2 field names (camelCase) both in seed files and on the wire, so a
//! subscription copied from a real `GET /saas/subscriptions/` answer can be pasted into a seed file as is.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A SaaS subscription's status, as `saasSubscriptionStatus` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SubscriptionStatus {
    /// Created, never started.
    NotStarted,
    /// Purchased but not activated by the publisher yet: not billable.
    PendingFulfillmentStart,
    /// Active: the only billable status.
    #[default]
    Subscribed,
    /// Payment failed; not billable.
    Suspended,
    /// Cancelled; not billable, still listed.
    Unsubscribed,
}

impl SubscriptionStatus {
    /// Parses a status name or one of the admin API's verbs (`subscribe`, `suspend`, `unsubscribe`, `pending`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "notstarted" => Some(Self::NotStarted),
            "pendingfulfillmentstart" | "pending" => Some(Self::PendingFulfillmentStart),
            "subscribed" | "subscribe" | "activate" => Some(Self::Subscribed),
            "suspended" | "suspend" => Some(Self::Suspended),
            "unsubscribed" | "unsubscribe" => Some(Self::Unsubscribed),
            _ => None,
        }
    }
}

/// `beneficiary` / `purchaser` of a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AadIdentifier {
    #[serde(default)]
    pub email_id: String,
    #[serde(default)]
    pub object_id: String,
    #[serde(default)]
    pub tenant_id: String,
    #[serde(default)]
    pub puid: String,
}

impl Default for AadIdentifier {
    fn default() -> Self {
        Self {
            email_id: "customer@emulator.example".into(),
            object_id: "aaaaaaaa-0000-0000-0000-00000000000a".into(),
            tenant_id: "bbbbbbbb-0000-0000-0000-00000000000b".into(),
            puid: "10033FFF00000000".into(),
        }
    }
}

/// The subscription term; dates are absent when there is no active term (a pending purchase).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Term {
    /// First day of the term (`YYYY-MM-DD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_date: Option<String>,
    /// Last day of the term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_date: Option<String>,
    /// `P1M`, `P1Y`, ... (default `P1M`).
    #[serde(default = "default_term_unit")]
    pub term_unit: String,
}

fn default_term_unit() -> String {
    "P1M".into()
}

impl Default for Term {
    fn default() -> Self {
        Self {
            start_date: None,
            end_date: None,
            term_unit: default_term_unit(),
        }
    }
}

/// A SaaS subscription, in the SaaS Fulfillment v2 shape (see `saas_list_page1.json`).
///
/// Every field but `id` has a default, so a seed entry can be as short as `{id, planId}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    /// The subscription id (a GUID): the metering `resourceId`.
    pub id: String,
    /// Publisher id.
    #[serde(default = "default_publisher")]
    pub publisher_id: String,
    /// Offer id.
    #[serde(default = "default_offer")]
    pub offer_id: String,
    /// Display name; also the resource name in [`Subscription::resource_uri`].
    #[serde(default)]
    pub name: String,
    /// Seed files may say `status` instead.
    #[serde(default, alias = "status")]
    pub saas_subscription_status: SubscriptionStatus,
    /// Who uses the subscription.
    #[serde(default)]
    pub beneficiary: AadIdentifier,
    /// Who bought it.
    #[serde(default)]
    pub purchaser: AadIdentifier,
    /// Current plan id (default `gold`).
    #[serde(default = "default_plan")]
    pub plan_id: String,
    /// Seat count; usually absent for metered plans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<i64>,
    /// The current term.
    #[serde(default)]
    pub term: Term,
    /// Renews at the end of the term (default true).
    #[serde(default = "yes")]
    pub auto_renew: bool,
    /// A test purchase.
    #[serde(default)]
    pub is_test: bool,
    /// A free trial.
    #[serde(default)]
    pub is_free_trial: bool,
    /// Operations the customer may perform (default `Delete`, `Update`, `Read`).
    #[serde(default = "default_operations")]
    pub allowed_customer_operations: Vec<String>,
    /// Sandbox type (default `None`).
    #[serde(default = "default_none")]
    pub sandbox_type: String,
    /// Creation time, as the service writes it.
    #[serde(default = "default_created")]
    pub created: String,
    /// Last modification, as the service writes it.
    #[serde(default = "default_last_modified")]
    pub last_modified: String,
    /// Session mode (default `None`).
    #[serde(default = "default_none")]
    pub session_mode: String,
    /// The customer's Azure subscription: not part of the SaaS answer, but reported by `GET /usageEvents` and used
    /// in the `resourceUri` the marketplace adds to accepted SaaS events.
    #[serde(default = "default_azure_subscription", skip_serializing)]
    pub azure_subscription_id: String,
    /// When the subscription was cancelled (emulator clock). Azure still accepts usage for hours that ended
    /// before the cancellation; set by `set_status(Unsubscribed)` or a seed's `unsubscribedAt`.
    #[serde(default, skip_serializing, alias = "unsubscribed_at")]
    pub unsubscribed_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn default_publisher() -> String {
    "emulator-publisher".into()
}
fn default_offer() -> String {
    "emulator-offer".into()
}
fn default_plan() -> String {
    "gold".into()
}
fn yes() -> bool {
    true
}
fn default_operations() -> Vec<String> {
    vec!["Delete".into(), "Update".into(), "Read".into()]
}
fn default_none() -> String {
    "None".into()
}
fn default_created() -> String {
    "2026-01-01T00:00:00.0000000Z".into()
}
fn default_last_modified() -> String {
    "0001-01-01T00:00:00".into()
}
fn default_azure_subscription() -> String {
    "cccccccc-0000-0000-0000-000000000001".into()
}

impl Subscription {
    /// A Subscribed subscription with every other field defaulted.
    pub fn new(id: impl Into<String>, plan_id: impl Into<String>) -> Self {
        let value = serde_json::json!({"id": id.into(), "planId": plan_id.into()});
        serde_json::from_value(value).expect("defaults of a minimal subscription")
    }

    /// The same subscription in another status.
    pub fn with_status(mut self, status: SubscriptionStatus) -> Self {
        self.saas_subscription_status = status;
        self
    }

    /// The `resourceUri` the marketplace adds to accepted events of this SaaS subscription.
    pub fn resource_uri(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/saas-rg/providers/Microsoft.SaaS/resources/{}",
            self.azure_subscription_id, self.name
        )
    }
}

/// A plan and the metering dimensions it allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Plan id.
    pub id: String,
    /// `None` (absent in the seed): any dimension is allowed on this plan.
    #[serde(default)]
    pub dimensions: Option<Vec<String>>,
}

impl Plan {
    /// Whether `dimension` may be metered on this plan.
    pub fn allows(&self, dimension: &str) -> bool {
        self.dimensions
            .as_ref()
            .is_none_or(|dims| dims.iter().any(|d| d == dimension))
    }
}

/// An Azure Managed Application instance that may be metered by `resourceUri` or by its `resourceUsageId`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedApp {
    /// The application's `resourceUri` (`/subscriptions/.../resourceGroups/.../providers/Microsoft.Solutions/applications/...`).
    #[serde(alias = "resource_uri")]
    pub resource_uri: String,
    /// `billingDetails.resourceUsageId`, a GUID usable as `resourceId`.
    #[serde(default, alias = "resource_usage_id")]
    pub resource_usage_id: Option<String>,
    /// Offer id (default `emulator-offer`).
    #[serde(default = "default_offer", alias = "offer_id")]
    pub offer_id: String,
}

/// One event as the emulator received it, whatever its fate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceivedEvent {
    /// `batchUsageEvent` or `usageEvent`.
    pub route: String,
    /// The request id (`x-ms-requestid`) of the call that carried it.
    pub request_id: String,
    /// When it arrived, by the emulator clock.
    pub received_at: DateTime<Utc>,
    /// The event exactly as sent.
    pub event: Value,
    /// The status the emulator gave it (`Accepted`, `Duplicate`, ...).
    pub status: String,
    /// The `usageEventId` it was given, when accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_event_id: Option<String>,
}

/// An event the emulator accepted (recorded, "billed").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedEvent {
    /// The id the service gave it.
    pub usage_event_id: String,
    /// Formatted like the service: 7 fractional digits and `Z`.
    pub message_time: String,
    /// `resourceId` as sent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// `resourceUri` as sent or added, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_uri: Option<String>,
    /// Quantity as sent.
    pub quantity: f64,
    /// Dimension as sent.
    pub dimension: String,
    /// As sent (the service echoes it verbatim).
    pub effective_start_time: String,
    /// Plan as sent.
    pub plan_id: String,
    /// Parsed `effectiveStartTime`.
    #[serde(skip)]
    pub effective_start: DateTime<Utc>,
    /// Offer and Azure subscription, for `GET /usageEvents`.
    #[serde(skip)]
    pub offer_id: String,
    /// Offer type for `GET /usageEvents`: `SaaS` or `ManagedApplication`.
    #[serde(skip)]
    pub offer_type: String,
    /// The customer's Azure subscription, for `GET /usageEvents`.
    #[serde(skip)]
    pub azure_subscription_id: String,
}

/// Formats an instant like the marketplace does in `messageTime`: `2024-05-01T10:05:12.1234567Z`.
pub(super) fn message_time(at: DateTime<Utc>) -> String {
    format!(
        "{}.{:07}Z",
        at.format("%Y-%m-%dT%H:%M:%S"),
        at.timestamp_subsec_nanos() / 100
    )
}
