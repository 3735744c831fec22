//! The reference model ("oracle"): which transitions a correct pipeline emits for a
//! heartbeat log. The processor's end-to-end tests compare `facility-status` with
//! [`oracle`] (sorted logs: [`crate::sim::generate`]'s, or loadgen's ground-truth file read
//! with `presence_loadgen::read_truth`) or [`oracle_placed`] (several partitions, late,
//! out-of-order, tied, future-dated and refused beats, flap hold).
//!
//! The oracle is deliberately naive: per partition, a stream time and the open sessions,
//! expired by scanning them all; per facility, a count. A session is the pair (user id,
//! session id): a beat or END only ever touches the session its own user opened. It shares
//! no code with the processor.

use std::collections::{BTreeMap, HashMap};

use presence_core::records::{HeartbeatKind, Status};
use presence_loadgen::SimRecord;

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
            wall: None,
        })
        .collect();
    oracle_placed(
        &placed,
        &OracleConfig {
            timeout_ms,
            flap_hold_ms: 0,
            reject_after: i64::MAX,
            max_future_ms: i64::MAX,
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
    /// `processor.max_clock_skew`, ms: a record whose [`Placed::wall`] is known is refused
    /// when stamped more than this after it.
    pub max_future_ms: i64,
}

/// A heartbeats record where the processor meets it: its partition, and its offset, which
/// is its position among the records of that partition in the slice given to
/// [`oracle_placed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub partition: i32,
    pub record: SimRecord,
    /// The processor's wall clock when it read the record, if the log says: a record stamped
    /// more than [`OracleConfig::max_future_ms`] after it is refused, even if the partition's
    /// stream time passes its timestamp later. `None`: only [`OracleConfig::reject_after`].
    pub wall: Option<i64>,
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
        let refused = p.record.ts > c.reject_after
            || p.wall
                .is_some_and(|w| p.record.ts > w.saturating_add(c.max_future_ms));
        if !refused {
            partitions.entry(p.partition).or_default().push(&p.record);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::heartbeat;

    /// A record of `user`'s `session` at facility `f` (of 2 regions).
    fn at(ts: i64, user: &str, session: &str, f: usize, kind: HeartbeatKind) -> SimRecord {
        SimRecord {
            ts,
            heartbeat: heartbeat(session, user, f, 2, kind),
        }
    }

    /// The oracle's transitions of `log` with a 5,005 ms timeout, as (facility number, seq,
    /// status, since).
    fn transitions(log: &[SimRecord]) -> Vec<(usize, i64, Status, i64)> {
        oracle(log, 5_005)
            .into_iter()
            .map(|e| {
                let n = e.facility_id.trim_start_matches("facility-").parse();
                (n.unwrap_or(usize::MAX), e.seq, e.status, e.since)
            })
            .collect()
    }

    /// Another user's END or beat with a session id it did not open is a session of its own.
    #[test]
    fn oracle_keeps_sessions_with_their_owner() {
        use HeartbeatKind::{Beat, End};
        let log = vec![
            at(0, "victim", "s", 1, Beat),
            at(1_000, "attacker", "s", 1, End),
            at(2_000, "attacker", "s", 2, Beat),
            at(3_000, "attacker", "s", 2, End),
            at(4_000, "victim", "s", 1, Beat),
        ];
        assert_eq!(
            transitions(&log),
            vec![
                (1, 1, Status::Online, 0),
                (1, 2, Status::Offline, 9_005),
                (2, 1, Status::Online, 2_000),
                (2, 2, Status::Offline, 3_000),
            ]
        );
    }

    #[test]
    fn oracle_on_a_hand_written_log() {
        use HeartbeatKind::{Beat, End};
        let log = vec![
            at(0, "u", "a", 1, Beat),
            at(1_000, "u", "b", 1, Beat),
            at(2_000, "u", "a", 1, End),
            at(3_000, "u", "b", 2, Beat), // b moves: facility 1 goes offline
            at(20_000, "u", "b", 2, Beat), // after a silent gap: closed at 3_000 + 5_005, reopened
        ];
        assert_eq!(
            transitions(&log),
            vec![
                (1, 1, Status::Online, 0),
                (1, 2, Status::Offline, 3_000),
                (2, 1, Status::Online, 3_000),
                (2, 2, Status::Offline, 8_005),
                (2, 3, Status::Online, 20_000),
                (2, 4, Status::Offline, 25_005),
            ]
        );
    }
}
