//! The usage dashboard in the browser: `GET /ui/` and its assets, embedded in the binary (effects layer, beside
//! `ingest`, which mounts [`router`] on the ingest listener).
//!
//! The page is static: HTML, CSS, JavaScript and the vendored uPlot charting library (`assets/vendor/`, see
//! `assets/vendor/README.md` for its version and origin). Nothing is fetched from elsewhere at run time, so it works
//! air-gapped. The assets carry no data and are public; the page reads meterd's own JSON routes (`/v1/status`,
//! `/v1/dashboard/...`, the balance routes), which need the bearer token when `ingest.token_file` is set: the page
//! asks for it once and keeps it in `sessionStorage`.
//!
//! Every answer carries a strict Content-Security-Policy (no inline script or style, no other origin),
//! `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`, and `Cache-Control: no-cache` with a strong
//! `ETag`, so a browser revalidates (a `304` when unchanged) and never runs the assets of an older binary.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The Content-Security-Policy of every dashboard answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// Every file the dashboard serves, by path under `/ui/`.
const ASSETS: &[Asset] = &[
    Asset {
        path: "",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("assets/index.html"),
    },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        path: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/app.css"),
    },
    Asset {
        path: "vendor/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/vendor/uPlot.iife.min.js"),
    },
    Asset {
        path: "vendor/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/vendor/uPlot.min.css"),
    },
    Asset {
        path: "vendor/uPlot.LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("assets/vendor/uPlot.LICENSE"),
    },
];

/// The paths served under `/ui/` (`""` is the page itself).
pub fn paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|a| a.path)
}

/// A strong ETag of `body` (FNV-1a, 64 bits: stable for a given binary's bytes).
fn etag(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}-{}\"", body.len())
}

/// The security headers of every dashboard answer.
fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn serve(asset: &'static Asset, req: &HeaderMap) -> Response {
    let tag = etag(asset.body);
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = resp.headers_mut();
    secure(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    resp
}

async fn not_found() -> Response {
    let mut resp = (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "no such dashboard file; the dashboard is at /ui/\n",
    )
        .into_response();
    secure(resp.headers_mut());
    resp
}

/// The dashboard's routes: `/ui` (redirects to `/ui/`), `/ui/` and every asset; no state, no token (the assets
/// hold no data).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new().route("/ui", get(|| async { Redirect::permanent("/ui/") }));
    for asset in ASSETS {
        r = r.route(
            &format!("/ui/{}", asset.path),
            get(move |headers: HeaderMap| async move { serve(asset, &headers) }),
        );
    }
    r.route("/ui/{*rest}", get(not_found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        let html = std::str::from_utf8(ASSETS[0].body).unwrap();
        for needle in ["<script>", "style=", "onclick=", "http://", "https://"] {
            assert!(
                !html.contains(needle),
                "index.html holds `{needle}` (inline code or another origin)"
            );
        }
        for a in &ASSETS[1..3] {
            let name = a.path;
            assert!(html.contains(name), "index.html does not load {name}");
        }
        let js = std::str::from_utf8(ASSETS[1].body).unwrap();
        assert!(!js.contains("http://") && !js.contains("https://"));
        assert_ne!(etag(b"a"), etag(b"b"));
    }
}
