//! Who is calling. Mode `none` trusts the body (local use); mode `jwt` takes the user,
//! facility and region from a token's claims, so a browser cannot report presence for a
//! facility that is not its own, nor watch a region it was not granted.
//!
//! Tokens are HS256 with `gateway.jwt_secret` (local use), or RS256/ES256/EdDSA signed by an
//! identity provider whose public keys come from a JWKS ([`jwks`]); `iss`, `aud` and the
//! token's lifetime are checked when configured. A token's `alg` must fit the key it names:
//! an HS256 token never meets a JWKS key (so a provider's public key cannot be used as an
//! HMAC secret), `none` and unknown algorithms are refused, and a header's own `jwk`/`jku`
//! are never trusted.
//!
//! The token comes in `Authorization: Bearer <token>`. Only `POST /v1/heartbeats` also takes
//! `?access_token=`, for `navigator.sendBeacon`, which cannot set headers and is the one
//! unload-safe way to send the END of a session. Streams (`EventSource` cannot set headers
//! either) use a short-lived, region-scoped [`ticket`] from `POST /v1/stream-tickets`
//! instead, so no long-lived token ever sits in a stream's URL.

pub mod jwks;
pub mod ticket;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine;
use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use presence_core::config::{AuthMode, GatewayConfig};
use serde::{Deserialize, Serialize};

pub use jwks::{Jwks, KeySet};
pub use ticket::{Grant, Tickets};

/// The claims a presence token carries. `exp` is required; `nbf` is honoured when present.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    pub facility: String,
    pub region: String,
    /// Regions whose live stream this token may open, besides `region`. Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

impl Claims {
    pub fn grants_region(&self, region: &str) -> bool {
        self.region == region || self.regions.iter().any(|r| r == region || r == "*")
    }

    /// Every region the token grants (`*` for all).
    pub fn granted_regions(&self) -> Vec<String> {
        let mut all = vec![self.region.clone()];
        all.extend(self.regions.iter().filter(|r| **r != self.region).cloned());
        all
    }
}

/// The claims plus what only the lifetime check needs.
#[derive(Deserialize)]
struct Decoded {
    #[serde(flatten)]
    claims: Claims,
    #[serde(default)]
    iat: Option<u64>,
}

/// Why a request is not authenticated (401), not allowed (403), or cannot be checked now
/// (503).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token: send 'Authorization: Bearer <token>' (a stream: ?ticket= from POST /v1/stream-tickets)")]
    Missing,
    #[error("a token in the URL (access_token=) is accepted only by POST /v1/heartbeats: send 'Authorization: Bearer <token>', or for a stream a ticket from POST /v1/stream-tickets")]
    TokenInUrl,
    #[error("the token has expired: get a new one from the application")]
    Expired,
    #[error("the token is not valid yet (nbf): check the clock of the issuer")]
    NotYetValid,
    #[error("the token's signature does not verify: it was not issued for this gateway")]
    BadSignature,
    #[error("the token is malformed or lacks a claim (sub, facility, region, exp): {0}")]
    Malformed(String),
    #[error("the token's algorithm '{0}' is not accepted for its key: HS256 with gateway.jwt_secret, or the algorithm of the identity provider's key named by kid")]
    WrongAlgorithm(String),
    #[error("the token's key id (kid) '{0}' is not among the identity provider's keys, even after fetching them again")]
    UnknownKey(String),
    #[error("the token's issuer (iss) is missing or is not gateway.jwt_issuer")]
    WrongIssuer,
    #[error("the token's audience (aud) is missing or does not include gateway.jwt_audience")]
    WrongAudience,
    #[error("the token is valid for {lifetime} s, longer than gateway.jwt_max_lifetime ({max} s): issue shorter-lived tokens")]
    TooLongLived { lifetime: u64, max: u64 },
    #[error("the identity provider's keys cannot be read now ({0}); retry later")]
    KeysUnavailable(String),
    #[error("the stream ticket is not valid (altered, or from another gateway): get a new one from POST /v1/stream-tickets")]
    TicketInvalid,
    #[error("the stream ticket has expired: get a new one from POST /v1/stream-tickets")]
    TicketExpired,
    #[error("{field} '{body}' in the body differs from the token's '{token}'")]
    Mismatch {
        field: &'static str,
        body: String,
        token: String,
    },
    #[error("the token does not grant region '{0}'")]
    RegionNotGranted(String),
}

