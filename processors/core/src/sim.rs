//! A seeded simulation of facilities full of users (a compressed log for the tests), and
//! the reference model ("oracle") that says which transitions a correct pipeline emits for
//! a heartbeat log. The processor's end-to-end tests compare `facility-status` with
//! [`oracle`] (sorted logs) or [`oracle_placed`] (several partitions, late, out-of-order,
//! tied, future-dated and refused beats, flap hold). `presence loadgen` runs a real-time
//! simulation of its own (`processors/loadgen`); its `--truth` file, read back with
//! [`read_truth`], goes through the same oracle.
//!
//! The oracle is deliberately naive: per partition, a stream time and the open sessions,
//! expired by scanning them all; per facility, a count. A session is the pair (user id,
//! session id): a beat or END only ever touches the session its own user opened. It shares
//! no code with the processor.

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
        client_version: None,
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
/// out, with no flap hold. `records` must be sorted by `ts`: they are taken as one
/// partition's log (see [`oracle_placed`] for several partitions, late and out-of-order
/// records, flap hold and refused timestamps).
pub fn oracle(records: &[SimRecord], timeout_ms: i64) -> Vec<Expected> {
    let placed: Vec<Placed> = records
        .iter()
        .map(|r| Placed {
            partition: 0,
            record: r.clone(),
        })
        .collect();
    oracle_placed(
        &placed,
        &OracleConfig {
            timeout_ms,
            flap_hold_ms: 0,
            reject_after: i64::MAX,
        },
    )
}

/// What the oracle needs to know of the processor's settings.
#[derive(Debug, Clone, Copy)]
pub struct OracleConfig {
    /// `processor.session_timeout`, ms.
    pub timeout_ms: i64,
    /// `processor.flap_hold`, ms: an OFFLINE waits this long and never happens if the
    /// facility reopens first (a reopen exactly at the end of the hold comes after it). 0:
    /// none.
    pub flap_hold_ms: i64,
    /// Records stamped after this are refused (dead-lettered, `timestamp_in_future`): the
    /// wall clock when they are processed plus `processor.max_clock_skew`. `i64::MAX`: none.
    pub reject_after: i64,
}

/// A heartbeats record where the processor meets it: its partition, and its offset, which
/// is its position among the records of that partition in the slice given to
/// [`oracle_placed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub partition: i32,
    pub record: SimRecord,
}

/// A session's count change at a facility, as a partition's log makes it.
struct Change {
    at: i64,
    partition: i32,
    seq: usize,
    delta: i32,
    facility: String,
    region: String,
}

/// The transitions a correct processor emits for `records` (in each partition's log
/// order; timestamps may be late, out of order, tied or ahead of the rest), once every
/// partition has caught up with the wall clock and every session has ended or timed out.
///
/// The rules, as the README states them, in the plainest code (no shared code with the
/// processor; expiry scans every open session):
///
/// - Each partition has a *stream time*: the highest timestamp it has seen. A session closes
///   when stream time passes `last beat + timeout` (a beat exactly at the deadline keeps it
///   open), at that deadline. Every other open and close happens at the stream time of the
///   record that causes it (a late record acts "now", not in the past).
/// - A beat opens a session unless one of its user is open under that id; one already older
///   than the timeout when it arrives opens nothing; a beat older than its session's last
///   extends nothing; a beat naming another facility moves the session (closes it there,
///   opens it here) unless it is older than the last beat or than the timeout. An END
///   closes its user's session unless it is older than the last beat.
/// - Facilities count their sessions' changes in `(time, partition, order in the
///   partition)` order: ONLINE when the count leaves 0, OFFLINE when it returns to 0 (after
///   the flap hold, if any, and only if it did not reopen in between).
pub fn oracle_placed(records: &[Placed], c: &OracleConfig) -> Vec<Expected> {
    let mut partitions: BTreeMap<i32, Vec<&SimRecord>> = BTreeMap::new();
    for p in records {
        partitions.entry(p.partition).or_default().push(&p.record);
    }
    let mut changes = Vec::new();
    for (partition, log) in partitions {
        sessions_of_partition(partition, &log, c, &mut changes);
    }
    changes.sort_by_key(|ch| (ch.at, ch.partition, ch.seq));
    facilities_of(changes, c.flap_hold_ms)
}

