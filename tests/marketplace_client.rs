//! Black-box tests of the marketplace client and token providers against a small scripted axum mock.
//!
//! The mock records every request (host, path and query as received, headers, body bytes) and answers each path
//! from a script of replies (then a default), so each test states exactly what the "marketplace" and "Entra" do.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeZone, Utc};
use meterd::clock::{ManualClock, SharedClock};
use meterd::marketplace::auth::{
    AuthConfig, AuthError, CachedTokenProvider, EndpointVersion, RetryPolicy, TokenProvider,
};
use meterd::marketplace::client::{CallError, FatalKind, MarketplaceClient, TransientKind};
use meterd::marketplace::types::{batch_body, event_json};
use meterd::resource::ResourceRef;
use meterd::secret::Secret;

const CLIENT_SECRET: &str = "client-secret-value-XYZ";
const TOKEN_PREFIX: &str = "tok-secret-";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 9, 0, 0)
        .single()
        .expect("valid")
}

#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Option<Duration>,
}

impl Reply {
    fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: None,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

#[derive(Clone, Debug)]
struct Recorded {
    method: Method,
    host: String,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Recorded {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }
}

#[derive(Default)]
struct MockState {
    log: Vec<Recorded>,
    scripts: HashMap<String, VecDeque<Reply>>,
    defaults: HashMap<String, Reply>,
    tokens_issued: usize,
    token_delay: Option<Duration>,
}

#[derive(Clone)]
struct Mock {
    addr: SocketAddr,
    state: Arc<Mutex<MockState>>,
}

impl Mock {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(MockState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().fallback(handle).with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn script(&self, path: &str, replies: impl IntoIterator<Item = Reply>) {
        self.state
            .lock()
            .expect("lock")
            .scripts
            .entry(path.to_owned())
            .or_default()
            .extend(replies);
    }

    fn default_reply(&self, path: &str, reply: Reply) {
        self.state
            .lock()
            .expect("lock")
            .defaults
            .insert(path.to_owned(), reply);
    }

    fn requests(&self, path: &str) -> Vec<Recorded> {
        self.state
            .lock()
            .expect("lock")
            .log
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    fn tokens_issued(&self) -> usize {
        self.state.lock().expect("lock").tokens_issued
    }
}

async fn handle(
    State(state): State<Arc<Mutex<MockState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let (reply, token_delay) = {
        let mut s = state.lock().expect("lock");
        s.log.push(Recorded {
            method,
            host: headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            path: path.clone(),
            query: uri.query().unwrap_or("").to_owned(),
            headers,
            body,
        });
        let scripted = s.scripts.get_mut(&path).and_then(|q| q.pop_front());
        let reply = match scripted.or_else(|| s.defaults.get(&path).cloned()) {
            Some(reply) => Some(reply),
            None if path == "/token" => {
                s.tokens_issued += 1;
                Some(Reply::new(
                    200,
                    format!(
                        r#"{{"token_type":"Bearer","expires_in":3600,"access_token":"{TOKEN_PREFIX}{}"}}"#,
                        s.tokens_issued
                    ),
                ))
            }
            None => None,
        };
        (reply, s.token_delay)
    };
    if path == "/token"
        && let Some(delay) = token_delay
    {
        tokio::time::sleep(delay).await;
    }
    let Some(reply) = reply else {
        return (StatusCode::NOT_FOUND, "no script").into_response();
    };
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = (
        StatusCode::from_u16(reply.status).expect("status"),
        reply.body,
    )
        .into_response();
    for (name, value) in reply.headers {
        response
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    response
}

fn clock() -> (ManualClock, SharedClock) {
    let manual = ManualClock::new(t0());
    let shared: SharedClock = Arc::new(manual.clone());
    (manual, shared)
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

fn secret_provider(
    mock: &Mock,
    clock: SharedClock,
    version: EndpointVersion,
) -> CachedTokenProvider {
    let config = AuthConfig::ClientSecret {
        tenant_id: "contoso-tenant".into(),
        client_id: "app-id".into(),
        secret: Secret::new(CLIENT_SECRET),
        token_url: Some(mock.url("/token")),
        version,
    };
    CachedTokenProvider::new(config, clock)
        .expect("provider")
        .with_retry(fast_retry())
}

fn client_for(mock: &Mock, timeout: Duration) -> (MarketplaceClient, Arc<CachedTokenProvider>) {
    let (_, clock) = clock();
    let provider = Arc::new(secret_provider(mock, clock.clone(), EndpointVersion::V2));
    let client = MarketplaceClient::new(mock.url("/api"), provider.clone(), clock, timeout)
        .expect("client")
        .with_connect_retries(1, Duration::from_millis(5));
    (client, provider)
}

fn static_client(base: &str, timeout: Duration) -> MarketplaceClient {
    let (_, clock) = clock();
    let provider = CachedTokenProvider::new(
        AuthConfig::StaticToken {
            token: Secret::new(format!("{TOKEN_PREFIX}static")),
        },
        clock.clone(),
    )
    .expect("provider");
    MarketplaceClient::new(base, Arc::new(provider), clock, timeout)
        .expect("client")
        .with_connect_retries(1, Duration::from_millis(5))
}

/// Neither the client secret nor any token may appear in an error's `Display` or `Debug`.
fn assert_clean(what: &dyn std::fmt::Debug, display: &str) {
    let debug = format!("{what:?}");
    for text in [&debug, display] {
        assert!(!text.contains(CLIENT_SECRET), "secret leaked: {text}");
        assert!(!text.contains(TOKEN_PREFIX), "token leaked: {text}");
    }
}

fn assert_clean_call_error(error: &CallError) {
    assert_clean(error, &error.to_string());
}

fn body() -> String {
    let sub = ResourceRef::parse("11111111-2222-3333-4444-555555555555");
    let a = event_json(&sub, "gold", "gb_processed", t0(), 12_500_000);
    let b = event_json(&sub, "gold", "api_calls_1k", t0(), 3_000_000);
    batch_body(&[&a, &b])
}

fn batch_ok() -> Reply {
    Reply::new(200, fixture("batch_response_mixed.json"))
}

#[tokio::test]
async fn token_is_cached_and_refreshed_early() {
    let mock = Mock::start().await;
    let (manual, clock) = clock();
    let provider = secret_provider(&mock, clock, EndpointVersion::V2);

    let first = provider.token().await.expect("token");
    assert_eq!(first.secret().expose(), "tok-secret-1");
    assert_eq!(provider.token().await.expect("cached"), first);
    assert_eq!(mock.tokens_issued(), 1);

    let form = String::from_utf8(mock.requests("/token")[0].body.to_vec()).expect("utf8");
    assert!(form.contains("grant_type=client_credentials"), "{form}");
    assert!(form.contains("client_id=app-id"), "{form}");
    assert!(
        form.contains("scope=20e940b3-4c77-4b0b-9a53-9e16a1b010a7%2F.default"),
        "{form}"
    );
    assert!(!form.contains("62d94f6c"), "{form}");
    assert!(!form.contains("resource="), "{form}");

    // A one-hour token is kept until five minutes before it expires...
    manual.advance(chrono::Duration::minutes(54));
    assert_eq!(provider.token().await.expect("still cached"), first);
    assert_eq!(mock.tokens_issued(), 1);
    // ...and refreshed after that, while it is still valid.
    manual.advance(chrono::Duration::minutes(2));
    let second = provider.token().await.expect("refreshed");
    assert_eq!(second.secret().expose(), "tok-secret-2");
    assert_eq!(mock.tokens_issued(), 2);

    assert_clean(&provider, "");
}

#[tokio::test]
async fn concurrent_callers_share_one_fetch() {
    let mock = Mock::start().await;
    mock.state.lock().expect("lock").token_delay = Some(Duration::from_millis(150));
    let (_, clock) = clock();
    let provider = Arc::new(secret_provider(&mock, clock, EndpointVersion::V2));
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let p = provider.clone();
            tokio::spawn(async move { p.token().await })
        })
        .collect();
    for call in calls {
        let token = call.await.expect("join").expect("token");
        assert_eq!(token.secret().expose(), "tok-secret-1");
    }
    assert_eq!(mock.tokens_issued(), 1);

    provider.invalidate();
    assert_eq!(
        provider.token().await.expect("token").secret().expose(),
        "tok-secret-2"
    );
}

#[tokio::test]
async fn v1_endpoint_uses_resource_and_string_numbers() {
    let mock = Mock::start().await;
    // The fixture's expires_on is 2024-05-01T10:40:00Z.
    mock.script(
        "/token",
        [Reply::new(200, fixture("token_v1_response.json"))],
    );
    let (manual, clock) = clock();
    manual.set(
        Utc.with_ymd_and_hms(2024, 5, 1, 9, 45, 0)
            .single()
            .expect("valid"),
    );
    let provider = secret_provider(&mock, clock, EndpointVersion::V1);
    let token = provider.token().await.expect("token");
    assert_eq!(
        token.expires_at(),
        Utc.with_ymd_and_hms(2024, 5, 1, 10, 40, 0)
            .single()
            .expect("valid")
    );
    let form = String::from_utf8(mock.requests("/token")[0].body.to_vec()).expect("utf8");
    assert!(
        form.contains("resource=20e940b3-4c77-4b0b-9a53-9e16a1b010a7"),
        "{form}"
    );
    assert!(!form.contains("scope="), "{form}");
}

#[tokio::test]
async fn entra_errors_keep_aadsts_and_never_the_secret() {
    let mock = Mock::start().await;
    mock.default_reply(
        "/token",
        Reply::new(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value.","error_codes":[7000215]}"#,
        ),
    );
    let (_, clock) = clock();
    let provider = secret_provider(&mock, clock, EndpointVersion::V2);
    let error = provider.token().await.expect_err("refused");
    assert!(matches!(error, AuthError::Entra { status: 401, .. }));
    assert!(error.to_string().contains("AADSTS7000215"), "{error}");
    assert!(error.advice().is_some_and(|a| a.contains("secret")));
    // 401 from Entra is not retried.
    assert_eq!(mock.requests("/token").len(), 1);
    assert_clean(&error, &error.to_string());
    assert_clean(&provider, "");
}

#[tokio::test]
async fn managed_identity_retries_5xx_and_404_but_not_400() {
    let mock = Mock::start().await;
    mock.script(
        "/msi",
        [
            Reply::new(500, "busy"),
            Reply::new(404, "identity not found yet"),
            Reply::new(200, fixture("token_imds_response.json")),
        ],
    );
    let (_, clock) = clock();
    let config = AuthConfig::ManagedIdentity {
        endpoint: Some(mock.url("/msi")),
        client_id: Some("user-assigned-id".into()),
        identity_header: None,
    };
    let provider = CachedTokenProvider::new(config, clock.clone())
        .expect("provider")
        .with_retry(fast_retry());
    let token = provider.token().await.expect("token after retries");
    // t0 + expires_in (86399 s) = 2024-05-02T08:59:59Z comes before expires_on (2024-05-02T09:33:19Z).
    assert_eq!(token.expires_at(), t0() + chrono::Duration::seconds(86399));
    let requests = mock.requests("/msi");
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].method, Method::GET);
    assert_eq!(requests[0].header("metadata"), "true");
    assert!(requests[0].query.contains("api-version=2018-02-01"));
    assert!(
        requests[0]
            .query
            .contains("resource=20e940b3-4c77-4b0b-9a53-9e16a1b010a7")
    );
    assert!(requests[0].query.contains("client_id=user-assigned-id"));

