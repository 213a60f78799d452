//! The metering rules: how the marketplace judges one usage event, and the JSON it answers with.
//!
//! Checks run in this order, and the first failure decides the status: `BadArgument` (shape: missing fields, both or
//! neither of `resourceId`/`resourceUri`, a time without `Z`), `ResourceNotAuthorized` (fault), `InvalidQuantity`
//! (<= 0), `Expired` (more than 24 h before the emulator's now, or after it), `ResourceNotFound` /
//! `ResourceNotActive`, `InvalidDimension` (plan unknown or dimension not on it), `Duplicate` (first write wins per
//! resource + dimension + UTC hour, whatever the quantity), `Error` (fault), then `Accepted`. Only accepted events
//! are recorded.

use super::model::{AcceptedEvent, SubscriptionStatus, message_time};
use super::state::{DedupeKey, State};
use chrono::{DateTime, Duration, Timelike, Utc};
use serde_json::{Map, Value, json};

/// The per-event statuses of the metering API (`StatusEnum` in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Accepted,
    Duplicate,
    Expired,
    ResourceNotFound,
    ResourceNotActive,
    ResourceNotAuthorized,
    InvalidDimension,
    InvalidQuantity,
    BadArgument,
    Error,
}

impl Status {
    /// The name on the wire.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "Accepted",
            Status::Duplicate => "Duplicate",
            Status::Expired => "Expired",
            Status::ResourceNotFound => "ResourceNotFound",
            Status::ResourceNotActive => "ResourceNotActive",
            Status::ResourceNotAuthorized => "ResourceNotAuthorized",
            Status::InvalidDimension => "InvalidDimension",
            Status::InvalidQuantity => "InvalidQuantity",
            Status::BadArgument => "BadArgument",
            Status::Error => "Error",
        }
    }
}

/// How one event was judged.
#[derive(Debug, Clone)]
pub(super) enum Verdict {
    /// Recorded now.
    Accepted(AcceptedEvent),
    /// Its hour was already recorded: the original.
    Duplicate(AcceptedEvent),
    /// Refused, with the field at fault and a message.
    Rejected {
        status: Status,
        target: &'static str,
        message: String,
    },
}

impl Verdict {
    /// The status it maps to.
    pub(super) fn status(&self) -> Status {
        match self {
            Verdict::Accepted(_) => Status::Accepted,
            Verdict::Duplicate(_) => Status::Duplicate,
            Verdict::Rejected { status, .. } => *status,
        }
    }
}

/// A refusal, before it becomes a [`Verdict`].
#[derive(Debug, Clone)]
pub(super) struct Rejection {
    status: Status,
    target: &'static str,
    message: String,
}

impl From<Rejection> for Verdict {
    fn from(r: Rejection) -> Self {
        Verdict::Rejected {
            status: r.status,
            target: r.target,
            message: r.message,
        }
    }
}

fn reject(status: Status, target: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        status,
        target,
        message: message.into(),
    }
}

fn rejected(status: Status, target: &'static str, message: impl Into<String>) -> Verdict {
    reject(status, target, message).into()
}

/// The fields of a well-formed event.
struct Parsed<'a> {
    resource_id: Option<&'a str>,
    resource_uri: Option<&'a str>,
    quantity: f64,
    dimension: &'a str,
    plan_id: &'a str,
    effective_start_time: &'a str,
    effective_start: DateTime<Utc>,
}

impl Parsed<'_> {
    fn resource(&self) -> &str {
        self.resource_id.or(self.resource_uri).unwrap_or_default()
    }
}

fn optional_str<'a>(
    event: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, Rejection> {
    match event.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(reject(
            Status::BadArgument,
            field,
            format!("The {field} must be a string."),
        )),
    }
}

fn required_str<'a>(
    event: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, Rejection> {
    optional_str(event, field)?.ok_or_else(|| {
        reject(
            Status::BadArgument,
            field,
            format!("The {field} is required."),
        )
    })
}

