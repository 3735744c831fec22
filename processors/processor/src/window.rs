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
//!
//! Sessions that went quiet (closed tabs waiting for their timeout: always some in
//! production) would take the read back to the oldest one's open, the whole window, since
//! nothing newer says they did not beat. So stage 1 says it: once a session has not beaten
//! for [`quiet_after`] (more than a beat interval, less than a step), each commit's walk of
//! the head of the expiry order writes its *mark* into the changelog
//! ([`SessionTask::mark_quiet`]): its last-seen as of the last heartbeats offset applied,
//! under its key and a tag byte, renewed every [`mark_every`] while it stays quiet and
//! tombstoned when it closes. A restore applies each mark as a later session record
//! ([`SessionTask::apply_marks`]): the session's beats count only after the mark's offset,
//! and a mark written within the newest step (the walk renews it well within one) settles
//! it. Sessions that beat on time are never marked; a quiet one costs a record every half
//! step for at most the rest of its timeout (four at the defaults) and its tombstone.
//!
//! A mark is a hint: a restore without it (an older changelog, a mark older than the step)
//! reads further back to the same state; a missing or skewed stamp likewise only costs
//! time, never a different state (the property tests below).

use crate::sessions::{SessionTask, WindowBeat};

/// How far back the newest step of the window reaches: a beat interval (a third of the
/// timeout, as browsers beat every 30 s against the default 90 s) and a margin for beats
/// that come late (5 s, or a sixth of the timeout when that is less: 35 s of the default
/// 91 s window), so that it alone settles every session that beats on time.
pub fn step(timeout: i64) -> i64 {
    (timeout / 3 + margin(timeout)).max(1)
}

/// The margin of [`step`] past a beat interval: 5 s, or a sixth of the timeout when that
/// is less.
fn margin(timeout: i64) -> i64 {
    (timeout / 6).min(5_000)
}

/// How long a session goes without a beat before stage 1 marks it: a beat interval and
/// half the step's margin (32.5 s of the default 35 s step), so that sessions beating on
/// time are never marked, and a quiet one is marked within its first step of silence even
/// when the walk comes [`mark_walk`] late.
pub fn quiet_after(timeout: i64) -> i64 {
    (timeout / 3 + margin(timeout) / 2).max(1)
}

/// How often a quiet session's mark is renewed: half a step, so that at any restore the
/// newest mark of a session quiet for longer than a step is within the newest step.
pub fn mark_every(timeout: i64) -> i64 {
    (step(timeout) / 2).max(1)
}

