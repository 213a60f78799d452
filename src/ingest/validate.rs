//! Field checks shared by the usage API and CloudEvents ingest.
//!
//! Every check returns a message a developer can act on; nothing is stored unless every record of a request
//! passes, so an application never has to guess which half of a batch landed.

use crate::config::Settings;
use crate::journal::usage::NewRecord;
use crate::quantity::Micros;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;

/// Longest idempotency key, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest plan id, in bytes.
pub const MAX_PLAN_BYTES: usize = 128;
/// Longest resource URI, in bytes.
pub const MAX_RESOURCE_BYTES: usize = 1024;

/// One problem with one field of one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Position of the record in the request (absent for whole-request problems).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The field (absent for whole-record problems).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl FieldError {
    /// A problem with `field` of record `index`.
    pub fn field(index: usize, field: &str, message: impl Into<String>) -> Self {
        FieldError {
            index: Some(index),
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    /// A problem with the whole request.
    pub fn request(message: impl Into<String>) -> Self {
        FieldError {
            index: None,
            field: None,
            message: message.into(),
        }
    }
}

pub use crate::resource::is_guid;

/// Checks a resource and returns its canonical form: a SaaS subscription id (GUID, lower-cased so that one
/// subscription never splits into two hourly events) or an ARM resource URI of a managed application, kept as
/// spelled (the journal folds its letter case: every spelling is counted under the first one seen, which is the
/// one sent; see `journal::usage::known_spelling`).
pub fn resource(s: &str) -> Result<String, String> {
    let t = s.trim();
    if is_guid(t) {
        return Ok(t.to_ascii_lowercase());
    }
    if t.len() <= MAX_RESOURCE_BYTES
        && t.len() > "/subscriptions/".len()
        && t.get(..15)
            .is_some_and(|p| p.eq_ignore_ascii_case("/subscriptions/"))
        && t.to_ascii_lowercase().contains("/providers/")
        && !t.chars().any(|c| c.is_control())
    {
        return Ok(t.to_string());
    }
    Err(format!(
        "`{}` is neither a SaaS subscription id (a GUID like 11111111-2222-3333-4444-555555555555) nor a managed \
         application resource URI (/subscriptions/.../providers/Microsoft.Solutions/applications/NAME)",
        truncate(t, 80)
    ))
}

/// [`resource`] for a string the caller owns: the canonical form is `s` itself when it already is (a lower-case
/// GUID without spaces around it, or a URI as given), without a copy (issue 15: one allocation less per record).
pub fn resource_owned(s: String) -> Result<String, String> {
    if is_guid(&s) && !s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Ok(s);
    }
    resource(&s)
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

/// [`dimension`] for a string the caller owns: the declared id is `d` itself (a dimension is found by its exact
/// id), not a copy.
pub fn dimension_owned(
    settings: &Settings,
    d: String,
    plan: Option<&str>,
) -> Result<String, String> {
    check_dimension(settings, &d, plan).map(|()| d)
}

/// Checks the dimension is declared (and allowed on `plan` when both say so).
pub fn dimension(settings: &Settings, d: &str, plan: Option<&str>) -> Result<String, String> {
    check_dimension(settings, d, plan).map(|()| d.to_string())
}

fn check_dimension(settings: &Settings, d: &str, plan: Option<&str>) -> Result<(), String> {
    let Some(decl) = settings.dimension(d) else {
        let known: Vec<&str> = settings.dimensions.iter().map(|d| d.id.as_str()).collect();
        return Err(if known.is_empty() {
            format!(
                "dimension `{}` is not declared; add [[dimensions]] id = \"...\" to the configuration",
                truncate(d, 80)
            )
        } else {
            format!(
                "dimension `{}` is not declared; known dimensions: {}",
                truncate(d, 80),
                known.join(", ")
            )
        });
    };
    if let Some(p) = plan
        && !decl.plans.is_empty()
        && !decl.plans.iter().any(|x| x == p)
    {
        return Err(format!(
            "dimension `{d}` is not on plan `{p}`; it is declared for plans: {}",
            decl.plans.join(", ")
        ));
    }
    Ok(())
}

/// Reads a quantity from raw JSON: a number, or a string holding one.
pub fn quantity(raw: &RawValue) -> Result<Micros, String> {
    let text = raw.get().trim();
    let literal: std::borrow::Cow<str> = if let Some(inner) = text.strip_prefix('"') {
        match serde_json::from_str::<String>(text) {
            Ok(s) => s.into(),
            Err(_) => inner.trim_end_matches('"').into(),
        }
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        // A JSON number: read as it stands (issue 15: no copy).
        text.into()
    } else {
        return Err(format!(
            "must be a number greater than 0, got {}",
            truncate(text, 40)
        ));
    };
    Micros::parse_decimal(&literal).map_err(|e| e.to_string())
}

/// Parses an RFC 3339 time and checks it is not too far in the future.
pub fn time(s: &str, now: DateTime<Utc>, settings: &Settings) -> Result<DateTime<Utc>, String> {
    let t = DateTime::parse_from_rfc3339(s.trim())
        .map_err(|_| {
            format!(
                "`{}` is not an RFC 3339 time like 2026-03-10T09:05:00Z",
                truncate(s, 60)
            )
        })?
        .with_timezone(&Utc);
    if t > now + settings.ingest.max_future_skew {
        return Err(format!(
            "`{}` is more than {} in the future (meterd's clock says {}); check the application's clock",
            truncate(s, 60),
            crate::config::format_duration(settings.ingest.max_future_skew),
            now.format("%Y-%m-%dT%H:%M:%SZ")
        ));
    }
    Ok(t)
}

/// [`id`] for a string the caller owns: the key is `s` itself, not a copy.
pub fn id_owned(s: String) -> Result<String, String> {
    check_id(&s).map(|()| s)
}

/// Checks an idempotency key.
pub fn id(s: &str) -> Result<String, String> {
    check_id(s).map(|()| s.to_string())
}

fn check_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty (leave it out when there is no idempotency key)".into());
    }
    if s.len() > MAX_ID_BYTES {
        return Err(format!("is {} bytes long; at most {MAX_ID_BYTES}", s.len()));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// Checks a plan id.
pub fn plan(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty()
        || t.len() > MAX_PLAN_BYTES
        || t.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "`{}` is not a plan id (as in Partner Center, at most {MAX_PLAN_BYTES} bytes, no spaces)",
            truncate(t, 60)
        ));
    }
    Ok(t.to_string())
}