/// One partition's session changes, in the order the partition makes them.
fn sessions_of_partition(
    partition: i32,
    log: &[&SimRecord],
    c: &OracleConfig,
    changes: &mut Vec<Change>,
) {
    // (user id, session id) -> (facility, region, last beat)
    let mut open: HashMap<(&str, &str), (&str, &str, i64)> = HashMap::new();
    let mut stream = i64::MIN;
    let mut change = |at: i64, delta: i32, facility: &str, region: &str| {
        changes.push(Change {
            at,
            partition,
            seq: changes.len(),
            delta,
            facility: facility.to_string(),
            region: region.to_string(),
        });
    };
    for r in log {
        if r.ts > c.reject_after {
            continue;
        }
        if r.ts > stream {
            stream = r.ts;
            let mut expired: Vec<(i64, &str, (&str, &str))> = open
                .iter()
                .filter(|(_, s)| s.2.saturating_add(c.timeout_ms) < stream)
                .map(|(k, s)| (s.2 + c.timeout_ms, s.0, *k))
                .collect();
            expired.sort();
            for (deadline, _, key) in expired {
                if let Some((f, reg, _)) = open.remove(&key) {
                    change(deadline, -1, f, reg);
                }
            }
        }
        let at = stream;
        let h = &r.heartbeat;
        let key = (h.user_id.as_str(), h.session_id.as_str());
        let too_old = r.ts.saturating_add(c.timeout_ms) < at;
        match (open.get(&key).copied(), h.kind) {
            (None, HeartbeatKind::End) => {}
            (None, HeartbeatKind::Beat) if too_old => {}
            (None, HeartbeatKind::Beat) => {
                change(at, 1, &h.facility_id, &h.region_id);
                open.insert(key, (&h.facility_id, &h.region_id, r.ts));
            }
            (Some((_, _, last)), HeartbeatKind::End) if r.ts < last => {}
            (Some((f, reg, _)), HeartbeatKind::End) => {
                change(at, -1, f, reg);
                open.remove(&key);
            }
            (Some((f, reg, last)), HeartbeatKind::Beat) if f == h.facility_id => {
                open.insert(key, (f, reg, last.max(r.ts)));
            }
            (Some((_, _, last)), HeartbeatKind::Beat) if r.ts < last || too_old => {}
            (Some((f, reg, _)), HeartbeatKind::Beat) => {
                change(at, -1, f, reg);
                change(at, 1, &h.facility_id, &h.region_id);
                open.insert(key, (&h.facility_id, &h.region_id, r.ts));
            }
        }
    }
    // Caught up with the wall clock: every session left closes at its deadline.
    let mut rest: Vec<(i64, &str, &str)> = open
        .into_values()
        .map(|(f, reg, last)| (last.saturating_add(c.timeout_ms), f, reg))
        .collect();
    rest.sort();
    for (deadline, f, reg) in rest {
        change(deadline, -1, f, reg);
    }
}

/// Per facility: its count, and the transitions it makes, in `changes`' order.
fn facilities_of(changes: Vec<Change>, hold: i64) -> Vec<Expected> {
    #[derive(Default)]
    struct Facility {
        count: i32,
        online: bool,
        seq: i64,
        region: String,
        /// With a hold: when the count returned to 0 (OFFLINE is due at that + hold).
        pending: Option<i64>,
    }
    let mut facilities: BTreeMap<String, Facility> = BTreeMap::new();
    let mut out = Vec::new();
    let offline = |id: &str, f: &mut Facility, since: i64, out: &mut Vec<Expected>| {
        f.online = false;
        f.seq += 1;
        out.push(Expected {
            facility_id: id.to_string(),
            seq: f.seq,
            status: Status::Offline,
            since,
            open_sessions: 0,
            region_id: f.region.clone(),
        });
    };
    for ch in changes {
        let f = facilities.entry(ch.facility.clone()).or_default();
        // A pending OFFLINE due at or before this change happened first.
        if let Some(since) = f.pending.filter(|&since| since + hold <= ch.at) {
            f.pending = None;
            offline(&ch.facility, f, since, &mut out);
        }
        if ch.delta > 0 {
            f.region.clone_from(&ch.region);
            f.count += 1;
            if f.count == 1 && f.pending.take().is_none() && !f.online {
                f.online = true;
                f.seq += 1;
                out.push(Expected {
                    facility_id: ch.facility.clone(),
                    seq: f.seq,
                    status: Status::Online,
                    since: ch.at,
                    open_sessions: 1,
                    region_id: ch.region.clone(),
                });
            }
        } else if f.count > 0 {
            f.count -= 1;
            if f.count == 0 && f.online {
                if hold > 0 {
                    f.pending = Some(ch.at);
                } else {
                    offline(&ch.facility, f, ch.at, &mut out);
                }
            }
        }
    }
    for (id, f) in &mut facilities {
        if let Some(since) = f.pending.take() {
            offline(id, f, since, &mut out);
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
