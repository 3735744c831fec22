//! The simulated users: one state machine per user, driven by a deadline-ordered heap,
//! over injected time. `presence loadgen` advances it with the clock ([`crate::run`]); the
//! tests' logs (`presence_testkit::sim::generate`) advance it from deadline to deadline
//! with no clock at all. Nothing here reads the time or sends anything.
//!
//! A user logs in at its home facility, beats every `beat_interval` (± 10%), sometimes
//! moves to another facility once, and after a session of about `mean_session` logs out
//! with END or vanishes without one (a closed laptop); it stays logged out for about
//! `mean_offline`, then logs in again with a new session id (or, with
//! `reused_id_probability`, the id of an earlier session, perhaps another user's). The
//! same seed gives the same users.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use presence_core::records::{Heartbeat, HeartbeatKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Options;

/// The facility id of facility number `i`: `facility-00042`.
pub fn facility_id(i: usize) -> String {
    format!("facility-{i:05}")
}

/// The region of facility number `facility`, facilities spread round-robin over `regions`.
pub fn region_of(facility: usize, regions: usize) -> String {
    format!("region-{}", facility % regions.max(1))
}

/// What the users did so far.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    pub logins: u64,
    /// Sessions ended with END.
    pub logouts: u64,
    /// Sessions ended without END.
    pub vanished: u64,
    pub moves: u64,
}

/// Every simulated user, and when each acts next. Time is a [`Duration`] since the start of
/// the run.
pub struct Users {
    options: Options,
    rng: StdRng,
    people: Vec<User>,
    due: BinaryHeap<Reverse<(Duration, usize)>>,
    /// Every session id given out so far; kept only when sessions may reuse one.
    issued: Vec<String>,
    activity: Activity,
}

/// One simulated user: logged out, or logged in with a session.
struct User {
    home: usize,
    session: Option<Session>,
    sessions_started: u64,
}

struct Session {
    id: String,
    facility: usize,
    ends_at: Duration,
    moves_at: Option<Duration>,
    vanishes: bool,
}

/// An exponentially distributed duration of mean `mean`, at most ten times the mean.
fn exp(rng: &mut StdRng, mean: Duration) -> Duration {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    mean.mul_f64(-u.ln()).min(mean * 10)
}

impl Users {
    /// `options.facilities * options.users_per_facility` users, all logged out; each logs
    /// in within the first quarter of `mean_offline` or so.
    pub fn new(options: &Options) -> Users {
        let mut rng = StdRng::seed_from_u64(options.seed);
        let count = options.facilities * options.users_per_facility;
        let people = (0..count)
            .map(|i| User {
                home: options.first_facility + i / options.users_per_facility.max(1),
                session: None,
                sessions_started: 0,
            })
            .collect();
        let due = (0..count)
            .map(|i| Reverse((exp(&mut rng, options.mean_offline / 4), i)))
            .collect();
        Users {
            options: options.clone(),
            rng,
            people,
            due,
            issued: Vec::new(),
            activity: Activity::default(),
        }
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.people.len()
    }

    pub fn is_empty(&self) -> bool {
        self.people.is_empty()
    }

    /// How many are logged in now.
    pub fn online(&self) -> usize {
        self.people.iter().filter(|u| u.session.is_some()).count()
    }

    pub fn activity(&self) -> Activity {
        self.activity
    }

    /// When the next user acts; `None` with no users.
    pub fn next_due(&self) -> Option<Duration> {
        self.due.peek().map(|Reverse((t, _))| *t)
    }

    /// Every user due at or before `now` acts at `now`, handing what it sends to `send`
    /// (with `client_sent_at` = `wall_ms`, the wall clock at `now`).
    pub fn advance(&mut self, now: Duration, wall_ms: i64, mut send: impl FnMut(Heartbeat)) {
        while let Some(Reverse((t, i))) = self.due.peek().copied() {
            if t > now {
                break;
            }
            self.due.pop();
            let next = self.step(i, now, wall_ms, &mut send);
            self.due.push(Reverse((next, i)));
        }
    }

