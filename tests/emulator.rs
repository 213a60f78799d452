//! Black-box tests of `meterd emulator`: plain HTTP against `Emulator::spawn_local`, answers compared with the
//! shapes in `tests/fixtures/` and requests checked against the official OpenAPI schema in `tests/fixtures/spec/`.

use chrono::{DateTime, Duration, DurationRound, Utc};
use meterd::emulator::config::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_STATIC_TOKEN, DEFAULT_SUBSCRIPTION_A,
    DEFAULT_SUBSCRIPTION_B, DEFAULT_SUBSCRIPTION_C, DEFAULT_TENANT, MARKETPLACE_RESOURCE,
};
use meterd::emulator::{
    Emulator, EmulatorConfig, ManagedApp, NextLinkMode, Phase, Plan, ResultOrder, Route,
    Subscription, SubscriptionStatus,
};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;

const API: &str = "api-version=2018-08-31";

struct Harness {
    base: String,
    emulator: Emulator,
    http: reqwest::Client,
}

impl Harness {
    async fn start() -> Self {
        Self::with(EmulatorConfig::default()).await
    }

    async fn with(config: EmulatorConfig) -> Self {
        let (addr, emulator, _handle) =
            Emulator::spawn_local(config).await.expect("spawn emulator");
        Self {
            base: format!("http://{addr}"),
            emulator,
            http: meterd::tls::client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The start of the UTC hour `hours` before the emulator's now.
    fn hour(&self, hours: i64) -> String {
        let t = self
            .emulator
            .now()
            .duration_trunc(Duration::hours(1))
            .expect("trunc")
            - Duration::hours(hours);
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }

    fn event(&self, resource: &str, dimension: &str, hours_ago: i64, quantity: f64) -> Value {
        json!({"resourceId": resource, "quantity": quantity, "dimension": dimension,
               "effectiveStartTime": self.hour(hours_ago), "planId": "gold"})
    }

    async fn batch_raw(&self, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url(&format!("/api/batchUsageEvent?{API}")))
            .bearer_auth(DEFAULT_STATIC_TOKEN)
            .json(body)
            .send()
            .await
    }

    async fn batch(&self, events: Vec<Value>) -> Value {
        let response = self
            .batch_raw(&json!({"request": events}))
            .await
            .expect("batch call");
        assert_eq!(response.status(), 200);
        response.json().await.expect("batch json")
    }

    async fn single(&self, event: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(&format!("/api/usageEvent?{API}")))
            .bearer_auth(DEFAULT_STATIC_TOKEN)
            .json(event)
            .send()
            .await
            .expect("single call");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(DEFAULT_STATIC_TOKEN)
            .send()
            .await
            .expect("get")
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin call");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn form(&self, path: &str, fields: &[(&str, &str)]) -> (u16, Value) {
        let body = fields
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let response = self
            .http
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("token call");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Copies of the reference fixtures and Microsoft's OpenAPI files (see `tests/fixtures/README.md`).
fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(name: &str) -> Value {
    let path = fixtures().join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture json")
}

/// The structure of a JSON value: object keys and leaf types (numbers as "number", arrays by their first item).
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.first().map(shape).into_iter().collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

fn item_with_status<'a>(result: &'a Value, status: &str) -> &'a Value {
    result["result"]
        .as_array()
        .expect("result array")
        .iter()
        .find(|i| i["status"] == status)
        .unwrap_or_else(|| panic!("no {status} in {result}"))
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

// ---------- tokens ----------

#[tokio::test]
async fn token_v2_has_numbers_and_v1_has_strings() {
    let h = Harness::start().await;
    let scope = format!("{MARKETPLACE_RESOURCE}/.default");
    let (status, v2) = h
        .form(
            &format!("/{DEFAULT_TENANT}/oauth2/v2.0/token"),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("scope", &scope),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(shape(&v2), shape(&fixture("token_v2_response.json")));
    assert_eq!(v2["expires_in"], json!(3600));

    let (status, v1) = h
        .form(
            &format!("/{DEFAULT_TENANT}/oauth2/token"),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("resource", MARKETPLACE_RESOURCE),
            ],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(shape(&v1), shape(&fixture("token_v1_response.json")));
    assert_eq!(v1["expires_in"], json!("3600"));
    let expires_on: i64 = v1["expires_on"]
        .as_str()
        .expect("string")
        .parse()
        .expect("number in a string");
    let expected = h.emulator.now().timestamp() + 3600;
    assert!(
        (expected - expires_on).abs() <= 1,
        "expires_on by the emulator clock: {expires_on} vs {expected}"
    );

    for token in [&v2["access_token"], &v1["access_token"]] {
        let token = token.as_str().expect("token");
        let response = h
            .http
            .get(h.url(&format!(
                "/api/saas/subscriptions/{DEFAULT_SUBSCRIPTION_A}?{API}"
            )))
            .bearer_auth(token)
            .send()
            .await
            .expect("call");
        assert_eq!(response.status(), 200);
    }
    assert_eq!(h.emulator.request_count(Route::Token), 2);
}

#[tokio::test]
async fn token_errors_are_entra_shaped() {
    let h = Harness::start().await;
    let scope = format!("{MARKETPLACE_RESOURCE}/.default");
    let v2 = format!("/{DEFAULT_TENANT}/oauth2/v2.0/token");
    let good =
        |secret: &'static str, client: &'static str, scope: &str| -> Vec<(&'static str, String)> {
            vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", client.into()),
                ("client_secret", secret.into()),
                ("scope", scope.into()),
            ]
        };
    let call = |fields: Vec<(&'static str, String)>, path: String| {
        let h = &h;
        async move {
            let borrowed: Vec<(&str, &str)> =
                fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            h.form(&path, &borrowed).await
        }
    };
    let (status, body) = call(good("wrong", DEFAULT_CLIENT_ID, &scope), v2.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7000215]));
    assert!(
        body["error_description"]
            .as_str()
            .expect("description")
            .starts_with("AADSTS7000215: Invalid client secret provided")
    );
    for key in ["timestamp", "trace_id", "correlation_id", "error_uri"] {
        assert!(body.get(key).is_some(), "{key} in {body}");
    }

    let (status, body) = call(
        good(
            DEFAULT_CLIENT_SECRET,
            "12345678-0000-0000-0000-000000000000",
            &scope,
        ),
        v2.clone(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert_eq!(body["error_codes"], json!([700016]));

    let (status, body) = call(
        good(DEFAULT_CLIENT_SECRET, DEFAULT_CLIENT_ID, &scope),
        "/common/oauth2/v2.0/token".into(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert_eq!(body["error_codes"], json!([90002]));

    let stale = "62d94f6c-d599-489b-a797-3e10e42fbe22/.default";
    let (status, body) = call(
        good(DEFAULT_CLIENT_SECRET, DEFAULT_CLIENT_ID, stale),
        v2.clone(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error_codes"], json!([500011]));

    let (status, body) = h
        .form(
            &format!("/{DEFAULT_TENANT}/oauth2/token"),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("resource", "https://management.azure.com/"),
            ],
        )
        .await;
    assert_eq!(
        (status, body["error_codes"].clone()),
        (400, json!([500011]))
    );
}

#[tokio::test]
async fn managed_identity_endpoints() {
    let h = Harness::start().await;
    let path = format!(
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource={MARKETPLACE_RESOURCE}"
    );
    let response = h.http.get(h.url(&path)).send().await.expect("imds");
    assert_eq!(response.status(), 400, "IMDS needs Metadata: true");

    let body: Value = h
        .http
        .get(h.url(&path))
        .header("Metadata", "true")
        .send()
        .await
        .expect("imds")
        .json()
        .await
        .expect("json");
    assert_eq!(shape(&body), shape(&fixture("token_imds_response.json")));
    assert!(body["expires_on"].is_string() && body["expires_in"].is_string());

    let app_service = format!("/msi/token?api-version=2019-08-01&resource={MARKETPLACE_RESOURCE}");
    let response = h.http.get(h.url(&app_service)).send().await.expect("msi");
    assert_eq!(response.status(), 401);
    let body: Value = h
        .http
        .get(h.url(&app_service))
        .header("X-IDENTITY-HEADER", "emulator-identity-header")
        .send()
        .await
        .expect("msi")
        .json()
        .await
        .expect("json");
    assert!(body["expires_on"].is_string());
    let token = body["access_token"].as_str().expect("token");
    let response = h
        .http
        .get(h.url(&format!("/api/saas/subscriptions/?{API}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("list");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn api_needs_a_bearer_token_and_tokens_expire_with_the_emulator_clock() {
    let h = Harness::start().await;
    let url = h.url(&format!("/api/saas/subscriptions/?{API}"));
    let response = h.http.get(&url).send().await.expect("call");
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "Unauthorized");

    let response = h
        .http
        .get(&url)
        .bearer_auth("made-up")
        .send()
        .await
        .expect("call");
    assert_eq!(response.status(), 401);

    let token = h.emulator.issue_token();
    assert_eq!(
        h.http
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("call")
            .status(),
        200
    );

    let (status, clock) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/clock",
            Some(json!({"shift": "2h"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(clock["offsetSeconds"], json!(7200));
    assert_eq!(
        h.http
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("call")
            .status(),
        401,
        "expired"
    );
    assert_eq!(
        h.http
            .get(&url)
            .bearer_auth(DEFAULT_STATIC_TOKEN)
            .send()
            .await
            .expect("call")
            .status(),
        200,
        "static token always valid"
    );
}

// ---------- metering ----------

#[tokio::test]
async fn batch_statuses_have_the_fixture_shapes() {
    let h = Harness::start().await;
    let a = DEFAULT_SUBSCRIPTION_A;
    let first = h.batch(vec![h.event(a, "api_calls", 2, 2.0)]).await;
    assert_eq!(first["count"], 1);

    let result = h
        .batch(vec![
            h.event(a, "gb_processed", 2, 12.5),
            h.event(a, "api_calls", 2, 3.0),
            h.event(
                "99999999-2222-3333-4444-555555555555",
                "gb_processed",
                2,
                1.0,
            ),
            json!({"resourceId": a, "quantity": 7, "dimension": "gb_processed",
                   "effectiveStartTime": h.hour(30), "planId": "gold"}),
            h.event(a, "no_such_dimension", 2, 1.0),
        ])
        .await;
    let expected = fixture("batch_response_mixed.json");
    assert_eq!(
        shape(&result),
        shape(&json!({"count": 5, "result": [expected["result"][0].clone()]}))
    );
    assert_eq!(result["count"], 5);
    for status in [
        "Accepted",
        "Duplicate",
        "ResourceNotFound",
        "Expired",
        "InvalidDimension",
    ] {
        assert_eq!(
            shape(item_with_status(&result, status)),
            shape(item_with_status(&expected, status)),
            "{status}"
        );
    }
    let duplicate = item_with_status(&result, "Duplicate");
    assert_eq!(duplicate["quantity"], json!(3.0), "echoes what was sent");
    assert_eq!(
        duplicate["error"]["additionalInfo"]["acceptedMessage"]["quantity"],
        json!(2),
        "the original"
    );
    assert_eq!(
        item_with_status(&result, "Expired")["error"]["details"][0]["target"],
        "effectiveStartTime"
    );

    let more = h
        .batch(vec![
            h.event(DEFAULT_SUBSCRIPTION_C, "api_calls", 1, 1.0),
            h.event(a, "api_calls", 1, 0.0),
            json!({"resourceId": a, "resourceUri": "/subscriptions/x", "quantity": 1, "dimension": "api_calls",
                   "effectiveStartTime": h.hour(1), "planId": "gold"}),
            json!({"resourceId": a, "quantity": 1, "dimension": "api_calls",
                   "effectiveStartTime": h.hour(1).replace('Z', "+00:00"), "planId": "gold"}),
            h.event(a, "api_calls", -2, 1.0),
        ])
        .await;
    let statuses: Vec<&str> = more["result"]
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        [
            "ResourceNotActive",
            "InvalidQuantity",
            "BadArgument",
            "BadArgument",
            "Expired"
        ]
    );
    // Only accepted events are recorded.
    assert_eq!(h.emulator.accepted_events().len(), 2);
    assert_eq!(h.emulator.received_events().len(), 11);
}

#[tokio::test]
async fn batch_whole_call_errors_are_400_bad_argument() {
    let h = Harness::start().await;
    let bad_shape = shape(&fixture("single_400_badargument.json"));
    let no_version = h
        .http
        .post(h.url("/api/batchUsageEvent"))
        .bearer_auth(DEFAULT_STATIC_TOKEN)
        .json(&json!({"request": [h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 1.0)]}))
        .send()
        .await
        .expect("call");
    assert_eq!(no_version.status(), 400);
    assert_eq!(shape(&no_version.json().await.expect("json")), bad_shape);

    let one = h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 1.0);
    for body in [
        json!([one.clone()]),
        json!({"request": []}),
        json!({"request": vec![one.clone(); 26]}),
    ] {
        let response = h.batch_raw(&body).await.expect("call");
        assert_eq!(response.status(), 400, "{body}");
        assert_eq!(shape(&response.json().await.expect("json")), bad_shape);
    }
    let malformed = h
        .http
        .post(h.url(&format!("/api/batchUsageEvent?{API}")))
        .bearer_auth(DEFAULT_STATIC_TOKEN)
        .body("{\"request\": [")
        .send()
        .await
        .expect("call");
    assert_eq!(malformed.status(), 400);
    assert!(h.emulator.received_events().is_empty());
    // 25 is fine.
    let events: Vec<Value> = (0..25)
        .map(|i| h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", i % 20 + 1, 1.0))
        .collect();
    assert_eq!(h.batch(events).await["count"], 25);
}

#[tokio::test]
async fn single_event_answers() {
    let h = Harness::start().await;
    let event = h.event(DEFAULT_SUBSCRIPTION_A, "gb_processed", 1, 12.5);
    let (status, accepted) = h.single(&event).await;
    assert_eq!(status, 200);
    assert_eq!(accepted["status"], "Accepted");
    assert!(uuid::Uuid::parse_str(accepted["usageEventId"].as_str().expect("id")).is_ok());

    let mut again = event.clone();
    again["quantity"] = json!(99);
    let (status, conflict) = h.single(&again).await;
    assert_eq!(status, 409);
    let expected = fixture("single_409_duplicate.json");
    assert_eq!(shape(&conflict), shape(&expected));
    assert_eq!(
        conflict["additionalInfo"]["acceptedMessage"]["quantity"],
        json!(12.5)
    );
    assert_eq!(
        conflict["additionalInfo"]["acceptedMessage"]["usageEventId"],
        accepted["usageEventId"]
    );

    let (status, bad) = h.single(&json!({"quantity": 1, "dimension": "api_calls", "effectiveStartTime": h.hour(1), "planId": "gold"})).await;
    assert_eq!(status, 400);
    assert_eq!(bad, fixture("single_400_badargument.json"));

    let (status, expired) = h
        .single(&h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 26, 1.0))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        shape(&expired),
        shape(&fixture("single_400_badargument.json"))
    );

    h.emulator.forbid_resource(DEFAULT_SUBSCRIPTION_B);
    let (status, forbidden) = h
        .single(&h.event(DEFAULT_SUBSCRIPTION_B, "api_calls", 1, 1.0))
        .await;
    assert_eq!(status, 403);
    assert_eq!(forbidden, fixture("single_403_forbidden.json"));
    let batch = h
        .batch(vec![h.event(DEFAULT_SUBSCRIPTION_B, "api_calls", 1, 1.0)])
        .await;
    assert_eq!(batch["result"][0]["status"], "ResourceNotAuthorized");
}

#[tokio::test]
async fn usage_events_daily_totals() {
    let h = Harness::start().await;
    h.emulator.set_clock(
        "2026-03-10T12:30:00Z"
            .parse::<DateTime<Utc>>()
            .expect("time"),
    );
    let ev = |hour: &str, dim: &str, q: f64| {
        json!({"resourceId": DEFAULT_SUBSCRIPTION_A, "quantity": q, "dimension": dim,
               "effectiveStartTime": format!("2026-03-10T{hour}:00:00Z"), "planId": "gold"})
    };
    h.batch(vec![
        ev("09", "gb_processed", 10.0),
        ev("10", "gb_processed", 7.0),
        ev("10", "api_calls", 1.0),
    ])
    .await;
    let rows: Value = h
        .get(&format!(
            "/api/usageEvents?{API}&usageStartDate=2026-03-10&UsageEndDate=2026-03-10"
        ))
        .await
        .json()
        .await
        .expect("json");
    let rows = rows.as_array().expect("array").clone();
    assert_eq!(rows.len(), 2);
    let fixture_row = fixture("get_usage_events_response.json")[0].clone();
    let gb = rows
        .iter()
        .find(|r| r["dimension"] == "gb_processed")
        .expect("gb row");
    assert_eq!(shape(gb), shape(&fixture_row));
    assert_eq!(gb["submittedQuantity"], json!(17.0));
    assert_eq!(gb["submittedCount"], json!(2));
    assert_eq!(gb["usageDate"], "2026-03-10T00:00:00Z");
    assert_eq!(gb["usageResourceId"], DEFAULT_SUBSCRIPTION_A);

    // Lower-case usageEndDate and a filter; a range before the events is empty.
    let rows: Value = h
        .get(&format!("/api/usageEvents?{API}&usageStartDate=2026-03-10T00:00&usageEndDate=2026-03-11&dimension=api_calls"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(rows.as_array().map(Vec::len), Some(1));
    let rows: Value = h
        .get(&format!(
            "/api/usageEvents?{API}&usageStartDate=2026-03-01&UsageEndDate=2026-03-09"
        ))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(rows, json!([]));
    assert_eq!(
        h.get(&format!("/api/usageEvents?{API}")).await.status(),
        400
    );
}

#[tokio::test]
async fn batch_results_can_come_back_reversed() {
    let h = Harness::with(EmulatorConfig {
        result_order: ResultOrder::Reversed,
        ..EmulatorConfig::default()
    })
    .await;
    let result = h
        .batch(vec![
            h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 1.0),
            h.event(DEFAULT_SUBSCRIPTION_B, "api_calls", 1, 2.0),
        ])
        .await;
    assert_eq!(result["result"][0]["resourceId"], DEFAULT_SUBSCRIPTION_B);
}

#[tokio::test]
async fn managed_apps_by_resource_uri() {
    let h = Harness::start().await;
    let request = fixture("batch_request_managed_app.json");
    let uri = request["request"][0]["resourceUri"]
        .as_str()
        .expect("uri")
        .to_owned();
    let mut event = request["request"][0].clone();
    event["effectiveStartTime"] = json!(h.hour(1));
    assert_eq!(
        h.batch(vec![event.clone()]).await["result"][0]["status"],
        "ResourceNotFound"
    );
    h.emulator.add_managed_app(ManagedApp {
        resource_uri: uri,
        resource_usage_id: None,
        offer_id: "contoso-app".into(),
    });
    h.emulator.add_plan(Plan {
        id: "standard".into(),
        dimensions: None,
    });
    let result = h.batch(vec![event]).await;
    assert_eq!(result["result"][0]["status"], "Accepted");
    assert!(result["result"][0].get("resourceId").is_none());
}

// ---------- subscriptions ----------

#[tokio::test]
async fn subscription_list_pages_through_a_foreign_host_next_link() {
    let mut config = EmulatorConfig {
        next_link: NextLinkMode::ForeignHost,
        page_size: 2,
        ..EmulatorConfig::default()
    };
    for i in 4..=5 {
        config.subscriptions.push(Subscription::new(
            format!("{i}{i}{i}{i}{i}{i}{i}{i}-0000-4000-8000-000000000000"),
            "gold",
        ));
    }
    let h = Harness::with(config).await;
    let mut url = h.url(&format!("/api/saas/subscriptions/?{API}"));
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let response = h
            .http
            .get(&url)
            .bearer_auth(DEFAULT_STATIC_TOKEN)
            .send()
            .await
            .expect("page");
        assert_eq!(response.status(), 200, "{url}");
        let page: Value = response.json().await.expect("json");
        pages += 1;
        if pages == 1 {
            let expected = fixture("saas_list_page1.json");
            assert_eq!(
                keys(&page["subscriptions"][0]),
                keys(&expected["subscriptions"][0])
            );
            assert_eq!(
                shape(&page["subscriptions"][0]["term"]),
                shape(&expected["subscriptions"][0]["term"])
            );
        }
        ids.extend(
            page["subscriptions"]
                .as_array()
                .expect("array")
                .iter()
                .map(|s| s["id"].as_str().unwrap_or("").to_owned()),
        );
        match page.get("@nextLink").and_then(Value::as_str) {
            Some(next) if !next.is_empty() => {
                assert!(
                    next.starts_with("http://localhost:"),
                    "foreign host: {next}"
                );
                assert!(
                    next.contains("continuationToken=%5b%7b"),
                    "encoded once: {next}"
                );
                url = next.to_owned();
            }
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 5);
    assert_eq!(ids[0], DEFAULT_SUBSCRIPTION_A);
    assert_eq!(h.emulator.request_count(Route::Subscriptions), 3);
}

#[tokio::test]
async fn subscription_list_without_subscriptions_is_an_empty_body() {
    let h = Harness::with(EmulatorConfig {
        subscriptions: Vec::new(),
        ..EmulatorConfig::default()
    })
    .await;
    let response = h.get(&format!("/api/saas/subscriptions/?{API}")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.expect("body").len(), 0);
}

#[tokio::test]
async fn one_subscription_and_admin_status_changes() {
    let h = Harness::start().await;
    let one: Value = h
        .get(&format!(
            "/api/saas/subscriptions/{DEFAULT_SUBSCRIPTION_B}?{API}"
        ))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(one["saasSubscriptionStatus"], "Subscribed");
    assert_eq!(
        h.get(&format!(
            "/api/saas/subscriptions/99999999-0000-0000-0000-000000000000?{API}"
        ))
        .await
        .status(),
        404
    );

    let (status, changed) = h
        .admin(
            reqwest::Method::POST,
            &format!("/emulator/subscriptions/{DEFAULT_SUBSCRIPTION_B}/suspend"),
            None,
        )
        .await;
    assert_eq!(
        (status, changed["saasSubscriptionStatus"].as_str()),
        (200, Some("Suspended"))
    );
    assert_eq!(
        h.batch(vec![h.event(DEFAULT_SUBSCRIPTION_B, "api_calls", 1, 1.0)])
            .await["result"][0]["status"],
        "ResourceNotActive"
    );
    let (status, _) = h
        .admin(
            reqwest::Method::POST,
            &format!("/emulator/subscriptions/{DEFAULT_SUBSCRIPTION_B}/status"),
            Some(json!({"status": "Subscribed"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        h.batch(vec![h.event(DEFAULT_SUBSCRIPTION_B, "api_calls", 1, 1.0)])
            .await["result"][0]["status"],
        "Accepted"
    );

    let new_id = "55555555-5555-4555-8555-555555555555";
    let (status, _) = h
        .admin(reqwest::Method::POST, "/emulator/subscriptions",
               Some(json!({"id": new_id, "planId": "platinum", "status": "PendingFulfillmentStart", "offerId": "x-preview"})))
        .await;
    assert_eq!(status, 200);
    let (status, _) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/plans",
            Some(json!({"id": "platinum", "dimensions": ["seats"]})),
        )
        .await;
    assert_eq!(status, 200);
    let mut event = json!({"resourceId": new_id, "quantity": 1, "dimension": "seats", "effectiveStartTime": h.hour(1), "planId": "platinum"});
    assert_eq!(
        h.batch(vec![event.clone()]).await["result"][0]["status"],
        "ResourceNotActive"
    );
    assert!(
        h.emulator
            .set_status(new_id, SubscriptionStatus::Subscribed)
    );
    assert_eq!(
        h.batch(vec![event.clone()]).await["result"][0]["status"],
        "Accepted"
    );
    event["dimension"] = json!("api_calls");
    assert_eq!(
        h.batch(vec![event]).await["result"][0]["status"],
        "InvalidDimension"
    );

    let (status, _) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/subscriptions/nope/suspend",
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = h
        .admin(
            reqwest::Method::POST,
            &format!("/emulator/subscriptions/{new_id}/explode"),
            None,
        )
        .await;
    assert_eq!(status, 400);
}

// ---------- faults ----------

#[tokio::test]
async fn failures_with_retry_after_then_success() {
    let h = Harness::start().await;
    let (status, _) = h
        .admin(reqwest::Method::POST, "/emulator/faults",
               Some(json!([{"route": "batchUsageEvent", "kind": "fail", "status": 429, "retryAfter": 30},
                           {"route": "batchUsageEvent", "kind": "fail", "status": 503, "times": 2}])))
        .await;
    assert_eq!(status, 200);
    let body = json!({"request": [h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 4.0)]});
    let first = h.batch_raw(&body).await.expect("call");
    assert_eq!(first.status(), 429);
    assert_eq!(
        first
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("30")
    );
    assert_eq!(h.batch_raw(&body).await.expect("call").status(), 503);
    assert_eq!(h.batch_raw(&body).await.expect("call").status(), 503);
    let ok = h.batch_raw(&body).await.expect("call");
    assert_eq!(ok.status(), 200);
    assert_eq!(h.emulator.accepted_events().len(), 1);

    // Other routes and the token route are scripted separately; `*` hits all.
    h.emulator.fail_next(Route::Token, 1, 500, None);
    let (status, _) = h
        .form(&format!("/{DEFAULT_TENANT}/oauth2/v2.0/token"), &[])
        .await;
    assert_eq!(status, 500);
    h.admin(
        reqwest::Method::POST,
        "/emulator/faults",
        Some(json!({"kind": "fail", "status": 401})),
    )
    .await;
    assert_eq!(
        h.get(&format!("/api/saas/subscriptions/?{API}"))
            .await
            .status(),
        401
    );
    assert_eq!(
        h.get(&format!("/api/saas/subscriptions/?{API}"))
            .await
            .status(),
        200
    );

    let (_, stats) = h.admin(reqwest::Method::GET, "/emulator/stats", None).await;
    assert_eq!(stats["requests"]["batchUsageEvent"], 4);
    assert_eq!(stats["requests"]["subscriptions"], 2);
    assert_eq!(stats["eventsAccepted"], 1);
    let (status, _) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/faults",
            Some(json!({"route": "nope", "kind": "fail", "status": 500})),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn delay_after_processing_records_before_answering() {
    let h = Harness::start().await;
    meterd::tls::install_crypto_provider();
    let quick = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .expect("client");
    let body = json!({"request": [h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 4.0)]});
    let send = || {
        quick
            .post(h.url(&format!("/api/batchUsageEvent?{API}")))
            .bearer_auth(DEFAULT_STATIC_TOKEN)
            .json(&body)
            .send()
    };

    h.emulator.delay_next(
        Route::BatchUsageEvent,
        1,
        std::time::Duration::from_millis(1500),
        Phase::Before,
    );
    let error = send().await.expect_err("times out");
    assert!(error.is_timeout());
    assert!(
        h.emulator.accepted_events().is_empty(),
        "delay before: nothing recorded yet"
    );

    h.admin(
        reqwest::Method::POST,
        "/emulator/faults",
        Some(
            json!({"route": "batchUsageEvent", "kind": "delay", "delayMs": 1500, "phase": "after"}),
        ),
    )
    .await;
    let error = send().await.expect_err("times out");
    assert!(error.is_timeout());
    assert_eq!(
        h.emulator.accepted_events().len(),
        1,
        "delay after: recorded, answer late"
    );

    // A short delay is just slow.
    h.emulator.delay_next(
        Route::BatchUsageEvent,
        1,
        std::time::Duration::from_millis(100),
        Phase::Before,
    );
    let started = std::time::Instant::now();
    let result = h
        .batch(vec![h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 4.0)])
        .await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(100));
    assert_eq!(result["result"][0]["status"], "Duplicate");
}

#[tokio::test]
async fn dropped_connections_give_no_http_status() {
    let h = Harness::start().await;
    let body = json!({"request": [h.event(DEFAULT_SUBSCRIPTION_A, "gb_processed", 1, 4.0)]});

    h.emulator
        .drop_next(Route::BatchUsageEvent, 1, Phase::Before);
    let error = h.batch_raw(&body).await.expect_err("connection dropped");
    assert!(error.status().is_none() && !error.is_timeout(), "{error:?}");
    assert!(
        h.emulator.accepted_events().is_empty(),
        "dropped before processing"
    );

    h.admin(
        reqwest::Method::POST,
        "/emulator/faults",
        Some(json!({"route": "batchUsageEvent", "kind": "drop", "phase": "after"})),
    )
    .await;
    let error = h.batch_raw(&body).await.expect_err("connection dropped");
    assert!(error.status().is_none(), "{error:?}");
    assert_eq!(
        h.emulator.accepted_events().len(),
        1,
        "recorded, answer lost"
    );

    // The resend after the crash: Duplicate with the same quantity.
    let result = h.batch(vec![body["request"][0].clone()]).await;
    assert_eq!(result["result"][0]["status"], "Duplicate");
    assert_eq!(
        result["result"][0]["error"]["additionalInfo"]["acceptedMessage"]["quantity"],
        json!(4)
    );

    h.emulator.drop_next(Route::Token, 1, Phase::Before);
    let error = h
        .http
        .post(h.url(&format!("/{DEFAULT_TENANT}/oauth2/v2.0/token")))
        .send()
        .await
        .expect_err("dropped");
    assert!(error.status().is_none());
}

#[tokio::test]
async fn latency_and_per_event_errors() {
    let h = Harness::start().await;
    let (status, _) = h
        .admin(
            reqwest::Method::PUT,
            "/emulator/faults/latency",
            Some(json!({"ms": 200})),
        )
        .await;
    assert_eq!(status, 200);
    let started = std::time::Instant::now();
    h.get(&format!("/api/saas/subscriptions/?{API}")).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    h.emulator.set_latency(std::time::Duration::ZERO);

    h.admin(
        reqwest::Method::POST,
        "/emulator/faults/event-errors",
        Some(json!({"count": 1})),
    )
    .await;
    let result = h
        .batch(vec![
            h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 1.0),
            h.event(DEFAULT_SUBSCRIPTION_B, "api_calls", 1, 1.0),
        ])
        .await;
    assert_eq!(result["result"][0]["status"], "Error");
    assert_eq!(result["result"][1]["status"], "Accepted");
    // Retrying the failed one succeeds.
    let result = h
        .batch(vec![h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 1.0)])
        .await;
    assert_eq!(result["result"][0]["status"], "Accepted");

    h.admin(
        reqwest::Method::POST,
        "/emulator/faults/forbidden",
        Some(json!({"resource": DEFAULT_SUBSCRIPTION_A})),
    )
    .await;
    let result = h
        .batch(vec![h.event(
            DEFAULT_SUBSCRIPTION_A,
            "gb_processed",
            1,
            1.0,
        )])
        .await;
    assert_eq!(result["result"][0]["status"], "ResourceNotAuthorized");
    h.admin(reqwest::Method::DELETE, "/emulator/faults/forbidden", None)
        .await;
    let result = h
        .batch(vec![h.event(
            DEFAULT_SUBSCRIPTION_A,
            "gb_processed",
            1,
            1.0,
        )])
        .await;
    assert_eq!(result["result"][0]["status"], "Accepted");
}

#[tokio::test]
async fn bare_router_cannot_drop_connections_and_says_so() {
    let emulator = Emulator::new(EmulatorConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = emulator.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    emulator.drop_next(Route::Subscriptions, 1, Phase::Before);
    let response = meterd::tls::client()
        .get(format!("http://{addr}/api/saas/subscriptions/?{API}"))
        .bearer_auth(DEFAULT_STATIC_TOKEN)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), 502);
}

// ---------- admin, ids, clock ----------

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let h = Harness::start().await;
    let id = "6f1e4c1a-0000-4000-8000-000000000001";
    let response = h
        .http
        .get(h.url(&format!("/api/saas/subscriptions/?{API}")))
        .bearer_auth(DEFAULT_STATIC_TOKEN)
        .header("x-ms-requestid", id)
        .header("x-ms-correlationid", "corr-1")
        .send()
        .await
        .expect("call");
    assert_eq!(response.headers()["x-ms-requestid"], id);
    assert_eq!(response.headers()["x-ms-correlationid"], "corr-1");
    let response = h.get(&format!("/api/saas/subscriptions/?{API}")).await;
    let generated = response.headers()["x-ms-requestid"]
        .to_str()
        .expect("ascii");
    assert!(uuid::Uuid::parse_str(generated).is_ok());
}

#[tokio::test]
async fn admin_clock_events_and_reset() {
    let h = Harness::start().await;
    let (status, clock) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/clock",
            Some(json!({"set": "2026-03-10T10:05:00Z"})),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        clock["now"]
            .as_str()
            .expect("now")
            .starts_with("2026-03-10T10:05")
    );
    let (_, clock) = h.admin(reqwest::Method::GET, "/emulator/clock", None).await;
    assert!(
        clock["now"]
            .as_str()
            .expect("now")
            .starts_with("2026-03-10T10:0")
    );
    let (status, _) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/clock",
            Some(json!({"shift": "soon"})),
        )
        .await;
    assert_eq!(status, 400);

    h.batch(vec![
        h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 1.0),
        h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 2.0),
    ])
    .await;
    let (_, all) = h
        .admin(reqwest::Method::GET, "/emulator/events", None)
        .await;
    let statuses: Vec<&str> = all
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["Accepted", "Duplicate"]);
    assert_eq!(all[1]["event"]["quantity"], json!(2.0));
    let (_, accepted) = h
        .admin(reqwest::Method::GET, "/emulator/events/accepted", None)
        .await;
    assert_eq!(accepted.as_array().map(Vec::len), Some(1));
    assert_eq!(accepted[0]["effectiveStartTime"], "2026-03-10T09:00:00Z");

    let (status, _) = h
        .admin(reqwest::Method::POST, "/emulator/reset", None)
        .await;
    assert_eq!(status, 200);
    assert!(h.emulator.accepted_events().is_empty());
    assert!(
        (h.emulator.now() - Utc::now()).num_seconds().abs() < 5,
        "clock offset reset"
    );
    let (_, subs) = h
        .admin(reqwest::Method::GET, "/emulator/subscriptions", None)
        .await;
    assert_eq!(subs.as_array().map(Vec::len), Some(3));
}

