//! The timeout window of a stage-1 restore, read newest first.
//!
//! A restored session's last-seen is the newest stamp among its changelog record and the
//! beats after its open (or move) that named its facility ([`SessionTask::refresh`]): a
//! maximum, so the order the beats are read in does not change it. The window holds every
//! beat that can matter, the timeout and a second back from the checkpoint's stream time:
//! three beats a session when browsers beat every 30 s against a 90 s timeout. Most
//! sessions are settled by their newest beat alone, so the window is read in two parts:
//!
//! - the newest [`step`] (a beat interval and a margin), beside the changelog as the whole
//!   window was. Kafka finds, for a time `t`, the first offset stamped at or after it, and
//!   every record before that offset is stamped before `t` (the broker's lookup of the
//!   log's time index, exact whatever the stamps' order). So once the records from there
//!   on are applied, a session last seen at or after `t` is settled (nothing older can
//!   raise it), and so is one opened at or after that offset (nothing before its open
//!   applies to it);
//! - then, only if a session is unsettled ([`SessionTask::unsettled_from`]), the older part,
//!   from the oldest unsettled session's open on (or the window's start).
//!
//! When every session beat within the last step (the steady state), the restore reads a
//! third of the window and a margin: 30 M beats of a 10 M-session restore become ~12 M.
//! Sessions that went quiet (closed tabs waiting for their timeout) take the read back to
//! the oldest one's open, at worst the whole window as before; a missing or skewed stamp
//! only costs time, never a different state (the property test below).

use crate::sessions::{SessionTask, WindowBeat};

/// How far back the newest step of the window reaches: a beat interval (a third of the
/// timeout, as browsers beat every 30 s against the default 90 s) and a margin for beats
/// that come late (5 s, or a sixth of the timeout when that is less: 35 s of the default
/// 91 s window), so that it alone settles every session that beats on time.
pub fn step(timeout: i64) -> i64 {
    (timeout / 3 + (timeout / 6).min(5_000)).max(1)
}

/// When the newest step begins: one [`step`] back from the checkpoint's stream time `now`,
/// no further than the window's start `from_t`.
pub fn newest_time(now: i64, step: i64, from_t: i64) -> i64 {
    (now - step).max(from_t)
}

/// One partition's window: the offsets from `from` (the first stamped at or after the
/// window's start time) up to the committed offset `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: i64,
    pub until: i64,
}

impl Window {
    /// Where the newest step begins, given Kafka's lookup for [`newest_time`] (`None`:
    /// nothing is stamped at or after it): every record before it is stamped before that
    /// time.
    pub fn newest_from(&self, found: Option<i64>) -> i64 {
        found.map_or(self.until, |o| o.clamp(self.from, self.until))
    }