impl AuthError {
    /// 403 for a caller we know who is asking for what is not theirs; 401 otherwise.
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            AuthError::Mismatch { .. } | AuthError::RegionNotGranted(_)
        )
    }

    /// 403 (known caller, not theirs), 503 (the keys cannot be read), else 401.
    pub fn status(&self) -> StatusCode {
        match self {
            _ if self.is_forbidden() => StatusCode::FORBIDDEN,
            AuthError::KeysUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// A short code for metrics labels and response bodies.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "token_missing",
            AuthError::TokenInUrl => "token_in_url",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadSignature => "token_forged",
            AuthError::Malformed(_) => "token_malformed",
            AuthError::WrongAlgorithm(_) => "token_algorithm",
            AuthError::UnknownKey(_) => "token_unknown_key",
            AuthError::WrongIssuer => "token_issuer",
            AuthError::WrongAudience => "token_audience",
            AuthError::TooLongLived { .. } => "token_lifetime",
            AuthError::KeysUnavailable(_) => "keys_unavailable",
            AuthError::TicketInvalid => "ticket_invalid",
            AuthError::TicketExpired => "ticket_expired",
            AuthError::Mismatch { .. } => "claim_mismatch",
            AuthError::RegionNotGranted(_) => "region_not_granted",
        }
    }
}

/// Verifies tokens and issues and redeems stream tickets. `None` when the gateway runs with
/// `auth = "none"`.
#[derive(Clone)]
pub struct Verifier(Arc<Inner>);

struct Inner {
    /// HS256 with `gateway.jwt_secret`; `None` when only a JWKS is configured.
    hs256: Option<DecodingKey>,
    jwks: Option<Jwks>,
    /// Leeway, `nbf`, `iss` and `aud`; the algorithm is set per token from its key.
    validation: Validation,
    /// `gateway.jwt_max_lifetime` in seconds; `None` = no limit.
    max_lifetime: Option<u64>,
    tickets: Tickets,
}

impl Verifier {
    /// Reads `gateway.jwks_file` now, so that a missing or broken file stops the start.
    pub fn from_config(c: &GatewayConfig) -> anyhow::Result<Option<Verifier>> {
        if c.auth == AuthMode::None {
            return Ok(None);
        }
        let jwks = Jwks::from_config(c)?;
        Ok(Some(Verifier::build(c, jwks)))
    }

    /// HS256 only, with `secret` and no lifetime limit (tests and local use).
    pub fn new(secret: &[u8], leeway: Duration) -> Verifier {
        let c = GatewayConfig {
            auth: AuthMode::Jwt,
            jwt_secret: presence_core::config::Secret::new(String::from_utf8_lossy(secret)),
            jwt_leeway: leeway,
            jwt_max_lifetime: Duration::ZERO,
            ..GatewayConfig::default()
        };
        Verifier::build(&c, None)
    }

