//! A seeded simulation of facilities full of users, and the reference model ("oracle")
//! that says which transitions a correct pipeline emits for it. The load generator sends
//! what [`generate`] makes; the processor's end-to-end tests compare `facility-status`
//! with [`oracle`].
//!
//! The oracle is deliberately naive: per session, its open intervals; per facility, the
//! union of its sessions' intervals. A session is the pair (user id, session id): a beat
//! or END only ever touches the session its own user opened. It shares no code with the
//! processor.

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::records::{Heartbeat, HeartbeatKind, Status};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Sessions over the whole run (each user logs in once or more).
    pub sessions: usize,
    pub facilities: usize,
    pub regions: usize,
    /// Event time of the first record, ms since the epoch.
    pub start_ms: i64,
    /// Sessions start uniformly within this span.
    pub span_ms: i64,
    /// A beat every this long, ± `jitter_ms`.
    pub beat_ms: i64,
    pub jitter_ms: i64,
    /// Session lifetimes are uniform in this range.
    pub lifetime_ms: (i64, i64),
    /// The chance that a session ends with END (logout) rather than going silent.
    pub end_probability: f64,
    /// The chance that a session moves to another facility halfway.
    pub move_probability: f64,
    /// The chance that a session reuses the id of an earlier one under its own user id (a
    /// client with a fixed id, or one replaying someone else's): a session of its own all
    /// the same, which must never close or move the other.
    pub reused_id_probability: f64,
}

impl SimConfig {
    /// A compressed day for tests: beats every second, lifetimes of 5 s to 2 min.
    pub fn compressed(seed: u64, sessions: usize, facilities: usize, start_ms: i64) -> SimConfig {
        SimConfig {
            seed,
            sessions,
            facilities,
            regions: 4,
            start_ms,
            span_ms: 10 * 60_000,
            beat_ms: 1_000,
            jitter_ms: 100,
            lifetime_ms: (5_000, 120_000),
            end_probability: 0.5,
            move_probability: 0.1,
            reused_id_probability: 0.05,
        }
    }
}

/// One heartbeat with its event time (the Kafka record timestamp to use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRecord {
    pub ts: i64,
    pub heartbeat: Heartbeat,
}

pub fn facility_id(i: usize) -> String {
    format!("facility-{i:05}")
}

pub fn region_of(facility: usize, regions: usize) -> String {
    format!("region-{}", facility % regions.max(1))
}

/// The heartbeat log, sorted by time. Timestamps are unique multiples of 10 ms, so that
/// no two records tie and (with a timeout ≡ 5 mod 10) no expiry ties with a record.
pub fn generate(c: &SimConfig) -> Vec<SimRecord> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let mut out = Vec::new();
    for s in 0..c.sessions {
        let reused = if s > 0 && rng.gen_bool(c.reused_id_probability) {
            rng.gen_range(0..s)
        } else {
            s
        };
        let session_id = format!("sess-{}-{reused:06}", c.seed);
        let user_id = format!("user-{:05}", rng.gen_range(0..c.sessions.max(1)));
        let mut facility = rng.gen_range(0..c.facilities.max(1));
        let start = c.start_ms + rng.gen_range(0..c.span_ms.max(1));
        let lifetime = rng.gen_range(c.lifetime_ms.0..=c.lifetime_ms.1);
        let moves_at = rng
            .gen_bool(c.move_probability)
            .then(|| start + lifetime / 2);
        let ends = rng.gen_bool(c.end_probability);
        let mut t = start;
        let mut moved = false;
        while t < start + lifetime {
            if let Some(m) = moves_at {
                if !moved && t >= m && c.facilities > 1 {
                    facility = (facility + 1 + rng.gen_range(0..c.facilities - 1)) % c.facilities;
                    moved = true;
                }
            }
            out.push(SimRecord {
                ts: t,
                heartbeat: beat(
                    &session_id,
                    &user_id,
                    facility,
                    c.regions,
                    HeartbeatKind::Beat,
                ),
            });
            t += c.beat_ms + rng.gen_range(-c.jitter_ms..=c.jitter_ms);
        }
        if ends {
            out.push(SimRecord {
                ts: t.min(start + lifetime),
                heartbeat: beat(
                    &session_id,
                    &user_id,
                    facility,
                    c.regions,
                    HeartbeatKind::End,
                ),
            });
        }
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

fn beat(
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
    }
}

