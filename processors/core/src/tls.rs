//! TLS to Redis and PostgreSQL, on one stack: rustls with the ring provider.
//!
//! Redis: `rediss://` URLs, the redis crate's own rustls support, with the CA and client
//! certificate from `[redis]` (`delivery::redis_client`). PostgreSQL: libpq's `sslmode`
//! (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert`/`sslcert`/
//! `sslkey` in the URL, or `[database]`'s `ca_file`/`client_cert_file`/`client_key_file`,
//! read here because tokio-postgres knows only the first three modes and none of the files;
//! the handshake is [`PostgresTls`], tokio-postgres' `MakeTlsConnect` over tokio-rustls.
//!
//! What each mode checks, as libpq does:
//!
//! | sslmode | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `prefer` (default without a CA) | if the server offers it | no | no |
//! | `require` | always | only when a CA is configured (then as `verify-ca`) | no |
//! | `verify-ca` | always | against the CA | no |
//! | `verify-full` (default with a CA) | always | against the CA | must be in the certificate |

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{DatabaseConfig, RedisConfig};
use crate::Secret;

/// The crypto every TLS client here uses. Also installed as the process default, because the
/// redis crate builds its rustls config with `ClientConfig::builder()`, which needs one.
pub fn provider() -> Arc<CryptoProvider> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Err means a default is installed already (by an earlier call): nothing to do.
    let _ = CryptoProvider::install_default((*provider).clone());
    provider
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS is refused.
    pub fn requires_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }

    fn tokio_postgres(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

/// What a database URL and `[database]` ask for, TLS-wise, with the URL that is left for
/// tokio-postgres once libpq's `ssl*` parameters are taken out.
#[derive(Debug)]
pub struct PostgresSettings {
    /// The URL without `sslmode`, `sslrootcert`, `sslcert` and `sslkey`.
    pub url: Secret,
    pub mode: SslMode,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

/// libpq's TLS parameters that tokio-postgres does not take, and the `[database]` key that
/// says the same thing.
const URL_FILES: [(&str, &str); 3] = [
    ("sslrootcert", "database.ca_file"),
    ("sslcert", "database.client_cert_file"),
    ("sslkey", "database.client_key_file"),
];

/// Reads `[database]` and the URL's `ssl*` parameters; every problem at once, each saying
/// what to change. Files are checked by [`file_problems`], not here.
pub fn postgres_settings(db: &DatabaseConfig) -> Result<PostgresSettings, Vec<String>> {
    let mut problems = Vec::new();
    let raw = db.url.expose();
    let (base, query) = match raw.split_once('?') {
        Some((b, q)) => (b, q),
        None => (raw, ""),
    };
    let mut kept = Vec::new();
    let mut mode = None;
    let mut from_url: [Option<PathBuf>; 3] = [None, None, None];
    for segment in query.split('&').filter(|s| !s.is_empty()) {
        let Some((key, value)) = url::form_urlencoded::parse(segment.as_bytes()).next() else {
            continue;
        };
        match key.as_ref() {
            "sslmode" => match SslMode::parse(&value) {
                Some(m) => mode = Some(m),
                None => problems.push(format!(
                    "database.url has sslmode={value}: use disable, prefer, require, verify-ca or verify-full"
                )),
            },
            k => match URL_FILES.iter().position(|(name, _)| *name == k) {
                Some(i) => from_url[i] = Some(PathBuf::from(value.as_ref())),
                None => kept.push(segment),
            },
        }
    }
    let [ca_url, cert_url, key_url] = from_url;
    let mut pick = |i: usize, url: Option<PathBuf>, key: Option<&PathBuf>| match (url, key) {
        (Some(u), Some(k)) if &u != k => {
            problems.push(format!(
                "database.url has {}={} and {} is {}: set the file once, in one of the two",
                URL_FILES[i].0,
                u.display(),
                URL_FILES[i].1,
                k.display()
            ));
            None
        }
        (u, k) => u.or_else(|| k.cloned()),
    };
    let ca_file = pick(0, ca_url, db.ca_file.as_ref());
    let client_cert_file = pick(1, cert_url, db.client_cert_file.as_ref());
    let client_key_file = pick(2, key_url, db.client_key_file.as_ref());
    // A CA without sslmode means checking the server: libpq's prefer would silently not.
    let mode = mode.unwrap_or(if ca_file.is_some() {
        SslMode::VerifyFull
    } else {
        SslMode::Prefer
    });
    match mode {
        SslMode::VerifyCa | SslMode::VerifyFull if ca_file.is_none() => problems.push(format!(
            "database.url has sslmode={} but no CA to check the server against: set database.ca_file (or sslrootcert= in DATABASE_URL) to the PEM file of the CA that signed the server's certificate",
            mode.as_str()
        )),
        SslMode::Disable | SslMode::Prefer
            if ca_file.is_some() || client_cert_file.is_some() =>
        {
            problems.push(format!(
                "database.url has sslmode={} but a CA or client certificate is configured, which that mode never uses: use sslmode=verify-full (or require/verify-ca), or remove the files",
                mode.as_str()
            ))
        }
        _ => {}
    }
    if client_cert_file.is_some() != client_key_file.is_some() {
        problems.push("database.client_cert_file and database.client_key_file (sslcert/sslkey) go together: set both or neither".into());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(PostgresSettings {
        url: Secret::new(url),
        mode,
        ca_file,
        client_cert_file,
        client_key_file,
    })
}

/// `[redis]`'s TLS settings against its URL; every problem at once. Files are checked by
/// [`file_problems`].
pub fn redis_problems(r: &RedisConfig) -> Vec<String> {
    let mut p = Vec::new();
    let url = r.url.expose();
    let tls = url.starts_with("rediss://");
    if tls && url.ends_with("#insecure") {
        p.push("redis.url ends in #insecure, which turns certificate checks off: remove it, and set redis.ca_file to the PEM file of the CA that signed the server's certificate".into());
    }
    for (key, set) in [
        ("redis.ca_file", r.ca_file.is_some()),
        ("redis.client_cert_file", r.client_cert_file.is_some()),
    ] {
        if set && !tls {
            p.push(format!(
                "{key} is set but redis.url (REDIS_URL) is not rediss://: use rediss://host:port for TLS, or remove {key}"
            ));
        }
    }
    if r.client_cert_file.is_some() != r.client_key_file.is_some() {
        p.push(
            "redis.client_cert_file and redis.client_key_file go together: set both or neither"
                .into(),
        );
    }
    p
}

/// Each configured PEM file exists and holds what it should, or a problem naming the key.
pub fn file_problems(files: &[(&str, Option<&Path>, PemKind)]) -> Vec<String> {
    files
        .iter()
        .filter_map(|(key, path, kind)| {
            let path = (*path)?;
            let what = match kind {
                PemKind::Ca => "the PEM file of the CA that signed the server's certificate",
                PemKind::Certificate => "a PEM certificate (chain) for this client",
                PemKind::Key => "the PEM private key of the client certificate",
            };
            if !path.is_file() {
                return Some(format!(
                    "{key} '{}' does not exist: set it to {what}, or remove it",
                    path.display()
                ));
            }
            let checked = match kind {
                PemKind::Ca | PemKind::Certificate => certificates(path).map(|_| ()),
                PemKind::Key => private_key(path).map(|_| ()),
            };
            checked
                .err()
                .map(|e| format!("{key} '{}': {e}: set it to {what}", path.display()))
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
pub enum PemKind {
    Ca,
    Certificate,
    Key,
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates ({e})"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("holds no usable private key ({e})"))
}

/// The TLS side of PostgreSQL connections for one [`PostgresSettings`]: what to verify,
/// against which CA, with which client certificate. Cheap to clone.
#[derive(Clone)]
pub struct PostgresTls {
    config: Arc<ClientConfig>,
    mode: SslMode,
    /// For error messages.
    ca_file: Option<PathBuf>,
}

impl PostgresTls {
    pub fn new(s: &PostgresSettings) -> Result<PostgresTls, String> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let roots = match &s.ca_file {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(path)
                    .map_err(|e| format!("database.ca_file '{}': {e}", path.display()))?
                {
                    roots.add(cert).map_err(|e| {
                        format!(
                            "database.ca_file '{}': not a usable CA certificate ({e})",
                            path.display()
                        )
                    })?;
                }
                Some(Arc::new(roots))
            }
            None => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (s.mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => {
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("database.ca_file: {e}"))?
            }
            (SslMode::VerifyCa | SslMode::Require, Some(roots)) => Arc::new(ChainOnly(
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("database.ca_file: {e}"))?,
            )),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                    "sslmode={} needs database.ca_file (or sslrootcert=)",
                    s.mode.as_str()
                ))
            }
            _ => Arc::new(AnyCertificate(provider.clone())),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&s.client_cert_file, &s.client_key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert)
                    .map_err(|e| format!("database.client_cert_file '{}': {e}", cert.display()))?;
                let key = private_key(key)
                    .map_err(|e| format!("database.client_key_file '{}': {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!("database.client_cert_file and client_key_file do not make a client certificate: {e}")
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(PostgresTls {
            config: Arc::new(config),
            mode: s.mode,
            ca_file: s.ca_file.clone(),
        })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Sets tokio-postgres' own `ssl_mode` to what [`SslMode`] means on the wire.
    pub fn apply(&self, config: &mut tokio_postgres::Config) {
        config.ssl_mode(self.mode.tokio_postgres());
    }

    /// Why a handshake failed, in terms of the setting to change.
    fn explain(&self, host: &str, e: &io::Error) -> String {
        let ca = self
            .ca_file
            .as_ref()
            .map(|p| format!("'{}'", p.display()))
            .unwrap_or_else(|| "(none)".into());
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return format!("TLS handshake with '{host}' failed: {e}");
        };
        match tls {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => format!(
                "the server's certificate is not signed by the CA in database.ca_file {ca} ({tls}): set database.ca_file to the CA that signed the server's certificate"
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "the server's certificate is not issued for host '{host}' ({tls}): connect by a name the certificate lists, or use sslmode=verify-ca to check the CA only"
            ),
            rustls::Error::InvalidCertificate(_) => format!(
                "the server's certificate was refused ({tls}): renew or fix the server's certificate"
            ),
            rustls::Error::AlertReceived(_) => format!(
                "the server ended the TLS handshake ({tls}): if it asks for a client certificate, set database.client_cert_file and database.client_key_file"
            ),
            _ => format!("TLS handshake with '{host}' failed: {tls}"),
        }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PostgresTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = TlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<TlsConnect, io::Error> {
        // A Unix socket has no host name; tokio-postgres asks anyway, then never uses it
        // (servers do not offer TLS there). The error waits for a handshake that happens.
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            format!("'{host}' is not a host name TLS can check ({e}): use a DNS name or an IP address in database.url")
        });
        Ok(TlsConnect {
            tls: self.clone(),
            host: host.to_string(),
            name,
        })
    }
}

/// One connection's handshake (tokio-postgres' `TlsConnect`).
pub struct TlsConnect {
    tls: PostgresTls,
    host: String,
    name: Result<ServerName<'static>, String>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for TlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.map_err(io::Error::other)?;
            let connector = tokio_rustls::TlsConnector::from(self.tls.config.clone());
            match connector.connect(name, stream).await {
                Ok(s) => Ok(TlsStream(s)),
                Err(e) => Err(io::Error::other(self.tls.explain(&self.host, &e))),
            }
        })
    }
}