    fn build(c: &GatewayConfig, jwks: Option<Jwks>) -> Verifier {
        let secret = c.jwt_secret.expose();
        let hs256 = (!secret.is_empty()).then(|| DecodingKey::from_secret(secret.as_bytes()));
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = c.jwt_leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if !c.jwt_issuer.is_empty() {
            validation.set_issuer(&[&c.jwt_issuer]);
            required.push("iss");
        }
        if c.jwt_audience.is_empty() {
            // A token may carry an audience meant for others; without our own we cannot
            // tell, so it is not checked.
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&c.jwt_audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let ticket_key = match c.ticket_secret.expose() {
            "" => Tickets::random_key(),
            s => s.as_bytes().to_vec(),
        };
        Verifier(Arc::new(Inner {
            hs256,
            jwks,
            validation,
            max_lifetime: (!c.jwt_max_lifetime.is_zero()).then_some(c.jwt_max_lifetime.as_secs()),
            tickets: Tickets::new(ticket_key, c.stream_ticket_ttl),
        }))
    }

    pub fn tickets(&self) -> &Tickets {
        &self.0.tickets
    }

    pub async fn verify(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let header = decode_header(token).map_err(|e| header_error(token, &e))?;
        let key = match header.alg {
            Algorithm::HS256 => self
                .0
                .hs256
                .clone()
                .ok_or_else(|| AuthError::WrongAlgorithm("HS256".into()))?,
            alg => {
                let jwks = self
                    .0
                    .jwks
                    .as_ref()
                    .ok_or_else(|| AuthError::WrongAlgorithm(format!("{alg:?}")))?;
                let kid = header
                    .kid
                    .ok_or_else(|| AuthError::UnknownKey("(none)".into()))?;
                jwks.key(&kid, alg).await?
            }
        };
        let mut validation = self.0.validation.clone();
        validation.algorithms = vec![header.alg];
        let decoded = decode::<Decoded>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => {
                    AuthError::WrongAlgorithm(format!("{:?}", header.alg))
                }
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::WrongIssuer,
                ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::WrongAudience,
                _ => AuthError::Malformed(e.to_string()),
            })?
            .claims;
        if let Some(max) = self.0.max_lifetime {
            check_lifetime(decoded.claims.exp, decoded.iat, now_secs(), max)?;
        }
        Ok(decoded.claims)
    }
}

/// `exp - iat` (or `exp - now` without `iat`) must not exceed `max` seconds.
pub fn check_lifetime(exp: u64, iat: Option<u64>, now: u64, max: u64) -> Result<(), AuthError> {
    let lifetime = exp.saturating_sub(iat.unwrap_or(now));
    if lifetime > max {
        return Err(AuthError::TooLongLived { lifetime, max });
    }
    Ok(())
}

/// Why a header did not decode: an algorithm we do not know (`none`, made-up names) is said
/// as such; anything else is malformed.
fn header_error(token: &str, e: &jsonwebtoken::errors::Error) -> AuthError {
    #[derive(Deserialize)]
    struct AlgOnly {
        alg: String,
    }
    let alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<AlgOnly>(&json).ok());
    match alg {
        Some(a) if a.alg.parse::<Algorithm>().is_err() => {
            AuthError::WrongAlgorithm(a.alg.chars().take(16).collect())
        }
        _ => AuthError::Malformed(e.to_string()),
    }
}

/// The SSE `response` with its body ended at `expires` (seconds since the epoch): a final
/// `expired` event, then the end of the stream. The stream's task notices the closed body
/// and stops; `EventSource` reconnects with its ticket, which by then is refused, so the
/// page must exchange a fresh token for a new ticket.
pub fn end_stream_at(response: axum::response::Response, expires: u64) -> axum::response::Response {
    use futures::StreamExt;
    let left = Duration::from_secs(expires.saturating_sub(now_secs()));
    let deadline = tokio::time::Instant::now() + left;
    let (parts, body) = response.into_parts();
    let last = futures::stream::once(async {
        Ok::<_, axum::Error>(bytes::Bytes::from_static(
            b"event: expired\ndata: the token behind this stream has expired: get a new token and ticket\n\n",
        ))
    });
    let body = body
        .into_data_stream()
        .take_until(tokio::time::sleep_until(deadline))
        .chain(last);
    axum::response::Response::from_parts(parts, axum::body::Body::from_stream(body))
}

pub fn now_secs() -> u64 {
    u64::try_from(presence_core::now_ms() / 1000).unwrap_or(0)
}