/// A transition as the oracle predicts it (no `emitted_at`: wall time is not predictable).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Expected {
    pub facility_id: String,
    pub seq: i64,
    pub status: Status,
    pub since: i64,
    pub open_sessions: i32,
    pub region_id: String,
}

/// Every transition of every facility once all sessions of `records` have ended or timed
/// out, with no flap hold. `records` must be sorted by `ts`.
pub fn oracle(records: &[SimRecord], timeout_ms: i64) -> Vec<Expected> {
    // (at, +1/-1, facility, region)
    let mut events: Vec<(i64, i32, String, String)> = Vec::new();
    // (user id, session id) -> (facility, region, last beat)
    let mut open: HashMap<(&str, &str), (&str, &str, i64)> = HashMap::new();
    for r in records {
        let h = &r.heartbeat;
        let session = (h.user_id.as_str(), h.session_id.as_str());
        if let Some(&(f, reg, last)) = open.get(&session) {
            if last + timeout_ms < r.ts {
                events.push((last + timeout_ms, -1, f.into(), reg.into()));
                open.remove(&session);
            }
        }
        match (open.get(&session).copied(), h.kind) {
            (None, HeartbeatKind::Beat) => {
                events.push((r.ts, 1, h.facility_id.clone(), h.region_id.clone()));
                open.insert(session, (&h.facility_id, &h.region_id, r.ts));
            }
            (None, HeartbeatKind::End) => {}
            (Some((f, reg, _)), HeartbeatKind::End) => {
                events.push((r.ts, -1, f.into(), reg.into()));
                open.remove(&session);
            }
            (Some((f, reg, _)), HeartbeatKind::Beat) if f != h.facility_id => {
                events.push((r.ts, -1, f.into(), reg.into()));
                events.push((r.ts, 1, h.facility_id.clone(), h.region_id.clone()));
                open.insert(session, (&h.facility_id, &h.region_id, r.ts));
            }
            (Some((f, reg, _)), HeartbeatKind::Beat) => {
                open.insert(session, (f, reg, r.ts));
            }
        }
    }
    for (_, (f, reg, last)) in open {
        events.push((last + timeout_ms, -1, f.into(), reg.into()));
    }
    // Ties at one facility cannot happen with generate()'s timestamps; sort for the rest.
    events.sort_by(|a, b| (a.0, &a.2).cmp(&(b.0, &b.2)));
    let mut count: BTreeMap<String, (i32, i64)> = BTreeMap::new();
    let mut out = Vec::new();
    for (at, delta, f, region) in events {
        let e = count.entry(f.clone()).or_insert((0, 0));
        e.0 += delta;
        if (delta == 1 && e.0 == 1) || (delta == -1 && e.0 == 0) {
            e.1 += 1;
            out.push(Expected {
                facility_id: f,
                seq: e.1,
                status: if e.0 > 0 {
                    Status::Online
                } else {
                    Status::Offline
                },
                since: at,
                open_sessions: e.0,
                region_id: region,
            });
        }
    }
    out.sort();
    out
}

/// One line of a ground-truth file (`presence loadgen --truth FILE`): the heartbeat's JSON
/// with its event time `ts` (ms).
#[derive(serde::Serialize, serde::Deserialize)]
struct TruthLine<'a> {
    ts: i64,
    #[serde(flatten)]
    heartbeat: std::borrow::Cow<'a, Heartbeat>,
}

