//! Fault injection: the ways production misbehaves, scripted per route so tests can replay them exactly.
//!
//! A scripted [`Fault`] applies to the next `times` calls of its route (or of every marketplace route, `*`); faults
//! are consumed in the order they were added, so "two 503s, then a 429, then success" is three `POST`s. Beside the
//! script there are standing settings: a latency added to every marketplace call, resources the identity may not
//! meter (403 on the single call, `ResourceNotAuthorized` in a batch), and a count of upcoming events that get the
//! per-event status `Error`.
//!
//! "Drop" closes the TCP connection without writing any response, before or after the handler ran. "After" is the
//! case a crash-safe client must survive: the marketplace recorded the events but the answer never arrived.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::Notify;

/// The marketplace routes faults and counters refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Every token endpoint (v1, v2, IMDS, App Service).
    Token,
    /// `POST /api/batchUsageEvent`.
    BatchUsageEvent,
    /// `POST /api/usageEvent`.
    UsageEvent,
    /// `GET /api/usageEvents` (the daily totals).
    UsageEvents,
    /// The subscription list and single-subscription reads.
    Subscriptions,
}

impl Route {
    /// Every route, in a stable order.
    pub const ALL: [Route; 5] = [
        Route::Token,
        Route::BatchUsageEvent,
        Route::UsageEvent,
        Route::UsageEvents,
        Route::Subscriptions,
    ];

    /// The name used in fault scripts and stats.
    pub fn name(self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::BatchUsageEvent => "batchUsageEvent",
            Route::UsageEvent => "usageEvent",
            Route::UsageEvents => "usageEvents",
            Route::Subscriptions => "subscriptions",
        }
    }

    fn matches(self, selector: &str) -> bool {
        selector == "*" || selector.eq_ignore_ascii_case(self.name())
    }
}

/// Whether a delay or a drop happens before the handler runs or after it ran (and recorded what it accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Before the handler runs: nothing is recorded.
    #[default]
    Before,
    /// After the handler ran and recorded what it accepted, before the answer.
    After,
}

/// What a scripted fault does to one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum FaultKind {
    /// Answer `status` without processing; `retryAfter` (seconds) adds a `Retry-After` header; `body` replaces the
    /// default body.
    Fail {
        /// The HTTP status answered.
        status: u16,
        /// `Retry-After` seconds, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
        /// The body answered instead of the default one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<Value>,
    },
    /// Wait `delayMs` before processing, or after processing and before answering.
    Delay {
        /// How long, milliseconds.
        delay_ms: u64,
        /// Before or after processing.
        #[serde(default)]
        phase: Phase,
    },
    /// Close the connection without an answer, before processing or after processing.
    Drop {
        /// Before or after processing.
        #[serde(default)]
        phase: Phase,
    },
}

/// A scripted fault: `kind` on the next `times` calls of `route`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// A route name (`batchUsageEvent`, `usageEvent`, `usageEvents`, `subscriptions`, `token`) or `*`.
    #[serde(default = "any_route")]
    pub route: String,
    /// What it does.
    #[serde(flatten)]
    pub kind: FaultKind,
    /// How many calls it still applies to.
    #[serde(default = "one")]
    pub times: u32,
}

fn any_route() -> String {
    "*".into()
}
fn one() -> u32 {
    1
}

impl Fault {
    /// `kind` on the next `times` calls of `route`.
    pub fn new(route: Route, kind: FaultKind, times: u32) -> Self {
        Self {
            route: route.name().into(),
            kind,
            times,
        }
    }

    /// Whether `route` names a known route or `*`.
    pub fn route_is_valid(&self) -> bool {
        self.route == "*" || Route::ALL.iter().any(|r| r.matches(&self.route))
    }
}

/// The fault script and standing settings, as `GET /emulator/faults` shows them.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Faults {
    pub scripted: Vec<Fault>,
    /// Added to every marketplace call, on top of the configured latency.
    pub latency_ms: u64,
    /// Resource ids or URIs (lowercase) this identity may not meter.
    pub forbidden: BTreeSet<String>,
    /// The next this many events that would be accepted get `Error` instead.
    pub event_errors: u32,
    /// Scripted cancellations: subscription id (lowercase) -> when it was really cancelled (emulator clock). From
    /// that time on the list shows the subscription `Unsubscribed` (cancelled at that time), and every hour that
    /// ends after it answers `ResourceNotFound`; hours that ended before it are still accepted.
    pub cancellations: BTreeMap<String, chrono::DateTime<chrono::Utc>>,
    /// Dimensions whose events make a whole batch call fail with 400 `BadArgument` (as one malformed event does
    /// in production): every batch holding one of them is refused as a whole, nothing recorded.
    pub poison_dimensions: BTreeSet<String>,
}

