//! Stage 1, pure: the open sessions of one `heartbeats` partition, and the transitions they
//! make. No Kafka here: records and time come in, [`SessionEvent`]s and changelog writes go
//! out through [`SessionOutput`].
//!
//! Time is the partition's *stream time*: the highest record timestamp seen, advanced to the
//! wall clock by the runner only while the partition is caught up. A session closes when the
//! stream time passes `last_seen + timeout`, so a replayed backlog expires exactly what the
//! log says and never a session that kept beating.
//!
//! Memory: sessions live in a slab of 40-byte slots, found through a `HashTable<u32>` (5
//! bytes a bucket) keyed by a 128-bit hash of the session id, and linked in a list ordered
//! by `last_seen`: the head is always the next to expire, so expiry never scans, and a beat
//! moves its session to the tail in O(1) (a late beat walks back a few slots).

use hashbrown::{HashMap, HashTable};
use presence_core::records::HeartbeatKind;

use crate::records::{SessionEvent, SessionEventKind, SessionState};

/// A session id's 128-bit hash: the in-memory and changelog key. Collisions are as likely
/// as two random UUIDs being equal.
pub type SessionKey = [u64; 2];

pub fn session_key(session_id: &str) -> SessionKey {
    let h = xxhash_rust::xxh3::xxh3_128(session_id.as_bytes());
    [h as u64, (h >> 64) as u64]
}

/// A facility id's 64-bit hash, for comparing facilities without keeping the strings.
pub fn facility_hash(facility_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(facility_id.as_bytes())
}

pub fn key_bytes(key: &SessionKey) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&key[0].to_le_bytes());
    b[8..].copy_from_slice(&key[1].to_le_bytes());
    b
}

pub fn key_from_bytes(b: &[u8]) -> Option<SessionKey> {
    let b: &[u8; 16] = b.try_into().ok()?;
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    Some([u64::from_le_bytes(lo), u64::from_le_bytes(hi)])
}

/// What stage 1 produces; the runner turns it into Kafka records of the open transaction.
pub trait SessionOutput {
    /// To stage 2, keyed by facility.
    fn event(&mut self, event: SessionEvent);
    /// Changelog: the session opened or moved.
    fn put_session(&mut self, key: SessionKey, state: SessionState);
    /// Changelog: the session closed.
    fn delete_session(&mut self, key: SessionKey);
}

/// The fields of a heartbeat stage 1 reads, borrowed from the decoded record.
#[derive(Debug, Clone, Copy)]
pub struct Beat<'a> {
    pub session_id: &'a str,
    pub facility_id: &'a str,
    pub region_id: &'a str,
    pub kind: HeartbeatKind,
}

/// What a record did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Opened,
    Extended,
    Moved,
    Closed,
    /// END for a session that is not open, or older than its last beat.
    IgnoredEnd,
    /// A beat already older than the timeout when it arrived, or older than the session's
    /// last beat while naming another facility.
    IgnoredLate,
}

/// A record the processor refuses; it goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub code: &'static str,
    pub message: String,
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Slot {
    key: SessionKey,
    last_seen: i64,
    facility: u32,
    prev: u32,
    next: u32,
}

/// The open sessions of one heartbeats partition.
pub struct SessionTask {
    partition: i32,
    timeout: i64,
    max_future: i64,
    stream_time: i64,
    next_seq: i64,
    facilities: Vec<(Box<str>, Box<str>)>,
    facility_index: HashMap<Box<str>, u32>,
    slots: Vec<Slot>,
    free: u32,
    table: HashTable<u32>,
    head: u32,
    tail: u32,
    open: usize,
    /// While restoring: each slot's open offset (from the changelog), so that the re-read
    /// beats apply only after it. Empty otherwise.
    restore_offsets: Vec<i64>,
}