/// A TLS connection to PostgreSQL. No channel binding: SCRAM works without it, and
/// computing it needs the certificate's signature hash, which rustls does not expose.
pub struct TlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

/// `verify-ca` (and `require` with a CA): the chain must lead to the CA; the name is not
/// checked, as libpq does.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first and the name last, so a name error means the chain
        // was good.
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

/// `prefer` and `require` without a CA: encrypted, but any certificate is taken (libpq's
/// meaning of those modes). The handshake signature is still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn db(url: &str) -> DatabaseConfig {
        DatabaseConfig {
            url: Secret::new(url),
            ..DatabaseConfig::default()
        }
    }

    #[test]
    fn ssl_parameters_leave_the_url_and_other_parameters_stay_as_written() {
        let s = postgres_settings(&db(
            "postgres://u:pw@h:5432/d?sslmode=verify-full&options=-c%20statement_timeout%3D5s&sslrootcert=/ca.pem",
        ))
        .expect("valid");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            s.url.expose(),
            "postgres://u:pw@h:5432/d?options=-c%20statement_timeout%3D5s"
        );
        let s = postgres_settings(&db("postgres://u:pw@h/d?sslmode=disable")).expect("valid");
        assert_eq!(
            (s.mode, s.url.expose()),
            (SslMode::Disable, "postgres://u:pw@h/d")
        );
    }

    #[test]
    fn mode_defaults_to_prefer_or_to_verify_full_when_a_ca_is_given() {
        let s = postgres_settings(&db("postgres://h/d")).expect("valid");
        assert_eq!(s.mode, SslMode::Prefer);
        let mut c = db("postgres://h/d");
        c.ca_file = Some("/ca.pem".into());
        assert_eq!(
            postgres_settings(&c).expect("valid").mode,
            SslMode::VerifyFull
        );
    }

    #[test]
    fn contradictions_are_reported_with_what_to_change() {
        let mut c = db("postgres://h/d?sslmode=verify-full&sslrootcert=/a.pem&sslcert=/c.pem");
        c.ca_file = Some("/b.pem".into());
        let p = postgres_settings(&c).expect_err("invalid");
        assert!(
            p.iter()
                .any(|m| m.contains("sslrootcert=/a.pem")
                    && m.contains("database.ca_file is /b.pem")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("set both or neither")), "{p:?}");
        let p = postgres_settings(&db("postgres://h/d?sslmode=verify-full")).expect_err("no CA");
        assert!(p[0].contains("set database.ca_file"), "{p:?}");
        let p = postgres_settings(&db("postgres://h/d?sslmode=always")).expect_err("bad mode");
        assert!(p[0].contains("verify-full"), "{p:?}");
        let mut c = db("postgres://h/d?sslmode=disable");
        c.ca_file = Some("/ca.pem".into());
        assert!(postgres_settings(&c).is_err());
    }

    #[test]
    fn redis_tls_settings_need_rediss_and_no_insecure() {
        let mut r = RedisConfig {
            url: Secret::new("redis://h:6379"),
            ca_file: Some("/ca.pem".into()),
            ..RedisConfig::default()
        };
        let p = redis_problems(&r);
        assert!(
            p.iter()
                .any(|m| m.contains("redis.ca_file") && m.contains("rediss://")),
            "{p:?}"
        );
        r.url = Secret::new("rediss://h:6379/#insecure");
        let p = redis_problems(&r);
        assert!(p.len() == 1 && p[0].contains("#insecure"), "{p:?}");
        r.url = Secret::new("rediss://h:6379");
        r.client_key_file = Some("/k.pem".into());
        let p = redis_problems(&r);
        assert!(p.len() == 1 && p[0].contains("both or neither"), "{p:?}");
    }

    #[test]
    fn missing_or_wrong_files_name_the_key() {
        let p = file_problems(&[(
            "redis.ca_file",
            Some(Path::new("/nonexistent/ca.pem")),
            PemKind::Ca,
        )]);
        assert!(
            p.len() == 1 && p[0].starts_with("redis.ca_file '/nonexistent/ca.pem' does not exist"),
            "{p:?}"
        );
        let dir = std::env::temp_dir().join(format!("presence-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("not-pem.txt");
        std::fs::write(&file, "hello").expect("write");
        let p = file_problems(&[
            ("database.ca_file", Some(file.as_path()), PemKind::Ca),
            (
                "database.client_key_file",
                Some(file.as_path()),
                PemKind::Key,
            ),
            ("redis.ca_file", None, PemKind::Ca),
        ]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("no PEM certificate"), "{p:?}");
        assert!(p[1].contains("no usable private key"), "{p:?}");
    }
}