    mock.script(
        "/msi2",
        [Reply::new(
            400,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        )],
    );
    let config = AuthConfig::ManagedIdentity {
        endpoint: Some(mock.url("/msi2")),
        client_id: None,
        identity_header: Some(Secret::new("identity-header-value")),
    };
    let provider = CachedTokenProvider::new(config, clock)
        .expect("provider")
        .with_retry(fast_retry());
    assert!(!format!("{provider:?}").contains("identity-header-value"));
    let error = provider.token().await.expect_err("400 is final");
    assert!(
        matches!(error, AuthError::Entra { status: 400, .. }),
        "{error:?}"
    );
    let requests = mock.requests("/msi2");
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].header("x-identity-header"),
        "identity-header-value"
    );
    assert!(requests[0].query.contains("api-version=2019-08-01"));
}

#[tokio::test]
async fn batch_sends_headers_and_parses_results() {
    let mock = Mock::start().await;
    mock.script("/api/batchUsageEvent", [batch_ok()]);
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let body = body();
    let call = client.batch_usage(&body).await.expect("answered");
    assert_eq!(call.response.result.len(), 5);
    let requests = mock.requests("/api/batchUsageEvent");
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, Method::POST);
    assert_eq!(r.query, "api-version=2018-08-31");
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("authorization"), "Bearer tok-secret-1");
    assert_eq!(r.header("x-ms-requestid"), call.ids.request_id.to_string());
    assert_eq!(
        r.header("x-ms-correlationid"),
        call.ids.correlation_id.to_string()
    );
    assert_eq!(r.body.as_ref(), body.as_bytes());
}