impl Faults {
    /// Consumes one use of the first scripted fault that applies to `route`.
    pub(crate) fn take(&mut self, route: Route) -> Option<FaultKind> {
        let index = self
            .scripted
            .iter()
            .position(|f| f.times > 0 && route.matches(&f.route))?;
        let fault = &mut self.scripted[index];
        fault.times -= 1;
        let kind = fault.kind.clone();
        if fault.times == 0 {
            self.scripted.remove(index);
        }
        Some(kind)
    }

    /// Whether events for `resource` are refused (403 / `ResourceNotAuthorized`).
    pub(crate) fn is_forbidden(&self, resource: &str) -> bool {
        self.forbidden.contains(&resource.to_ascii_lowercase())
    }

    /// Consumes one injected per-event `Error`, if any is left.
    pub(crate) fn take_event_error(&mut self) -> bool {
        if self.event_errors > 0 {
            self.event_errors -= 1;
            true
        } else {
            false
        }
    }
}

/// Closes the connection a request came on, without an answer; put in each request's extensions by the server loop.
#[derive(Debug, Clone, Default)]
pub(super) struct ConnectionKill(pub(crate) Arc<Notify>);

impl ConnectionKill {
    /// Asks the connection task to drop the socket; the caller should then never return.
    pub(super) fn kill(&self) {
        self.0.notify_one();
    }
}

/// The answer of a `Fail` fault: a plausible body for the status.
pub(super) fn failure_response(
    status: u16,
    retry_after: Option<u64>,
    body: Option<Value>,
) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = body.unwrap_or_else(|| match code.as_u16() {
        401 => json!({"error": {"code": "Unauthorized", "message": "The access token is missing, invalid or expired."}}),
        403 => json!({"message": "Client is not authorized for this usage resource.", "code": "Forbidden"}),
        429 => json!({"statusCode": 429, "message": format!("Rate limit is exceeded. Try again in {} seconds.", retry_after.unwrap_or(1))}),
        503 => json!({"code": "ServiceUnavailable", "message": "The service is temporarily unavailable."}),
        _ => json!({"code": code.canonical_reason().unwrap_or("Error").replace(' ', ""), "message": "An injected error occurred."}),
    });
    let mut response = (code, axum::Json(body)).into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_faults_are_consumed_in_order_and_per_route() {
        let mut faults = Faults::default();
        faults.scripted.push(Fault::new(
            Route::BatchUsageEvent,
            FaultKind::Fail {
                status: 503,
                retry_after: None,
                body: None,
            },
            2,
        ));
        faults.scripted.push(Fault {
            route: "*".into(),
            kind: FaultKind::Drop {
                phase: Phase::After,
            },
            times: 1,
        });
        assert_eq!(
            faults.take(Route::Token),
            Some(FaultKind::Drop {
                phase: Phase::After
            })
        );
        assert!(matches!(
            faults.take(Route::BatchUsageEvent),
            Some(FaultKind::Fail { status: 503, .. })
        ));
        assert!(faults.take(Route::BatchUsageEvent).is_some());
        assert_eq!(faults.take(Route::BatchUsageEvent), None);
    }

    #[test]
    fn fault_json_shape() {
        let fault: Fault = serde_json::from_value(json!({
            "route": "usageEvent", "kind": "delay", "delayMs": 250, "phase": "after", "times": 3
        }))
        .expect("fault");
        assert_eq!(
            fault.kind,
            FaultKind::Delay {
                delay_ms: 250,
                phase: Phase::After
            }
        );
        assert!(fault.route_is_valid());
        let fault: Fault =
            serde_json::from_value(json!({"kind": "fail", "status": 429, "retryAfter": 7}))
                .expect("fault");
        assert_eq!((fault.route.as_str(), fault.times), ("*", 1));
    }
}
