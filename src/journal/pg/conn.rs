//! How a replica reaches PostgreSQL: the URL's TLS parameters (libpq's names and meanings) turned into a
//! `tokio_postgres::Config` and a rustls client configuration (ring provider only; no OpenSSL).
//!
//! tokio-postgres parses only `sslmode=disable|prefer|require` and knows no `sslrootcert`, so this module takes
//! `sslmode`, `sslrootcert` (and refuses `sslcert`/`sslkey`/`sslcrl`, which meterd does not implement) out of the
//! URL before tokio-postgres sees it, and does what libpq does with them:
//!
//! | `sslmode`     | TLS                | certificate checked                                          |
//! |---------------|--------------------|--------------------------------------------------------------|
//! | `disable`     | never              | -                                                            |
//! | `prefer`      | if the server can  | no (as libpq: encryption only)                               |
//! | `require`     | always             | no; with `sslrootcert` given, as `verify-ca` (as libpq)      |
//! | `verify-ca`   | always             | chain to a trusted root, any host name                       |
//! | `verify-full` | always             | chain to a trusted root and the host name                    |
//!
//! Roots: the PEM file `sslrootcert=/path/ca.pem`, or the system store (`sslrootcert=system`, and the default
//! when none is given). Nothing here ever prints the URL: it may hold a password.

use super::PgError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS always, unverified unless `sslrootcert` is given.
    Require,
    /// TLS always, the chain verified.
    VerifyCa,
    /// TLS always, the chain and the host name verified.
    VerifyFull,
}

/// What the client checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Nothing (the session is encrypted, not authenticated).
    None,
    /// The chain up to a trusted root; any host name.
    Chain,
    /// The chain and the host name.
    ChainAndHost,
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The operating system's store.
    System,
    /// A PEM file (`sslrootcert=/path`).
    File(PathBuf),
}

/// A parsed fleet URL: what tokio-postgres gets, and the TLS choices made here.
#[derive(Clone)]
pub struct Target {
    /// The connection settings (TLS mode already mapped onto tokio-postgres' three).
    pub config: tokio_postgres::Config,
    /// The `sslmode` as written (default `prefer`).
    pub mode: SslMode,
    /// Where trusted roots come from.
    pub roots: Roots,
    /// Whether `sslrootcert` was given.
    pub root_given: bool,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the config: it holds the password.
        f.debug_struct("Target")
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// What the certificate check is for this target.
    pub fn verification(&self) -> Verification {
        verification(self.mode, self.root_given)
    }
}

/// The certificate check for `mode` (libpq's rules: `require` with a root certificate behaves as `verify-ca`).
pub fn verification(mode: SslMode, root_given: bool) -> Verification {
    match mode {
        SslMode::Disable | SslMode::Prefer => Verification::None,
        SslMode::Require if root_given => Verification::Chain,
        SslMode::Require => Verification::None,
        SslMode::VerifyCa => Verification::Chain,
        SslMode::VerifyFull => Verification::ChainAndHost,
    }
}

fn parse_mode(v: &str) -> Result<SslMode, PgError> {
    Ok(match v {
        "disable" => SslMode::Disable,
        "allow" | "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        other => {
            return Err(PgError::BadUrl(format!(
                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
            )));
        }
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits `key=value` connection strings as libpq does (values may be single-quoted, `\` escapes).
fn split_key_values(s: &str) -> Result<Vec<(String, String)>, PgError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(PgError::BadUrl(format!(
                "`{key}` has no value (write key=value pairs)"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(PgError::BadUrl(format!(
                            "the value of `{key}` has no closing quote"
                        )));
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Parses a fleet URL (`postgres://...` or `key=value` form). Errors never include the URL.
pub fn parse(url: &str) -> Result<Target, PgError> {
    let url = url.trim();
    let mut mode = None;
    let mut root: Option<String> = None;
    let refuse = |k: &str| {
        PgError::BadUrl(format!(
            "`{k}` (client certificates, revocation lists) is not supported; authenticate with a password"
        ))
    };
    let rewritten = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match percent_decode(k).as_str() {
                "sslmode" => mode = Some(parse_mode(&percent_decode(v))?),
                "sslrootcert" => root = Some(percent_decode(v)),
                "sslcert" | "sslkey" | "sslcrl" | "sslpassword" => return Err(refuse(k)),
                _ => kept.push(pair.to_string()),
            }
        }
        let m = mode.unwrap_or(SslMode::Prefer);
        kept.push(format!("sslmode={}", pg_mode_name(m)));
        format!("{base}?{}", kept.join("&"))
    } else {
        let mut kept = Vec::new();
        for (k, v) in split_key_values(url)? {
            match k.as_str() {
                "sslmode" => mode = Some(parse_mode(&v)?),
                "sslrootcert" => root = Some(v),
                "sslcert" | "sslkey" | "sslcrl" | "sslpassword" => return Err(refuse(&k)),
                _ => kept.push(format!("{k}={}", quote(&v))),
            }
        }
        let m = mode.unwrap_or(SslMode::Prefer);
        kept.push(format!("sslmode={}", pg_mode_name(m)));
        kept.join(" ")
    };
    let mut config = tokio_postgres::Config::from_str(&rewritten).map_err(|e| {
        // tokio-postgres' messages name the offending key, never the value.
        PgError::BadUrl(e.to_string())
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("meterd");
    }
    let root_given = root.as_deref().is_some_and(|r| !r.is_empty());
    let roots = match root.as_deref() {
        None | Some("") | Some("system") => Roots::System,
        Some(path) => Roots::File(PathBuf::from(path)),
    };
    Ok(Target {
        config,
        mode: mode.unwrap_or(SslMode::Prefer),
        roots,
        root_given: root_given && root.as_deref() != Some("system"),
    })
}

/// The tokio-postgres mode for a libpq mode: the verifying modes are `require` plus the verifier chosen here.
fn pg_mode_name(m: SslMode) -> &'static str {
    match m {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
    }
}

fn load_roots(roots: &Roots) -> Result<rustls::RootCertStore, PgError> {
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    PgError::BadUrl(format!(
                        "cannot read sslrootcert {}: {e}; give a PEM file of the CA certificate(s)",
                        path.display()
                    ))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(PgError::BadUrl(format!(
                    "sslrootcert {} holds no usable certificate; give a PEM file of the CA certificate(s)",
                    path.display()
                )));
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(PgError::BadUrl(
                    "no trusted root certificates in the system store; install ca-certificates or add \
                     sslrootcert=/path/ca.pem to the URL"
                        .into(),
                ));
            }
        }
    }
    Ok(store)
}

