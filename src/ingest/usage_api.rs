//! `POST /v1/usage` (one record or an array) and `GET /v1/usage` (hourly totals with outcomes).

use super::validate::{self, FieldError};
use super::{AppState, SharedState, error_response, journal_error_response, read_body};
use crate::config::Settings;
use crate::journal::usage::{self, IngestRules, NewRecord, ReportFilter};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
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
    parse_usage_with(&state.settings, text, now)
}

/// [`parse_usage`] of a body known to be UTF-8 starting with `[` or `{`.
fn parse_usage_with(
    settings: &Settings,
    text: &str,
    now: DateTime<Utc>,
) -> Result<Vec<NewRecord>, Vec<FieldError>> {
    if let Some(records) = parse_typed(settings, text, now) {
        return records;
    }
    parse_items(settings, text, now)
}

/// The item-by-item read: every item of the body apart, each problem named.
fn parse_items(
    settings: &Settings,
    text: &str,
    now: DateTime<Utc>,
) -> Result<Vec<NewRecord>, Vec<FieldError>> {
    let items = validate::items(text, "records")?;
    validate::parse_all(items, |index, raw| parse_record(settings, index, raw, now))
}

/// A record's fields read in the same pass as the body (issue 15): strings as strings, the quantity raw. Only a
/// JSON object is read into it ([`Object`]); whatever it refuses (an unknown or repeated field, a field that is
/// not a string, a record that is not an object, a body that is not JSON) sends the whole body down the path
/// that reads it item by item and names every problem, so only well-formed bodies take this one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedFields<'a> {
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    dimension: Option<String>,
    #[serde(borrow, default)]
    quantity: Option<&'a RawValue>,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    plan: Option<String>,
}

/// `T` read only from a JSON object: serde's derived structs also read an array, by position.
struct Object<T>(T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                m: M,
            ) -> Result<Self::Value, M::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(m)).map(Object)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// The one-pass read of a well-formed body (one object, or a non-empty array of objects, each field of the
/// right JSON type): its records, or every problem the checks find, exactly as the item-by-item path would
/// answer; `None` sends the body down that path.
fn parse_typed(
    settings: &Settings,
    text: &str,
    now: DateTime<Utc>,
) -> Option<Result<Vec<NewRecord>, Vec<FieldError>>> {
    let fields: Vec<Object<TypedFields>> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).ok()?
    } else {
        vec![serde_json::from_str(text).ok()?]
    };
    if fields.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(fields.len());
    let mut errors = Vec::new();
    for (index, Object(f)) in fields.into_iter().enumerate() {
        let quantity = f.quantity.filter(|v| v.get() != "null");
        let mut given = [f.resource, f.dimension, f.time, f.id, f.plan];
        let present: [bool; 5] = std::array::from_fn(|i| given[i].is_some());
        let slot = |k: &str| match k {
            "resource" => Some(0),
            "dimension" => Some(1),
            "time" => Some(2),
            "id" => Some(3),
            "plan" => Some(4),
            _ => None,
        };
        let record = validate_fields(
            settings,
            index,
            |k, _| slot(k).and_then(|i| given[i].take()),
            |k| slot(k).is_some_and(|i| present[i]),
            quantity,
            Vec::new(),
            now,
        );
        match record {
            Ok(r) => out.push(r),
            Err(mut e) => errors.append(&mut e),
        }
    }
    Some(if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    })
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
    settings: &Settings,
    index: usize,
    raw: &RawValue,
    now: DateTime<Utc>,
) -> Result<NewRecord, Vec<FieldError>> {
    // Only an object takes the fast path (serde would also read a struct from an array, by position).
    if raw.get().trim_start().starts_with('{')
        && let Ok(fields) = serde_json::from_str::<Fields>(raw.get())
    {
        return validate_record(settings, index, |k| fields.get(k), Vec::new(), now);
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
    validate_record(settings, index, present, errors, now)
}

/// Validates a record's fields (`present(name)`: the field's raw JSON, `None` when absent or `null`), adding to
/// `errors` (the unknown fields already found); the record, or every problem.
fn validate_record<'a>(
    settings: &Settings,
    index: usize,
    present: impl Fn(&str) -> Option<&'a RawValue>,
    errors: Vec<FieldError>,
    now: DateTime<Utc>,
) -> Result<NewRecord, Vec<FieldError>> {
    validate_fields(
        settings,
        index,
        |k, errors| present(k).and_then(|v| string_field(index, k, v, errors)),
        |k| present(k).is_some(),
        present("quantity"),
        errors,
        now,
    )
}

