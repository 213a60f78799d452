//! `POST /v1/usage` (one record or an array) and `GET /v1/usage` (hourly totals with outcomes).

use super::validate::{self, FieldError};
use super::{AppState, SharedState, error_response, journal_error_response, read_body};
use crate::journal::usage::{self, IngestRules, NewRecord, ReportFilter};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Fields a usage record may have.
const FIELDS: &[&str] = &["resource", "dimension", "quantity", "time", "id", "plan"];

/// Parses the body into records, or the list of every problem found.
pub fn parse_usage(
    state: &AppState,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<Vec<NewRecord>, Vec<FieldError>> {
    let text = std::str::from_utf8(body)
        .map_err(|_| vec![FieldError::request("body is not valid UTF-8")])?;
    if !text.trim_start().starts_with(['[', '{']) {
        return Err(vec![FieldError::request(
            "body must be one JSON record {\"resource\": ..., \"dimension\": ..., \"quantity\": ...} or an array of them",
        )]);
    }
    let items = validate::items(text, "records")?;
    validate::parse_all(items, |index, raw| parse_record(state, index, raw, now))
}

fn string_field(
    index: usize,
    field: &str,
    raw: &RawValue,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => Some(s),
        Err(_) => {
            errors.push(FieldError::field(index, field, "must be a string"));
            None
        }
    }
}

