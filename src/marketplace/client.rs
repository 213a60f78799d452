//! The marketplace HTTP client: batch usage, the subscription list, the daily usage report.
//!
//! (Over 600 lines only with its unit tests: about 540 of code, one role, the calls and their error mapping.)
//!
//! Its job is to turn every way a call can go wrong into a [`CallError`] the emitter can act on without looking at
//! HTTP: `Transient` (retry later, possibly after `retry_after`) or `Fatal` (alert; retrying cannot help). The one
//! fact the emitter cannot recover later is whether a failed request *may have reached* the marketplace: such a
//! failure is `ambiguous`, and an event whose attempts were ever ambiguous must not be carried into another hour
//! (that could bill it twice). reqwest cannot always tell when the request was written, so only failures to
//! connect (including DNS) count as unambiguous; every other network failure, timeouts included, is ambiguous, as
//! are 500, 502 and 504 answers (a gateway may have forwarded the request). 408, 429 and 503 say the request was
//! not processed.
//!
//! Retries that belong here and not in the emitter:
//! - a 401 invalidates the token, fetches a new one and resends the *same bytes* once; a second 401 is a
//!   transient authentication error (with advice), since a rotated secret may fix it;
//! - a failure to connect is retried a couple of times at once with a short backoff (`backon`), since nothing was
//!   sent; everything else goes back to the emitter, whose retry state survives restarts.
//!
//! Every call sends fresh `x-ms-requestid` and `x-ms-correlationid` GUIDs and returns them (in [`BatchCall`] and
//! in [`CallError`]), because Microsoft support asks for them.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode, Url};
use uuid::Uuid;

use super::advice::excerpt;
use super::auth::{AuthError, TokenProvider};
use super::types::{
    ApiError, BatchUsageResponse, Subscription, SubscriptionPage, UsageEventsDaily,
};
use super::{API_VERSION, error_chain};
use crate::clock::SharedClock;

pub use super::advice::advice;
pub use super::error::{CallError, FatalKind, RequestIds, TransientKind};

/// A batch call that got an answer (HTTP 2xx): per-event results still have to be classified.
#[derive(Debug, Clone)]
pub struct BatchCall {
    /// The parsed answer.
    pub response: BatchUsageResponse,
    /// The ids the call was sent with.
    pub ids: RequestIds,
    /// The HTTP status (200).
    pub status: u16,
}

/// The HTTP client could not be built (TLS backend initialisation).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the marketplace HTTP client: {0}")]
pub struct ClientBuildError(String);

/// Default largest number of subscription pages followed (about 80 000 subscriptions).
pub const DEFAULT_MAX_PAGES: usize = 1000;

/// Talks to the marketplace API.
pub struct MarketplaceClient {
    base_url: String,
    auth: Arc<dyn TokenProvider>,
    clock: SharedClock,
    http: reqwest::Client,
    connect_retries: usize,
    connect_retry_delay: Duration,
    max_pages: usize,
}

impl fmt::Debug for MarketplaceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MarketplaceClient")
            .field("base_url", &self.base_url)
            .field("auth", &self.auth)
            .field("connect_retries", &self.connect_retries)
            .field("max_pages", &self.max_pages)
            .finish_non_exhaustive()
    }
}