/// Splits a JSON body into its items: the elements of an array, or one object. `what` names them in errors.
pub fn items<'a>(text: &'a str, what: &str) -> Result<Vec<&'a RawValue>, Vec<FieldError>> {
    let trimmed = text.trim_start();
    let items: Vec<&RawValue> = if trimmed.starts_with('[') {
        serde_json::from_str(text).map_err(|e| {
            vec![FieldError::request(format!(
                "body is not a JSON array of {what}: {e}"
            ))]
        })?
    } else if trimmed.starts_with('{') {
        vec![
            serde_json::from_str(text)
                .map_err(|e| vec![FieldError::request(format!("body is not valid JSON: {e}"))])?,
        ]
    } else {
        return Err(vec![FieldError::request(format!(
            "body must be one JSON object or an array of {what}"
        ))]);
    };
    if items.is_empty() {
        return Err(vec![FieldError::request(format!(
            "the array holds no {what}"
        ))]);
    }
    Ok(items)
}

/// Parses every item, collecting every problem: a request is accepted whole or not at all.
pub fn parse_all<T>(
    items: Vec<&RawValue>,
    mut parse: impl FnMut(usize, &RawValue) -> Result<T, Vec<FieldError>>,
) -> Result<Vec<T>, Vec<FieldError>> {
    let mut out = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, raw) in items.into_iter().enumerate() {
        match parse(index, raw) {
            Ok(r) => out.push(r),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Builds the record once every field passed.
pub fn record(
    resource: String,
    plan: Option<String>,
    dimension: String,
    time: DateTime<Utc>,
    quantity: Micros,
    key: Option<String>,
) -> NewRecord {
    NewRecord {
        resource,
        plan,
        dimension,
        time,
        quantity,
        key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_and_uris() {
        assert_eq!(
            resource("11111111-2222-3333-4444-55555555555A").unwrap(),
            "11111111-2222-3333-4444-55555555555a"
        );
        assert!(
            resource(
                "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Solutions/applications/app"
            )
            .is_ok()
        );
        assert!(resource("1111-2222").is_err());
        assert!(resource("/subscriptions/").is_err());
        assert!(resource("customer-42").is_err());
        assert!(resource("11111111-2222-3333-4444-55555555555g").is_err());
    }

    #[test]
    fn quantities_from_raw_json() {
        let q = |s: &str| quantity(&RawValue::from_string(s.to_string()).unwrap());
        assert_eq!(q("1.5"), Ok(Micros(1_500_000)));
        assert_eq!(q("\"2\""), Ok(Micros(2_000_000)));
        assert!(q("\"NaN\"").is_err());
        assert!(q("null").is_err());
        assert!(q("true").is_err());
        assert!(q("[1]").is_err());
        assert!(q("-0").is_err());
    }

    #[test]
    fn ids() {
        assert!(id(&"x".repeat(128)).is_ok());
        assert!(id(&"x".repeat(129)).is_err());
        assert!(id("").is_err());
    }
}