    /// Advances user `index` at `now`; returns when it acts next.
    fn step(
        &mut self,
        index: usize,
        now: Duration,
        wall_ms: i64,
        send: &mut impl FnMut(Heartbeat),
    ) -> Duration {
        let o = &self.options;
        let rng = &mut self.rng;
        let a = &mut self.activity;
        let u = &mut self.people[index];
        let mut emit = |session: &Session, kind: HeartbeatKind| {
            send(Heartbeat {
                session_id: session.id.clone(),
                user_id: format!("user-{index:07}"),
                facility_id: facility_id(session.facility),
                region_id: region_of(session.facility, o.regions),
                kind,
                client_sent_at: Some(wall_ms),
                client_version: None,
            })
        };
        let jittered = |rng: &mut StdRng| o.beat_interval.mul_f64(rng.gen_range(0.9..1.1));
        match u.session.take() {
            None => {
                u.sessions_started += 1;
                let reuse = o.reused_id_probability > 0.0
                    && !self.issued.is_empty()
                    && rng.gen_bool(o.reused_id_probability);
                let id = if reuse {
                    self.issued[rng.gen_range(0..self.issued.len())].clone()
                } else {
                    format!("s{}-{index}-{}", o.seed, u.sessions_started)
                };
                if o.reused_id_probability > 0.0 {
                    self.issued.push(id.clone());
                }
                let session = Session {
                    id,
                    facility: u.home,
                    ends_at: now + exp(rng, o.mean_session),
                    moves_at: rng
                        .gen_bool(o.move_probability)
                        .then(|| now + exp(rng, o.mean_session / 2)),
                    vanishes: rng.gen_bool(o.vanish_probability),
                };
                a.logins += 1;
                emit(&session, HeartbeatKind::Beat);
                u.session = Some(session);
                now + jittered(rng)
            }
            Some(session) if now >= session.ends_at => {
                if session.vanishes {
                    a.vanished += 1;
                } else {
                    a.logouts += 1;
                    emit(&session, HeartbeatKind::End);
                }
                now + exp(rng, o.mean_offline)
            }
            Some(mut session) => {
                if session.moves_at.is_some_and(|m| now >= m) && o.facilities > 1 {
                    let from = session.facility - o.first_facility;
                    session.facility = o.first_facility
                        + (from + 1 + rng.gen_range(0..o.facilities - 1)) % o.facilities;
                    session.moves_at = None;
                    a.moves += 1;
                }
                emit(&session, HeartbeatKind::Beat);
                let next = now + jittered(rng);
                let next = next.min(session.ends_at.max(now + Duration::from_millis(1)));
                u.session = Some(session);
                next
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20 users, 2,000 steps from deadline to deadline: what they sent.
    fn run_steps(seed: u64) -> Vec<(String, String, HeartbeatKind)> {
        let o = Options {
            facilities: 5,
            seed,
            mean_session: Duration::from_secs(60),
            mean_offline: Duration::from_secs(30),
            move_probability: 0.5,
            ..Options::default()
        };
        let mut users = Users::new(&o);
        assert_eq!(users.len(), 20);
        let mut sent = Vec::new();
        for _ in 0..2_000 {
            let now = users.next_due().expect("users");
            users.advance(now, 0, |h| {
                sent.push((h.session_id, h.facility_id, h.kind));
            });
        }
        let a = users.activity();
        assert!(
            a.logins > 20 && a.logouts > 0 && a.vanished > 0 && a.moves > 0,
            "{a:?}"
        );
        sent
    }

    #[test]
    fn a_seed_replays_the_same_behaviour() {
        assert_eq!(run_steps(5), run_steps(5));
        assert_ne!(run_steps(5), run_steps(6));
    }

    #[test]
    fn sessions_end_with_end_or_silence_and_never_beat_after_end() {
        let sent = run_steps(7);
        let mut ended = std::collections::HashSet::new();
        for (session, _, kind) in &sent {
            assert!(!ended.contains(session), "beat after END for {session}");
            if *kind == HeartbeatKind::End {
                ended.insert(session.clone());
            }
        }
        assert!(!ended.is_empty());
    }
}
