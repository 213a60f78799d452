//! A client for the running daemon's local HTTP API, over TCP or a unix socket (`ingest.listen`), with the bearer
//! token of `ingest.token_file`.

use crate::config::{ListenAddr, Settings};
use anyhow::Context;
use std::collections::BTreeMap;

/// Where `record` and `flush` reach the daemon.
pub fn daemon_url(settings: &Settings) -> String {
    match &settings.ingest.listen {
        ListenAddr::Tcp(a) => format!(
            "http://{}",
            a.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
        ),
        ListenAddr::Unix(p) => format!("unix:{}", p.display()),
    }
}

/// A minimal HTTP/1.1 exchange with the daemon, over TCP or a unix socket.
pub async fn call_daemon(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    url: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let base = url
        .map(str::to_string)
        .unwrap_or_else(|| daemon_url(settings));
    let token = crate::daemon::ingest_token(settings, env)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: meterd\r\nConnection: close\r\n");
    if let Some(t) = &token {
        req.push_str(&format!("Authorization: Bearer {}\r\n", t.expose()));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let mut raw = Vec::new();
    let unreachable = || {
        format!(
            "cannot reach the daemon at {base}; is `meterd run` running with this configuration?"
        )
    };
    if let Some(p) = base.strip_prefix("unix:") {
        let mut s = tokio::net::UnixStream::connect(p)
            .await
            .with_context(unreachable)?;
        s.write_all(req.as_bytes()).await?;
        s.read_to_end(&mut raw).await?;
    } else {
        let host = base.trim_start_matches("http://").trim_end_matches('/');
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .with_context(unreachable)?;
        s.write_all(req.as_bytes()).await?;
        s.read_to_end(&mut raw).await?;
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}
