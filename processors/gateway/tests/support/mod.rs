//! What the gateway's integration tests share.

use jsonwebtoken::{encode, EncodingKey, Header};
use presence_gateway::auth::Claims;

/// An HS256 token signed with `secret`: `sub` reporting for `facility` in `region`, expiring
/// at `exp` (seconds since the epoch).
pub fn hs256_token(secret: &str, sub: &str, facility: &str, region: &str, exp: u64) -> String {
    let claims = Claims {
        sub: sub.into(),
        facility: facility.into(),
        region: region.into(),
        regions: vec![],
        exp,
        nbf: None,
    };
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}