/// `h` with its event time as a ground-truth line (no newline).
pub fn truth_line(h: &Heartbeat, ts: i64) -> String {
    let line = TruthLine {
        ts,
        heartbeat: std::borrow::Cow::Borrowed(h),
    };
    serde_json::to_string(&line).unwrap_or_default()
}

/// Reads a ground-truth file, sorted by `ts`, ready for [`oracle`].
pub fn read_truth(path: &std::path::Path) -> std::io::Result<Vec<SimRecord>> {
    use std::io::BufRead;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(std::fs::File::open(path)?)
        .lines()
        .enumerate()
    {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: TruthLine = serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}:{}: {e}", path.display(), n + 1),
            )
        })?;
        out.push(SimRecord {
            ts: parsed.ts,
            heartbeat: parsed.heartbeat.into_owned(),
        });
    }
    out.sort_by_key(|r| r.ts);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_log() {
        let c = SimConfig::compressed(7, 50, 10, 1_000_000);
        assert_eq!(generate(&c), generate(&c));
        let other = SimConfig {
            seed: 8,
            ..c.clone()
        };
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
        let mut users: HashMap<&str, std::collections::HashSet<&str>> = HashMap::new();
        for r in &log {
            users
                .entry(&r.heartbeat.session_id)
                .or_default()
                .insert(&r.heartbeat.user_id);
        }
        assert!(users.values().any(|u| u.len() > 1));
    }

    /// Another user's END or beat with a session id it did not open is a session of its own.
    #[test]
    fn oracle_keeps_sessions_with_their_owner() {
        let b = |ts, u: &str, f: usize, kind| SimRecord {
            ts,
            heartbeat: beat("s", u, f, 2, kind),
        };
        let log = vec![
            b(0, "victim", 1, HeartbeatKind::Beat),
            b(1_000, "attacker", 1, HeartbeatKind::End),
            b(2_000, "attacker", 2, HeartbeatKind::Beat),
            b(3_000, "attacker", 2, HeartbeatKind::End),
            b(4_000, "victim", 1, HeartbeatKind::Beat),
        ];
        let got: Vec<(String, i64, Status, i64)> = oracle(&log, 5_005)
            .into_iter()
            .map(|e| (e.facility_id, e.seq, e.status, e.since))
            .collect();
        let f1 = facility_id(1);
        let f2 = facility_id(2);
        assert_eq!(
            got,
            vec![
                (f1.clone(), 1, Status::Online, 0),
                (f1, 2, Status::Offline, 9_005),
                (f2.clone(), 1, Status::Online, 2_000),
                (f2, 2, Status::Offline, 3_000),
            ]
        );
    }

    #[test]
    fn oracle_on_a_hand_written_log() {
        let b = |ts, s: &str, f: usize, kind| SimRecord {
            ts,
            heartbeat: beat(s, "u", f, 2, kind),
        };
        let log = vec![
            b(0, "a", 1, HeartbeatKind::Beat),
            b(1_000, "b", 1, HeartbeatKind::Beat),
            b(2_000, "a", 1, HeartbeatKind::End),
            b(3_000, "b", 2, HeartbeatKind::Beat), // b moves: facility 1 goes offline
            b(20_000, "b", 2, HeartbeatKind::Beat), // after a silent gap: closed at 3_000 + 5_005, reopened
        ];
        let got: Vec<(String, i64, Status, i64)> = oracle(&log, 5_005)
            .into_iter()
            .map(|e| (e.facility_id, e.seq, e.status, e.since))
            .collect();
        let f1 = facility_id(1);
        let f2 = facility_id(2);
        assert_eq!(
            got,
            vec![
                (f1.clone(), 1, Status::Online, 0),
                (f1, 2, Status::Offline, 3_000),
                (f2.clone(), 1, Status::Online, 3_000),
                (f2.clone(), 2, Status::Offline, 8_005),
                (f2.clone(), 3, Status::Online, 20_000),
                (f2, 4, Status::Offline, 25_005),
            ]
        );
    }
}
