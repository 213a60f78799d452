//! `POST /api/v1/events`: CloudEvents 1.0 ingest, shaped like OpenMeter's so its client SDKs work unchanged.
//!
//! `subject` is the resource, `type` selects a configured meter (and so the dimension), `id` + `source` form the
//! idempotency key, `time` is the usage time, and the quantity is read from `data` at the meter's
//! `value_property`. Success is `204 No Content`, as OpenMeter answers.

use super::validate::{self, FieldError};
use super::{AppState, SharedState, error_response, read_body, usage_api};
use crate::config::MeterSettings;
use crate::journal::usage::NewRecord;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

const SINGLE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";
const JSON: &str = "application/json";

/// The idempotency key of a CloudEvent: `source` and `id` together, unambiguously joined.
pub fn event_key(source: &str, id: &str) -> String {
    format!("ce:{}:{source}:{id}", source.len())
}

/// Follows `path` into a JSON object given as raw text.
fn lookup<'a>(raw: &'a RawValue, path: &[String]) -> Option<&'a RawValue> {
    let mut cur = raw;
    for p in path {
        let map: BTreeMap<&str, &'a RawValue> = serde_json::from_str(cur.get()).ok()?;
        cur = map.get(p.as_str()).copied()?;
    }
    Some(cur)
}

fn meter<'a>(state: &'a AppState, event_type: &str) -> Option<&'a MeterSettings> {
    state
        .settings
        .meters
        .iter()
        .find(|m| m.event_type == event_type)
}

/// Parses CloudEvents into records, or every problem found.
pub fn parse_events(
    state: &AppState,
    body: &[u8],
    ctype: &str,
    now: DateTime<Utc>,
) -> Result<Vec<NewRecord>, Vec<FieldError>> {
    let text = std::str::from_utf8(body)
        .map_err(|_| vec![FieldError::request("body is not valid UTF-8")])?;
    let is_array = text.trim_start().starts_with('[');
    if ctype == SINGLE && is_array {
        return Err(vec![FieldError::request(format!(
            "a batch of events needs Content-Type {BATCH}"
        ))]);
    }
    if ctype == BATCH && !is_array {
        return Err(vec![FieldError::request(format!(
            "{BATCH} needs a JSON array of events"
        ))]);
    }
    let events = validate::items(text, "CloudEvents")?;
    validate::parse_all(events, |index, raw| parse_event(state, index, raw, now))
}