impl SessionTask {
    /// `timeout_ms`: sessions close this long after their last beat. `max_future_ms`: a
    /// record stamped further than this ahead of the wall clock is rejected, so that one bad
    /// producer clock cannot expire every session of the partition.
    pub fn new(partition: i32, timeout_ms: i64, max_future_ms: i64) -> SessionTask {
        SessionTask {
            partition,
            timeout: timeout_ms,
            max_future: max_future_ms,
            stream_time: i64::MIN,
            next_seq: 1,
            facilities: Vec::new(),
            facility_index: HashMap::new(),
            slots: Vec::new(),
            free: NIL,
            table: HashTable::new(),
            head: NIL,
            tail: NIL,
            open: 0,
            restore_offsets: Vec::new(),
        }
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn open_sessions(&self) -> usize {
        self.open
    }

    pub fn stream_time(&self) -> i64 {
        self.stream_time
    }

    pub fn next_seq(&self) -> i64 {
        self.next_seq
    }

    /// The clock as committed with the offsets, on restore.
    pub fn set_clock(&mut self, stream_time: i64, next_seq: i64) {
        self.stream_time = stream_time;
        self.next_seq = next_seq;
    }

    /// When the head session expires (the first stream time at which it is closed).
    pub fn next_expiry(&self) -> Option<i64> {
        (self.head != NIL).then(|| self.slots[self.head as usize].last_seen + self.timeout + 1)
    }

    /// Bytes of heap this task holds (benchmarks and the memory gauge).
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.table.capacity() * (std::mem::size_of::<u32>() + 1)
            + self
                .facilities
                .iter()
                .map(|(f, r)| f.len() + r.len() + 32)
                .sum::<usize>()
            + self.facility_index.capacity() * 24
    }

    /// Applies one heartbeat with record timestamp `ts` at `offset`. `wall_now` only bounds
    /// how far in the future `ts` may be.
    pub fn on_heartbeat(
        &mut self,
        offset: i64,
        ts: i64,
        beat: &Beat<'_>,
        wall_now: i64,
        out: &mut impl SessionOutput,
    ) -> Result<Applied, Rejected> {
        if ts > wall_now.saturating_add(self.max_future) {
            return Err(Rejected {
                code: "timestamp_in_future",
                message: format!(
                    "record timestamp {ts} is {} ms ahead of the processor's clock (at most {} allowed); fix the producer's clock or let the broker stamp records",
                    ts - wall_now,
                    self.max_future
                ),
            });
        }
        self.advance_to(ts, out);
        let at = self.stream_time;
        let key = session_key(beat.session_id);
        let found = self
            .table
            .find(key[0], |&i| self.slots[i as usize].key == key)
            .copied();
        let Some(i) = found else {
            if beat.kind == HeartbeatKind::End {
                return Ok(Applied::IgnoredEnd);
            }
            if ts.saturating_add(self.timeout) < at {
                return Ok(Applied::IgnoredLate);
            }
            let facility = self.intern(beat.facility_id, beat.region_id);
            self.insert(key, facility, ts);
            self.emit(SessionEventKind::Opened, facility, at, out);
            out.put_session(key, self.state_of(beat.session_id, facility, ts, offset));
            return Ok(Applied::Opened);
        };
        let slot = self.slots[i as usize];
        match beat.kind {
            HeartbeatKind::End if ts < slot.last_seen => Ok(Applied::IgnoredEnd),
            HeartbeatKind::End => {
                self.remove(i);
                self.emit(SessionEventKind::Closed, slot.facility, at, out);
                out.delete_session(key);
                Ok(Applied::Closed)
            }
            HeartbeatKind::Beat
                if self.facilities[slot.facility as usize].0.as_ref() == beat.facility_id =>
            {
                if ts > slot.last_seen {
                    self.touch(i, ts);
                }
                Ok(Applied::Extended)
            }
            HeartbeatKind::Beat => {
                if ts < slot.last_seen || ts.saturating_add(self.timeout) < at {
                    return Ok(Applied::IgnoredLate);
                }
                let facility = self.intern(beat.facility_id, beat.region_id);
                self.emit(SessionEventKind::Closed, slot.facility, at, out);
                self.slots[i as usize].facility = facility;
                self.touch(i, ts);
                self.emit(SessionEventKind::Opened, facility, at, out);
                out.put_session(key, self.state_of(beat.session_id, facility, ts, offset));
                Ok(Applied::Moved)
            }
        }
    }

    /// Moves stream time forward to `t` (never back) and closes every session whose
    /// deadline it passes, oldest first. Returns how many closed.
    pub fn advance_to(&mut self, t: i64, out: &mut impl SessionOutput) -> usize {
        if t <= self.stream_time {
            return 0;
        }
        self.stream_time = t;
        let mut closed = 0;
        while self.head != NIL {
            let slot = self.slots[self.head as usize];
            let deadline = slot.last_seen + self.timeout;
            if deadline >= t {
                break;
            }
            self.remove(self.head);
            self.emit(SessionEventKind::Closed, slot.facility, deadline, out);
            out.delete_session(slot.key);
            closed += 1;
        }
        closed
    }

