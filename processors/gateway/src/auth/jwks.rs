//! The identity provider's public keys (a JWKS), from a file or an https URL, cached.
//!
//! A token names its key by `kid`. The keys are read on the first token, then again when a
//! token names a `kid` the cache does not hold (a rotation: the provider signs with a new
//! key before we have seen it) or when they are older than `gateway.jwks_max_age` (so a
//! withdrawn key stops working). Reads happen at most once per `gateway.jwks_refresh_min`,
//! however many unknown kids arrive, so made-up kids cannot hammer the provider; between
//! reads an unknown kid is refused. A failed read keeps the keys we have.
//!
//! Each key verifies only the algorithms of its own family (its `alg` when the JWKS names
//! one): an RSA key never verifies an HS256 token, and symmetric (`oct`) keys and keys
//! marked for encryption are ignored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use presence_core::config::GatewayConfig;

use super::AuthError;

/// Largest JWKS accepted from a file or URL. Real ones are a few KiB.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long one fetch of the JWKS URL may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The keys of one JWKS read, by `kid`.
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, Key>,
}

struct Key {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// What a key set says about a token's `kid` and `alg`.
pub enum Lookup {
    Found(DecodingKey),
    /// The key exists but is not for this algorithm (e.g. HS256 against an RSA key).
    WrongAlgorithm,
    Unknown,
}

impl KeySet {
    /// Parses `{"keys": [...]}`. Keys that cannot verify a signature here (no `kid`,
    /// symmetric, for encryption, unsupported curve) are left out and named in the second
    /// value, for a warning.
    pub fn parse(json: &[u8]) -> Result<(KeySet, Vec<String>), String> {
        #[derive(serde::Deserialize)]
        struct Raw {
            keys: Vec<serde_json::Value>,
        }
        let raw: Raw = serde_json::from_slice(json)
            .map_err(|e| format!("not a JWKS ({{\"keys\": [...]}}): {e}"))?;
        let mut set = KeySet::default();
        let mut skipped = Vec::new();
        for (i, value) in raw.keys.into_iter().enumerate() {
            match Self::key_of(value) {
                Ok((kid, key)) => {
                    set.keys.insert(kid, key);
                }
                Err(why) => skipped.push(format!("keys[{i}]: {why}")),
            }
        }
        Ok((set, skipped))
    }

    fn key_of(value: serde_json::Value) -> Result<(String, Key), String> {
        let jwk: Jwk = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let kid = jwk.common.key_id.clone().ok_or("no kid")?;
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            return Err(format!("'{kid}' is not for signatures (use)"));
        }
        let family: &[Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                &[Algorithm::ES256]
            }
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                &[Algorithm::ES384]
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                &[Algorithm::EdDSA]
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "'{kid}' is a symmetric key, which has no place in a public JWKS"
                ))
            }
            _ => return Err(format!("'{kid}' has an unsupported key type or curve")),
        };
        let algorithms = match &jwk.common.key_algorithm {
            None => family.to_vec(),
            Some(a) => {
                let alg = a
                    .to_string()
                    .parse::<Algorithm>()
                    .map_err(|_| format!("'{kid}' names an unsupported alg '{a}'"))?;
                if !family.contains(&alg) {
                    return Err(format!(
                        "'{kid}' names alg '{a}', which does not fit its key"
                    ));
                }
                vec![alg]
            }
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("'{kid}': {e}"))?;
        Ok((kid, Key { key, algorithms }))
    }

    pub fn lookup(&self, kid: &str, alg: Algorithm) -> Lookup {
        match self.keys.get(kid) {
            Some(k) if k.algorithms.contains(&alg) => Lookup::Found(k.key.clone()),
            Some(_) => Lookup::WrongAlgorithm,
            None => Lookup::Unknown,
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Whether a read is allowed at `now`, the last one having started at `last`.
pub fn read_due(last: Option<Instant>, now: Instant, min_interval: Duration) -> bool {
    !matches!(last, Some(t) if now.saturating_duration_since(t) < min_interval)
}

enum Source {
    File(PathBuf),
    Url {
        client: reqwest::Client,
        url: reqwest::Url,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "gateway.jwks_file {}", p.display()),
            Source::Url { url, .. } => write!(f, "gateway.jwks_url {url}"),
        }
    }
}

