//! Entra ID access tokens for the marketplace API.
//!
//! (Over 600 lines only with its unit tests: about 500 of code, one role, the token providers and their cache.)
//!
//! Every marketplace call needs a bearer token for the marketplace application
//! ([`MARKETPLACE_RESOURCE_ID`]). Fetching one per call would be slow and would hit Entra's throttling, so
//! [`CachedTokenProvider`] caches it and refreshes it *before* it expires (five minutes early, or at 80 % of the
//! lifetime for short-lived tokens), using an injected clock so tests control expiry. Concurrent callers share a
//! single in-flight fetch, and callers that waited on a fetch that failed get that failure instead of starting a
//! new one each. If a refresh fails while the cached token is still valid, the cached token keeps being served.
//!
//! The emitter calls [`TokenProvider::invalidate`] after a 401 so the next call fetches a new token.
//!
//! Nothing in here prints a secret: [`Secret`] redacts itself, and [`AuthError`] holds Entra's `error` and
//! `error_description` (with its `AADSTS` code) but never the request, the secret or the token.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::MARKETPLACE_RESOURCE_ID;
use super::advice::excerpt;
use crate::clock::SharedClock;
use crate::secret::Secret;

pub use super::auth_config::{AuthConfig, EndpointVersion, IMDS_ENDPOINT};
pub use super::error::AuthError;

/// A boxed, sendable future (what [`TokenProvider::token`] returns, to keep the trait object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Refresh at the latest this long before expiry.
const REFRESH_MARGIN: chrono::Duration = chrono::Duration::minutes(5);

/// After a failed refresh, a still-valid token is served this long before the next attempt.
const RETRY_REFRESH_AFTER: chrono::Duration = chrono::Duration::seconds(30);

/// Assumed lifetime when a token response states none (Entra always does; be conservative anyway).
const FALLBACK_LIFETIME: chrono::Duration = chrono::Duration::minutes(10);

/// A bearer token and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    token: Secret,
    expires_at: DateTime<Utc>,
}

impl AccessToken {
    /// A token valid until `expires_at`.
    pub fn new(token: Secret, expires_at: DateTime<Utc>) -> Self {
        Self { token, expires_at }
    }

    /// The token (use `.expose()` only to put it in the `Authorization` header).
    pub fn secret(&self) -> &Secret {
        &self.token
    }

    /// When it stops being valid (by the local clock).
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }
}

/// Something that hands out bearer tokens for the marketplace API.
pub trait TokenProvider: Send + Sync + fmt::Debug {
    /// A currently valid token, from the cache or freshly fetched.
    fn token(&self) -> BoxFuture<'_, Result<AccessToken, AuthError>>;

    /// Drops the cached token (the marketplace answered 401 with it); the next [`TokenProvider::token`] fetches.
    fn invalidate(&self);
}

/// How token fetches are retried (only failures that can pass: network, 429, 5xx, and 404 from IMDS).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: usize,
    /// First delay.
    pub min_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 4,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// A [`TokenProvider`] for any [`AuthConfig`]: caches, refreshes early, single-flight.
pub struct CachedTokenProvider {
    config: AuthConfig,
    http: reqwest::Client,
    clock: SharedClock,
    retry: RetryPolicy,
    state: Mutex<CacheState>,
    /// Held while fetching, so concurrent callers wait for one fetch instead of starting their own.
    fetch: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct CacheState {
    cached: Option<Cached>,
    /// Completed fetches so far.
    fetches: u64,
    /// The latest fetch, if it failed.
    last_failure: Option<Failure>,
}

struct Cached {
    token: AccessToken,
    refresh_at: DateTime<Utc>,
}

struct Failure {
    /// Which fetch (its number in `fetches`).
    fetch: u64,
    at: DateTime<Utc>,
    error: AuthError,
}

impl CacheState {
    /// The cached token, if it has not expired.
    fn valid(&self, now: DateTime<Utc>) -> Option<&Cached> {
        self.cached.as_ref().filter(|c| now < c.token.expires_at)
    }