    /// A watermark for stage 2: every later event of this partition has `at >= watermark`.
    pub fn watermark(&self) -> SessionEvent {
        SessionEvent {
            kind: SessionEventKind::Watermark,
            source_partition: self.partition,
            source_seq: self.next_seq - 1,
            at: self.stream_time,
            facility_id: String::new(),
            region_id: String::new(),
        }
    }

    /// Restore: a changelog record (the session opened or moved), applied in log order.
    pub fn restore_session(&mut self, key: SessionKey, state: &SessionState) {
        let facility = self.intern(&state.facility_id, &state.region_id);
        let i = match self
            .table
            .find(key[0], |&i| self.slots[i as usize].key == key)
            .copied()
        {
            Some(i) => {
                self.slots[i as usize].facility = facility;
                self.touch(i, state.last_seen);
                i
            }
            None => self.insert(key, facility, state.last_seen),
        };
        let i = i as usize;
        if self.restore_offsets.len() <= i {
            self.restore_offsets.resize(i + 1, i64::MAX);
        }
        self.restore_offsets[i] = state.open_offset;
    }

    /// Restore is over: the open offsets are not needed any more.
    pub fn finish_restore(&mut self) {
        self.restore_offsets = Vec::new();
    }

    /// Restore: a changelog tombstone (the session closed).
    pub fn restore_delete(&mut self, key: SessionKey) {
        if let Some(i) = self
            .table
            .find(key[0], |&i| self.slots[i as usize].key == key)
            .copied()
        {
            self.remove(i);
        }
    }

    /// Restore: a beat at `offset`, re-read from the heartbeats, raises its session's
    /// last-seen exactly as it did when first processed: if it came after the session's open
    /// (or move) and names the same facility.
    pub fn refresh_last_seen(&mut self, key: SessionKey, facility_id: &str, ts: i64, offset: i64) {
        self.refresh_last_seen_hashed(key, facility_hash(facility_id), ts, offset)
    }

    /// As [`Self::refresh_last_seen`], with the facility given by [`facility_hash`], so that
    /// the beats can be read on another thread while the changelog restores.
    pub fn refresh_last_seen_hashed(
        &mut self,
        key: SessionKey,
        facility: u64,
        ts: i64,
        offset: i64,
    ) {
        let Some(i) = self
            .table
            .find(key[0], |&i| self.slots[i as usize].key == key)
            .copied()
        else {
            return;
        };
        if self
            .restore_offsets
            .get(i as usize)
            .is_none_or(|&open| offset <= open)
        {
            return;
        }
        let slot = self.slots[i as usize];
        if ts > slot.last_seen
            && facility_hash(&self.facilities[slot.facility as usize].0) == facility
        {
            self.touch(i, ts);
        }
    }

    fn state_of(
        &self,
        session_id: &str,
        facility: u32,
        last_seen: i64,
        open_offset: i64,
    ) -> SessionState {
        let (f, r) = &self.facilities[facility as usize];
        SessionState {
            session_id: session_id.to_string(),
            facility_id: f.to_string(),
            region_id: r.to_string(),
            last_seen,
            open_offset,
        }
    }

    fn emit(
        &mut self,
        kind: SessionEventKind,
        facility: u32,
        at: i64,
        out: &mut impl SessionOutput,
    ) {
        let (f, r) = &self.facilities[facility as usize];
        out.event(SessionEvent {
            kind,
            source_partition: self.partition,
            source_seq: self.next_seq,
            at,
            facility_id: f.to_string(),
            region_id: r.to_string(),
        });
        self.next_seq += 1;
    }

    fn intern(&mut self, facility_id: &str, region_id: &str) -> u32 {
        if let Some(&i) = self.facility_index.get(facility_id) {
            // A facility belongs to one region; follow the newest beat if that ever changes.
            if self.facilities[i as usize].1.as_ref() != region_id {
                self.facilities[i as usize].1 = region_id.into();
            }
            return i;
        }
        let i = self.facilities.len() as u32;
        self.facilities.push((facility_id.into(), region_id.into()));
        self.facility_index.insert(facility_id.into(), i);
        i
    }

    fn insert(&mut self, key: SessionKey, facility: u32, last_seen: i64) -> u32 {
        let slot = Slot {
            key,
            last_seen,
            facility,
            prev: NIL,
            next: NIL,
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            self.slots[i as usize] = slot;
            i
        } else {
            self.slots.push(slot);
            (self.slots.len() - 1) as u32
        };
        let slots = &self.slots;
        self.table
            .insert_unique(key[0], i, |&j| slots[j as usize].key[0]);
        self.link_sorted(i);
        self.open += 1;
        i
    }