#[tokio::test]
async fn unauthorized_refreshes_once_and_resends_the_same_bytes() {
    let mock = Mock::start().await;
    mock.script(
        "/api/batchUsageEvent",
        [
            Reply::new(401, r#"{"message":"token expired"}"#),
            batch_ok(),
        ],
    );
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let body = body();
    let call = client
        .batch_usage(&body)
        .await
        .expect("answered after refresh");
    assert_eq!(mock.tokens_issued(), 2);
    let requests = mock.requests("/api/batchUsageEvent");
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].body, requests[1].body);
    assert_eq!(requests[1].body.as_ref(), body.as_bytes());
    assert_eq!(requests[0].header("authorization"), "Bearer tok-secret-1");
    assert_eq!(requests[1].header("authorization"), "Bearer tok-secret-2");
    assert_eq!(
        requests[0].header("x-ms-correlationid"),
        requests[1].header("x-ms-correlationid")
    );
    assert_ne!(
        requests[0].header("x-ms-requestid"),
        requests[1].header("x-ms-requestid")
    );
    assert_eq!(
        requests[1].header("x-ms-requestid"),
        call.ids.request_id.to_string()
    );
}

#[tokio::test]
async fn second_unauthorized_is_a_transient_auth_error() {
    let mock = Mock::start().await;
    mock.default_reply("/api/batchUsageEvent", Reply::new(401, ""));
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let error = client.batch_usage(&body()).await.expect_err("401 twice");
    assert!(
        matches!(
            error,
            CallError::Transient {
                kind: TransientKind::Auth,
                ambiguous: false,
                status: Some(401),
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("clock"), "{error}");
    assert_eq!(mock.requests("/api/batchUsageEvent").len(), 2);
    assert_clean_call_error(&error);
}

#[tokio::test]
async fn token_failure_is_transient_and_not_ambiguous() {
    let mock = Mock::start().await;
    mock.default_reply(
        "/token",
        Reply::new(400, r#"{"error":"unauthorized_client","error_description":"AADSTS700016: Application with identifier 'app-id' was not found in the directory."}"#),
    );
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let error = client.batch_usage(&body()).await.expect_err("no token");
    assert!(matches!(
        error,
        CallError::Transient {
            kind: TransientKind::Auth,
            ambiguous: false,
            ..
        }
    ));
    assert!(error.to_string().contains("Partner Center"), "{error}");
    assert!(mock.requests("/api/batchUsageEvent").is_empty());
    assert_clean_call_error(&error);
}

#[tokio::test]
async fn rate_limited_honours_retry_after() {
    let mock = Mock::start().await;
    mock.script(
        "/api/batchUsageEvent",
        [
            Reply::new(429, "").header("retry-after", "7"),
            // t0 is 2024-05-01T09:00:00Z on the client's clock.
            Reply::new(429, "").header("retry-after", "Wed, 01 May 2024 09:00:30 GMT"),
        ],
    );
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let error = client.batch_usage(&body()).await.expect_err("429");
    assert!(matches!(
        error,
        CallError::Transient {
            kind: TransientKind::RateLimited,
            ambiguous: false,
            ..
        }
    ));
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
    let error = client.batch_usage(&body()).await.expect_err("429");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(30)));
    assert_clean_call_error(&error);
}

#[tokio::test]
async fn server_errors_are_transient() {
    let mock = Mock::start().await;
    mock.script(
        "/api/batchUsageEvent",
        [
            Reply::new(500, "oops"),
            Reply::new(503, "").header("retry-after", "3"),
        ],
    );
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let error = client.batch_usage(&body()).await.expect_err("500");
    assert!(matches!(
        error,
        CallError::Transient {
            kind: TransientKind::Server,
            status: Some(500),
            ..
        }
    ));
    assert!(error.is_ambiguous(), "a 500 may come after the write");
    let error = client.batch_usage(&body()).await.expect_err("503");
    assert!(error.is_transient() && !error.is_ambiguous());
    assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn forbidden_and_bad_request_are_fatal() {
    let mock = Mock::start().await;
    mock.script(
        "/api/batchUsageEvent",
        [
            Reply::new(403, fixture("single_403_forbidden.json")),
            Reply::new(400, fixture("single_400_badargument.json")),
        ],
    );
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let error = client.batch_usage(&body()).await.expect_err("403");
    assert!(matches!(
        error,
        CallError::Fatal {
            kind: FatalKind::Forbidden,
            status: Some(403),
            ..
        }
    ));
    let advice = error.advice().expect("advice");
    assert!(
        advice.contains("Partner Center") && advice.contains("service principal"),
        "{advice}"
    );
    assert_clean_call_error(&error);
    let error = client.batch_usage(&body()).await.expect_err("400");
    assert!(matches!(
        error,
        CallError::Fatal {
            kind: FatalKind::BadRequest,
            ..
        }
    ));
    assert!(
        error.to_string().contains("The resourceId is required."),
        "{error}"
    );
}

#[tokio::test]
async fn timeout_is_ambiguous() {
    let mock = Mock::start().await;
    mock.script(
        "/api/batchUsageEvent",
        [batch_ok().delay(Duration::from_secs(3))],
    );
    let (client, _) = client_for(&mock, Duration::from_millis(300));
    let error = client.batch_usage(&body()).await.expect_err("timeout");
    assert!(
        matches!(
            error,
            CallError::Transient {
                kind: TransientKind::Timeout,
                ambiguous: true,
                ..
            }
        ),
        "{error:?}"
    );
    assert_clean_call_error(&error);
}

#[tokio::test]
async fn dropped_connection_is_ambiguous() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            // Read the request, then hang up without answering.
            let mut buf = vec![0_u8; 65536];
            let _ = socket.read(&mut buf).await;
            drop(socket);
        }
    });
    let client = static_client(&format!("http://{addr}/api"), Duration::from_secs(5));
    let error = client.batch_usage(&body()).await.expect_err("dropped");
    assert!(
        matches!(
            error,
            CallError::Transient {
                ambiguous: true,
                ..
            }
        ),
        "{error:?}"
    );
    assert_ne!(error.status(), Some(200));
    assert_clean_call_error(&error);
}