/// The rustls client configuration for `target` (ring provider).
pub fn tls_config(target: &Target) -> Result<rustls::ClientConfig, PgError> {
    crate::tls::install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Unavailable(format!("TLS setup: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match target.verification() {
        Verification::None => Arc::new(EncryptOnly(provider)),
        v => {
            let roots = Arc::new(load_roots(&target.roots)?);
            let webpki =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| PgError::Unavailable(format!("TLS setup: {e}")))?;
            if v == Verification::Chain {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// `prefer`/`require` without roots: encrypts, accepts any certificate (libpq's behaviour); the handshake
/// signatures are still checked, so the session is bound to the certificate presented.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full WebPKI check except the host name.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode as PgMode;

    #[test]
    fn verify_full_and_verify_ca_parse_and_map_onto_require() {
        for (url, mode, pg) in [
            (
                "postgres://u:pw@db.example.com/m?sslmode=verify-full",
                SslMode::VerifyFull,
                PgMode::Require,
            ),
            (
                "postgres://u@db/m?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem",
                SslMode::VerifyCa,
                PgMode::Require,
            ),
            (
                "postgres://u@db/m?sslmode=require",
                SslMode::Require,
                PgMode::Require,
            ),
            (
                "postgres://u@db/m?sslmode=disable",
                SslMode::Disable,
                PgMode::Disable,
            ),
            ("postgres://u@db/m", SslMode::Prefer, PgMode::Prefer),
            (
                "host=db user=u password='a b\\'c' sslmode=verify-full",
                SslMode::VerifyFull,
                PgMode::Require,
            ),
            (
                "host=db dbname=m sslmode = prefer",
                SslMode::Prefer,
                PgMode::Prefer,
            ),
        ] {
            let t = parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(t.mode, mode, "{url}");
            assert_eq!(t.config.get_ssl_mode(), pg, "{url}");
        }
        let t = parse(
            "postgres://u@db/m?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(t.roots, Roots::File("/etc/ca.pem".into()));
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t = parse("host=db user=u password='a b\\'c'").unwrap();
        assert_eq!(t.config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(t.config.get_user(), Some("u"));
    }

    #[test]
    fn the_verifier_follows_libpq() {
        assert_eq!(verification(SslMode::Disable, false), Verification::None);
        assert_eq!(verification(SslMode::Prefer, true), Verification::None);
        assert_eq!(verification(SslMode::Require, false), Verification::None);
        assert_eq!(verification(SslMode::Require, true), Verification::Chain);
        assert_eq!(verification(SslMode::VerifyCa, false), Verification::Chain);
        assert_eq!(
            verification(SslMode::VerifyFull, false),
            Verification::ChainAndHost
        );
        let t = parse("postgres://u@db/m?sslmode=require&sslrootcert=system").unwrap();
        assert_eq!(
            t.verification(),
            Verification::None,
            "`system` is not a root file"
        );
        // Every mode builds a configuration (the system store has roots on this machine's image, or the
        // error says what to do).
        for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            let t = parse(&format!("postgres://u@db/m?sslmode={m}")).unwrap();
            match tls_config(&t) {
                Ok(_) => {}
                Err(e) => assert!(e.to_string().contains("sslrootcert"), "{m}: {e}"),
            }
        }
    }

    #[test]
    fn bad_urls_say_what_to_do_and_never_echo_the_password() {
        for url in [
            "postgres://u:hunter2@db/m?sslmode=verify-all",
            "postgres://u:hunter2@db/m?sslcert=/x.pem",
            "host=db password=hunter2 sslmode=maybe",
            "host=db password='hunter2",
            "postgres://u:hunter2@db/m?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
        ] {
            let e = match parse(url).and_then(|t| tls_config(&t).map(|_| ())) {
                Err(e) => e.to_string(),
                Ok(()) => panic!("{url} was accepted"),
            };
            assert!(!e.contains("hunter2"), "{e}");
            assert!(
                e.contains("fleet") || e.contains("sslmode") || e.contains("ssl"),
                "{e}"
            );
        }
        let t = parse("postgres://u:hunter2@db/m").unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