    fn remove(&mut self, i: u32) {
        let key = self.slots[i as usize].key;
        if let Ok(entry) = self.table.find_entry(key[0], |&j| j == i) {
            entry.remove();
        }
        self.unlink(i);
        self.slots[i as usize].next = self.free;
        self.free = i;
        self.open -= 1;
    }

    fn touch(&mut self, i: u32, last_seen: i64) {
        self.slots[i as usize].last_seen = last_seen;
        if self.tail == i {
            return;
        }
        self.unlink(i);
        self.link_sorted(i);
    }

    /// Links slot `i` into the list, keeping it ordered by `last_seen`: usually at the
    /// tail; a late beat walks back from the tail.
    fn link_sorted(&mut self, i: u32) {
        let t = self.slots[i as usize].last_seen;
        let mut after = self.tail;
        while after != NIL && self.slots[after as usize].last_seen > t {
            after = self.slots[after as usize].prev;
        }
        let next = if after == NIL {
            self.head
        } else {
            self.slots[after as usize].next
        };
        self.slots[i as usize].prev = after;
        self.slots[i as usize].next = next;
        if after == NIL {
            self.head = i;
        } else {
            self.slots[after as usize].next = i;
        }
        if next == NIL {
            self.tail = i;
        } else {
            self.slots[next as usize].prev = i;
        }
    }

    fn unlink(&mut self, i: u32) {
        let Slot { prev, next, .. } = self.slots[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }
}

/// Collects outputs in memory: tests, benchmarks and the runner's per-record buffer.
#[derive(Default, Debug)]
pub struct Collected {
    pub events: Vec<SessionEvent>,
    pub puts: Vec<(SessionKey, SessionState)>,
    pub deletes: Vec<SessionKey>,
}

impl SessionOutput for Collected {
    fn event(&mut self, event: SessionEvent) {
        self.events.push(event);
    }
    fn put_session(&mut self, key: SessionKey, state: SessionState) {
        self.puts.push((key, state));
    }
    fn delete_session(&mut self, key: SessionKey) {
        self.deletes.push(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: i64 = 90_000;
    const WALL: i64 = i64::MAX / 2;

    fn beat<'a>(s: &'a str, f: &'a str) -> Beat<'a> {
        Beat {
            session_id: s,
            facility_id: f,
            region_id: "r",
            kind: HeartbeatKind::Beat,
        }
    }
    fn end(s: &str) -> Beat<'_> {
        Beat {
            session_id: s,
            facility_id: "f",
            region_id: "r",
            kind: HeartbeatKind::End,
        }
    }
    fn kinds(c: &Collected) -> Vec<(SessionEventKind, String, i64)> {
        c.events
            .iter()
            .map(|e| (e.kind, e.facility_id.clone(), e.at))
            .collect()
    }
    use SessionEventKind::{Closed, Opened};

    #[test]
    fn first_beat_opens_and_beats_extend_without_output() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        assert_eq!(
            t.on_heartbeat(0, 1_000, &beat("s", "f"), WALL, &mut out),
            Ok(Applied::Opened)
        );
        assert_eq!(
            t.on_heartbeat(1, 31_000, &beat("s", "f"), WALL, &mut out),
            Ok(Applied::Extended)
        );
        assert_eq!(
            t.on_heartbeat(2, 61_000, &beat("s", "f"), WALL, &mut out),
            Ok(Applied::Extended)
        );
        assert_eq!(kinds(&out), vec![(Opened, "f".into(), 1_000)]);
        assert_eq!(
            out.puts.len(),
            1,
            "one changelog write per open, none per beat"
        );
        assert_eq!(t.open_sessions(), 1);
    }

    #[test]
    fn timeout_closes_at_the_deadline_not_when_noticed() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        t.on_heartbeat(0, 1_000, &beat("s", "f"), WALL, &mut out)
            .unwrap();
        assert_eq!(t.next_expiry(), Some(1_000 + T + 1));
        assert_eq!(
            t.advance_to(1_000 + T, &mut out),
            0,
            "exactly at the deadline it is still open"
        );
        assert_eq!(t.advance_to(500_000, &mut out), 1);
        assert_eq!(kinds(&out)[1], (Closed, "f".into(), 1_000 + T));
        assert_eq!(out.deletes, vec![session_key("s")]);
        assert_eq!(t.next_expiry(), None);
    }

