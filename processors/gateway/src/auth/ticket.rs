//! Stream tickets: what `EventSource` carries in its URL instead of a token.
//!
//! `POST /v1/stream-tickets` (token in the `Authorization` header) returns a ticket: the
//! regions it opens, the identity, the moment by which it must be used
//! (`gateway.stream_ticket_ttl` after issue, default 60 s) and the grant's expiry (the
//! token's `exp`), signed with HMAC-SHA256 under a gateway key. A stream opened with it is
//! closed when the grant expires. A ticket seen in a log is good for one region set and at
//! most a minute, never for posting heartbeats or reading history.
//!
//! Form: `v1.<base64url(JSON)>.<base64url(HMAC-SHA256(key, "v1.<base64url(JSON)>"))>`. The
//! content is readable, not secret; only the signature matters.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{AuthError, Claims};

const VERSION: &str = "v1";
/// Longest ticket accepted, so that a huge `?ticket=` costs nothing to refuse.
const MAX_TICKET_BYTES: usize = 4096;

/// What a ticket (or a header token, on a stream) grants.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    /// The user id (the token's `sub`).
    pub sub: String,
    /// Regions the stream may follow (`*` for all).
    pub regions: Vec<String>,
    /// Seconds since the epoch by which the ticket must be used to open a stream.
    pub open_by: u64,
    /// Seconds since the epoch when the grant ends (the token's `exp`): the stream closes.
    pub expires: u64,
}

impl Grant {
    pub fn allows(&self, region: &str) -> bool {
        self.regions.iter().any(|r| r == region || r == "*")
    }
}

/// Issues and redeems tickets.
pub struct Tickets {
    key: Vec<u8>,
    ttl: Duration,
}

impl Tickets {
    pub fn new(key: Vec<u8>, ttl: Duration) -> Tickets {
        Tickets { key, ttl }
    }

    /// 32 random bytes: tickets from before a restart stop working, which costs a client
    /// one more exchange.
    pub fn random_key() -> Vec<u8> {
        let mut key = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        key
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!())
    }

    /// A ticket for `regions` (each granted by `claims`, checked by the caller) at `now`.
    pub fn issue(&self, claims: &Claims, regions: Vec<String>, now: u64) -> (String, Grant) {
        let grant = Grant {
            sub: claims.sub.clone(),
            regions,
            open_by: now + self.ttl.as_secs().max(1),
            expires: claims.exp,
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&grant).unwrap_or_default());
        let signed = format!("{VERSION}.{body}");
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        (format!("{signed}.{tag}"), grant)
    }

    /// The grant of `ticket` if it is ours, unexpired at `now`, and opens `region`.
    pub fn redeem(&self, ticket: &str, region: &str, now: u64) -> Result<Grant, AuthError> {
        let grant = self.redeem_any(ticket, now)?;
        if !grant.allows(region) {
            return Err(AuthError::RegionNotGranted(region.to_string()));
        }
        Ok(grant)
    }

    /// The grant of `ticket` if it is ours and unexpired at `now`, whatever regions it opens
    /// (the overview stream shows each of them).
    pub fn redeem_any(&self, ticket: &str, now: u64) -> Result<Grant, AuthError> {
        if ticket.len() > MAX_TICKET_BYTES {
            return Err(AuthError::TicketInvalid);
        }
        let (signed, tag) = ticket.rsplit_once('.').ok_or(AuthError::TicketInvalid)?;
        let body = signed
            .strip_prefix(VERSION)
            .and_then(|b| b.strip_prefix('.'))
            .ok_or(AuthError::TicketInvalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| AuthError::TicketInvalid)?;
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        // Constant time.
        mac.verify_slice(&tag)
            .map_err(|_| AuthError::TicketInvalid)?;
        let grant: Grant = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(AuthError::TicketInvalid)?;
        if now > grant.open_by {
            return Err(AuthError::TicketExpired);
        }
        if now >= grant.expires {
            return Err(AuthError::Expired);
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever arrives in `?ticket=` is refused without a panic, unless it is ours.
        #[test]
        fn arbitrary_tickets_are_refused(s in ".{0,300}", tail in "[A-Za-z0-9_.-]{0,120}") {
            let t = Tickets::new(Tickets::random_key(), Duration::from_secs(60));
            prop_assert!(t.redeem(&s, "a", 1_000).is_err());
            let shaped = format!("v1.{tail}");
            prop_assert!(t.redeem(&shaped, "a", 1_000).is_err());
        }
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "u1".into(),
            facility: "f1".into(),
            region: "a".into(),
            regions: vec!["b".into()],
            exp,
            nbf: None,
        }
    }

    #[test]
    fn a_ticket_opens_its_regions_until_it_expires() {
        let t = Tickets::new(Tickets::random_key(), Duration::from_secs(60));
        let (ticket, grant) = t.issue(&claims(10_000), vec!["a".into()], 1_000);
        assert_eq!((grant.open_by, grant.expires), (1_060, 10_000));
        assert_eq!(t.redeem(&ticket, "a", 1_000), Ok(grant.clone()));
        assert_eq!(t.redeem(&ticket, "a", 1_060), Ok(grant));
        assert_eq!(
            t.redeem(&ticket, "b", 1_000),
            Err(AuthError::RegionNotGranted("b".into()))
        );
        assert_eq!(t.redeem(&ticket, "a", 1_061), Err(AuthError::TicketExpired));
    }

    #[test]
    fn a_ticket_never_outlives_its_token() {
        let t = Tickets::new(Tickets::random_key(), Duration::from_secs(60));
        let (ticket, _) = t.issue(&claims(1_030), vec!["a".into()], 1_000);
        assert!(t.redeem(&ticket, "a", 1_029).is_ok());
        assert_eq!(t.redeem(&ticket, "a", 1_030), Err(AuthError::Expired));
    }

    #[test]
    fn altered_foreign_and_garbage_tickets_are_refused() {
        let t = Tickets::new(Tickets::random_key(), Duration::from_secs(60));
        let other = Tickets::new(Tickets::random_key(), Duration::from_secs(60));
        let (ticket, _) = t.issue(&claims(10_000), vec!["a".into()], 1_000);
        // Widen the regions, keep the signature.
        let (_, tag) = ticket.rsplit_once('.').unwrap();
        let forged_body = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Grant {
                sub: "u1".into(),
                regions: vec!["*".into()],
                open_by: 1_060,
                expires: 10_000,
            })
            .unwrap(),
        );
        let forged = format!("v1.{forged_body}.{tag}");
        let (foreign, _) = other.issue(&claims(10_000), vec!["a".into()], 1_000);
        for bad in [
            forged.as_str(),
            foreign.as_str(),
            "",
            "v1",
            "v1..",
            "v2.e30.AAAA",
            "not a ticket",
            &"x".repeat(10_000),
        ] {
            assert_eq!(
                t.redeem(bad, "a", 1_000),
                Err(AuthError::TicketInvalid),
                "{bad:.40}"
            );
        }
    }
}
