//! Seeded heartbeat logs for the tests, made by loadgen's users
//! ([`presence_loadgen::Users`], the project's one simulation of users) with injected time:
//! where `presence loadgen` advances them with the clock and sends what they send,
//! [`generate`] advances them from one deadline to the next and writes it down. The
//! oracle ([`crate::oracle`]) says what the processor must make of such a log.

use std::time::Duration;

use presence_core::records::{Heartbeat, HeartbeatKind};
use presence_loadgen::{Options, Users};

pub use presence_loadgen::{facility_id, read_truth, region_of, SimRecord};

/// A log to generate: loadgen's users, from `start_ms` of event time for
/// `users.duration`.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The users; `duration` is the length of the log (`None`: an empty log).
    pub users: Options,
    /// Event time of the start, ms since the epoch.
    pub start_ms: i64,
}

impl SimConfig {
    /// A compressed ten minutes for tests, about `sessions` sessions at `facilities`
    /// facilities: users beating every second (± 10%), logged in and out for a minute on
    /// average (so about five sessions each, and `sessions / 5` users spread evenly), half
    /// of the sessions ending without END, one in ten moving to another facility, one login
    /// in twenty reusing an earlier session's id. Dense logs spread out in event time: no
    /// two records share a 10 ms step (see [`generate`]).
    pub fn compressed(seed: u64, sessions: usize, facilities: usize, start_ms: i64) -> SimConfig {
        const SESSIONS_PER_USER: f64 = 5.0;
        let users_per_facility =
            (sessions as f64 / SESSIONS_PER_USER / facilities.max(1) as f64).round() as usize;
        SimConfig {
            users: Options {
                facilities,
                first_facility: 0,
                regions: 4,
                users_per_facility: users_per_facility.max(1),
                beat_interval: Duration::from_secs(1),
                mean_session: Duration::from_secs(60),
                mean_offline: Duration::from_secs(60),
                vanish_probability: 0.5,
                move_probability: 0.1,
                reused_id_probability: 0.05,
                seed,
                duration: Some(Duration::from_secs(600)),
            },
            start_ms,
        }
    }
}

/// The heartbeat log, sorted by time. Timestamps are unique multiples of 10 ms, so that
/// no two records tie and (with a timeout ≡ 5 mod 10) no expiry ties with a record.
pub fn generate(c: &SimConfig) -> Vec<SimRecord> {
    let mut users = Users::new(&c.users);
    let end = c.users.duration.unwrap_or(Duration::ZERO);
    let mut out = Vec::new();
    while let Some(now) = users.next_due().filter(|&t| t < end) {
        let ts = c.start_ms + now.as_millis() as i64;
        users.advance(now, ts, |heartbeat| out.push(SimRecord { ts, heartbeat }));
    }
    out.sort_by_key(|r| r.ts);
    // Unique multiples of 10 ms, order kept.
    let mut last = i64::MIN;
    for r in &mut out {
        let mut ts = r.ts - r.ts.rem_euclid(10);
        if ts <= last {
            ts = last + 10;
        }
        r.ts = ts;
        r.heartbeat.client_sent_at = Some(ts);
        last = ts;
    }
    out
}

/// A heartbeat of `user`'s `session` at facility number `facility`, for hand-written logs.
pub fn heartbeat(
    session: &str,
    user: &str,
    facility: usize,
    regions: usize,
    kind: HeartbeatKind,
) -> Heartbeat {
    Heartbeat {
        session_id: session.to_string(),
        user_id: user.to_string(),
        facility_id: facility_id(facility),
        region_id: region_of(facility, regions),
        kind,
        client_sent_at: None,
        client_version: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    #[test]
    fn same_seed_same_log() {
        let c = SimConfig::compressed(7, 100, 10, 1_000_000);
        assert_eq!(generate(&c), generate(&c));
        let mut other = c.clone();
        other.users.seed = 8;
        assert_ne!(generate(&c), generate(&other));
    }

    #[test]
    fn timestamps_are_unique_sorted_multiples_of_ten() {
        let log = generate(&SimConfig::compressed(1, 200, 20, 1_000_000));
        assert!(log.windows(2).all(|w| w[0].ts < w[1].ts));
        assert!(log.iter().all(|r| r.ts % 10 == 0));
    }

    #[test]
    fn generated_logs_reuse_some_session_ids_under_other_users() {
        let log = generate(&SimConfig::compressed(3, 400, 20, 1_000_000));
        let mut users: HashMap<&str, HashSet<&str>> = HashMap::new();
        for r in &log {
            users
                .entry(&r.heartbeat.session_id)
                .or_default()
                .insert(&r.heartbeat.user_id);
        }
        assert!(users.values().any(|u| u.len() > 1));
    }

    /// The log holds what loadgen's users do: logins, END and silent ends, moves.
    #[test]
    fn generated_logs_hold_ends_silences_and_moves() {
        let log = generate(&SimConfig::compressed(4, 150, 10, 1_000_000));
        let mut facilities: HashMap<(&str, &str), HashSet<&str>> = HashMap::new();
        let mut ended = HashSet::new();
        for r in &log {
            let key = (
                r.heartbeat.user_id.as_str(),
                r.heartbeat.session_id.as_str(),
            );
            facilities
                .entry(key)
                .or_default()
                .insert(&r.heartbeat.facility_id);
            if r.heartbeat.kind == HeartbeatKind::End {
                ended.insert(key);
            }
        }
        assert!(!ended.is_empty(), "some sessions end with END");
        assert!(ended.len() < facilities.len(), "some end in silence");
        assert!(facilities.values().any(|f| f.len() > 1), "some move");
    }
}
