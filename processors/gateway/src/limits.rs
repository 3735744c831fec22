//! How much one caller may take: heartbeats per identity over time (a token bucket each)
//! and open streams per identity and in total. Pure: time is passed in, nothing is read
//! from the clock, so the rules are tested without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a caller must wait.
#[derive(Debug, Clone, PartialEq)]
pub enum Limited {
    /// This identity is over its rate; it may send again after this long (429).
    Rate { retry_after: Duration },
    /// A batch costs more than a full bucket holds: it can never pass as one request (429).
    TooBig { cost: u32, burst: u32 },
    /// Too many identities are tracked at once; memory stays bounded (503).
    Full,
}

/// One identity's tokens at one instant.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per identity: `burst` heartbeats at once, refilled at `per_minute`.
/// An identity whose bucket has refilled is forgotten, so the table holds only identities
/// active within the last `burst / rate`; it never holds more than `max_identities`.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    max_identities: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32, max_identities: usize) -> RateLimiter {
        RateLimiter {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            max_identities,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn tokens(&self, b: &Bucket, now: Instant) -> f64 {
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        (b.tokens + refill).min(self.burst)
    }

    /// Takes `cost` tokens from each identity, all or none: a request is admitted only if
    /// every identity it names has enough.
    pub fn admit(&self, costs: &[(&str, u32)], now: Instant) -> Result<(), Limited> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = Duration::ZERO;
        let mut new_identities = 0;
        for (identity, cost) in costs {
            let cost = f64::from(*cost);
            if cost > self.burst {
                return Err(Limited::TooBig {
                    cost: cost as u32,
                    burst: self.burst as u32,
                });
            }
            let have = match buckets.get(*identity) {
                Some(b) => self.tokens(b, now),
                None => {
                    new_identities += 1;
                    self.burst
                }
            };
            if have < cost {
                wait = wait.max(Duration::from_secs_f64((cost - have) / self.per_second));
            }
        }
        if !wait.is_zero() {
            return Err(Limited::Rate { retry_after: wait });
        }
        if buckets.len() + new_identities > self.max_identities {
            // Full buckets carry no state: an absent identity starts full too.
            buckets.retain(|_, b| self.tokens(b, now) < self.burst);
            if buckets.len() + new_identities > self.max_identities {
                return Err(Limited::Full);
            }
        }
        for (identity, cost) in costs {
            let tokens = buckets
                .get(*identity)
                .map_or(self.burst, |b| self.tokens(b, now));
            buckets.insert(
                identity.to_string(),
                Bucket {
                    tokens: tokens - f64::from(*cost),
                    at: now,
                },
            );
        }
        Ok(())
    }

    /// Identities tracked now (a metric).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// This identity has `max` streams open (429).
    Identity { max: usize },
    /// The gateway has `max` streams open (503).
    Total { max: usize },
}

#[derive(Default)]
struct Open {
    total: usize,
    by_identity: HashMap<String, usize>,
}

/// Open streams, per identity and in total. A [`Slot`] is one open stream; dropping it
/// (the stream's task ends) gives it back.
#[derive(Clone)]
pub struct StreamSlots {
    max_total: usize,
    max_per_identity: usize,
    open: Arc<Mutex<Open>>,
}

impl StreamSlots {
    pub fn new(max_total: usize, max_per_identity: usize) -> StreamSlots {
        StreamSlots {
            max_total,
            max_per_identity,
            open: Arc::default(),
        }
    }

    /// A slot for `identity` (`None`: no identity, only the total applies).
    pub fn acquire(&self, identity: Option<&str>) -> Result<Slot, NoSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.max_total {
            return Err(NoSlot::Total {
                max: self.max_total,
            });
        }
        if let Some(id) = identity {
            let n = open.by_identity.entry(id.to_string()).or_insert(0);
            if *n >= self.max_per_identity {
                return Err(NoSlot::Identity {
                    max: self.max_per_identity,
                });
            }
            *n += 1;
        }
        open.total += 1;
        Ok(Slot {
            slots: self.clone(),
            identity: identity.map(str::to_string),
        })
    }

    /// Streams open now.
    pub fn total(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One open stream; given back on drop.
pub struct Slot {
    slots: StreamSlots,
    identity: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(id) = &self.identity {
            if let Some(n) = open.by_identity.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    open.by_identity.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_applies_and_refills() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(60, 3, 100); // 1 per second
        for _ in 0..3 {
            assert_eq!(limiter.admit(&[("u", 1)], t0), Ok(()));
        }
        match limiter.admit(&[("u", 1)], t0) {
            Err(Limited::Rate { retry_after }) => {
                assert!(
                    (retry_after.as_secs_f64() - 1.0).abs() < 1e-6,
                    "{retry_after:?}"
                )
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        // Another identity is not affected.
        assert_eq!(limiter.admit(&[("v", 1)], t0), Ok(()));
        // One second later, one more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.admit(&[("u", 1)], t1), Ok(()));
        assert!(limiter.admit(&[("u", 1)], t1).is_err());
    }

    #[test]
    fn a_browser_beating_every_30_s_never_meets_the_defaults() {
        let defaults = presence_core::config::GatewayConfig::default();
        let limiter = RateLimiter::new(
            defaults.ingest_per_minute,
            defaults.ingest_burst,
            defaults.ingest_identities,
        );
        let t0 = Instant::now();
        // Ten tabs of one user, each beating every 30 s, for an hour, plus an END each.
        for beat in 0..120u64 {
            let at = t0 + Duration::from_secs(30 * beat);
            for _tab in 0..10 {
                assert_eq!(limiter.admit(&[("user", 1)], at), Ok(()), "beat {beat}");
            }
        }
    }

    #[test]
    fn a_batch_is_admitted_whole_or_not_at_all() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(60, 3, 100);
        assert_eq!(limiter.admit(&[("a", 2)], t0), Ok(()));
        // b could pass, a cannot: nothing is taken from b.
        assert!(limiter.admit(&[("a", 2), ("b", 3)], t0).is_err());
        assert_eq!(limiter.admit(&[("b", 3)], t0), Ok(()));
        assert_eq!(
            limiter.admit(&[("c", 4)], t0),
            Err(Limited::TooBig { cost: 4, burst: 3 })
        );
    }

    #[test]
    fn the_table_forgets_refilled_identities_and_stays_bounded() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(60, 2, 2);
        assert_eq!(limiter.admit(&[("a", 1)], t0), Ok(()));
        assert_eq!(limiter.admit(&[("b", 1)], t0), Ok(()));
        assert_eq!(limiter.admit(&[("c", 1)], t0), Err(Limited::Full));
        assert_eq!(limiter.tracked(), 2);
        // After a and b refilled (1 s), they carry no state and make room.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.admit(&[("c", 1)], t1), Ok(()));
        assert!(limiter.tracked() <= 2);
    }

    #[test]
    fn stream_slots_cap_each_identity_and_the_total_and_come_back_on_drop() {
        let slots = StreamSlots::new(3, 2);
        let a1 = slots.acquire(Some("a")).unwrap();
        let _a2 = slots.acquire(Some("a")).unwrap();
        assert_eq!(
            slots.acquire(Some("a")).err(),
            Some(NoSlot::Identity { max: 2 })
        );
        let _anonymous = slots.acquire(None).unwrap();
        assert_eq!(
            slots.acquire(Some("b")).err(),
            Some(NoSlot::Total { max: 3 })
        );
        drop(a1);
        assert_eq!(slots.total(), 2);
        assert!(slots.acquire(Some("a")).is_ok());
    }
}