    /// The answer for a caller that need not fetch, if any. `fetches_seen` is the fetch count a caller saw before
    /// waiting for the in-flight fetch.
    fn answer(
        &self,
        now: DateTime<Utc>,
        fetches_seen: Option<u64>,
    ) -> Option<Result<AccessToken, AuthError>> {
        let valid = self.valid(now);
        if let Some(cached) = valid {
            if now < cached.refresh_at {
                return Some(Ok(cached.token.clone()));
            }
            // Due for a refresh, but one just failed: keep serving the valid token for a while rather than
            // making every call wait for another round of retries.
            if self
                .last_failure
                .as_ref()
                .is_some_and(|f| now < f.at + RETRY_REFRESH_AFTER)
            {
                return Some(Ok(cached.token.clone()));
            }
        }
        // The fetch this caller waited for failed: share its answer rather than hammer the endpoint.
        if let (Some(seen), Some(failure)) = (fetches_seen, &self.last_failure)
            && seen != self.fetches
            && failure.fetch == self.fetches
        {
            return Some(match valid {
                Some(cached) => Ok(cached.token.clone()),
                None => Err(failure.error.clone()),
            });
        }
        None
    }
}

impl fmt::Debug for CachedTokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached_until = self
            .state
            .lock()
            .ok()
            .and_then(|s| s.cached.as_ref().map(|c| c.token.expires_at));
        f.debug_struct("CachedTokenProvider")
            .field("config", &self.config)
            .field("cached_until", &cached_until)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl CachedTokenProvider {
    /// A provider with a 30-second request timeout and the default retry policy; validates `config`.
    pub fn new(config: AuthConfig, clock: SharedClock) -> Result<Self, AuthError> {
        config.validate()?;
        crate::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10));
        if matches!(config, AuthConfig::ManagedIdentity { .. }) {
            // The identity endpoint is link-local or loopback: a proxy would break it.
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| AuthError::Config {
            reason: format!("cannot build the HTTP client: {e}"),
        })?;
        Ok(Self::with_http_client(config, clock, http))
    }

    /// A provider using `http` (its timeouts apply).
    pub fn with_http_client(config: AuthConfig, clock: SharedClock, http: reqwest::Client) -> Self {
        Self {
            config,
            http,
            clock,
            retry: RetryPolicy::default(),
            state: Mutex::new(CacheState::default()),
            fetch: tokio::sync::Mutex::new(()),
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // A panic while holding this lock cannot leave the cache inconsistent: recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn token_inner(&self) -> Result<AccessToken, AuthError> {
        let fetches_seen = {
            let state = self.state();
            if let Some(answer) = state.answer(self.clock.now(), None) {
                return answer;
            }
            state.fetches
        };
        let _in_flight = self.fetch.lock().await;
        if let Some(answer) = self.state().answer(self.clock.now(), Some(fetches_seen)) {
            return answer;
        }

        let result = self.fetch_with_retry().await;
        let now = self.clock.now();
        let mut state = self.state();
        state.fetches += 1;
        match result {
            Ok(token) => {
                metrics::counter!("meterd_token_refreshes_total", "result" => "ok").increment(1);
                let refresh_at = refresh_at(now, token.expires_at);
                state.cached = Some(Cached {
                    token: token.clone(),
                    refresh_at,
                });
                state.last_failure = None;
                tracing::debug!(
                    message = "Fetched an access token.",
                    expires_at = %token.expires_at,
                    refresh_at = %refresh_at,
                );
                Ok(token)
            }
            Err(error) => {
                metrics::counter!("meterd_token_refreshes_total", "result" => "error").increment(1);
                state.last_failure = Some(Failure {
                    fetch: state.fetches,
                    at: now,
                    error: error.clone(),
                });
                if let Some(cached) = state.valid(now) {
                    tracing::warn!(
                        message = "Token refresh failed; using the cached token until it expires.",
                        %error,
                        expires_at = %cached.token.expires_at,
                    );
                    return Ok(cached.token.clone());
                }
                Err(error)
            }
        }
    }

    async fn fetch_with_retry(&self) -> Result<AccessToken, AuthError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.max_retries)
            .with_jitter();
        (|| self.fetch_once())
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| self.is_retryable(e))
            .notify(|error, delay| {
                tracing::warn!(
                    message = "Token request failed; retrying.",
                    %error,
                    delay_ms = delay.as_millis() as u64,
                );
            })
            .await
    }

    /// Network failures, 429 and 5xx can pass; so can IMDS's 404 (identity not assigned yet). Other 4xx cannot.
    fn is_retryable(&self, error: &AuthError) -> bool {
        match error {
            AuthError::Network { .. } => true,
            AuthError::Entra { status, .. } | AuthError::Http { status, .. } => {
                *status == 429
                    || *status >= 500
                    || (*status == 404 && matches!(self.config, AuthConfig::ManagedIdentity { .. }))
            }
            AuthError::Decode { .. } | AuthError::Config { .. } => false,
        }
    }

    async fn fetch_once(&self) -> Result<AccessToken, AuthError> {
        let url = self.config.token_url();
        let request = match (&self.config, url) {
            (AuthConfig::StaticToken { token }, _) => {
                return Ok(AccessToken::new(token.clone(), DateTime::<Utc>::MAX_UTC));
            }
            (
                AuthConfig::ClientSecret {
                    client_id,
                    secret,
                    version,
                    ..
                },
                Some(url),
            ) => {
                let audience = match version {
                    EndpointVersion::V1 => ("resource", MARKETPLACE_RESOURCE_ID.to_owned()),
                    EndpointVersion::V2 => ("scope", format!("{MARKETPLACE_RESOURCE_ID}/.default")),
                };
                let body = form_encode(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret.expose()),
                    (audience.0, &audience.1),
                ]);
                self.http
                    .post(url)
                    .header("Content-Type", "application/x-www-form-urlencoded")
                    .header("Accept", "application/json")
                    .body(body)
            }
            (
                AuthConfig::ManagedIdentity {
                    client_id,
                    identity_header,
                    ..
                },
                Some(url),
            ) => {
                let mut url = reqwest::Url::parse(&url).map_err(|e| AuthError::Config {
                    reason: format!("invalid managed identity endpoint: {e}"),
                })?;
                {
                    let mut query = url.query_pairs_mut();
                    let api_version = if identity_header.is_some() {
                        "2019-08-01"
                    } else {
                        "2018-02-01"
                    };
                    query.append_pair("api-version", api_version);
                    query.append_pair("resource", MARKETPLACE_RESOURCE_ID);
                    if let Some(id) = client_id.as_deref().filter(|i| !i.is_empty()) {
                        query.append_pair("client_id", id);
                    }
                }
                let request = self.http.get(url);
                match identity_header {
                    Some(header) => request.header("X-IDENTITY-HEADER", header.expose()),
                    None => request.header("Metadata", "true"),
                }
            }
            (_, None) => {
                return Err(AuthError::Config {
                    reason: "no token endpoint".into(),
                });
            }
        };

        let response = request.send().await.map_err(network_error)?;
        let status = response.status();
        let body = response.text().await.map_err(network_error)?;
        if !status.is_success() {
            return Err(error_from_body(status.as_u16(), &body));
        }
        parse_token_response(&body, self.clock.now())
    }
}