/// A record's fields, refusing an object that names a field twice: `{"quantity": 1, "quantity": 2}` is
/// ambiguous (other JSON readers on the path may take the first value where a map keeps the last), so it is
/// rejected rather than billed either way.
struct UniqueFields<'a>(BTreeMap<String, &'a RawValue>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for UniqueFields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = UniqueFields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let mut map = BTreeMap::new();
                while let Some((k, v)) = m.next_entry::<String, &'a RawValue>()? {
                    if map.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{k}`")));
                    }
                    map.insert(k, v);
                }
                Ok(UniqueFields(map))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A record's fields as the typed fast path reads them (issue 15: serde into a struct, no map per record). Any
/// object this refuses (an unknown or repeated field, not an object) goes through [`UniqueFields`] instead, which
/// names every problem; a field given as `null` is `None` in both, as if absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields<'a> {
    #[serde(borrow, default)]
    resource: Option<&'a RawValue>,
    #[serde(borrow, default)]
    dimension: Option<&'a RawValue>,
    #[serde(borrow, default)]
    quantity: Option<&'a RawValue>,
    #[serde(borrow, default)]
    time: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    plan: Option<&'a RawValue>,
}

impl<'a> Fields<'a> {
    fn get(&self, k: &str) -> Option<&'a RawValue> {
        let v = match k {
            "resource" => self.resource,
            "dimension" => self.dimension,
            "quantity" => self.quantity,
            "time" => self.time,
            "id" => self.id,
            "plan" => self.plan,
            _ => None,
        };
        v.filter(|v| v.get() != "null")
    }
}

fn parse_record(
    state: &AppState,
    index: usize,
    raw: &RawValue,
    now: DateTime<Utc>,
) -> Result<NewRecord, Vec<FieldError>> {
    // Only an object takes the fast path (serde would also read a struct from an array, by position).
    if raw.get().trim_start().starts_with('{')
        && let Ok(fields) = serde_json::from_str::<Fields>(raw.get())
    {
        return validate_record(state, index, |k| fields.get(k), Vec::new(), now);
    }
    let UniqueFields(map) = serde_json::from_str(raw.get()).map_err(|e| {
        vec![FieldError {
            index: Some(index),
            field: None,
            message: if e.to_string().starts_with("duplicate field") {
                format!("{e}; each field may appear once")
            } else {
                "each record must be a JSON object".into()
            },
        }]
    })?;
    let mut errors = Vec::new();
    for key in map.keys() {
        if !FIELDS.contains(&key.as_str()) {
            errors.push(FieldError::field(
                index,
                key,
                format!("unknown field; a record has {}", FIELDS.join(", ")),
            ));
        }
    }
    let present = |k: &str| map.get(k).copied().filter(|v| v.get() != "null");
    validate_record(state, index, present, errors, now)
}

/// Validates a record's fields (`present(name)`: the field's raw JSON, `None` when absent or `null`), adding to
/// `errors` (the unknown fields already found); the record, or every problem.
fn validate_record<'a>(
    state: &AppState,
    index: usize,
    present: impl Fn(&str) -> Option<&'a RawValue>,
    mut errors: Vec<FieldError>,
    now: DateTime<Utc>,
) -> Result<NewRecord, Vec<FieldError>> {
    let get_str = |k: &str, errors: &mut Vec<FieldError>| {
        present(k).and_then(|v| string_field(index, k, v, errors))
    };

    let plan = match get_str("plan", &mut errors) {
        Some(p) => match validate::plan(&p) {
            Ok(p) => Some(p),
            Err(m) => {
                errors.push(FieldError::field(index, "plan", m));
                None
            }
        },
        None => None,
    };
    let resource = match get_str("resource", &mut errors) {
        Some(r) => validate::resource_owned(r)
            .map_err(|m| errors.push(FieldError::field(index, "resource", m)))
            .ok(),
        None => {
            if present("resource").is_none() {
                errors.push(FieldError::field(
                    index,
                    "resource",
                    "is required (the SaaS subscription id or resource URI)",
                ));
            }
            None
        }
    };
    let dimension = match get_str("dimension", &mut errors) {
        Some(d) => validate::dimension_owned(&state.settings, d, plan.as_deref())
            .map_err(|m| errors.push(FieldError::field(index, "dimension", m)))
            .ok(),
        None => {
            if present("dimension").is_none() {
                errors.push(FieldError::field(index, "dimension", "is required"));
            }
            None
        }
    };
    let quantity = match present("quantity") {
        Some(q) => validate::quantity(q)
            .map_err(|m| errors.push(FieldError::field(index, "quantity", m)))
            .ok(),
        None => {
            errors.push(FieldError::field(
                index,
                "quantity",
                "is required (a number greater than 0)",
            ));
            None
        }
    };
    let time = match get_str("time", &mut errors) {
        Some(t) => validate::time(&t, now, &state.settings)
            .map_err(|m| errors.push(FieldError::field(index, "time", m)))
            .ok(),
        None => Some(now),
    };
    let key = match get_str("id", &mut errors) {
        Some(k) => validate::id_owned(k)
            .map_err(|m| errors.push(FieldError::field(index, "id", m)))
            .ok(),
        None => None,
    };
    match (resource, dimension, quantity, time) {
        (Some(r), Some(d), Some(q), Some(t)) if errors.is_empty() => {
            Ok(validate::record(r, plan, d, t, q, key))
        }
        _ => Err(errors),
    }
}

/// The key given at ingest to a record without `id` in fleet mode: `meterd-gen:` and a random UUID (a client id
/// has at most 128 characters of its own choosing; the prefix keeps the generated ones apart for readers).
pub fn generated_key() -> String {
    format!("meterd-gen:{}", uuid::Uuid::new_v4().simple())
}

/// Journals validated records and turns the result into the HTTP answer parts.
pub async fn store(
    state: &AppState,
    mut records: Vec<NewRecord>,
    now: DateTime<Utc>,
) -> Result<usage::IngestOutcome, Response> {
    let outbox = state.settings.fleet.is_some();
    if outbox {
        // Fleet mode: every record needs a fleet-wide key to be forwarded idempotently; one without an `id`
        // gets one now, stored with it (a retry of such a request is a new record, as without fleet mode).
        for r in records.iter_mut().filter(|r| r.key.is_none()) {
            r.key = Some(generated_key());
        }
    }
    let rules = IngestRules {
        now,
        late: state.settings.late_usage,
        safety_margin: state.settings.emit.safety_margin,
        min_send_time: state.settings.emit.min_send_time,
        outbox,
    };
    let n = records.len();
    let result = state.journal.ingest(records, rules).await;
    match result {
        Ok(Ok(outcome)) => {
            metrics::counter!("meterd_ingest_records_total", "result" => "accepted")
                .increment(outcome.accepted as u64);
            metrics::counter!("meterd_ingest_records_total", "result" => "duplicate")
                .increment(outcome.duplicates as u64);
            metrics::counter!("meterd_ingest_records_total", "result" => "carried")
                .increment(outcome.carried as u64);
            metrics::counter!("meterd_ingest_requests_total", "result" => "accepted").increment(1);
            if outcome.carried > 0 {
                tracing::info!(
                    message = "Late usage carried into the open hour.",
                    records = outcome.carried
                );
            }
            Ok(outcome)
        }
        Ok(Err(late)) => {
            metrics::counter!("meterd_ingest_requests_total", "result" => "late").increment(1);
            metrics::counter!("meterd_ingest_records_total", "result" => "rejected")
                .increment(n as u64);
            let errors = late
                .into_iter()
                .map(|l| {
                    FieldError::field(
                        l.index,
                        "time",
                        format!("{}; late_usage = \"reject\" refuses it", l.message),
                    )
                })
                .collect();
            Err(error_response(StatusCode::UNPROCESSABLE_ENTITY, errors))
        }
        Err(e) => {
            metrics::counter!("meterd_ingest_requests_total", "result" => "unavailable")
                .increment(1);
            Err(journal_error_response(&e))
        }
    }
}

/// `POST /v1/usage`.
pub async fn post_usage(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Response {
    let (bytes, _) = match read_body(&state, &headers, body, &["application/json"]).await {
        Ok(b) => b,
        Err(resp) => {
            metrics::counter!("meterd_ingest_requests_total", "result" => "invalid").increment(1);
            return resp;
        }
    };
    let now = state.clock.now();
    let records = match parse_usage(&state, &bytes, now) {
        Ok(r) => r,
        Err(errors) => {
            metrics::counter!("meterd_ingest_requests_total", "result" => "invalid").increment(1);
            return error_response(StatusCode::BAD_REQUEST, errors);
        }
    };
    match store(&state, records, now).await {
        Ok(o) => accepted_response(&o),
        Err(resp) => resp,
    }
}

/// The `202` answer of an ingest request: the bytes `axum::Json(json!({...}))` wrote (keys in order, no spaces),
/// formatted directly instead of through a `serde_json::Value` map (issue 15: three key strings and a map per
/// request).
pub fn accepted_response(o: &usage::IngestOutcome) -> Response {
    let body = format!(
        r#"{{"accepted":{},"carried":{},"duplicates":{}}}"#,
        o.accepted, o.carried, o.duplicates
    );
    (
        StatusCode::ACCEPTED,
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Query of `GET /v1/usage`.
#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    resource: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// A query string the extractor cannot read (a parameter given twice, bad percent-encoding): the documented
/// `400 {"errors": [...]}`, not axum's plain-text answer.
pub fn query_rejection(e: &QueryRejection) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        vec![FieldError::request(format!(
            "cannot read the query string: {}; give each parameter once",
            e.body_text()
        ))],
    )
}

/// Parses an optional RFC 3339 or `YYYY-MM-DD` bound.
pub fn parse_bound(name: &str, v: Option<&str>) -> Result<Option<DateTime<Utc>>, String> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(Some(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()));
    }
    Err(format!(
        "`{name}` = `{v}` is not an RFC 3339 time (2026-03-10T09:00:00Z) or a date (2026-03-10)"
    ))
}

/// `GET /v1/usage?resource=&from=&to=`.
pub async fn get_usage(
    State(state): State<SharedState>,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return query_rejection(&e),
    };
    let filter = match (
        parse_bound("from", q.from.as_deref()),
        parse_bound("to", q.to.as_deref()),
    ) {
        (Ok(from), Ok(to)) => ReportFilter {
            resource: q.resource.map(|r| validate::resource(&r).unwrap_or(r)),
            from,
            to,
        },
        (Err(m), _) | (_, Err(m)) => {
            return error_response(StatusCode::BAD_REQUEST, vec![FieldError::request(m)]);
        }
    };
    let now = state.clock.now();
    let grace = state.settings.emit.grace;
    let result = state.reads.report(filter, now, grace).await;
    match result {
        Ok((hours, carries)) => {
            axum::Json(json!({"hours": hours, "carries": carries})).into_response()
        }
        Err(e) => journal_error_response(&e),
    }
}