/// The bearer token of a request: the `Authorization` header, else, where `query_allowed`
/// (heartbeats: `sendBeacon`), `access_token=` in the query string. A token in the query
/// string anywhere else is refused rather than ignored, so that the client learns why.
pub fn bearer(
    authorization: Option<&str>,
    query: Option<&str>,
    query_allowed: bool,
) -> Result<Option<String>, AuthError> {
    if let Some(h) = authorization {
        return Ok(h.strip_prefix("Bearer ").map(|t| t.trim().to_string()));
    }
    match crate::query::query_param(query, "access_token") {
        Some(_) if !query_allowed => Err(AuthError::TokenInUrl),
        t => Ok(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bearer tokens and Authorization headers are refused without a panic.
        #[test]
        fn arbitrary_tokens_are_refused(token in ".{0,400}", parts in proptest::collection::vec("[A-Za-z0-9_-]{0,60}", 3)) {
            let v = Verifier::new(SECRET, Duration::from_secs(5));
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            prop_assert!(rt.block_on(v.verify(Some(&token))).is_err());
            prop_assert!(rt.block_on(v.verify(Some(&parts.join(".")))).is_err());
            let _ = bearer(Some(&token), Some(&token), false);
        }
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token(secret: &[u8], exp: u64, alg: Algorithm) -> String {
        let claims = Claims {
            sub: "u1".into(),
            facility: "f1".into(),
            region: "r1".into(),
            regions: vec![],
            exp,
            nbf: None,
        };
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn valid_token_gives_its_claims() {
        let v = Verifier::new(SECRET, Duration::from_secs(5));
        let c = v
            .verify(Some(&token(SECRET, now_secs() + 60, Algorithm::HS256)))
            .await
            .unwrap();
        assert_eq!((c.sub.as_str(), c.facility.as_str()), ("u1", "f1"));
        assert!(c.grants_region("r1") && !c.grants_region("r2"));
    }

    #[tokio::test]
    async fn expired_forged_missing_and_wrong_algorithm_are_refused() {
        let v = Verifier::new(SECRET, Duration::from_secs(5));
        let now = now_secs();
        assert_eq!(
            v.verify(Some(&token(SECRET, now - 60, Algorithm::HS256)))
                .await,
            Err(AuthError::Expired)
        );
        assert_eq!(
            v.verify(Some(&token(
                b"another-secret-another-secret-xx",
                now + 60,
                Algorithm::HS256
            )))
            .await,
            Err(AuthError::BadSignature)
        );
        assert_eq!(v.verify(None).await, Err(AuthError::Missing));
        assert_eq!(
            v.verify(Some(&token(SECRET, now + 60, Algorithm::HS512)))
                .await,
            Err(AuthError::WrongAlgorithm("HS512".into()))
        );
        // RS256 without a JWKS configured.
        let rs = format!(
            "{}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k"}"#),
            token(SECRET, now + 60, Algorithm::HS256)
                .split_once('.')
                .unwrap()
                .1
        );
        assert_eq!(
            v.verify(Some(&rs)).await,
            Err(AuthError::WrongAlgorithm("RS256".into()))
        );
        assert!(matches!(
            v.verify(Some("not.a.token")).await,
            Err(AuthError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn leeway_tolerates_small_clock_skew_only() {
        let v = Verifier::new(SECRET, Duration::from_secs(30));
        let now = now_secs();
        assert!(v
            .verify(Some(&token(SECRET, now - 10, Algorithm::HS256)))
            .await
            .is_ok());
        assert_eq!(
            v.verify(Some(&token(SECRET, now - 120, Algorithm::HS256)))
                .await,
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn lifetime_is_exp_minus_iat_or_now() {
        assert!(check_lifetime(1_000 + 3_600, Some(1_000), 2_000, 3_600).is_ok());
        assert_eq!(
            check_lifetime(1_000 + 3_601, Some(1_000), 2_000, 3_600),
            Err(AuthError::TooLongLived {
                lifetime: 3_601,
                max: 3_600
            })
        );
        // Without iat: what is left of it from now.
        assert!(check_lifetime(5_000, None, 2_000, 3_000).is_ok());
        assert!(check_lifetime(5_001, None, 2_000, 3_000).is_err());
    }

    #[test]
    fn token_from_header_or_only_where_allowed_from_query() {
        assert_eq!(
            bearer(Some("Bearer abc"), Some("access_token=x"), false),
            Ok(Some("abc".into()))
        );
        assert_eq!(
            bearer(None, Some("a=1&access_token=xyz"), true),
            Ok(Some("xyz".into()))
        );
        assert_eq!(
            bearer(None, Some("a=1&access_token=xyz"), false),
            Err(AuthError::TokenInUrl)
        );
        assert_eq!(bearer(Some("Basic abc"), None, true), Ok(None));
        assert_eq!(bearer(None, None, false), Ok(None));
    }
}