// ---------- seeds and arguments ----------

#[test]
fn seed_files_and_arguments() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: meterd::emulator::EmulatorArgs,
    }
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/emulator-seed.example.toml");
    let cli = Cli::parse_from([
        "emulator",
        "--seed",
        example.to_str().expect("utf-8"),
        "--page-size",
        "1",
        "--token-lifetime",
        "5m",
        "--foreign-next-link",
        "--result-order",
        "shuffled",
    ]);
    let config = cli.args.config().expect("config");
    assert_eq!(config.page_size, 1);
    assert_eq!(config.token_lifetime, std::time::Duration::from_secs(300));
    assert_eq!(config.next_link, NextLinkMode::ForeignHost);
    assert_eq!(config.result_order, ResultOrder::Shuffled);
    assert_eq!(
        config.subscriptions[1].saas_subscription_status,
        SubscriptionStatus::PendingFulfillmentStart
    );
    assert_eq!(config.managed_apps.len(), 1);
    assert_eq!(Cli::parse_from(["emulator"]).args.listen, "127.0.0.1:8788");

    let dir = tempfile::tempdir().expect("tempdir");
    let json_seed = dir.path().join("seed.json");
    std::fs::write(&json_seed, r#"{"page_size": 7, "plans": [{"id": "any"}],
        "subscriptions": [{"id": "66666666-6666-4666-8666-666666666666", "planId": "any", "status": "Suspended"}]}"#)
        .expect("write");
    let emulator = Emulator::from_seed_file(&json_seed).expect("json seed");
    assert_eq!(
        emulator.subscriptions()[0].saas_subscription_status,
        SubscriptionStatus::Suspended
    );
    let bad = dir.path().join("seed.yaml");
    std::fs::write(&bad, "x").expect("write");
    assert!(Emulator::from_seed_file(&bad).is_err());
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "page_sise = 3").expect("write");
    assert!(
        Emulator::from_seed_file(&typo).is_err(),
        "unknown keys are refused"
    );
}

