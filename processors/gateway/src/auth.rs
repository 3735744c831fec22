//! Who is calling. Mode `none` trusts the body (local use); mode `jwt` takes the user,
//! facility and region from an HS256 token's claims, so a browser cannot report presence
//! for a facility that is not its own, nor watch a region it was not granted.
//!
//! The token comes in `Authorization: Bearer <token>`, or in the `access_token` query
//! parameter for the two browser APIs that cannot set headers (`navigator.sendBeacon` and
//! `EventSource`).

use std::time::Duration;

use jsonwebtoken::{decode, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use presence_core::config::{AuthMode, GatewayConfig};
use serde::{Deserialize, Serialize};

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
}

/// Why a request is not authenticated (401) or not allowed (403).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token: send 'Authorization: Bearer <token>' or ?access_token=<token>")]
    Missing,
    #[error("the token has expired: get a new one from the application")]
    Expired,
    #[error("the token is not valid yet (nbf): check the clock of the issuer")]
    NotYetValid,
    #[error("the token's signature does not verify: it was not issued for this gateway")]
    BadSignature,
    #[error("the token is malformed or lacks a claim (sub, facility, region, exp): {0}")]
    Malformed(String),
    #[error("the token's algorithm is not HS256")]
    WrongAlgorithm,
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

    /// A short code for metrics labels and response bodies.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "token_missing",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadSignature => "token_forged",
            AuthError::Malformed(_) => "token_malformed",
            AuthError::WrongAlgorithm => "token_algorithm",
            AuthError::Mismatch { .. } => "claim_mismatch",
            AuthError::RegionNotGranted(_) => "region_not_granted",
        }
    }
}

/// Verifies tokens. `None` when the gateway runs with `auth = "none"`.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn from_config(c: &GatewayConfig) -> Option<Verifier> {
        match c.auth {
            AuthMode::None => None,
            AuthMode::Jwt => Some(Verifier::new(
                c.jwt_secret.expose().as_bytes(),
                c.jwt_leeway,
            )),
        }
    }

    pub fn new(secret: &[u8], leeway: Duration) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        decode::<Claims>(token, &self.key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
                _ => AuthError::Malformed(e.to_string()),
            })
    }
}

/// The bearer token of a request: the `Authorization` header, else `access_token=` in the
/// query string.
pub fn token_of(authorization: Option<&str>, query: Option<&str>) -> Option<String> {
    match authorization {
        Some(h) => h.strip_prefix("Bearer ").map(|t| t.trim().to_string()),
        None => crate::http::query_param(query, "access_token"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

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

    #[test]
    fn valid_token_gives_its_claims() {
        let v = Verifier::new(SECRET, Duration::from_secs(5));
        let c = v
            .verify(Some(&token(SECRET, now() + 60, Algorithm::HS256)))
            .unwrap();
        assert_eq!((c.sub.as_str(), c.facility.as_str()), ("u1", "f1"));
        assert!(c.grants_region("r1") && !c.grants_region("r2"));
    }

    #[test]
    fn expired_forged_missing_and_wrong_algorithm_are_refused() {
        let v = Verifier::new(SECRET, Duration::from_secs(5));
        assert_eq!(
            v.verify(Some(&token(SECRET, now() - 60, Algorithm::HS256))),
            Err(AuthError::Expired)
        );
        assert_eq!(
            v.verify(Some(&token(
                b"another-secret-another-secret-xx",
                now() + 60,
                Algorithm::HS256
            ))),
            Err(AuthError::BadSignature)
        );
        assert_eq!(v.verify(None), Err(AuthError::Missing));
        assert_eq!(
            v.verify(Some(&token(SECRET, now() + 60, Algorithm::HS512))),
            Err(AuthError::WrongAlgorithm)
        );
        assert!(matches!(
            v.verify(Some("not.a.token")),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn leeway_tolerates_small_clock_skew_only() {
        let v = Verifier::new(SECRET, Duration::from_secs(30));
        assert!(v
            .verify(Some(&token(SECRET, now() - 10, Algorithm::HS256)))
            .is_ok());
        assert_eq!(
            v.verify(Some(&token(SECRET, now() - 120, Algorithm::HS256))),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn token_from_header_or_query() {
        assert_eq!(
            token_of(Some("Bearer abc"), Some("access_token=x")).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_of(None, Some("a=1&access_token=xyz")).as_deref(),
            Some("xyz")
        );
        assert_eq!(token_of(Some("Basic abc"), None), None);
        assert_eq!(token_of(None, None), None);
    }
}