    /// With the records from `lower` to `until` applied (every record before `lower`
    /// stamped before `t`): reads the older part that some session still needs, in one
    /// `[start, lower)` through `read` (which hands each beat to the closure and returns how
    /// many records it read): from the oldest unsettled session's open on, or from the
    /// window's start. Returns the records read. Not for a task that restores schema-v1
    /// sessions ([`SessionTask::restores_legacy`]): their owners are found in offset order.
    pub fn refresh_older<E>(
        &self,
        task: &mut SessionTask,
        lower: i64,
        t: i64,
        read: impl FnOnce(i64, i64, &mut dyn FnMut(&WindowBeat)) -> Result<u64, E>,
    ) -> Result<u64, E> {
        let Some(oldest) = task.unsettled_from(t, lower) else {
            return Ok(0);
        };
        // Nothing before an unsettled session's open applies to it.
        let start = self.from.max(oldest.saturating_add(1)).min(lower);
        let records = read(start, lower, &mut |b| task.refresh_earlier(b))?;
        task.relink_refreshed();
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{SessionEvent, SessionState};
    use crate::sessions::{Beat, SessionKey, SessionOutput};
    use presence_core::records::HeartbeatKind;
    use proptest::prelude::*;

    const TIMEOUT: i64 = 9_000;
    const WALL: i64 = i64::MAX / 2;

    #[derive(Default)]
    struct Changelog(Vec<(SessionKey, Option<SessionState>)>);

    impl SessionOutput for Changelog {
        fn event(&mut self, _: SessionEvent) {}
        fn put_session(&mut self, key: SessionKey, state: SessionState) {
            self.0.push((key, Some(state)));
        }
        fn delete_session(&mut self, key: SessionKey) {
            self.0.push((key, None));
        }
    }

    /// The log a live task made: every record's stamp (by offset), the beats among them,
    /// its changelog, and its clock.
    struct Live {
        stamps: Vec<i64>,
        beats: Vec<WindowBeat>,
        changelog: Vec<(SessionKey, Option<SessionState>)>,
        stream_time: i64,
        next_seq: i64,
    }

    fn live(records: &[(u8, u8, u8, u16, i16, bool)]) -> Live {
        let mut task = SessionTask::new(0, TIMEOUT, 60_000);
        let mut out = Changelog::default();
        let (mut stamps, mut beats) = (Vec::new(), Vec::new());
        let mut now = 10_000i64;
        for (offset, &(u, s, f, dt, skew, end)) in records.iter().enumerate() {
            now += dt as i64;
            // Stamps out of order, as producers' clocks make them.
            let ts = now + skew as i64;
            let (uid, sid, fid) = (format!("u{u}"), format!("s{s}"), format!("f{f}"));
            let kind = if end {
                HeartbeatKind::End
            } else {
                HeartbeatKind::Beat
            };
            let b = Beat {
                session_id: &sid,
                user_id: &uid,
                facility_id: &fid,
                region_id: "r",
                kind,
            };
            // Refused records stay in the log (dead letters) and refresh nothing.
            let _ = task.on_heartbeat(offset as i64, ts, &b, WALL, &mut out);
            stamps.push(ts);
            if !end {
                beats.push(WindowBeat::new(&b, ts, offset as i64));
            }
        }
        Live {
            stamps,
            beats,
            changelog: out.0,
            stream_time: task.stream_time(),
            next_seq: task.next_seq(),
        }
    }

    fn from_changelog(l: &Live) -> SessionTask {
        let mut task = SessionTask::new(0, TIMEOUT, 60_000);
        for (key, state) in &l.changelog {
            match state {
                Some(s) => task.restore_session(*key, s.borrowed()),
                None => task.restore_delete(*key),
            }
        }
        task.set_clock(l.stream_time, l.next_seq);
        task
    }

    /// Kafka's lookup over the log: the first offset stamped at or after `t`.
    fn offset_for_time(stamps: &[i64], t: i64) -> Option<i64> {
        stamps.iter().position(|&ts| ts >= t).map(|o| o as i64)
    }

    proptest! {
        // Many cases: what tells the two reads apart is a session last seen just before the
        // newest step's time with an older beat between the two, a narrow draw.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever the stamps' order and the step, the window read newest first restores
        /// exactly the sessions (key, facility, last-seen, expiry order) that reading it
        /// oldest first does.
        #[test]
        fn newest_first_restores_what_oldest_first_does(
            records in proptest::collection::vec(
                (0u8..2, 0u8..6, 0u8..3, 0u16..800, -2_000i16..2_000, proptest::bool::weighted(0.05)),
                1..400,
            ),
            step in 200i64..6_000,
            committed_back in 0usize..20,
        ) {
            let l = live(&records);
            // The checkpoint: some records may come after it (not part of the window).
            let until = records.len().saturating_sub(committed_back) as i64;
            let from_t = l.stream_time - TIMEOUT - 1_000;
            let Some(from) = offset_for_time(&l.stamps, from_t) else { return Ok(()) };
            let from = from.min(until);
            let window = Window { from, until };
            let in_range = |a: i64, b: i64| l.beats.iter().filter(move |w| w.offset >= a && w.offset < b);

            let mut oldest_first = from_changelog(&l);
            for b in in_range(from, until) {
                oldest_first.refresh(b);
            }
            oldest_first.finish_restore();

            let mut newest_first = from_changelog(&l);
            let t = newest_time(l.stream_time, step, from_t);
            let lower = window.newest_from(offset_for_time(&l.stamps, t));
            for b in in_range(lower, until) {
                newest_first.refresh(b);
            }
            let read = window
                .refresh_older(
                    &mut newest_first,
                    lower,
                    t,
                    // Newest first here too: the state must not depend on the order the
                    // older beats come in.
                    |a, b, f| {
                        let mut beats: Vec<_> = in_range(a, b).collect();
                        beats.reverse();
                        for w in beats {
                            f(w);
                        }
                        Ok::<_, ()>((b - a) as u64)
                    },
                )
                .unwrap();
            newest_first.finish_restore();
            prop_assert!(read as i64 <= lower - from, "read {} records of {}", read, lower - from);
            // The same sessions, each in expiry order; sessions last seen at the same instant
            // may be in any order (reading oldest first does not keep the live order of
            // those either).
            let (mut a, mut b) = (newest_first.in_expiry_order(), oldest_first.in_expiry_order());
            for sessions in [&a, &b] {
                prop_assert!(sessions.windows(2).all(|w| w[0].2 <= w[1].2), "not in expiry order: {:?}", sessions);
            }
            a.sort_by_key(|s| (s.2, s.0));
            b.sort_by_key(|s| (s.2, s.0));
            prop_assert_eq!(a, b);
            prop_assert_eq!(newest_first.next_expiry(), oldest_first.next_expiry());
        }
    }

    /// Sessions that all beat within the last step: the restore reads that step alone.
    #[test]
    fn sessions_that_beat_on_time_are_settled_by_the_newest_step() {
        // Ten sessions beat every 3 s for 9 s (the timeout), one record every 300 ms.
        let records: Vec<_> = (0..30)
            .map(|i| (0u8, (i % 10) as u8, 0u8, 300u16, 0i16, false))
            .collect();
        let l = live(&records);
        let from_t = l.stream_time - TIMEOUT - 1_000;
        let window = Window {
            from: offset_for_time(&l.stamps, from_t).unwrap(),
            until: records.len() as i64,
        };
        let step = step(TIMEOUT);
        let mut task = from_changelog(&l);
        let t = newest_time(l.stream_time, step, from_t);
        let lower = window.newest_from(offset_for_time(&l.stamps, t));
        for b in l.beats.iter().filter(|b| b.offset >= lower) {
            task.refresh(b);
        }
        let mut older = 0;
        window
            .refresh_older(&mut task, lower, t, |a, b, _| {
                older += b - a;
                Ok::<_, ()>((b - a) as u64)
            })
            .unwrap();
        // The newest step is 3 s + 1.5 s of the 9 s: fewer than all 30 records.
        assert!(lower > window.from, "the newest step is the whole window");
        assert_eq!(
            older, 0,
            "the older part was read though every session beat on time"
        );
        assert_eq!(task.open_sessions(), 10);
    }
}