// ---------- the official request schema ----------

/// A small checker of the OpenAPI subset the metering spec uses: `$ref`, `type`, `required`, `properties`,
/// `items`, `minItems`/`maxItems`, `enum`, and the `uuid` / `date-time` formats.
fn check(spec: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or_default();
        return check(
            spec,
            &spec["components"]["schemas"][name],
            value,
            path,
            errors,
        );
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("number") => value.is_number(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        errors.push(format!("{path}: expected {ty:?}, got {value}"));
        return;
    }
    if let (Some(format), Some(s)) = (schema.get("format").and_then(Value::as_str), value.as_str())
    {
        let ok = match format {
            "uuid" => uuid::Uuid::parse_str(s).is_ok(),
            "date-time" => DateTime::parse_from_rfc3339(s).is_ok(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{path}: {s:?} is not a {format}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} not in {allowed:?}"));
    }
    for field in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = field.as_str().unwrap_or_default();
        if value.get(field).is_none() {
            errors.push(format!("{path}: missing required {field}"));
        }
    }
    if let (Some(properties), Some(object)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object(),
    ) {
        for (name, sub) in properties {
            if let Some(v) = object.get(name) {
                check(spec, sub, v, &format!("{path}.{name}"), errors);
            }
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as u64;
        if schema
            .get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
        {
            errors.push(format!("{path}: fewer than minItems"));
        }
        if schema
            .get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| len > m)
        {
            errors.push(format!("{path}: more than maxItems"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(spec, item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
}

fn request_schema(spec: &Value, route: &str) -> Value {
    spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"].clone()
}

#[tokio::test]
async fn accepted_requests_validate_against_the_official_request_schema() {
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("spec/meteringapi.v1.json")).expect("spec"),
    )
    .expect("spec json");
    let batch_schema = request_schema(&spec, "/batchUsageEvent");
    let single_schema = request_schema(&spec, "/usageEvent");
    assert_eq!(batch_schema["$ref"], "#/components/schemas/BatchUsageEvent");

    // The checker is not vacuous.
    let mut errors = Vec::new();
    check(
        &spec,
        &batch_schema,
        &json!({"request": [{"resourceId": "not-a-guid", "quantity": "1"}]}),
        "$",
        &mut errors,
    );
    check(
        &spec,
        &batch_schema,
        &json!({"request": []}),
        "$",
        &mut errors,
    );
    assert_eq!(errors.len(), 3, "{errors:?}");

    let h = Harness::start().await;
    h.emulator.add_managed_app(ManagedApp {
        resource_uri: fixture("batch_request_managed_app.json")["request"][0]["resourceUri"]
            .as_str()
            .expect("uri")
            .into(),
        resource_usage_id: None,
        offer_id: "contoso-app".into(),
    });
    h.emulator.add_plan(Plan {
        id: "standard".into(),
        dimensions: None,
    });
    let mut saas = fixture("batch_request_saas.json");
    for event in saas["request"].as_array_mut().expect("array") {
        event["resourceId"] = json!(DEFAULT_SUBSCRIPTION_A);
        event["effectiveStartTime"] = json!(h.hour(1));
        if event["dimension"] == "api_calls_1k" {
            event["dimension"] = json!("api_calls");
        }
    }
    let mut managed = fixture("batch_request_managed_app.json");
    managed["request"][0]["effectiveStartTime"] = json!(h.hour(1));
    for body in [&saas, &managed] {
        let result = h
            .batch(body["request"].as_array().expect("array").clone())
            .await;
        assert!(
            result["result"]
                .as_array()
                .expect("array")
                .iter()
                .all(|i| i["status"] == "Accepted"),
            "{result}"
        );
        let mut errors = Vec::new();
        check(&spec, &batch_schema, body, "$", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }
    let (status, _) = h
        .single(&h.event(DEFAULT_SUBSCRIPTION_B, "api_calls", 1, 1.0))
        .await;
    assert_eq!(status, 200);

    // Every event the emulator accepted, as it was received, is valid under the spec (single and in a batch).
    let received = h.emulator.received_events();
    assert_eq!(received.len(), 4);
    for event in received.iter().filter(|e| e.status == "Accepted") {
        let mut errors = Vec::new();
        check(&spec, &single_schema, &event.event, "$", &mut errors);
        check(
            &spec,
            &batch_schema,
            &json!({"request": [event.event.clone()]}),
            "$",
            &mut errors,
        );
        assert!(errors.is_empty(), "{}: {errors:?}", event.event);
    }
}

/// Fault injection for issue 11: a real cancellation time per subscription (later hours `ResourceNotFound`, the
/// list shows it cancelled from then on), and a dimension that makes a whole batch fail with 400.
#[tokio::test]
async fn scripted_cancellation_and_poisoned_dimension() {
    let h = Harness::start().await;
    let at = (h.emulator.now() - Duration::minutes(90)).to_rfc3339();
    let (status, _) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/faults/cancellations",
            Some(json!({"subscription": DEFAULT_SUBSCRIPTION_A, "at": at})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/faults/cancellations",
            Some(json!({"subscription": DEFAULT_SUBSCRIPTION_A, "at": "yesterday"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let result = h
        .batch(vec![
            // Ended at least two hours ago: before the cancellation.
            h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 3, 1.0),
            // Ends after it.
            h.event(DEFAULT_SUBSCRIPTION_A, "api_calls", 1, 1.0),
        ])
        .await;
    assert_eq!(result["result"][0]["status"], "Accepted", "{result}");
    assert_eq!(
        result["result"][1]["status"], "ResourceNotFound",
        "{result}"
    );
    let sub = h
        .emulator
        .subscriptions()
        .into_iter()
        .find(|s| s.id.eq_ignore_ascii_case(DEFAULT_SUBSCRIPTION_A))
        .expect("listed");
    assert_eq!(
        sub.saas_subscription_status,
        SubscriptionStatus::Unsubscribed
    );

    let (status, _) = h
        .admin(
            reqwest::Method::POST,
            "/emulator/faults/poison",
            Some(json!({"dimension": "gb_processed"})),
        )
        .await;
    assert_eq!(status, 200);
    let response = h
        .batch_raw(&json!({"request": [
            h.event(DEFAULT_SUBSCRIPTION_B, "api_calls", 2, 1.0),
            h.event(DEFAULT_SUBSCRIPTION_B, "gb_processed", 2, 1.0),
        ]}))
        .await
        .expect("batch");
    assert_eq!(response.status(), 400);
    assert!(
        h.emulator
            .accepted_events()
            .iter()
            .all(|e| e.resource_id.as_deref() != Some(DEFAULT_SUBSCRIPTION_B)),
        "nothing of a refused batch is recorded"
    );
}

/// `meterd emulator --listen 127.0.0.1:0` with its stderr piped (no RUST_LOG): the child and its stderr.
fn spawn_emulator_command() -> (std::process::Child, std::process::ChildStderr) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["emulator", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn meterd emulator");
    let stderr = child.stderr.take().expect("stderr");
    (child, stderr)
}

/// `meterd emulator --listen 127.0.0.1:0` says where it listens: its log (stderr) names the address, so scripts
/// (the browser test, `ci/browser.sh`) can start it on a free port. Before, the command set up no logging at all.
#[test]
fn emulator_command_logs_its_address() {
    use std::io::{BufRead, BufReader};
    let (mut child, stderr) = spawn_emulator_command();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(at) = line.find("emulator listening on http://") {
                let _ = tx.send(
                    line[at + "emulator listening on ".len()..]
                        .trim()
                        .to_string(),
                );
            }
        }
    });
    let url = rx.recv_timeout(std::time::Duration::from_secs(30));
    // A plain HTTP/1.1 GET of the admin clock at that address.
    let answer = url.clone().map(|u| -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(u.trim_start_matches("http://"))?;
        s.write_all(
            b"GET /emulator/clock HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )?;
        let mut text = Vec::new();
        s.read_to_end(&mut text)?;
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .next()
            .unwrap_or("")
            .to_string())
    });
    let _ = child.kill();
    let _ = child.wait();
    let url = url.expect("the emulator logged no `emulator listening on http://...` line");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let status = match answer {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => String::new(),
    };
    assert!(status.contains(" 200 "), "{url}/emulator/clock: {status}");
}

/// With its log pipe closed (the reader of its stderr gone, as when a supervisor's log collector dies), the
/// emulator keeps answering. Before, tracing-subscriber reported each unwritable log line with `eprintln!`, which
/// panicked on the same closed stderr, so every request that logged got an empty reply.
#[test]
fn emulator_keeps_answering_when_its_log_pipe_closes() {
    use std::io::{BufRead, BufReader, Read, Write};
    let (mut child, stderr) = spawn_emulator_command();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("the emulator exited before saying where it listens");
        };
        if let Some(at) = line.find("emulator listening on http://") {
            break line[at + "emulator listening on http://".len()..]
                .trim()
                .to_string();
        }
    };
    drop(lines); // the read end of its stderr is closed now
    let request = |req: &str| -> String {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.write_all(req.as_bytes()).unwrap();
        let mut text = Vec::new();
        let _ = s.read_to_end(&mut text);
        String::from_utf8_lossy(&text)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    };
    // Each of these logs a line (reset and the clock change at info), twice so the first failed write is behind us.
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(request(
            "POST /emulator/reset HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ));
        answers.push(request(
            "GET /emulator/clock HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ));
    }
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "the emulator exited");
    for a in &answers {
        assert!(
            a.starts_with("HTTP/1.1 2"),
            "an answer after the log pipe closed: {answers:?}"
        );
    }
}