    #[test]
    fn a_beat_at_the_deadline_keeps_the_session() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        t.on_heartbeat(0, 0, &beat("s", "f"), WALL, &mut out)
            .unwrap();
        assert_eq!(
            t.on_heartbeat(1, T, &beat("s", "f"), WALL, &mut out),
            Ok(Applied::Extended)
        );
        assert_eq!(out.events.len(), 1);
    }

    #[test]
    fn end_closes_at_once_and_stale_end_is_ignored() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        t.on_heartbeat(0, 1_000, &beat("s", "f"), WALL, &mut out)
            .unwrap();
        t.on_heartbeat(1, 5_000, &beat("s", "f"), WALL, &mut out)
            .unwrap();
        assert_eq!(
            t.on_heartbeat(2, 4_000, &end("s"), WALL, &mut out),
            Ok(Applied::IgnoredEnd),
            "older than the last beat"
        );
        assert_eq!(
            t.on_heartbeat(3, 6_000, &end("s"), WALL, &mut out),
            Ok(Applied::Closed)
        );
        assert_eq!(
            t.on_heartbeat(4, 7_000, &end("s"), WALL, &mut out),
            Ok(Applied::IgnoredEnd),
            "not open"
        );
        assert_eq!(
            kinds(&out),
            vec![(Opened, "f".into(), 1_000), (Closed, "f".into(), 6_000)]
        );
        assert_eq!(t.open_sessions(), 0);
    }

    #[test]
    fn a_move_closes_at_the_old_facility_and_opens_at_the_new() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        t.on_heartbeat(0, 1_000, &beat("s", "a"), WALL, &mut out)
            .unwrap();
        assert_eq!(
            t.on_heartbeat(1, 2_000, &beat("s", "b"), WALL, &mut out),
            Ok(Applied::Moved)
        );
        assert_eq!(
            kinds(&out),
            vec![
                (Opened, "a".into(), 1_000),
                (Closed, "a".into(), 2_000),
                (Opened, "b".into(), 2_000)
            ]
        );
        assert_eq!(out.puts.len(), 2);
        assert_eq!(out.puts[1].1.open_offset, 1);
        // An older beat naming the old facility does not move it back.
        assert_eq!(
            t.on_heartbeat(2, 1_500, &beat("s", "a"), WALL, &mut out),
            Ok(Applied::IgnoredLate)
        );
        t.advance_to(10_000_000, &mut out);
        assert_eq!(
            kinds(&out).last().unwrap(),
            &(Closed, "b".into(), 2_000 + T)
        );
    }

    #[test]
    fn out_of_order_beats_keep_the_newest_last_seen() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        t.on_heartbeat(0, 10_000, &beat("a", "f"), WALL, &mut out)
            .unwrap();
        t.on_heartbeat(1, 20_000, &beat("b", "f"), WALL, &mut out)
            .unwrap();
        // a's late beat (older than b's) must not make a expire after b.
        t.on_heartbeat(2, 15_000, &beat("a", "f"), WALL, &mut out)
            .unwrap();
        t.on_heartbeat(3, 12_000, &beat("a", "f"), WALL, &mut out)
            .unwrap();
        t.advance_to(1_000_000, &mut out);
        let closes: Vec<i64> = out
            .events
            .iter()
            .filter(|e| e.kind == Closed)
            .map(|e| e.at)
            .collect();
        assert_eq!(closes, vec![15_000 + T, 20_000 + T]);
    }

    #[test]
    fn beats_far_in_the_past_or_future() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        let wall = 1_000_000;
        let e = t
            .on_heartbeat(0, wall + 60_001, &beat("s", "f"), wall, &mut out)
            .unwrap_err();
        assert_eq!(e.code, "timestamp_in_future");
        assert_eq!(
            t.on_heartbeat(1, wall + 60_000, &beat("s", "f"), wall, &mut out),
            Ok(Applied::Opened)
        );
        // Already older than the timeout on arrival: it cannot open anything.
        assert_eq!(
            t.on_heartbeat(2, wall + 60_000 - T - 1, &beat("old", "f"), wall, &mut out),
            Ok(Applied::IgnoredLate)
        );
        // Late but within the timeout: opens, stamped with the stream time.
        assert_eq!(
            t.on_heartbeat(3, wall, &beat("late", "f"), wall, &mut out),
            Ok(Applied::Opened)
        );
        assert_eq!(out.events.last().unwrap().at, wall + 60_000);
    }

    #[test]
    fn event_times_never_go_backwards_and_seq_counts_up() {
        let mut t = SessionTask::new(3, T, 60_000);
        let mut out = Collected::default();
        t.on_heartbeat(0, 1_000, &beat("a", "f"), WALL, &mut out)
            .unwrap();
        t.on_heartbeat(1, 50_000, &beat("b", "g"), WALL, &mut out)
            .unwrap();
        t.on_heartbeat(2, 200_000, &beat("c", "f"), WALL, &mut out)
            .unwrap();
        let seqs: Vec<i64> = out.events.iter().map(|e| e.source_seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
        assert!(
            out.events.windows(2).all(|w| w[0].at <= w[1].at),
            "{:?}",
            kinds(&out)
        );
        assert!(out.events.iter().all(|e| e.source_partition == 3));
        assert_eq!(t.watermark().at, 200_000);
    }

    #[test]
    fn restore_then_refresh_reproduces_last_seen() {
        let mut live = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        live.on_heartbeat(0, 1_000, &beat("s", "f"), WALL, &mut out)
            .unwrap();
        live.on_heartbeat(1, 31_000, &beat("s", "f"), WALL, &mut out)
            .unwrap();
        let (key, state) = out.puts[0].clone();
        let mut restored = SessionTask::new(0, T, 60_000);
        restored.restore_session(key, &state);
        restored.set_clock(live.stream_time(), live.next_seq());
        restored.refresh_last_seen(key, "f", 45_000, 0); // the opening beat's offset or before: not after the open
        restored.refresh_last_seen(key, "f", 31_000, 1);
        restored.refresh_last_seen(key, "other", 40_000, 2); // another facility: not this session's beat
        restored.finish_restore();
        assert_eq!(restored.next_expiry(), live.next_expiry());
    }

    // A reference model: per session, its open interval; the state machine must close each
    // session exactly where the model says, whatever the order of sessions.
    proptest! {
        #[test]
        fn matches_a_naive_model(beats in proptest::collection::vec((0u8..20, 0u8..3, 0u32..200, any::<bool>()), 1..300)) {
            let mut t = SessionTask::new(0, 10_000, 60_000);
            let mut out = Collected::default();
            // The naive model: session -> (facility, last_seen), scanning everything each step.
            let mut model: std::collections::HashMap<u8, (u8, i64)> = Default::default();
            let mut model_events = Vec::new();
            let mut now = 0i64;
            for (i, (s, f, dt, is_end)) in beats.into_iter().enumerate() {
                now += dt as i64 * 100;
                let mut expired: Vec<(i64, u8, u8)> = model.iter().filter(|(_, (_, ls))| ls + 10_000 < now).map(|(s, (f, ls))| (ls + 10_000, *f, *s)).collect();
                expired.sort();
                for (at, f, s) in expired { model.remove(&s); model_events.push((Closed, f, at)); }
                let sid = format!("s{s}");
                let fid = format!("f{f}");
                let b = Beat { session_id: &sid, facility_id: &fid, region_id: "r", kind: if is_end { HeartbeatKind::End } else { HeartbeatKind::Beat } };
                t.on_heartbeat(i as i64, now, &b, WALL, &mut out).unwrap();
                match (model.get(&s).copied(), is_end) {
                    (None, false) => { model.insert(s, (f, now)); model_events.push((Opened, f, now)); }
                    (Some((of, _)), true) => { model.remove(&s); model_events.push((Closed, of, now)); }
                    (Some((of, _)), false) if of != f => { model.insert(s, (f, now)); model_events.push((Closed, of, now)); model_events.push((Opened, f, now)); }
                    (Some(_), false) => { model.insert(s, (f, now)); }
                    (None, true) => {}
                }
            }
            let got: Vec<(SessionEventKind, u8, i64)> = out.events.iter().map(|e| (e.kind, e.facility_id[1..].parse().unwrap(), e.at)).collect();
            // Sessions that expire at the same instant may come in any order in the model.
            let norm = |mut v: Vec<(SessionEventKind, u8, i64)>| { v.sort_by_key(|(k, f, at)| (*at, *k as u8, *f)); v };
            prop_assert_eq!(norm(got), norm(model_events));
            prop_assert_eq!(t.open_sessions(), model.len());
        }
    }
}
