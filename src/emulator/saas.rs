//! The SaaS Fulfillment v2 subscription routes: `GET /api/saas/subscriptions/` (paged) and
//! `GET /api/saas/subscriptions/{id}`.
//!
//! Paging follows production: `{"subscriptions": [...], "@nextLink": "<url>"}` with `@nextLink` absent on the last
//! page, and an **empty body** (200, no JSON at all) when the publisher has no subscription. The continuation token
//! is percent-encoded JSON like production's (`[{"token":null,"range":{"min":"..","max":".."}}]`); a client that
//! double-encodes it gets a 400. `@nextLink` may point at another host name of the same server
//! ([`NextLinkMode`]), as production points at `main.prod.marketplaceapi.azure.com`.

use super::Emulator;
use super::call::{API_VERSION, Call, guarded, precheck};
use super::config::NextLinkMode;
use super::faults::Route;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Encodes `offset` as a production-looking continuation token (before percent-encoding).
pub(super) fn continuation_token(offset: usize) -> String {
    format!(r#"[{{"token":null,"range":{{"min":"{offset:014X}","max":"FFFFFFFFFFFFFF"}}}}]"#)
}

/// The offset a continuation token (already percent-decoded once) points at.
pub(super) fn parse_continuation_token(token: &str) -> Option<usize> {
    let value: Value = serde_json::from_str(token).ok()?;
    let min = value.get(0)?.get("range")?.get("min")?.as_str()?;
    usize::from_str_radix(min, 16).ok()
}

/// Percent-encodes everything but RFC 3986 unreserved characters (lowercase hex, like production's links).
pub(super) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn next_link_base(mode: &NextLinkMode, host: &str) -> String {
    match mode {
        NextLinkMode::SameHost => format!("http://{host}/api"),
        NextLinkMode::ForeignHost => {
            let port = host.rsplit_once(':').map(|(_, p)| p).unwrap_or("80");
            format!("http://localhost:{port}/api")
        }
        NextLinkMode::Base(base) => base.trim_end_matches('/').to_owned(),
    }
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": {"code": "EntityNotFound", "message": format!("Subscription {id} not found.")}})),
    )
        .into_response()
}

/// `GET /api/saas/subscriptions/`.
pub(super) async fn list(State(emulator): State<Emulator>, call: Call) -> Response {
    guarded(&emulator, Route::Subscriptions, &call, || async {
        if let Some(r) = precheck(&emulator, &call) {
            return r;
        }
        let offset = match call.param("continuationToken") {
            None => 0,
            Some(token) => match parse_continuation_token(token) {
                Some(offset) => offset,
                None => {
                    return (
                        StatusCode::BAD_REQUEST,
                        axum::Json(json!({"error": {"code": "BadRequest", "message": "The continuation token is invalid."}})),
                    )
                        .into_response();
                }
            },
        };
        let mut world = emulator.lock();
        world.apply_cancellations(emulator.now());
        if world.current.subscriptions.is_empty() {
            return StatusCode::OK.into_response();
        }
        let page: Vec<Value> = world
            .current.subscriptions
            .iter()
            .skip(offset)
            .take(world.current.page_size)
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null))
            .collect();
        let mut body = Map::new();
        body.insert("subscriptions".into(), Value::Array(page));
        let next = offset.saturating_add(world.current.page_size);
        if next < world.current.subscriptions.len() {
            let host = call.header("host").unwrap_or_else(|| "127.0.0.1".into());
            let link = format!(
                "{}/saas/subscriptions/?continuationToken={}&api-version={API_VERSION}",
                next_link_base(&world.current.next_link, &host),
                percent_encode(&continuation_token(next)),
            );
            body.insert("@nextLink".into(), Value::String(link));
        }
        axum::Json(Value::Object(body)).into_response()
    })
    .await
}

/// `GET /api/saas/subscriptions/{id}`.
pub(super) async fn one(
    State(emulator): State<Emulator>,
    call: Call,
    Path(id): Path<String>,
) -> Response {
    guarded(&emulator, Route::Subscriptions, &call, || async {
        if let Some(r) = precheck(&emulator, &call) {
            return r;
        }
        let now = emulator.now();
        let mut world = emulator.lock();
        world.apply_cancellations(now);
        match world.subscription(&id) {
            Some(s) => axum::Json(s).into_response(),
            None => not_found(&id),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_tokens_round_trip() {
        let token = continuation_token(42);
        assert_eq!(parse_continuation_token(&token), Some(42));
        assert!(percent_encode(&token).starts_with("%5b%7b%22token%22%3anull"));
        // A double-encoded token does not parse.
        assert_eq!(parse_continuation_token(&percent_encode(&token)), None);
    }

    #[test]
    fn foreign_host_is_always_localhost() {
        assert_eq!(
            next_link_base(&NextLinkMode::ForeignHost, "127.0.0.1:8788"),
            "http://localhost:8788/api"
        );
        assert_eq!(
            next_link_base(&NextLinkMode::ForeignHost, "localhost:9"),
            "http://localhost:9/api"
        );
    }
}