#[tokio::test]
async fn connection_refused_is_not_ambiguous() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let client = static_client(&format!("http://{addr}/api"), Duration::from_secs(5));
    let error = client.batch_usage(&body()).await.expect_err("refused");
    assert!(
        matches!(
            error,
            CallError::Transient {
                kind: TransientKind::Connect,
                ambiguous: false,
                ..
            }
        ),
        "{error:?}"
    );
    assert_clean_call_error(&error);
}

#[tokio::test]
async fn subscriptions_follow_next_link_to_another_host() {
    let mock = Mock::start().await;
    let raw_query = "continuationToken=%5b%7b%22token%22%3anull%2c%22range%22%3a%7b%22min%22%3a%2205C1C9CD673398%22%7d%7d%5d&api-version=2018-08-31";
    let next = format!(
        "http://localhost:{}/api/saas/subscriptions/?{raw_query}",
        mock.addr.port()
    );
    let page1 = fixture("saas_list_page1.json").replace(
        "https://main.prod.marketplaceapi.azure.com/api/saas/subscriptions/?continuationToken=%5b%7b%22token%22%3anull%2c%22range%22%3a%7b%22min%22%3a%2205C1C9CD673398%22%2c%22max%22%3a%2205C1D9CD673398%22%7d%7d%5d&api-version=2018-08-31",
        &next,
    );
    assert!(page1.contains(&next));
    mock.script(
        "/api/saas/subscriptions/",
        [
            Reply::new(200, page1),
            Reply::new(200, fixture("saas_list_last_page.json")),
        ],
    );
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let subs = client.list_subscriptions().await.expect("all pages");
    let ids: Vec<&str> = subs.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "11111111-2222-3333-4444-555555555555",
            "22222222-2222-3333-4444-555555555555",
            "33333333-2222-3333-4444-555555555555"
        ]
    );
    let requests = mock.requests("/api/saas/subscriptions/");
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].host, mock.addr.to_string());
    assert_eq!(requests[0].query, "api-version=2018-08-31");
    assert_eq!(requests[1].host, format!("localhost:{}", mock.addr.port()));
    // Followed as given: not decoded, not re-encoded.
    assert_eq!(requests[1].query, raw_query);
    assert_eq!(
        requests[0].header("authorization"),
        requests[1].header("authorization")
    );
    assert_eq!(
        requests[0].header("x-ms-correlationid"),
        requests[1].header("x-ms-correlationid")
    );
}

