//! Actionable text for authentication and authorisation failures.
//!
//! A 401 or 403 from the marketplace, or an `AADSTS` error from Entra ID, is almost always one of a handful of
//! configuration mistakes, and the raw answer ("Client is not authorized for this usage resource.") names none of
//! them. `meterd subscriptions` and `check-config --online` print this advice so an operator can fix the setup
//! without a support case.

use super::MARKETPLACE_RESOURCE_ID;

/// The legacy marketplace application id that stale docs still show.
const LEGACY_RESOURCE_PREFIX: &str = "62d94f6c";

/// Advice for an Entra `AADSTS` error code, if it is one meterd knows.
pub fn aadsts_advice(code: u32) -> Option<&'static str> {
    Some(match code {
        7000215 => {
            "AADSTS7000215: the client secret is invalid. Use the secret's value (not its id) from the app \
             registration's 'Certificates & secrets' page, and check the secret file has no extra characters."
        }
        7000222 => {
            "AADSTS7000222: the client secret has expired. Create a new secret for the app registration, update \
             the secret file or credential, and restart meterd."
        }
        700016 => {
            "AADSTS700016: the application (client id) was not found in this tenant. Use the Entra app id \
             registered on the offer's technical configuration in Partner Center, and the tenant id of the \
             tenant that app lives in."
        }
        90002 => {
            "AADSTS90002: the tenant was not found. tenant_id must be the id (a GUID) or a verified domain of \
             the tenant that owns the app registered on the offer, not 'common' or 'organizations'."
        }
        500011 => {
            "AADSTS500011: the resource principal was not found. Request a token for the marketplace API \
             20e940b3-4c77-4b0b-9a53-9e16a1b010a7 (not the legacy 62d94f6c-... id); if that is already the \
             case, the marketplace service principal is missing in your tenant."
        }
        _ => return None,
    })
}

/// Finds the first `AADSTS<digits>` code in `text`.
pub fn find_aadsts_code(text: &str) -> Option<u32> {
    let start = text.find("AADSTS")? + "AADSTS".len();
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// A clear, actionable message for an error answer with `status` and `body` (from the marketplace or from Entra).
pub fn advice(status: u16, body: &str) -> String {
    if let Some(text) = find_aadsts_code(body).and_then(aadsts_advice) {
        return text.to_owned();
    }
    if body.contains(LEGACY_RESOURCE_PREFIX) {
        return format!(
            "The token was requested for the legacy marketplace resource id {LEGACY_RESOURCE_PREFIX}-...; request \
             it for {MARKETPLACE_RESOURCE_ID} instead (scope {MARKETPLACE_RESOURCE_ID}/.default on the v2 endpoint, \
             resource={MARKETPLACE_RESOURCE_ID} on v1 and for managed identity)."
        );
    }
    match status {
        401 => format!(
            "The marketplace rejected the access token (401). Check that: the token is for the resource \
             {MARKETPLACE_RESOURCE_ID} (not the legacy {LEGACY_RESOURCE_PREFIX}-... id); it was issued by the \
             tenant that owns the app registered on the offer (tenant_id is that tenant's id, not 'common'); it \
             has not expired: this host's clock must be correct (check NTP), since a skewed clock makes fresh \
             tokens look expired or not yet valid."
        ),
        403 => "The marketplace refused this identity (403 Forbidden: not authorized for this usage resource). \
                Check that: client_id is the Entra app id entered on the offer's technical configuration in \
                Partner Center (not another app of yours); tenant_id is that app's own tenant (the tenant id \
                entered in Partner Center, not 'common'); the app has a service principal (an Enterprise \
                application) in that tenant; for a managed application, the identity is the one registered on \
                the plan; the resource belongs to this offer."
            .to_owned(),
        400 => format!("The request was rejected as malformed (400): {}", excerpt(body)),
        429 => "The marketplace is throttling (429); meterd honours Retry-After and retries.".to_owned(),
        500..=599 => format!(
            "The marketplace had a server error ({status}); meterd retries with backoff. If it persists, open a \
             support case with the x-ms-requestid and x-ms-correlationid from the log."
        ),
        _ => format!("Unexpected answer {status}: {}", excerpt(body)),
    }
}

/// At most 500 characters of a body, on one line.
pub(crate) fn excerpt(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(500)
        .collect();
    let trimmed = one_line.trim();
    if body.chars().count() > 500 {
        format!("{trimmed}...")
    } else {
        trimmed.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_names_tenant_app_and_service_principal() {
        let text = advice(
            403,
            r#"{ "message": "Client is not authorized for this usage resource.", "code": "Forbidden" }"#,
        );
        for needle in ["Partner Center", "common", "service principal", "tenant"] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }

    #[test]
    fn unauthorized_names_resource_and_clock() {
        let text = advice(401, "");
        assert!(text.contains(MARKETPLACE_RESOURCE_ID));
        assert!(text.contains("clock"));
        assert!(
            advice(401, "audience 62d94f6c-d599-489b-a797-3e10e42fbe22 invalid").contains("legacy")
        );
    }

    #[test]
    fn aadsts_codes() {
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Trace ID: x"}"#;
        assert_eq!(find_aadsts_code(body), Some(7000215));
        assert!(advice(401, body).contains("secret is invalid"));
        assert!(
            advice(400, "AADSTS700016: Application with identifier").contains("Partner Center")
        );
        assert!(advice(400, "AADSTS90002: Tenant 'x' not found").contains("common"));
        assert!(advice(400, "AADSTS500011: The resource principal named").contains("20e940b3"));
        assert!(advice(401, "AADSTS7000222: expired").contains("expired"));
        assert_eq!(find_aadsts_code("AADSTS"), None);
        assert_eq!(aadsts_advice(1), None);
    }
}
