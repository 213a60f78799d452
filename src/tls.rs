//! TLS for meterd's HTTPS clients (marketplace, token endpoint, alert webhook): rustls with the ring crypto
//! provider, and only that one.
//!
//! reqwest is built with `rustls-no-provider`, so it has no crypto provider of its own and panics when a client
//! is built before one is installed. Every place that builds a client calls [`install_crypto_provider`] first
//! (or uses [`client`]); it is idempotent and cheap.

/// Installs ring as rustls' process-wide default crypto provider, once. Call before building any reqwest client.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only when a provider is installed already (by a caller): that one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// `reqwest::Client::new()` with the crypto provider installed.
pub fn client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::new()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    /// Building an HTTPS client (which builds its rustls config) does not panic for want of a provider, and its
    /// first request to an `https://` URL starts a TLS handshake: the server side sees a TLS handshake record
    /// (a ClientHello).
    #[test]
    fn the_https_client_builds_and_speaks_tls_with_the_ring_provider() {
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                .unwrap();
            let mut head = [0u8; 3];
            s.read_exact(&mut head).unwrap();
            head
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap();
        let head_seen = std::thread::spawn(move || server.join().unwrap());
        // The server never answers the handshake: the request fails once it closes; only the ClientHello matters.
        let request = rt.block_on(async move {
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                client.get(format!("https://127.0.0.1:{port}/")).send(),
            )
            .await
        });
        let head = head_seen.join().unwrap();
        // Record type 22 (handshake), protocol version 3.x.
        assert_eq!(head[0], 0x16, "not a TLS handshake record: {head:?}");
        assert_eq!(head[1], 0x03, "not a TLS record version: {head:?}");
        assert!(
            !matches!(request, Ok(Ok(_))),
            "a non-TLS server cannot answer"
        );
    }
}