/// The cached keys of one JWKS source.
#[derive(Clone)]
pub struct Jwks(Arc<Inner>);

struct Inner {
    source: Source,
    refresh_min: Duration,
    max_age: Duration,
    keys: RwLock<Cached>,
    /// Held while reading, so that concurrent unknown kids cause one read, not many.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Cached {
    set: Arc<KeySet>,
    /// When the last read started (successful or not); reads are rate-limited by it.
    last_attempt: Option<Instant>,
    /// When the keys in `set` were read; `None` before the first good read.
    read_at: Option<Instant>,
    /// Why the last read failed, while it did.
    error: Option<String>,
}

impl Jwks {
    /// `None` without `gateway.jwks_file`/`jwks_url`. A file is read now, so that a broken
    /// one stops the start; a URL is fetched on the first token.
    pub fn from_config(c: &GatewayConfig) -> anyhow::Result<Option<Jwks>> {
        let source = if !c.jwks_file.is_empty() {
            Source::File(PathBuf::from(&c.jwks_file))
        } else if !c.jwks_url.is_empty() {
            let url = reqwest::Url::parse(&c.jwks_url)
                .with_context(|| format!("gateway.jwks_url '{}' is not a URL", c.jwks_url))?;
            let mut builder = reqwest::Client::builder()
                .https_only(true)
                .timeout(FETCH_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none());
            if !c.jwks_ca_file.is_empty() {
                let pem = std::fs::read(&c.jwks_ca_file).with_context(|| {
                    format!("cannot read gateway.jwks_ca_file {}", c.jwks_ca_file)
                })?;
                for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                    format!(
                        "gateway.jwks_ca_file {} is not PEM certificates",
                        c.jwks_ca_file
                    )
                })? {
                    builder = builder.add_root_certificate(cert);
                }
            }
            let client = builder
                .build()
                .context("cannot build the HTTPS client for gateway.jwks_url")?;
            Source::Url { client, url }
        } else {
            return Ok(None);
        };
        let jwks = Jwks(Arc::new(Inner {
            source,
            refresh_min: c.jwks_refresh_min,
            max_age: c.jwks_max_age,
            keys: RwLock::new(Cached {
                set: Arc::new(KeySet::default()),
                last_attempt: None,
                read_at: None,
                error: None,
            }),
            reading: tokio::sync::Mutex::new(()),
        }));
        if let Source::File(path) = &jwks.0.source {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read gateway.jwks_file {}", path.display()))?;
            let set = jwks
                .accept(&bytes)
                .map_err(|e| anyhow::anyhow!("gateway.jwks_file {}: {e}", path.display()))?;
            jwks.store(Instant::now(), Ok(set));
        }
        Ok(Some(jwks))
    }

    fn cached(&self) -> Cached {
        self.0
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The key for a token's `kid` and `alg`, reading the JWKS again when the kid is
    /// unknown or the keys are old, if a read is due.
    pub async fn key(&self, kid: &str, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        let now = Instant::now();
        let cached = self.cached();
        let stale =
            !matches!(cached.read_at, Some(t) if now.saturating_duration_since(t) < self.0.max_age);
        match cached.set.lookup(kid, alg) {
            // Old keys are read again in the background: this request need not wait for the
            // provider (nor stall while it is down).
            Lookup::Found(k) => {
                if stale {
                    let jwks = self.clone();
                    tokio::spawn(async move { jwks.read_if_due().await });
                }
                return Ok(k);
            }
            Lookup::WrongAlgorithm if !stale => {
                return Err(AuthError::WrongAlgorithm(format!("{alg:?}")))
            }
            _ => {}
        }
        self.read_if_due().await;
        let cached = self.cached();
        match cached.set.lookup(kid, alg) {
            Lookup::Found(k) => Ok(k),
            Lookup::WrongAlgorithm => Err(AuthError::WrongAlgorithm(format!("{alg:?}"))),
            Lookup::Unknown => match cached.error {
                Some(e) if cached.set.is_empty() => Err(AuthError::KeysUnavailable(e)),
                _ => Err(AuthError::UnknownKey(kid.chars().take(64).collect())),
            },
        }
    }

    /// Reads the source if the last read started at least `jwks_refresh_min` ago.
    async fn read_if_due(&self) {
        let _reading = self.0.reading.lock().await;
        // Checked under the lock: whoever held it before may just have read.
        let now = Instant::now();
        if !read_due(self.cached().last_attempt, now, self.0.refresh_min) {
            return;
        }
        {
            let mut c = self.0.keys.write().unwrap_or_else(|p| p.into_inner());
            c.last_attempt = Some(now);
        }
        let result = self.fetch().await.and_then(|bytes| self.accept(&bytes));
        self.store(now, result);
    }

    async fn fetch(&self) -> Result<Vec<u8>, String> {
        match &self.0.source {
            Source::File(path) => tokio::fs::read(path).await.map_err(|e| e.to_string()),
            Source::Url { client, url } => {
                let response = client
                    .get(url.clone())
                    .header(reqwest::header::ACCEPT, "application/json")
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| e.to_string())?;
                if response
                    .content_length()
                    .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
                {
                    return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                }
                let bytes = response.bytes().await.map_err(|e| e.to_string())?;
                Ok(bytes.to_vec())
            }
        }
    }

    /// Parses a read, warning about keys left out.
    fn accept(&self, bytes: &[u8]) -> Result<KeySet, String> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        let (set, skipped) = KeySet::parse(bytes)?;
        for why in skipped {
            tracing::warn!(source = %self.0.source, key = %why, "JWKS key left out");
        }
        Ok(set)
    }

    fn store(&self, at: Instant, result: Result<KeySet, String>) {
        let mut c = self.0.keys.write().unwrap_or_else(|p| p.into_inner());
        c.last_attempt = Some(at);
        match result {
            Ok(set) => {
                tracing::info!(source = %self.0.source, keys = set.len(), "identity provider keys read");
                c.set = Arc::new(set);
                c.read_at = Some(at);
                c.error = None;
            }
            Err(e) => {
                tracing::warn!(source = %self.0.source, error = %e, kept = c.set.len(), "cannot read the identity provider's keys; keeping the ones we have");
                c.error = Some(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A provider (or whoever answers in its place) cannot crash the gateway with what
        /// it serves.
        #[test]
        fn arbitrary_jwks_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = KeySet::parse(&bytes);
        }
    }

    #[test]
    fn reads_are_rate_limited() {
        let t0 = Instant::now();
        let min = Duration::from_secs(30);
        assert!(read_due(None, t0, min));
        assert!(!read_due(Some(t0), t0 + Duration::from_secs(29), min));
        assert!(read_due(Some(t0), t0 + Duration::from_secs(30), min));
    }

    #[test]
    fn unusable_keys_are_left_out() {
        let json = br#"{"keys": [
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed", "use": "enc"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ok"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "rs", "alg": "RS256"}
        ]}"#;
        let (set, skipped) = KeySet::parse(json).unwrap();
        assert_eq!(set.len(), 1, "{skipped:?}");
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(matches!(
            set.lookup("ok", Algorithm::EdDSA),
            Lookup::Found(_)
        ));
        assert!(matches!(
            set.lookup("ok", Algorithm::HS256),
            Lookup::WrongAlgorithm
        ));
        assert!(matches!(
            set.lookup("sym", Algorithm::HS256),
            Lookup::Unknown
        ));
        assert!(KeySet::parse(b"[]").is_err());
    }
}