/// An HTTP answer, read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl MarketplaceClient {
    /// A client for `base_url` (e.g. `https://marketplaceapi.microsoft.com/api`), with `timeout` per request.
    /// Redirects are not followed (the API does not redirect; following one could carry the token elsewhere).
    pub fn new(
        base_url: impl Into<String>,
        auth: Arc<dyn TokenProvider>,
        clock: SharedClock,
        timeout: Duration,
    ) -> Result<Self, ClientBuildError> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("meterd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientBuildError(error_chain(&e)))?;
        Ok(Self {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            auth,
            clock,
            http,
            connect_retries: 2,
            connect_retry_delay: Duration::from_millis(200),
            max_pages: DEFAULT_MAX_PAGES,
        })
    }

    /// How often a failure to connect is retried within one call (default 2), starting at `delay` (default 200 ms).
    pub fn with_connect_retries(mut self, retries: usize, delay: Duration) -> Self {
        self.connect_retries = retries;
        self.connect_retry_delay = delay;
        self
    }

    /// The most subscription pages followed before giving up (default [`DEFAULT_MAX_PAGES`]).
    pub fn with_max_pages(mut self, max_pages: usize) -> Self {
        self.max_pages = max_pages.max(1);
        self
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /batchUsageEvent` with `body` (from `batch_body`), sent as-is on every try.
    pub async fn batch_usage(&self, body: &str) -> Result<BatchCall, CallError> {
        let mut ids = RequestIds::new();
        let url = format!(
            "{}/batchUsageEvent?api-version={API_VERSION}",
            self.base_url
        );
        let result = self
            .execute(Method::POST, &url, Some(body), &mut ids)
            .await
            .and_then(|answer| {
                let status = answer.status.as_u16();
                serde_json::from_str::<BatchUsageResponse>(&answer.body)
                    .map(|response| BatchCall {
                        response,
                        ids,
                        status,
                    })
                    .map_err(|e| CallError::Transient {
                        kind: TransientKind::Decode,
                        retry_after: None,
                        // The service answered 2xx: it processed the batch, we just cannot read how.
                        ambiguous: true,
                        status: Some(status),
                        message: format!("unreadable batch answer: {e}: {}", excerpt(&answer.body)),
                        ids,
                    })
            });
        match &result {
            Ok(call) => tracing::debug!(
                message = "Batch call answered.",
                results = call.response.result.len(),
                request_id = %ids.request_id,
                correlation_id = %ids.correlation_id,
            ),
            Err(error) => tracing::warn!(
                message = "Batch call failed.",
                %error,
                request_id = %ids.request_id,
                correlation_id = %ids.correlation_id,
            ),
        }
        result
    }

    /// Every SaaS subscription, in every status: `GET /saas/subscriptions/` and each `@nextLink` after it.
    ///
    /// A `@nextLink` is followed exactly as given (it may name another host; the same token works there),
    /// resolved against the current page if relative. It must be `https` unless the base URL itself is plain HTTP
    /// (tests, the emulator). The same link twice, or more than the page limit, is a [`FatalKind::Protocol`] error.
    /// An empty body is an empty page.
    pub async fn list_subscriptions(&self) -> Result<Vec<Subscription>, CallError> {
        let mut ids = RequestIds::new();
        let first = format!(
            "{}/saas/subscriptions/?api-version={API_VERSION}",
            self.base_url
        );
        let base_is_https = self.base_url.starts_with("https:");
        let mut visited: HashSet<String> = HashSet::new();
        let mut subscriptions = Vec::new();
        let mut next = Some(first);
        let mut pages = 0_usize;
        while let Some(url) = next.take() {
            if !visited.insert(url.clone()) {
                return Err(self.protocol_error(ids, format!("@nextLink loops back to {url}")));
            }
            if pages >= self.max_pages {
                return Err(self.protocol_error(
                    ids,
                    format!("more than {} subscription pages", self.max_pages),
                ));
            }
            pages += 1;
            ids.request_id = Uuid::new_v4();
            let answer = self
                .execute(Method::GET, &url, None, &mut ids)
                .await
                .inspect_err(|error| {
                    tracing::warn!(
                        message = "Subscription list call failed.",
                        %error,
                        page = pages,
                        request_id = %ids.request_id,
                        correlation_id = %ids.correlation_id,
                    )
                })?;
            let page: SubscriptionPage = parse_json_or_empty(&answer, ids)?;
            subscriptions.extend(page.subscriptions);
            if let Some(link) = page
                .next_link
                .as_deref()
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                let resolved = Url::parse(&url)
                    .and_then(|current| current.join(link))
                    .map_err(|e| self.protocol_error(ids, format!("invalid @nextLink: {e}")))?;
                if resolved.scheme() != "https" && (base_is_https || resolved.scheme() != "http") {
                    return Err(self.protocol_error(
                        ids,
                        format!("@nextLink with scheme {:?} refused", resolved.scheme()),
                    ));
                }
                // An absolute link is used verbatim; `Url` keeps existing percent-escapes as they are.
                next = Some(if Url::parse(link).is_ok() {
                    link.to_owned()
                } else {
                    resolved.to_string()
                });
            }
        }
        tracing::debug!(
            message = "Listed subscriptions.",
            count = subscriptions.len(),
            pages,
            correlation_id = %ids.correlation_id,
        );
        Ok(subscriptions)
    }

    /// Daily totals the marketplace has recorded: `GET /usageEvents?usageStartDate=..&UsageEndDate=..` (the
    /// capital U is what the API expects).
    pub async fn get_usage_events(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<UsageEventsDaily>, CallError> {
        let mut ids = RequestIds::new();
        let mut url = Url::parse(&format!("{}/usageEvents", self.base_url))
            .map_err(|e| self.protocol_error(ids, format!("invalid base URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("api-version", API_VERSION)
            .append_pair(
                "usageStartDate",
                &start.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            )
            .append_pair(
                "UsageEndDate",
                &end.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            );
        let answer = self
            .execute(Method::GET, url.as_str(), None, &mut ids)
            .await
            .inspect_err(|error| {
                tracing::warn!(
                    message = "Usage report call failed.",
                    %error,
                    request_id = %ids.request_id,
                    correlation_id = %ids.correlation_id,
                )
            })?;
        parse_json_or_empty(&answer, ids)
    }

    fn protocol_error(&self, ids: RequestIds, message: String) -> CallError {
        CallError::Fatal {
            kind: FatalKind::Protocol,
            status: None,
            message,
            advice: None,
            ids,
        }
    }

    /// Sends one request with a token; on 401 invalidates it and resends once. Returns 2xx answers; everything
    /// else as a [`CallError`]. `ids.request_id` is renewed for the resend.
    async fn execute(
        &self,
        method: Method,
        url: &str,
        body: Option<&str>,
        ids: &mut RequestIds,
    ) -> Result<Answer, CallError> {
        let mut refreshed = false;
        loop {
            let token = self.auth.token().await.map_err(|e| auth_error(e, *ids))?;
            let answer = self
                .send(&method, url, body, token.secret().expose(), *ids)
                .await?;
            if answer.status == StatusCode::UNAUTHORIZED {
                if !refreshed {
                    tracing::info!(
                        message = "Marketplace answered 401; refreshing the token and retrying once.",
                        request_id = %ids.request_id,
                        correlation_id = %ids.correlation_id,
                    );
                    refreshed = true;
                    self.auth.invalidate();
                    ids.request_id = Uuid::new_v4();
                    continue;
                }
                return Err(CallError::Transient {
                    kind: TransientKind::Auth,
                    retry_after: None,
                    ambiguous: false,
                    status: Some(401),
                    message: format!(
                        "token refused after a refresh: {}",
                        advice(401, &answer.body)
                    ),
                    ids: *ids,
                });
            }
            if answer.status.is_success() {
                return Ok(answer);
            }
            return Err(status_error(&answer, *ids, self.clock.now()));
        }
    }

    /// One HTTP exchange, retrying failures to connect (nothing was sent) with a short backoff.
    async fn send(
        &self,
        method: &Method,
        url: &str,
        body: Option<&str>,
        token: &str,
        ids: RequestIds,
    ) -> Result<Answer, CallError> {
        let attempt = || async {
            let mut request = self
                .http
                .request(method.clone(), url)
                .bearer_auth(token)
                .header("x-ms-requestid", ids.request_id.to_string())
                .header("x-ms-correlationid", ids.correlation_id.to_string())
                .header("Accept", "application/json");
            if let Some(body) = body {
                request = request
                    .header("Content-Type", "application/json")
                    .body(body.to_owned());
            }
            let response = request.send().await.map_err(SendError::Send)?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response
                .text()
                .await
                .map_err(|e| SendError::Body(status, e))?;
            Ok(Answer {
                status,
                headers,
                body,
            })
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.connect_retry_delay)
            .with_max_times(self.connect_retries)
            .with_jitter();
        attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &SendError| matches!(e, SendError::Send(e) if e.is_connect()))
            .notify(|error, delay| {
                tracing::info!(
                    message = "Cannot connect to the marketplace; retrying.",
                    %error,
                    delay_ms = delay.as_millis() as u64,
                )
            })
            .await
            .map_err(|e| e.into_call_error(ids))
    }
}

/// A failed exchange: before an answer, or while reading its body.
#[derive(Debug)]
enum SendError {
    Send(reqwest::Error),
    Body(StatusCode, reqwest::Error),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Send(e) => f.write_str(&error_chain(e)),
            Self::Body(status, e) => write!(f, "reading the {status} answer: {}", error_chain(e)),
        }
    }
}

impl SendError {
    fn into_call_error(self, ids: RequestIds) -> CallError {
        let message = self.to_string();
        let (error, status) = match &self {
            Self::Send(e) => (e, None),
            Self::Body(status, e) => (e, Some(status.as_u16())),
        };
        // A connect (or DNS) error means nothing was written; anything else may have reached the service.
        let (kind, ambiguous) = if status.is_none() && error.is_connect() {
            (TransientKind::Connect, false)
        } else if error.is_timeout() {
            (TransientKind::Timeout, true)
        } else {
            (TransientKind::Network, true)
        };
        CallError::Transient {
            kind,
            retry_after: None,
            ambiguous,
            status,
            message,
            ids,
        }
    }
}

fn auth_error(error: AuthError, ids: RequestIds) -> CallError {
    let message = match error.advice() {
        Some(advice) => format!("no access token: {error}. {advice}"),
        None => format!("no access token: {error}"),
    };
    CallError::Transient {
        kind: TransientKind::Auth,
        retry_after: None,
        // The marketplace was not called.
        ambiguous: false,
        status: error.status(),
        message,
        ids,
    }
}

/// Maps a non-2xx, non-401 answer.
fn status_error(answer: &Answer, ids: RequestIds, now: DateTime<Utc>) -> CallError {
    let status = answer.status.as_u16();
    let retry_after = answer
        .headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    let details = serde_json::from_str::<ApiError>(&answer.body)
        .ok()
        .map(|e| e.summary())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| excerpt(&answer.body));
    let transient = |kind, ambiguous| CallError::Transient {
        kind,
        retry_after,
        ambiguous,
        status: Some(status),
        message: details.clone(),
        ids,
    };
    let fatal = |kind, advice| CallError::Fatal {
        kind,
        status: Some(status),
        message: details.clone(),
        advice,
        ids,
    };
    match status {
        429 => transient(TransientKind::RateLimited, false),
        408 | 503 => transient(TransientKind::Server, false),
        500..=599 => transient(TransientKind::Server, true),
        400 => fatal(FatalKind::BadRequest, None),
        403 => fatal(FatalKind::Forbidden, Some(advice(403, &answer.body))),
        404 => fatal(
            FatalKind::NotFound,
            Some(
                "Check marketplace.base_url (https://marketplaceapi.microsoft.com/api).".to_owned(),
            ),
        ),
        _ => fatal(FatalKind::Other, None),
    }
}

/// Parses a 2xx JSON body; an empty body (or `null`) is the empty value.
fn parse_json_or_empty<T: serde::de::DeserializeOwned + Default>(
    answer: &Answer,
    ids: RequestIds,
) -> Result<T, CallError> {
    let text = answer.body.trim();
    if text.is_empty() || text == "null" {
        return Ok(T::default());
    }
    serde_json::from_str(text).map_err(|e| CallError::Transient {
        kind: TransientKind::Decode,
        retry_after: None,
        ambiguous: false,
        status: Some(answer.status.as_u16()),
        message: format!("unreadable answer: {e}: {}", excerpt(text)),
        ids,
    })
}

/// Parses `Retry-After`: delta seconds, or an HTTP date (a date in the past is zero).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some(
        at.signed_duration_since(now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = Utc
            .with_ymd_and_hms(2015, 10, 21, 7, 28, 0)
            .single()
            .expect("valid");
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).expect("status"),
            headers: HeaderMap::new(),
            body: body.to_owned(),
        }
    }

    #[test]
    fn statuses_map_to_transient_or_fatal() {
        let ids = RequestIds::new();
        let now = Utc::now();
        let forbidden = status_error(
            &answer(
                403,
                r#"{"message":"Client is not authorized for this usage resource.","code":"Forbidden"}"#,
            ),
            ids,
            now,
        );
        assert!(matches!(
            forbidden,
            CallError::Fatal {
                kind: FatalKind::Forbidden,
                ..
            }
        ));
        assert!(forbidden.to_string().contains("Partner Center"));
        assert!(forbidden.to_string().contains(&ids.request_id.to_string()));
        let bad = status_error(
            &answer(400, r#"{"code":"BadArgument","message":"too many"}"#),
            ids,
            now,
        );
        assert!(matches!(
            bad,
            CallError::Fatal {
                kind: FatalKind::BadRequest,
                ..
            }
        ));
        assert!(bad.to_string().contains("too many"));
        assert!(status_error(&answer(500, ""), ids, now).is_ambiguous());
        assert!(!status_error(&answer(503, ""), ids, now).is_ambiguous());
        assert!(status_error(&answer(408, ""), ids, now).is_transient());
        assert!(!status_error(&answer(418, ""), ids, now).is_transient());
    }
}
