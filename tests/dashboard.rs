//! The dashboard against the real binary: `/ui/` and its assets are served with their content types, the
//! Content-Security-Policy and revalidation headers, without the token (they hold no data); every dashboard data
//! route refuses without the right token; and the data routes answer what the journal holds (cards paged,
//! usage per bucket and outcome group, pending events by expiry). The browser test (`tests/browser/`,
//! `ci/browser.sh`) checks the page itself in chromium.

mod common;

use common::{Daemon, hour_start, http, ts};
use serde_json::{Value, json};

const TOKEN: &str = "dash-s3cr3t-token";
const A: &str = "11111111-1111-4111-8111-111111111111";
const B: &str = "22222222-2222-4222-8222-222222222222";

fn daemon(dir: &std::path::Path) -> Daemon {
    let token_file = dir.join("ingest-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let cfg = common::config(
        dir,
        "",
        "[marketplace]\nmode = \"emulator\"\n[emit]\ngrace = \"0s\"\nschedule = \"0 0 0 1 1 *\"\n",
    )
    .replace(
        "[ingest]\nlisten = \"127.0.0.1:0\"\n",
        &format!(
            "[ingest]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    );
    Daemon::start(dir, &cfg, &[])
}

#[test]
fn ui_assets_are_public_typed_and_locked_down_by_csp() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let c = http();
    let expect = [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
        (
            "/ui/vendor/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
        ),
        ("/ui/vendor/uPlot.min.css", "text/css; charset=utf-8"),
        ("/ui/vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
    ];
    assert_eq!(
        meterd::ui::paths().count(),
        expect.len(),
        "every embedded file is checked here"
    );
    for (path, ctype) in expect {
        let r = c.get(format!("{}{path}", d.url)).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path} without a token");
        let h = r.headers().clone();
        let get = |k: &str| {
            h.get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(get("content-type"), ctype, "{path}");
        assert_eq!(get("content-security-policy"), meterd::ui::CSP, "{path}");
        assert!(get("content-security-policy").contains("script-src 'self';"));
        assert!(!get("content-security-policy").contains("unsafe-inline"));
        assert_eq!(get("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(get("cache-control"), "no-cache", "{path}");
        let etag = get("etag");
        assert!(etag.starts_with('"') && etag.len() > 4, "{path}: {etag}");
        let body = r.bytes().unwrap();
        assert!(!body.is_empty());
        // Revalidation: the same ETag answers 304 with no body.
        let again = c
            .get(format!("{}{path}", d.url))
            .header("if-none-match", &etag)
            .send()
            .unwrap();
        assert_eq!(again.status().as_u16(), 304, "{path}");
        assert_eq!(
            again.headers()["content-security-policy"].to_str().unwrap(),
            meterd::ui::CSP
        );
    }
    let page = c
        .get(format!("{}/ui/", d.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("<script defer src=\"app.js\"></script>"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page names no other origin"
    );
    // `/ui` sends the browser to `/ui/` (relative asset paths resolve under it); an unknown file is a 404.
    let no_redirect = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect.get(format!("{}/ui", d.url)).send().unwrap();
    assert_eq!(r.status().as_u16(), 308);
    assert_eq!(r.headers()["location"], "/ui/");
    let r = c.get(format!("{}/ui/nope.js", d.url)).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn dashboard_data_routes_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let c = http();
    let routes = [
        "/v1/dashboard/subscriptions".to_string(),
        format!("/v1/dashboard/usage?resource={A}"),
        "/v1/dashboard/at-risk".to_string(),
        "/v1/status".to_string(),
        format!("/v1/subscriptions/{A}/balance"),
    ];
    for path in &routes {
        let url = format!("{}{path}", d.url);
        let none = c.get(&url).send().unwrap();
        assert_eq!(none.status().as_u16(), 401, "{path} without a token");
        let text = none.text().unwrap();
        assert!(text.contains("bearer token"), "{path}: {text}");
        assert!(!text.contains(TOKEN));
        let wrong = c.get(&url).bearer_auth("wrong-token").send().unwrap();
        assert_eq!(wrong.status().as_u16(), 401, "{path} with a wrong token");
        let right = c.get(&url).bearer_auth(TOKEN).send().unwrap();
        assert_eq!(right.status().as_u16(), 200, "{path} with the token");
        assert!(
            !right.text().unwrap().contains(TOKEN),
            "{path} shows no secret"
        );
    }
}

fn get(c: &reqwest::blocking::Client, url: String) -> Value {
    let r = c.get(&url).bearer_auth(TOKEN).send().unwrap();
    assert_eq!(r.status().as_u16(), 200, "{url}");
    r.json().unwrap()
}

#[test]
fn dashboard_routes_page_aggregate_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let c = http();
    // A: 1.5 api_calls at 3 and 5 hours ago, 2 at 5 hours ago (same hour); B: 0.25 gb_processed 4 hours ago.
    let records = json!([
        {"resource": A, "dimension": "api_calls", "quantity": 1.5, "time": ts(hour_start(3) + chrono::Duration::minutes(10))},
        {"resource": A, "dimension": "api_calls", "quantity": 1.5, "time": ts(hour_start(5) + chrono::Duration::minutes(10))},
        {"resource": A, "dimension": "api_calls", "quantity": 2, "time": ts(hour_start(5) + chrono::Duration::minutes(40))},
        {"resource": B, "dimension": "gb_processed", "quantity": 0.25, "time": ts(hour_start(4) + chrono::Duration::minutes(10))},
    ]);
    let r = c
        .post(format!("{}/v1/usage", d.url))
        .bearer_auth(TOKEN)
        .json(&records)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);

    // Usage: every hourly bucket of the range, the quantities in the `pending` group (not frozen yet).
    let from = ts(hour_start(6));
    let to = ts(hour_start(0));
    let u = get(
        &c,
        format!(
            "{}/v1/dashboard/usage?resource={A}&bucket=hour&from={from}&to={to}",
            d.url
        ),
    );
    assert_eq!(u["timezone"], "UTC");
    let series = u["series"].as_array().unwrap();
    assert_eq!(series.len(), 1, "A has one dimension with usage: {u}");
    let buckets = series[0]["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 6);
    let totals: Vec<&str> = buckets
        .iter()
        .map(|b| b["total"].as_str().unwrap())
        .collect();
    assert_eq!(totals, ["0", "3.5", "0", "1.5", "0", "0"], "{u}");
    assert_eq!(buckets[1]["groups"]["pending"], "3.5");
    assert_eq!(buckets[1]["groups"]["accepted"], "0");
    // After a pass the emulator accepts them (nothing included in this configuration): `accepted`.
    let r = c
        .post(format!("{}/v1/flush", d.url))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let u = get(
        &c,
        format!(
            "{}/v1/dashboard/usage?resource={A}&dimension=api_calls&bucket=day&from={from}&to={to}",
            d.url
        ),
    );
    let days = u["series"][0]["buckets"].as_array().unwrap();
    let accepted: Vec<&str> = days
        .iter()
        .map(|b| b["groups"]["accepted"].as_str().unwrap())
        .filter(|q| *q != "0")
        .collect();
    let sum: f64 = accepted.iter().map(|q| q.parse::<f64>().unwrap()).sum();
    assert_eq!(
        sum, 5.0,
        "the day buckets hold the 5 accepted api_calls: {u}"
    );

    // Cards: paged by resource; page one of size 1 names the next.
    let p1 = get(&c, format!("{}/v1/dashboard/subscriptions?limit=1", d.url));
    assert!(p1["total"].as_i64().unwrap() >= 2, "{p1}");
    assert_eq!(p1["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(p1["subscriptions"][0]["resource"], A);
    let next = p1["next"].as_str().unwrap().to_string();
    let p2 = get(
        &c,
        format!("{}/v1/dashboard/subscriptions?limit=1&after={next}", d.url),
    );
    assert_eq!(p2["subscriptions"][0]["resource"], B);
    // Each card's dimensions are the balance route's entries, plus the threshold state.
    let bal = get(&c, format!("{}/v1/subscriptions/{A}/balance", d.url));
    for (card, b) in p1["subscriptions"][0]["dimensions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(bal["dimensions"].as_array().unwrap())
    {
        for (k, v) in b.as_object().unwrap() {
            assert_eq!(&card[k], v, "card field {k}");
        }
        assert!(card["threshold"]["text"].as_str().unwrap().ends_with('.'));
    }
    let all = get(
        &c,
        format!("{}/v1/dashboard/subscriptions?limit=200", d.url),
    );
    assert_eq!(
        all["subscriptions"].as_array().unwrap().len() as i64,
        all["total"].as_i64().unwrap()
    );
    assert!(all["next"].is_null());

    // Limits are refused with a message.
    for bad in [
        "/v1/dashboard/subscriptions?limit=0".to_string(),
        "/v1/dashboard/usage".to_string(),
        format!("/v1/dashboard/usage?resource={A}&bucket=week"),
        format!("/v1/dashboard/usage?resource={A}&bucket=hour&from=2020-01-01&to=2026-01-01"),
        format!("/v1/dashboard/usage?resource={A}&bucket=month&from=0001-01-01&to=9999-01-01"),
        format!("/v1/dashboard/usage?resource={A}&bucket=day&from=2026-01-02&to=2026-01-01"),
    ] {
        let r = c
            .get(format!("{}{bad}", d.url))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{bad}");
        let v: Value = r.json().unwrap();
        assert!(
            !v["errors"][0]["message"].as_str().unwrap().is_empty(),
            "{bad}"
        );
    }

    let risk = get(&c, format!("{}/v1/dashboard/at-risk", d.url));
    assert_eq!(risk["pending_total"], 0, "{risk}");
    assert!(risk["pending"].as_array().unwrap().is_empty(), "{risk}");
}