impl TokenProvider for CachedTokenProvider {
    fn token(&self) -> BoxFuture<'_, Result<AccessToken, AuthError>> {
        Box::pin(self.token_inner())
    }

    fn invalidate(&self) {
        self.state().cached = None;
    }
}

/// When to refresh a token obtained at `now`: five minutes before expiry, or at 80 % of a short lifetime.
pub fn refresh_at(now: DateTime<Utc>, expires_at: DateTime<Utc>) -> DateTime<Utc> {
    let lifetime = expires_at.signed_duration_since(now);
    if lifetime <= chrono::Duration::zero() {
        return now;
    }
    let margin = REFRESH_MARGIN.min(lifetime / 5);
    expires_at - margin
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// A number, or a string holding one; anything else (e.g. App Service's old date format) is `None`.
fn lenient_secs(value: Option<&serde_json::Value>) -> Option<i64> {
    match value? {
        serde_json::Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Parses a token answer (v1, v2 or managed identity) received at `now`.
///
/// The expiry is the earlier of `now + expires_in` and `expires_on`, ignoring an `expires_on` that is already past
/// by the local clock (a skewed clock must not cause a refresh on every call).
pub fn parse_token_response(body: &str, now: DateTime<Utc>) -> Result<AccessToken, AuthError> {
    let parsed: TokenResponse = serde_json::from_str(body).map_err(|e| AuthError::Decode {
        // serde_json's message names a position and a type, never the content.
        reason: format!("not a token response: {e}"),
    })?;
    let token = parsed
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AuthError::Decode {
            reason: "no access_token".into(),
        })?;
    let from_in = lenient_secs(parsed.expires_in.as_ref())
        .filter(|s| *s > 0)
        .map(|s| now + chrono::Duration::seconds(s));
    let from_on = lenient_secs(parsed.expires_on.as_ref())
        .and_then(|s| DateTime::from_timestamp(s, 0))
        .filter(|t| *t > now);
    let expires_at = match (from_in, from_on) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => now + FALLBACK_LIFETIME,
    };
    Ok(AccessToken::new(Secret::new(token), expires_at))
}

fn error_from_body(status: u16, body: &str) -> AuthError {
    match serde_json::from_str::<OAuthErrorBody>(body) {
        Ok(oauth) => AuthError::Entra {
            status,
            error: oauth.error,
            description: oauth
                .error_description
                .map(|d| excerpt(&d))
                .unwrap_or_default(),
        },
        Err(_) => AuthError::Http {
            status,
            body: excerpt(body),
        },
    }
}

fn network_error(error: reqwest::Error) -> AuthError {
    AuthError::Network {
        timeout: error.is_timeout(),
        message: super::error_chain(&error),
    }
}

/// `application/x-www-form-urlencoded` encoding (reqwest's `form` feature is not enabled).
fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse("http://form.invalid/").expect("a valid constant URL");
    url.query_pairs_mut().extend_pairs(pairs);
    url.query().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, h, m, 0)
            .single()
            .expect("valid")
    }

    #[test]
    fn v2_numbers() {
        let token = parse_token_response(&fixture("token_v2_response.json"), at(9, 0)).expect("v2");
        assert_eq!(
            token.expires_at(),
            at(9, 0) + chrono::Duration::seconds(3599)
        );
        assert_eq!(token.secret().expose(), "eyJ0eXAiOiJKV1Qi...redacted");
    }

    #[test]
    fn v1_strings_and_expires_on() {
        // expires_on 1714560000 = 2024-05-01T10:40:00Z comes before 9:45 + expires_in (10:44:59): the earlier wins.
        let token =
            parse_token_response(&fixture("token_v1_response.json"), at(9, 45)).expect("v1");
        assert_eq!(token.expires_at(), at(10, 40));
        // From a clock past expires_on, expires_in is used instead.
        let token =
            parse_token_response(&fixture("token_v1_response.json"), at(11, 0)).expect("v1");
        assert_eq!(
            token.expires_at(),
            at(11, 0) + chrono::Duration::seconds(3599)
        );
    }

    #[test]
    fn imds_strings() {
        // expires_on 1714642399 = 2024-05-02T09:33:19Z, expires_in 86399.
        let now = at(9, 33) + chrono::Duration::seconds(20);
        let token = parse_token_response(&fixture("token_imds_response.json"), now).expect("imds");
        assert_eq!(
            token.expires_at(),
            Utc.with_ymd_and_hms(2024, 5, 2, 9, 33, 19)
                .single()
                .expect("valid")
        );
    }

    #[test]
    fn decode_errors_do_not_repeat_the_body() {
        let err = parse_token_response(r#"{"token_type":"Bearer","expires_in":"x"}"#, at(9, 0))
            .expect_err("no token");
        assert!(matches!(err, AuthError::Decode { .. }));
        let err = parse_token_response("access_token=SECRETTOKEN", at(9, 0)).expect_err("not json");
        assert!(!format!("{err} {err:?}").contains("SECRETTOKEN"));
    }

    #[test]
    fn refresh_schedule() {
        // One hour: five minutes early.
        assert_eq!(refresh_at(at(9, 0), at(10, 0)), at(9, 55));
        // Ten minutes: at 80 %.
        assert_eq!(refresh_at(at(9, 0), at(9, 10)), at(9, 8));
        assert_eq!(refresh_at(at(9, 0), at(8, 0)), at(9, 0));
    }

    #[test]
    fn entra_errors_keep_code_and_description() {
        let err = error_from_body(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
        );
        assert!(err.to_string().contains("invalid_client"));
        assert!(err.to_string().contains("AADSTS7000215"));
        assert!(err.advice().is_some_and(|a| a.contains("secret")));
        assert!(matches!(
            error_from_body(502, "<html>bad gateway</html>"),
            AuthError::Http { status: 502, .. }
        ));
    }

    #[test]
    fn urls_and_form() {
        let cfg = AuthConfig::ClientSecret {
            tenant_id: "contoso.onmicrosoft.com".into(),
            client_id: "app".into(),
            secret: Secret::new("s3cr3t-value"),
            token_url: None,
            version: EndpointVersion::V1,
        };
        assert_eq!(
            cfg.token_url().as_deref(),
            Some("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/token")
        );
        assert!(!format!("{cfg:?}").contains("s3cr3t-value"));
        let mi = AuthConfig::ManagedIdentity {
            endpoint: None,
            client_id: None,
            identity_header: Some(Secret::new("hdr-value")),
        };
        assert_eq!(mi.token_url().as_deref(), Some(IMDS_ENDPOINT));
        assert!(!format!("{mi:?}").contains("hdr-value"));
        assert!(mi.validate().is_ok());
        let common = AuthConfig::ClientSecret {
            tenant_id: "Common".into(),
            client_id: "app".into(),
            secret: Secret::new("x"),
            token_url: None,
            version: EndpointVersion::V2,
        };
        let err = common.validate().expect_err("common");
        assert!(err.to_string().contains("Partner Center"), "{err}");
        assert_eq!(
            form_encode(&[("scope", "20e940b3/.default"), ("client_secret", "a+b c&d")]),
            "scope=20e940b3%2F.default&client_secret=a%2Bb+c%26d"
        );
    }
}