/// [`validate_record`] over the fields as read: `get_str(name, errors)` the string field (once per name, adding
/// a "must be a string" problem for another JSON type), `has(name)` whether it was given (not absent or `null`),
/// `quantity` its raw JSON.
fn validate_fields(
    settings: &Settings,
    index: usize,
    mut get_str: impl FnMut(&str, &mut Vec<FieldError>) -> Option<String>,
    has: impl Fn(&str) -> bool,
    quantity: Option<&RawValue>,
    mut errors: Vec<FieldError>,
    now: DateTime<Utc>,
) -> Result<NewRecord, Vec<FieldError>> {
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
            if !has("resource") {
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
        Some(d) => validate::dimension_owned(settings, d, plan.as_deref())
            .map_err(|m| errors.push(FieldError::field(index, "dimension", m)))
            .ok(),
        None => {
            if !has("dimension") {
                errors.push(FieldError::field(index, "dimension", "is required"));
            }
            None
        }
    };
    let quantity = match quantity {
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
        Some(t) => validate::time(&t, now, settings)
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
            crate::ops::metrics::ingest_accepted(
                outcome.accepted as u64,
                outcome.duplicates as u64,
                outcome.carried as u64,
            );
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
///
/// Takes the whole request, not the `HeaderMap` extractor, which clones the request's headers (issue 15, fourth
/// pass: two vectors copied and dropped per request).
pub async fn post_usage(State(state): State<SharedState>, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let (bytes, _) = match read_body(&state, &parts.headers, body, &["application/json"]).await {
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
/// written directly instead of through a `serde_json::Value` map (issue 15: three key strings and a map per
/// request), and without `format!` or a `text/plain` content type set and then replaced (issue 15, fourth pass:
/// 2.3 k instructions per request).
pub fn accepted_response(o: &usage::IngestOutcome) -> Response {
    let mut body = String::with_capacity(96);
    body.push_str(r#"{"accepted":"#);
    push_decimal(&mut body, o.accepted);
    body.push_str(r#","carried":"#);
    push_decimal(&mut body, o.carried);
    body.push_str(r#","duplicates":"#);
    push_decimal(&mut body, o.duplicates);
    body.push('}');
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Appends `n` in decimal, as `{}` formats it.
fn push_decimal(out: &mut String, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::dev_defaults(&std::collections::BTreeMap::new()).unwrap()
    }

    #[test]
    fn the_202_body_is_what_the_json_map_wrote() {
        let mut cases = vec![(1, 0, 0), (0, 0, 1), (1000, 17, 3), (usize::MAX, 0, 0)];
        for n in [9, 10, 99, 100, 101, 12_345, 1 << 32, usize::MAX - 1] {
            cases.push((n, n / 3, n / 7));
        }
        for (a, c, d) in cases {
            let o = usage::IngestOutcome {
                accepted: a,
                duplicates: d,
                carried: c,
            };
            let resp = accepted_response(&o);
            assert_eq!(resp.status(), StatusCode::ACCEPTED);
            assert_eq!(resp.headers()["content-type"], "application/json");
            assert_eq!(resp.headers().len(), 1, "{:?}", resp.headers());
            let body = futures_body(resp);
            let before =
                serde_json::to_string(&json!({"accepted": a, "duplicates": d, "carried": c}))
                    .unwrap();
            assert_eq!(body, before);
        }
    }

    fn futures_body(resp: Response) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt
            .block_on(axum::body::to_bytes(resp.into_body(), usize::MAX))
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Every body the one-pass read answers, it answers as the item-by-item read does (records, or the same
    /// problems in the same order); the bodies it must leave to that read, it leaves.
    #[test]
    fn the_one_pass_read_answers_as_the_item_by_item_read() {
        let settings = settings();
        let dim = settings.dimensions[0].id.clone();
        let now = Utc::now();
        let resources = [
            None,
            Some(r#""11111111-1111-4111-8111-111111111111""#.to_string()),
            Some(r#""11111111-1111-4111-8111-11111111111A""#.to_string()),
            Some(r#"" 11111111-1111-4111-8111-111111111111 ""#.to_string()),
            Some(r#""/subscriptions/x/resourceGroups/rg/providers/Microsoft.Solutions/applications/a""#.to_string()),
            Some(r#""customer-42""#.to_string()),
            Some("null".to_string()),
            Some("42".to_string()),
        ];
        let dimensions = [
            None,
            Some(format!("{dim:?}")),
            Some(r#""no_such_dimension""#.to_string()),
            Some("null".to_string()),
            Some("true".to_string()),
        ];
        let quantities = [
            None,
            Some("1"),
            Some("1.5"),
            Some(r#""2""#),
            Some("-1"),
            Some("0"),
            Some("null"),
            Some(r#""x""#),
            Some("[1]"),
            Some("1e3"),
        ];
        let others = [
            "",
            r#","id":"k-1""#,
            r#","id":"""#,
            r#","id":null,"plan":null,"time":null"#,
            r#","plan":"gold""#,
            r#","plan":"a b""#,
            r#","time":"2020-01-01T00:00:00Z""#,
            r#","time":"2999-01-01T00:00:00Z""#,
            r#","time":"yesterday""#,
            r#","id":"\u0041\n""#,
            r#","id":"\ud800""#,
            r#","id":7"#,
            r#","qty":2"#,
            r#","id":"a","id":"b""#,
        ];
        let mut bodies = Vec::new();
        for r in &resources {
            for d in &dimensions {
                for q in &quantities {
                    for o in &others {
                        let mut parts = Vec::new();
                        if let Some(r) = r {
                            parts.push(format!(r#""resource":{r}"#));
                        }
                        if let Some(d) = d {
                            parts.push(format!(r#""dimension":{d}"#));
                        }
                        if let Some(q) = q {
                            parts.push(format!(r#""quantity":{q}"#));
                        }
                        let mut body = format!("{{{}", parts.join(","));
                        body.push_str(if parts.is_empty() {
                            o.strip_prefix(',').unwrap_or(o)
                        } else {
                            o
                        });
                        body.push('}');
                        bodies.push(body);
                    }
                }
            }
        }
        let good = format!(
            r#"{{"resource":"11111111-1111-4111-8111-111111111111","dimension":{dim:?},"quantity":1}}"#
        );
        let mut all: Vec<String> = bodies.clone();
        for (i, b) in bodies.iter().enumerate().step_by(7) {
            all.push(format!("[{good},{b}]"));
            all.push(format!("[{b}, {good} ]"));
            all.push(format!("[{b},{}]", bodies[(i * 31) % bodies.len()]));
        }
        all.extend([
            "[]".to_string(),
            format!("[{good},[1,2,3]]"),
            format!("[[\"11111111-1111-4111-8111-111111111111\",{dim:?},1]]"),
            format!("{good} trailing"),
            format!("[{good}"),
            format!(" {good}"),
            format!("[{good},null]"),
        ]);
        let mut typed = 0;
        for body in &all {
            let slow = parse_items(&settings, body, now);
            match parse_typed(&settings, body, now) {
                Some(fast) => {
                    typed += 1;
                    assert_eq!(fast, slow, "{body}");
                }
                None => assert!(
                    slow.is_err(),
                    "{body}: refused by the one-pass read, accepted by the other: {slow:?}"
                ),
            }
        }
        // Most of the corpus is well-formed JSON of the right types: the one-pass read takes it.
        assert!(typed > all.len() / 2, "{typed} of {}", all.len());
        // And what is not well-formed goes to the other read.
        for body in [
            format!("[{good},[1,2,3]]"),
            format!(
                r#"{{"resource":"11111111-1111-4111-8111-111111111111","dimension":{dim:?},"quantity":1,"id":7}}"#
            ),
            format!(
                r#"{{"resource":"11111111-1111-4111-8111-111111111111","dimension":{dim:?},"quantity":1,"qty":7}}"#
            ),
            format!(
                r#"{{"resource":"11111111-1111-4111-8111-111111111111","dimension":{dim:?},"quantity":1,"quantity":2}}"#
            ),
            "[]".to_string(),
        ] {
            assert!(parse_typed(&settings, &body, now).is_none(), "{body}");
        }
    }
}