/// How much stream time passes between two walks for marks (a quarter of the margin:
/// 1.25 s): each walk visits every quiet session, so not every commit.
pub fn mark_walk(timeout: i64) -> i64 {
    (margin(timeout) / 4).max(1)
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
    use crate::records::{SessionEvent, SessionMark, SessionState};
    use crate::sessions::{Beat, SessionKey, SessionOutput};
    use presence_core::records::HeartbeatKind;
    use proptest::prelude::*;

    const TIMEOUT: i64 = 9_000;
    const WALL: i64 = i64::MAX / 2;

    /// A changelog record: a session's (`None`: its tombstone) or a mark's.
    enum Entry {
        Session(SessionKey, Option<SessionState>),
        Mark(SessionKey, Option<SessionMark>),
    }

    #[derive(Default)]
    struct Changelog(Vec<Entry>);

    impl SessionOutput for Changelog {
        fn event(&mut self, _: SessionEvent) {}
        fn put_session(&mut self, key: SessionKey, state: SessionState) {
            self.0.push(Entry::Session(key, Some(state)));
        }
        fn delete_session(&mut self, key: SessionKey) {
            self.0.push(Entry::Session(key, None));
        }
        fn put_mark(&mut self, key: SessionKey, mark: SessionMark) {
            self.0.push(Entry::Mark(key, Some(mark)));
        }
        fn delete_mark(&mut self, key: SessionKey) {
            self.0.push(Entry::Mark(key, None));
        }
    }

    /// The log a live task made: every record's stamp (by offset), the beats among them,
    /// its changelog, its clock, and its sessions at the end.
    struct Live {
        stamps: Vec<i64>,
        beats: Vec<WindowBeat>,
        changelog: Vec<Entry>,
        stream_time: i64,
        next_seq: i64,
        sessions: Vec<(SessionKey, String, i64)>,
    }

    /// A record: user, session, facility, ms since the previous record, stamp skew, END,
    /// and whether a commit (with its walk for marks) follows it.
    type Record = (u8, u8, u8, u16, i16, bool, bool);

    fn live(records: &[Record]) -> Live {
        let mut task = SessionTask::new(0, TIMEOUT, 60_000);
        let mut out = Changelog::default();
        let (mut stamps, mut beats) = (Vec::new(), Vec::new());
        let mut now = 10_000i64;
        for (offset, &(u, s, f, dt, skew, end, commit)) in records.iter().enumerate() {
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
            if commit {
                task.mark_quiet(&mut out);
            }
        }
        Live {
            stamps,
            beats,
            changelog: out.0,
            stream_time: task.stream_time(),
            next_seq: task.next_seq(),
            sessions: task.in_expiry_order(),
        }
    }

    /// The task the changelog restores, before the window: with its marks applied, or
    /// without them (as a restore that ignored them, or before they were written).
    fn from_changelog(l: &Live, marks: bool) -> SessionTask {
        let mut task = SessionTask::new(0, TIMEOUT, 60_000);
        for entry in &l.changelog {
            match entry {
                Entry::Session(key, Some(s)) => task.restore_session(*key, s.borrowed()),
                Entry::Session(key, None) => task.restore_delete(*key),
                Entry::Mark(key, mark) if marks => task.restore_mark(*key, *mark),
                Entry::Mark(..) => {}
            }
        }
        task.set_clock(l.stream_time, l.next_seq);
        task.apply_marks();
        task
    }

    /// The window read newest first, its older part in reverse too (the state must not
    /// depend on the order the older beats come in): the task, and the records the older
    /// part read.
    fn newest_first(l: &Live, marks: bool, window: Window, step: i64) -> (SessionTask, i64) {
        let from_t = l.stream_time - TIMEOUT - 1_000;
        let in_range = |a: i64, b: i64| {
            l.beats
                .iter()
                .filter(move |w| w.offset >= a && w.offset < b)
        };
        let mut task = from_changelog(l, marks);
        let t = newest_time(l.stream_time, step, from_t);
        let lower = window.newest_from(offset_for_time(&l.stamps, t));
        for b in in_range(lower, window.until) {
            task.refresh(b);
        }
        let read = window
            .refresh_older(&mut task, lower, t, |a, b, f| {
                let mut beats: Vec<_> = in_range(a, b).collect();
                beats.reverse();
                for w in beats {
                    f(w);
                }
                Ok::<_, ()>((b - a) as u64)
            })
            .unwrap();
        task.finish_restore();
        (task, read as i64)
    }

    /// Sessions by expiry, those last seen at the same instant by key (a restore need not
    /// keep the live order of those).
    fn by_expiry(task: &SessionTask) -> Vec<(SessionKey, String, i64)> {
        let mut sessions = task.in_expiry_order();
        assert!(
            sessions.windows(2).all(|w| w[0].2 <= w[1].2),
            "not in expiry order: {sessions:?}"
        );
        sessions.sort_by_key(|s| (s.2, s.0));
        sessions
    }

    /// Kafka's lookup over the log: the first offset stamped at or after `t`.
    fn offset_for_time(stamps: &[i64], t: i64) -> Option<i64> {
        stamps.iter().position(|&ts| ts >= t).map(|o| o as i64)
    }

    proptest! {
        // Many cases: what tells the two reads apart is a session last seen just before the
        // newest step's time with an older beat between the two, a narrow draw.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever the stamps' order, the step and the commits, the window read newest
        /// first restores exactly the sessions (key, facility, last-seen, expiry order) that
        /// reading it oldest first does, with the marks or without them; with the marks it
        /// reads no more; and with nothing after the checkpoint, both are the live task's.
        #[test]
        fn newest_first_restores_what_oldest_first_does(
            records in proptest::collection::vec(
                (0u8..2, 0u8..6, 0u8..3, 0u16..800, -2_000i16..2_000, proptest::bool::weighted(0.05), proptest::bool::weighted(0.3)),
                1..400,
            ),
            step in 200i64..6_000,
            committed_back in 0usize..20,
        ) {
            // The checkpoint: the records after it are in the log but in neither the
            // changelog nor the window.
            let until = records.len().saturating_sub(committed_back).max(1) as i64;
            let l = live(&records[..until as usize]);
            let from_t = l.stream_time - TIMEOUT - 1_000;
            let Some(from) = offset_for_time(&l.stamps, from_t) else { return Ok(()) };
            let from = from.min(until);
            let window = Window { from, until };

            let mut oldest_first = from_changelog(&l, false);
            for b in l.beats.iter().filter(|w| w.offset >= from && w.offset < until) {
                oldest_first.refresh(b);
            }
            oldest_first.finish_restore();
            let oldest_first = by_expiry(&oldest_first);

            for marks in [false, true] {
                let (task, _) = newest_first(&l, marks, window, step);
                prop_assert_eq!(&by_expiry(&task), &oldest_first, "marks: {}", marks);
            }
            let (_, without) = newest_first(&l, false, window, step);
            let (_, with) = newest_first(&l, true, window, step);
            prop_assert!(with <= without, "read {} older records with the marks, {} without", with, without);
            let mut live = l.sessions.clone();
            live.sort_by_key(|s| (s.2, s.0));
            prop_assert_eq!(&live, &oldest_first, "the live task's sessions");
        }
    }

    /// Sessions that all beat within the last step: the restore reads that step alone.
    #[test]
    fn sessions_that_beat_on_time_are_settled_by_the_newest_step() {
        // Ten sessions beat every 3 s for 9 s (the timeout), one record every 300 ms.
        let records: Vec<Record> = (0..30)
            .map(|i| (0u8, (i % 10) as u8, 0u8, 300u16, 0i16, false, true))
            .collect();
        let l = live(&records);
        assert!(
            !l.changelog.iter().any(|e| matches!(e, Entry::Mark(..))),
            "a session beating on time was marked"
        );
        let from_t = l.stream_time - TIMEOUT - 1_000;
        let window = Window {
            from: offset_for_time(&l.stamps, from_t).unwrap(),
            until: records.len() as i64,
        };
        let (task, older) = newest_first(&l, true, window, step(TIMEOUT));
        // The newest step is 3 s + 1.5 s of the 9 s: fewer than all 30 records.
        let lower = window.newest_from(offset_for_time(
            &l.stamps,
            newest_time(l.stream_time, step(TIMEOUT), from_t),
        ));
        assert!(lower > window.from, "the newest step is the whole window");
        assert_eq!(
            older, 0,
            "the older part was read though every session beat on time"
        );
        assert_eq!(task.open_sessions(), 10);
    }

    /// A session gone quiet for longer than a step (a closed tab waiting for its timeout)
    /// among sessions that beat on time: without its mark the restore goes back to its
    /// open; with it, the newest step settles it too, to the same state.
    #[test]
    fn a_quiet_sessions_mark_settles_it() {
        // Session 9 beats twice, in the first second, and never again; sessions 0 to 8 beat
        // every 3 s (one record every 300 ms, ten records a round); a commit after each.
        let records: Vec<Record> = (0..25)
            .map(|i| {
                let s = if i < 2 { 9 } else { (i % 9) as u8 };
                (0u8, s, 0u8, 300u16, 0i16, false, true)
            })
            .collect();
        let l = live(&records);
        let quiet = crate::sessions::session_key("u0", "s9");
        let marks: Vec<_> = l
            .changelog
            .iter()
            .filter_map(|e| match e {
                Entry::Mark(k, Some(m)) => Some((*k, *m)),
                _ => None,
            })
            .collect();
        assert!(!marks.is_empty(), "the quiet session was not marked");
        assert!(
            marks
                .iter()
                .all(|(k, m)| *k == quiet && m.last_seen == l.stamps[1]),
            "only the quiet session is marked, with its last beat: {marks:?}"
        );
        // Renewed while it stays quiet (every half step, to the second): at later offsets.
        assert!(
            marks.len() >= 2 && marks.windows(2).all(|w| w[0].1.offset < w[1].1.offset),
            "the mark was not renewed: {marks:?}"
        );
        assert_eq!(l.sessions.len(), 10, "the quiet session is still open");
        let from_t = l.stream_time - TIMEOUT - 1_000;
        let window = Window {
            from: offset_for_time(&l.stamps, from_t).unwrap(),
            until: records.len() as i64,
        };
        let (with, read_with) = newest_first(&l, true, window, step(TIMEOUT));
        let (without, read_without) = newest_first(&l, false, window, step(TIMEOUT));
        assert!(read_without > 0, "without the mark the older part is read");
        assert_eq!(read_with, 0, "the mark left an older read");
        assert_eq!(by_expiry(&with), by_expiry(&without));
    }
}