fn parse_event(
    state: &AppState,
    index: usize,
    raw: &RawValue,
    now: DateTime<Utc>,
) -> Result<NewRecord, Vec<FieldError>> {
    let map: BTreeMap<String, &RawValue> = serde_json::from_str(raw.get()).map_err(|_| {
        vec![FieldError {
            index: Some(index),
            field: None,
            message: "each event must be a JSON object".into(),
        }]
    })?;
    let mut errors = Vec::new();
    let text = |k: &str, required: bool, errors: &mut Vec<FieldError>| -> Option<String> {
        match map.get(k).filter(|v| v.get() != "null") {
            Some(v) => match serde_json::from_str::<String>(v.get()) {
                Ok(s) if !s.is_empty() => Some(s),
                _ => {
                    errors.push(FieldError::field(index, k, "must be a non-empty string"));
                    None
                }
            },
            None => {
                if required {
                    errors.push(FieldError::field(
                        index,
                        k,
                        "is required by CloudEvents 1.0",
                    ));
                }
                None
            }
        }
    };
    let spec = text("specversion", true, &mut errors);
    if let Some(s) = &spec
        && s != "1.0"
    {
        errors.push(FieldError::field(
            index,
            "specversion",
            format!("`{s}` is not supported; send \"1.0\""),
        ));
    }
    let id = text("id", true, &mut errors);
    let source = text("source", true, &mut errors);
    let event_type = text("type", true, &mut errors);
    let subject = text("subject", false, &mut errors);
    let time = text("time", false, &mut errors);
    if let Some(ct) = text("datacontenttype", false, &mut errors)
        && !ct.to_ascii_lowercase().contains("json")
    {
        errors.push(FieldError::field(
            index,
            "datacontenttype",
            "data must be JSON (application/json)",
        ));
    }
    if map.contains_key("data_base64") {
        errors.push(FieldError::field(
            index,
            "data_base64",
            "binary data is not supported; send `data` as a JSON object",
        ));
    }

    let key = match (&id, &source) {
        (Some(i), Some(s)) => match validate::id(i) {
            Ok(_) => Some(event_key(s, i)),
            Err(m) => {
                errors.push(FieldError::field(index, "id", m));
                None
            }
        },
        _ => None,
    };
    let resource = match &subject {
        Some(s) => validate::resource(s)
            .map_err(|m| errors.push(FieldError::field(index, "subject", m)))
            .ok(),
        None => {
            errors.push(FieldError::field(
                index,
                "subject",
                "is required: the SaaS subscription id or resource URI",
            ));
            None
        }
    };
    let time = match time {
        Some(t) => validate::time(&t, now, &state.settings)
            .map_err(|m| errors.push(FieldError::field(index, "time", m)))
            .ok(),
        None => Some(now),
    };
    let mut dimension = None;
    let mut quantity = None;
    let mut plan = None;
    if let Some(t) = &event_type {
        match meter(state, t) {
            None => {
                let known: Vec<&str> = state
                    .settings
                    .meters
                    .iter()
                    .map(|m| m.event_type.as_str())
                    .collect();
                errors.push(FieldError::field(
                    index,
                    "type",
                    format!(
                        "no meter for type `{t}`; add [[meters]] type = \"{t}\" to the configuration (known types: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
            }
            Some(m) => {
                let data = map.get("data").copied();
                let path = format!("$.{}", m.value_path.join("."));
                match data.and_then(|d| lookup(d, &m.value_path)) {
                    Some(v) => match validate::quantity(v) {
                        Ok(q) => quantity = Some(q),
                        Err(msg) => errors.push(FieldError::field(
                            index,
                            &format!("data{}", &path[1..]),
                            msg,
                        )),
                    },
                    None => errors.push(FieldError::field(
                        index,
                        "data",
                        format!("has no value at {path} (the meter's value_property)"),
                    )),
                }
                if let Some(pp) = &m.plan_path
                    && let Some(v) = data.and_then(|d| lookup(d, pp))
                {
                    match serde_json::from_str::<String>(v.get())
                        .map_err(|_| "must be a string".to_string())
                        .and_then(|p| validate::plan(&p))
                    {
                        Ok(p) => plan = Some(p),
                        Err(msg) => errors.push(FieldError::field(index, "data.plan", msg)),
                    }
                }
                match validate::dimension(&state.settings, &m.dimension, plan.as_deref()) {
                    Ok(d) => dimension = Some(d),
                    Err(msg) => errors.push(FieldError::field(index, "type", msg)),
                }
            }
        }
    }
    match (resource, dimension, quantity, time) {
        (Some(r), Some(d), Some(q), Some(t)) if errors.is_empty() => {
            Ok(validate::record(r, plan, d, t, q, key))
        }
        _ => Err(errors),
    }
}

/// `POST /api/v1/events`.
pub async fn post_events(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (bytes, ctype) = match read_body(&state, &headers, body, &[SINGLE, BATCH, JSON]).await {
        Ok(b) => b,
        Err(resp) => return problem(resp).await,
    };
    let now = state.clock.now();
    let records = match parse_events(&state, &bytes, &ctype, now) {
        Ok(r) => r,
        Err(errors) => {
            metrics::counter!("meterd_ingest_requests_total", "result" => "invalid").increment(1);
            return problem(error_response(StatusCode::BAD_REQUEST, errors)).await;
        }
    };
    match usage_api::store(&state, records, now).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(resp) => problem(resp).await,
    }
}

/// Re-shapes an `{"errors": [...]}` answer as RFC 7807 problem details (what OpenMeter's SDKs expect), keeping
/// the `errors` list as an extension member.
async fn problem(resp: Response) -> Response {
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let mut value: serde_json::Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| serde_json::json!({}));
    let detail = value["errors"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| match (e["index"].as_u64(), e["field"].as_str()) {
                    (Some(i), Some(f)) => {
                        format!("event {i}: {f}: {}", e["message"].as_str().unwrap_or(""))
                    }
                    _ => e["message"].as_str().unwrap_or("").to_string(),
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    value["type"] = "about:blank".into();
    value["title"] = status.canonical_reason().unwrap_or("Error").into();
    value["status"] = status.as_u16().into();
    value["detail"] = detail.into();
    let mut out = (status, serde_json::to_string(&value).unwrap_or_default()).into_response();
    for (k, v) in headers.iter() {
        if k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/problem+json"),
    );
    out
}