fn parse(event: &Value) -> Result<Parsed<'_>, Rejection> {
    let Some(event) = event.as_object() else {
        return Err(reject(
            Status::BadArgument,
            "usageEventRequest",
            "The usage event must be a JSON object.",
        ));
    };
    let resource_id = optional_str(event, "resourceId")?;
    let resource_uri = optional_str(event, "resourceUri")?;
    match (resource_id, resource_uri) {
        (None, None) => {
            return Err(reject(
                Status::BadArgument,
                "ResourceId",
                "The resourceId is required.",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(reject(
                Status::BadArgument,
                "resourceUri",
                "Only one of resourceId or resourceUri may be provided.",
            ));
        }
        (Some(id), None) if uuid::Uuid::parse_str(id).is_err() => {
            return Err(reject(
                Status::BadArgument,
                "resourceId",
                "The resourceId must be a GUID.",
            ));
        }
        _ => {}
    }
    let quantity = match event.get("quantity") {
        None | Some(Value::Null) => {
            return Err(reject(
                Status::BadArgument,
                "quantity",
                "The quantity is required.",
            ));
        }
        Some(q) => q.as_f64().ok_or_else(|| {
            reject(
                Status::BadArgument,
                "quantity",
                "The quantity must be a number.",
            )
        })?,
    };
    let dimension = required_str(event, "dimension")?;
    let plan_id = required_str(event, "planId")?;
    let effective_start_time = required_str(event, "effectiveStartTime")?;
    let effective_start = effective_start_time
        .strip_suffix('Z')
        .and_then(|_| DateTime::parse_from_rfc3339(effective_start_time).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| {
            reject(
                Status::BadArgument,
                "effectiveStartTime",
                "The effectiveStartTime must be a UTC date and time in ISO 8601 format ending in Z.",
            )
        })?;
    Ok(Parsed {
        resource_id,
        resource_uri,
        quantity,
        dimension,
        plan_id,
        effective_start_time,
        effective_start,
    })
}

/// Judges `event` at `now` and records it if accepted.
pub(super) fn judge(state: &mut State, event: &Value, now: DateTime<Utc>) -> Verdict {
    let parsed = match parse(event) {
        Ok(p) => p,
        Err(r) => return r.into(),
    };
    state.apply_cancellations(now);
    if state.faults.is_forbidden(parsed.resource()) {
        return rejected(
            Status::ResourceNotAuthorized,
            if parsed.resource_id.is_some() {
                "resourceId"
            } else {
                "resourceUri"
            },
            "Client is not authorized for this usage resource.",
        );
    }
    if parsed.quantity <= 0.0 || !parsed.quantity.is_finite() {
        return rejected(
            Status::InvalidQuantity,
            "quantity",
            "The quantity must be greater than zero.",
        );
    }
    if parsed.effective_start < now - Duration::hours(24) || parsed.effective_start > now {
        return rejected(
            Status::Expired,
            "effectiveStartTime",
            "The effective time provided is has expired or is in future.",
        );
    }
    let (offer_id, offer_type, azure_subscription_id, saas_uri) = match resolve(state, &parsed) {
        Ok(found) => found,
        Err(r) => return r.into(),
    };
    if !state
        .plan(parsed.plan_id)
        .is_some_and(|p| p.allows(parsed.dimension))
    {
        return rejected(
            Status::InvalidDimension,
            "dimension",
            "The payload dimension is invalid.",
        );
    }
    let hour = parsed
        .effective_start
        .with_minute(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(parsed.effective_start);
    let key: DedupeKey = (
        parsed.resource().to_ascii_lowercase(),
        parsed.dimension.to_owned(),
        hour.timestamp(),
    );
    if let Some(original) = state.dedupe.get(&key).and_then(|&i| state.accepted.get(i)) {
        return Verdict::Duplicate(original.clone());
    }
    if state.faults.take_event_error() {
        return rejected(
            Status::Error,
            "usageEventRequest",
            "An unexpected error occurred while processing the usage event. Try again later.",
        );
    }
    let accepted = AcceptedEvent {
        usage_event_id: uuid::Uuid::new_v4().to_string(),
        message_time: message_time(now),
        resource_id: parsed.resource_id.map(str::to_owned),
        resource_uri: parsed
            .resource_uri
            .map(str::to_owned)
            .or(saas_uri.filter(|_| state.current.echo_saas_resource_uri)),
        quantity: parsed.quantity,
        dimension: parsed.dimension.to_owned(),
        effective_start_time: parsed.effective_start_time.to_owned(),
        plan_id: parsed.plan_id.to_owned(),
        effective_start: parsed.effective_start,
        offer_id,
        offer_type,
        azure_subscription_id,
    };
    state.dedupe.insert(key, state.accepted.len());
    state.accepted.push(accepted.clone());
    Verdict::Accepted(accepted)
}

/// Finds the resource: (offer id, offer type, Azure subscription, SaaS resourceUri to echo).
type Resolved = (String, String, String, Option<String>);

fn resolve(state: &State, parsed: &Parsed<'_>) -> Result<Resolved, Rejection> {
    const NOT_FOUND: &str =
        "The resourceId value provided cannot be found or this resource is not active.";
    if let Some(id) = parsed.resource_id {
        if let Some(at) = state.faults.cancellations.get(&id.to_ascii_lowercase())
            && parsed.effective_start + Duration::hours(1) > *at
        {
            return Err(reject(Status::ResourceNotFound, "resourceId", NOT_FOUND));
        }
        if let Some(sub) = state.subscription(id) {
            // After a cancellation, hours that ended before it may still be reported (as Azure allows).
            let before_cancellation = sub.saas_subscription_status
                == SubscriptionStatus::Unsubscribed
                && sub
                    .unsubscribed_at
                    .is_some_and(|at| parsed.effective_start + Duration::hours(1) <= at);
            if sub.saas_subscription_status != SubscriptionStatus::Subscribed
                && !before_cancellation
            {
                return Err(reject(Status::ResourceNotActive, "resourceId", NOT_FOUND));
            }
            return Ok((
                sub.offer_id.clone(),
                "SaaS".into(),
                sub.azure_subscription_id.clone(),
                Some(sub.resource_uri()),
            ));
        }
        if let Some(app) = state.current.managed_apps.iter().find(|a| {
            a.resource_usage_id
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(id))
        }) {
            return Ok(managed(app));
        }
        return Err(reject(Status::ResourceNotFound, "resourceId", NOT_FOUND));
    }
    let uri = parsed.resource_uri.unwrap_or_default();
    state
        .current
        .managed_apps
        .iter()
        .find(|a| a.resource_uri.eq_ignore_ascii_case(uri))
        .map(managed)
        .ok_or_else(|| {
            reject(
                Status::ResourceNotFound,
                "resourceUri",
                "The resourceUri value provided cannot be found or this resource is not active.",
            )
        })
}

fn managed(app: &super::model::ManagedApp) -> Resolved {
    let azure_subscription = app
        .resource_uri
        .split('/')
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    (
        app.offer_id.clone(),
        "ManagedApplication".into(),
        azure_subscription,
        None,
    )
}

/// A quantity as the service writes it: whole numbers without a fraction.
pub(super) fn quantity_json(q: f64) -> Value {
    if q.fract() == 0.0 && q.abs() < 9.0e15 {
        json!(q as i64)
    } else {
        json!(q)
    }
}

/// The accepted event as the service echoes it, with `status` set to `status`.
pub(super) fn accepted_json(event: &AcceptedEvent, status: Status) -> Value {
    let mut map = Map::new();
    map.insert("usageEventId".into(), json!(event.usage_event_id));
    map.insert("status".into(), json!(status.as_str()));
    map.insert("messageTime".into(), json!(event.message_time));
    if let Some(id) = &event.resource_id {
        map.insert("resourceId".into(), json!(id));
    }
    // The acceptedMessage of a duplicate carries only what was sent: not the resourceUri production adds to SaaS
    // events (see `batch_response_mixed.json`). An event sent with a resourceUri has no resourceId.
    if let Some(uri) = &event.resource_uri
        && (status == Status::Accepted || event.resource_id.is_none())
    {
        map.insert("resourceUri".into(), json!(uri));
    }
    map.insert("quantity".into(), quantity_json(event.quantity));
    map.insert("dimension".into(), json!(event.dimension));
    map.insert(
        "effectiveStartTime".into(),
        json!(event.effective_start_time),
    );
    map.insert("planId".into(), json!(event.plan_id));
    Value::Object(map)
}

/// The `error` object of a duplicate (batch item), also the whole 409 body of the single call.
pub(super) fn conflict_json(original: &AcceptedEvent) -> Value {
    json!({
        "additionalInfo": {"acceptedMessage": accepted_json(original, Status::Duplicate)},
        "message": "This usage event already exist.",
        "code": "Conflict",
    })
}

/// A BadRequest-shaped error with one detail; also the whole 400 body of the single call.
pub(super) fn bad_request_json(target: &str, message: &str) -> Value {
    json!({
        "code": "BadArgument",
        "target": "usageEventRequest",
        "message": "One or more errors have occurred.",
        "details": [{"code": "BadArgument", "target": target, "message": message}],
    })
}

/// One `result` item of a batch answer: the event as sent, plus `status`, `messageTime` and `usageEventId` or
/// `error`.
pub(super) fn batch_item(event: &Value, verdict: &Verdict, now: DateTime<Utc>) -> Value {
    if let Verdict::Accepted(accepted) = verdict {
        return accepted_json(accepted, Status::Accepted);
    }
    let mut item = event.as_object().cloned().unwrap_or_default();
    item.insert("status".into(), json!(verdict.status().as_str()));
    item.insert("messageTime".into(), json!(message_time(now)));
    let error = match verdict {
        Verdict::Duplicate(original) => conflict_json(original),
        Verdict::Rejected {
            status: Status::Error,
            target,
            message,
        } => json!({
            "code": "InternalServerError",
            "target": target,
            "message": message,
            "details": [],
        }),
        Verdict::Rejected {
            target, message, ..
        } => bad_request_json(target, message),
        Verdict::Accepted(_) => Value::Null,
    };
    item.insert("error".into(), error);
    Value::Object(item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::config::{DEFAULT_SUBSCRIPTION_A, DEFAULT_SUBSCRIPTION_C, EmulatorConfig};

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-10T10:05:00Z")
            .expect("time")
            .with_timezone(&Utc)
    }

    fn event(resource: &str, dimension: &str, time: &str, quantity: f64) -> Value {
        json!({"resourceId": resource, "dimension": dimension, "effectiveStartTime": time,
               "quantity": quantity, "planId": "gold"})
    }

    #[test]
    fn first_write_wins_per_hour() {
        let mut state = State::from_config(&EmulatorConfig::default());
        let a = DEFAULT_SUBSCRIPTION_A;
        let first = judge(
            &mut state,
            &event(a, "api_calls", "2026-03-10T09:00:00Z", 4.0),
            now(),
        );
        assert_eq!(first.status(), Status::Accepted);
        let again = judge(
            &mut state,
            &event(a, "api_calls", "2026-03-10T09:30:00Z", 3.0),
            now(),
        );
        let Verdict::Duplicate(original) = again else {
            panic!("expected a duplicate, got {again:?}");
        };
        assert_eq!(original.quantity, 4.0);
        assert_eq!(state.accepted.len(), 1);
    }

    #[test]
    fn statuses_in_order() {
        let mut state = State::from_config(&EmulatorConfig::default());
        let a = DEFAULT_SUBSCRIPTION_A;
        let cases = [
            (json!({"quantity": 1}), Status::BadArgument),
            (
                event(a, "api_calls", "2026-03-10T09:00:00+00:00", 1.0),
                Status::BadArgument,
            ),
            (
                event(a, "api_calls", "2026-03-10T09:00:00Z", 0.0),
                Status::InvalidQuantity,
            ),
            (
                event(a, "api_calls", "2026-03-09T10:00:00Z", 1.0),
                Status::Expired,
            ),
            (
                event(a, "api_calls", "2026-03-10T11:00:00Z", 1.0),
                Status::Expired,
            ),
            (
                event(
                    "99999999-2222-3333-4444-555555555555",
                    "api_calls",
                    "2026-03-10T09:00:00Z",
                    1.0,
                ),
                Status::ResourceNotFound,
            ),
            (
                event(
                    DEFAULT_SUBSCRIPTION_C,
                    "api_calls",
                    "2026-03-10T09:00:00Z",
                    1.0,
                ),
                Status::ResourceNotActive,
            ),
            (
                event(a, "nope", "2026-03-10T09:00:00Z", 1.0),
                Status::InvalidDimension,
            ),
            (
                event(a, "gb_processed", "2026-03-09T10:05:00Z", 20.5),
                Status::Accepted,
            ),
        ];
        for (event, expected) in cases {
            assert_eq!(
                judge(&mut state, &event, now()).status(),
                expected,
                "{event}"
            );
        }
    }

    #[test]
    fn message_time_has_seven_digits() {
        let t = DateTime::parse_from_rfc3339("2024-05-01T10:05:12.123456789Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(message_time(t), "2024-05-01T10:05:12.1234567Z");
    }
}
