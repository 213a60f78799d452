//! A client for the running daemon's local HTTP API, over TCP or a unix socket (`ingest.listen`), with the bearer
//! token of `ingest.token_file`.
//!
//! Built on hyper's HTTP/1.1 client connection (`hyper::client::conn::http1`): one connection per call
//! (`Connection: close`), plain HTTP only (the daemon listens locally), on the caller's runtime: no pool, no
//! runtime and no TLS of its own, so a command starts as fast as before.

use crate::config::{ListenAddr, Settings};
use anyhow::Context;
use http_body_util::BodyExt;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;

/// Where `record` and `flush` reach the daemon.
pub(crate) fn daemon_url(settings: &Settings) -> String {
    match &settings.ingest.listen {
        ListenAddr::Tcp(a) => format!("http://{}", connect_address(a)),
        ListenAddr::Unix(p) => format!("unix:{}", p.display()),
    }
}

/// Where a client reaches a daemon listening on `listen`: an unspecified address (`0.0.0.0`, `[::]`) is reached
/// on the loopback of the same family; any other address as written.
fn connect_address(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(std::net::SocketAddr::V4(a)) if a.ip().is_unspecified() => {
            format!("127.0.0.1:{}", a.port())
        }
        Ok(std::net::SocketAddr::V6(a)) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        _ => listen.to_string(),
    }
}

/// One HTTP/1.1 exchange with the daemon, over TCP or a unix socket: the status code and the body (lossy UTF-8).
///
/// `url` overrides [`daemon_url`]; `http://HOST:PORT` or `unix:/path`.
pub(crate) async fn call_daemon(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    url: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let base = url
        .map(str::to_string)
        .unwrap_or_else(|| daemon_url(settings));
    let token = crate::daemon::ingest_token(settings, env)?;
    let body = body.unwrap_or("").to_string();
    let mut request = hyper::Request::builder()
        .method(hyper::Method::from_bytes(method.as_bytes())?)
        .uri(path)
        .header(HOST, "meterd")
        .header(CONNECTION, "close");
    if let Some(t) = &token {
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", t.expose()))
            .context("the ingest token (ingest.token_file) cannot be sent in an HTTP header")?;
        bearer.set_sensitive(true);
        request = request.header(AUTHORIZATION, bearer);
    }
    let request = request
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(body)?;
    let unreachable = || {
        format!(
            "cannot reach the daemon at {base}; is `meterd run` running with this configuration?"
        )
    };
    let answer = if let Some(p) = base.strip_prefix("unix:") {
        let stream = tokio::net::UnixStream::connect(p)
            .await
            .with_context(unreachable)?;
        exchange(stream, request).await
    } else {
        let host = base.trim_start_matches("http://").trim_end_matches('/');
        let stream = tokio::net::TcpStream::connect(host)
            .await
            .with_context(unreachable)?;
        exchange(stream, request).await
    };
    answer.with_context(|| format!("no complete answer from the daemon at {base}"))
}

/// Sends `request` on a fresh connection and reads the whole answer.
async fn exchange<S>(
    stream: S,
    request: hyper::Request<String>,
) -> Result<(u16, String), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection does the I/O; it ends once the answer is read (`Connection: close`).
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::connect_address;

    #[test]
    fn an_unspecified_listen_address_is_reached_on_loopback_and_others_as_written() {
        assert_eq!(connect_address("0.0.0.0:8787"), "127.0.0.1:8787");
        assert_eq!(connect_address("[::]:8787"), "[::1]:8787");
        // A text replace of "0.0.0.0" turned this one into "1127.0.0.1:8787".
        assert_eq!(connect_address("10.0.0.0:8787"), "10.0.0.0:8787");
        assert_eq!(connect_address("127.0.0.1:9"), "127.0.0.1:9");
        assert_eq!(connect_address("localhost:8787"), "localhost:8787");
    }
}