#[tokio::test]
async fn empty_body_means_no_subscriptions() {
    let mock = Mock::start().await;
    mock.script("/api/saas/subscriptions/", [Reply::new(200, "")]);
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    assert!(client.list_subscriptions().await.expect("empty").is_empty());
}

#[tokio::test]
async fn next_link_loop_is_detected() {
    let mock = Mock::start().await;
    let again = mock.url("/api/saas/subscriptions/?page=2&api-version=2018-08-31");
    mock.default_reply(
        "/api/saas/subscriptions/",
        Reply::new(
            200,
            format!(r#"{{"subscriptions":[{{"id":"a","saasSubscriptionStatus":"Subscribed"}}],"@nextLink":"{again}"}}"#),
        ),
    );
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let error = client.list_subscriptions().await.expect_err("loop");
    assert!(
        matches!(
            error,
            CallError::Fatal {
                kind: FatalKind::Protocol,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("loop"), "{error}");
    assert_eq!(mock.requests("/api/saas/subscriptions/").len(), 2);
}

#[tokio::test]
async fn page_limit_stops_endless_lists() {
    let mock = Mock::start().await;
    for page in 2..=5 {
        mock.script(
            "/api/saas/subscriptions/",
            [Reply::new(
                200,
                format!(
                    r#"{{"subscriptions":[],"@nextLink":"{}"}}"#,
                    mock.url(&format!("/api/saas/subscriptions/?page={page}"))
                ),
            )],
        );
    }
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let client = client.with_max_pages(3);
    let error = client
        .list_subscriptions()
        .await
        .expect_err("too many pages");
    assert!(
        matches!(
            error,
            CallError::Fatal {
                kind: FatalKind::Protocol,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(mock.requests("/api/saas/subscriptions/").len(), 3);
}

#[tokio::test]
async fn usage_events_query_uses_capital_u() {
    let mock = Mock::start().await;
    mock.script(
        "/api/usageEvents",
        [Reply::new(200, fixture("get_usage_events_response.json"))],
    );
    let (client, _) = client_for(&mock, Duration::from_secs(5));
    let days = client
        .get_usage_events(t0(), t0() + chrono::Duration::days(1))
        .await
        .expect("report");
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].submitted_quantity, Some(17.0));
    let query = &mock.requests("/api/usageEvents")[0].query;
    assert!(query.contains("api-version=2018-08-31"), "{query}");
    assert!(
        query.contains("usageStartDate=2024-05-01T09%3A00%3A00Z"),
        "{query}"
    );
    assert!(
        query.contains("UsageEndDate=2024-05-02T09%3A00%3A00Z"),
        "{query}"
    );
}

#[tokio::test]
async fn failed_refresh_keeps_serving_the_valid_token() {
    let mock = Mock::start().await;
    let (manual, clock) = clock();
    let provider = secret_provider(&mock, clock, EndpointVersion::V2);
    let first = provider.token().await.expect("token");
    manual.advance(chrono::Duration::minutes(56));
    // The refresh fails: 1 try + 3 retries, all 503.
    mock.script("/token", (0..4).map(|_| Reply::new(503, "down")));
    assert_eq!(provider.token().await.expect("cached"), first);
    assert_eq!(mock.requests("/token").len(), 5);
    // Right after a failed refresh, no new attempt.
    assert_eq!(provider.token().await.expect("cached"), first);
    assert_eq!(mock.requests("/token").len(), 5);
    // Once the token has expired, a new one is fetched (the endpoint is back).
    manual.advance(chrono::Duration::minutes(5));
    let second = provider.token().await.expect("new token");
    assert_eq!(second.secret().expose(), "tok-secret-2");
}
