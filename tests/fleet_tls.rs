//! TLS to the fleet's PostgreSQL, against a local fake server that speaks the PostgreSQL SSL negotiation and then
//! TLS (rustls, the certificates in `tests/fixtures/tls/`), and answers every startup with an error naming how it
//! was reached. No real PostgreSQL needed: this checks the client side of each `sslmode` (which verifier runs,
//! which roots it trusts, whether the host name counts).

use meterd::journal::pg::PgJournal;
use meterd::secret::Secret;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Sends an ErrorResponse (FATAL, 28000) with `message`.
fn refuse(w: &mut impl Write, message: &str) {
    let mut body = Vec::new();
    for (code, value) in [(b'S', "FATAL"), (b'C', "28000"), (b'M', message)] {
        body.push(code);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(&body);
    let _ = w.write_all(&msg);
    let _ = w.flush();
}

fn read_message(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    let mut rest = vec![0u8; n.saturating_sub(4)];
    r.read_exact(&mut rest)?;
    Ok(rest)
}

/// A fake server on 127.0.0.1: returns its port and the count of completed TLS handshakes.
fn fake_server() -> (u16, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    meterd::tls::install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture("server.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(fixture("server.pk8.pem")).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let done = handshakes.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut tcp) = conn else { continue };
            let config = config.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                    .ok();
                let Ok(first) = read_message(&mut tcp) else {
                    return;
                };
                if first[..4] != 80877103u32.to_be_bytes() {
                    refuse(&mut tcp, "fake server: reached without TLS");
                    return;
                }
                if tcp.write_all(b"S").is_err() {
                    return;
                }
                let server = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(server, tcp);
                // The startup message arrives only after the handshake completed (and the client accepted it).
                if read_message(&mut tls).is_ok() {
                    done.fetch_add(1, Ordering::SeqCst);
                    refuse(&mut tls, "fake server: reached over TLS");
                }
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (port, handshakes)
}

async fn attempt(url: &str) -> String {
    let pg = match PgJournal::connect(&Secret::new(url), 1) {
        Ok(p) => p,
        Err(e) => return format!("connect: {e}"),
    };
    match pg.client().await {
        Ok(_) => "connected".to_string(),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn each_sslmode_verifies_what_libpq_verifies() {
    let (port, handshakes) = fake_server();
    let ca = fixture("ca.pem");
    let other = fixture("other-ca.pem");
    let url = |host: &str, params: &str| format!("postgres://meterd:pw@{host}:{port}/m?{params}");
    let over_tls = "reached over TLS";
    let cases: Vec<(String, Option<&str>)> = vec![
        // (URL, Some(text the answer contains) when the server must be reached over TLS; None: refused by the client)
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            Some(over_tls),
        ),
        (
            url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            None,
        ),
        (
            url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")),
            Some(over_tls),
        ),
        (
            url(
                "localhost",
                &format!("sslmode=verify-ca&sslrootcert={other}"),
            ),
            None,
        ),
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
            None,
        ),
        (url("127.0.0.1", "sslmode=require"), Some(over_tls)),
        (
            url("127.0.0.1", &format!("sslmode=require&sslrootcert={other}")),
            None,
        ),
        (url("127.0.0.1", "sslmode=prefer"), Some(over_tls)),
        (
            url("127.0.0.1", "sslmode=disable"),
            Some("reached without TLS"),
        ),
        (
            format!(
                "host=localhost port={port} user=meterd dbname=m sslmode=verify-full sslrootcert={ca}"
            ),
            Some(over_tls),
        ),
    ];
    for (u, expect) in cases {
        let before = handshakes.load(Ordering::SeqCst);
        let answer = attempt(&u).await;
        let after = handshakes.load(Ordering::SeqCst);
        eprintln!("{u}\n  -> {answer}");
        match expect {
            Some(text) => assert!(answer.contains(text), "{u}: {answer}"),
            None => {
                assert_eq!(
                    after, before,
                    "{u}: the client must refuse the certificate: {answer}"
                );
                assert!(
                    answer.contains("certificate")
                        || answer.contains("TLS")
                        || answer.contains("tls"),
                    "{u}: {answer}"
                );
            }
        }
        assert!(!answer.contains(":pw@"), "{answer}");
    }
}
