//! Stage 1, pure: the open sessions of one `heartbeats` partition, and the transitions they
//! make. No Kafka here: records and time come in, [`SessionEvent`]s and changelog writes go
//! out through [`SessionOutput`].
//!
//! Time is the partition's *stream time*: the highest record timestamp seen, advanced to the
//! wall clock by the runner only while the partition is caught up. A session closes when the
//! stream time passes `last_seen + timeout`, so a replayed backlog expires exactly what the
//! log says and never a session that kept beating.
//!
//! Ownership: a session is the pair (user id, session id). A beat or END with another
//! user id that reuses a session id is a different session, with its own open and close at
//! the facility it names; it never extends, moves or closes the first one. The user id is
//! the identity the gateway vouches for (the token's subject), or the producer's own.
//!
//! Memory: sessions live in a slab of 40-byte slots, found through a `HashTable<u32>` (5
//! bytes a bucket) keyed by a 128-bit hash of (user id, session id), and linked in a list
//! ordered by `last_seen`: the head is always the next to expire, so expiry never scans, and
//! a beat moves its session to the tail in O(1) (a late beat walks back a few slots).

use hashbrown::{HashMap, HashTable};
use presence_core::codec::MAX_ID_BYTES;
use presence_core::records::{HeartbeatKind, HeartbeatRef, SessionStateRef};

use crate::records::{CloseReason, SessionEvent, SessionEventKind, SessionMark, SessionState};
use crate::window;

/// A session's 128-bit hash over (user id, session id): the in-memory and changelog key.
/// Collisions are as likely as two random UUIDs being equal.
pub type SessionKey = [u64; 2];

/// The key of the session `session_id` opened by `user_id`. The hashed bytes are the user
/// id's length (4 bytes, little-endian), the user id, then the session id, so no two pairs
/// hash the same bytes (`("ab", "c")` and `("a", "bc")` differ).
pub fn session_key(user_id: &str, session_id: &str) -> SessionKey {
    let (u, s) = (user_id.as_bytes(), session_id.as_bytes());
    let len = 4 + u.len() + s.len();
    let mut stack = [0u8; 4 + 2 * MAX_ID_BYTES];
    let mut heap = Vec::new();
    // Validated ids fit on the stack; anything longer still hashes, through the heap.
    let buf: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    buf[..4].copy_from_slice(&(u.len() as u32).to_le_bytes());
    buf[4..4 + u.len()].copy_from_slice(u);
    buf[4 + u.len()..].copy_from_slice(s);
    split(xxhash_rust::xxh3::xxh3_128(buf))
}

/// The key schema v1 of the changelog used: the session id's hash alone, without the user.
/// Only restore reads it, to take over records written before sessions had owners.
pub fn legacy_session_key(session_id: &str) -> SessionKey {
    split(xxhash_rust::xxh3::xxh3_128(session_id.as_bytes()))
}

fn split(h: u128) -> SessionKey {
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

/// The changelog key of a session's mark ([`SessionMark`]): the session's key and
/// [`presence_core::records::SESSION_MARK_TAG`].
pub fn mark_key_bytes(key: &SessionKey) -> [u8; 17] {
    let mut b = [presence_core::records::SESSION_MARK_TAG; 17];
    b[..16].copy_from_slice(&key_bytes(key));
    b
}

/// The session a mark's changelog key names; `None` for any other key.
pub fn mark_key_from_bytes(b: &[u8]) -> Option<SessionKey> {
    if !presence_core::records::is_session_mark_key(b) {
        return None;
    }
    key_from_bytes(&b[..16])
}

/// What stage 1 produces; the runner turns it into Kafka records of the open transaction.
pub trait SessionOutput {
    /// To stage 2, keyed by facility.
    fn event(&mut self, event: SessionEvent);
    /// Changelog: the session opened or moved.
    fn put_session(&mut self, key: SessionKey, state: SessionState);
    /// Changelog: the session closed.
    fn delete_session(&mut self, key: SessionKey);
    /// Changelog: the quiet session's last-seen as of an offset ([`SessionTask::mark_quiet`]),
    /// under its mark key ([`mark_key_bytes`]). Outputs that keep no changelog ignore it.
    fn put_mark(&mut self, _key: SessionKey, _mark: SessionMark) {}
    /// Changelog: the session whose mark was written closed.
    fn delete_mark(&mut self, _key: SessionKey) {}
}

/// The fields of a heartbeat stage 1 reads, borrowed from the decoded record.
#[derive(Debug, Clone, Copy)]
pub struct Beat<'a> {
    pub session_id: &'a str,
    /// The identity that owns the session: it is part of the session's key.
    pub user_id: &'a str,
    pub facility_id: &'a str,
    pub region_id: &'a str,
    pub kind: HeartbeatKind,
}

impl<'a> Beat<'a> {
    pub fn of(h: &HeartbeatRef<'a>) -> Beat<'a> {
        Beat {
            session_id: h.session_id,
            user_id: h.user_id,
            facility_id: h.facility_id,
            region_id: h.region_id,
            kind: h.kind,
        }
    }
}

/// What a record did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Opened,
    Extended,
    Moved,
    Closed,
    /// END for a session that is not open (by this user), or older than its last beat.
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

/// Slots the slab grows by at least, so that small partitions do not reallocate per session.
const SLAB_MIN_GROWTH: usize = 1024;

#[derive(Clone, Copy)]
struct Slot {
    key: SessionKey,
    last_seen: i64,
    facility: u32,
    prev: u32,
    next: u32,
    /// When the session's mark was last written ([`mark_stamp`] of the stream time), 0 if
    /// it never was: then its close writes no mark tombstone. Fills the slot's padding.
    marked: u32,
}

/// A stream time in whole seconds, at least 1, for [`Slot::marked`] (u32 seconds since the
/// epoch last until 2106).
fn mark_stamp(t: i64) -> u32 {
    (t / 1000).clamp(1, u32::MAX as i64) as u32
}

/// The open sessions of one heartbeats partition.
pub struct SessionTask {
    partition: i32,
    timeout: i64,
    max_future: i64,
    stream_time: i64,
    next_seq: i64,
    /// Facilities with open sessions here: (facility id, region id), by index. An index
    /// whose last session closed is freed (ids dropped, index reused), so facilities that
    /// stop appearing do not stay in memory.
    facilities: Vec<(Box<str>, Box<str>)>,
    facility_index: HashMap<Box<str>, u32>,
    /// Open sessions per facility index.
    facility_sessions: Vec<u32>,
    free_facilities: Vec<u32>,
    slots: Vec<Slot>,
    free: u32,
    table: HashTable<u32>,
    head: u32,
    tail: u32,
    open: usize,
    /// While restoring: each slot's open offset (from the changelog), so that the re-read
    /// beats apply only after it. Empty otherwise.
    restore_offsets: Vec<i64>,
    /// Sessions restored from a changelog record of schema v1 (keyed by the session id
    /// alone, no user id): slot → that record's key. While restoring, a slot still keyed by
    /// it has no known owner yet; afterwards only the sessions whose owner was found stay
    /// here, so that closing or moving them tombstones the old record. Empty once they close.
    legacy: HashMap<u32, SessionKey>,
    /// While restoring the window newest first: slots whose last-seen an older beat raised
    /// ([`Self::refresh_earlier`]), to be put back in expiry order together
    /// ([`Self::relink_refreshed`]). Empty otherwise.
    refreshed: Vec<u32>,
    /// While restoring: the newest mark of each session read from the changelog, applied
    /// once it is read whole ([`Self::apply_marks`]; compaction can leave a mark before the
    /// record of its session). Empty otherwise.
    restore_marks: HashMap<SessionKey, SessionMark>,
    /// The offset of the last heartbeats record applied (every record up to it is in the
    /// state), or the committed offset's predecessor after a restore; -1 before either.
    position: i64,
    /// The stream time of the last walk of [`Self::mark_quiet`].
    last_mark_walk: i64,
}

/// A beat re-read from the heartbeats during restore, reduced to what refreshing a
/// last-seen (and finding the owner of a v1 changelog record) needs.
#[derive(Debug, Clone, Copy)]
pub struct WindowBeat {
    pub key: SessionKey,
    pub legacy_key: SessionKey,
    pub facility: u64,
    pub ts: i64,
    pub offset: i64,
}

impl WindowBeat {
    pub fn new(beat: &Beat<'_>, ts: i64, offset: i64) -> WindowBeat {
        WindowBeat {
            key: session_key(beat.user_id, beat.session_id),
            legacy_key: legacy_session_key(beat.session_id),
            facility: facility_hash(beat.facility_id),
            ts,
            offset,
        }
    }
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
            facility_sessions: Vec::new(),
            free_facilities: Vec::new(),
            slots: Vec::new(),
            free: NIL,
            table: HashTable::new(),
            head: NIL,
            tail: NIL,
            open: 0,
            restore_offsets: Vec::new(),
            legacy: HashMap::new(),
            refreshed: Vec::new(),
            restore_marks: HashMap::new(),
            position: -1,
            last_mark_walk: i64::MIN,
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

    /// After a restore: the next heartbeats offset to apply (the committed offset), so that
    /// marks written before the first new record name the point the state stands for.
    pub fn set_next_offset(&mut self, next: i64) {
        self.position = self.position.max(next - 1);
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
            + (self.facility_sessions.capacity() + self.free_facilities.capacity()) * 4
            + self.legacy.capacity() * 25
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
        self.position = self.position.max(offset);
        if ts > wall_now.saturating_add(self.max_future) {
            self.record_refusal(offset, beat, out);
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
        let key = session_key(beat.user_id, beat.session_id);
        let Some(i) = self.find(key) else {
            if beat.kind == HeartbeatKind::End {
                return Ok(Applied::IgnoredEnd);
            }
            if ts.saturating_add(self.timeout) < at {
                return Ok(Applied::IgnoredLate);
            }
            let facility = self.intern(beat.facility_id, beat.region_id);
            self.insert(key, facility, ts);
            self.emit(SessionEventKind::Opened, None, facility, at, out);
            out.put_session(key, self.state_of(beat, facility, ts, offset));
            return Ok(Applied::Opened);
        };
        let slot = self.slots[i as usize];
        match beat.kind {
            HeartbeatKind::End if ts < slot.last_seen => Ok(Applied::IgnoredEnd),
            HeartbeatKind::End => {
                self.emit(
                    SessionEventKind::Closed,
                    Some(CloseReason::End),
                    slot.facility,
                    at,
                    out,
                );
                self.close(i, out);
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
                self.emit(
                    SessionEventKind::Closed,
                    Some(CloseReason::Moved),
                    slot.facility,
                    at,
                    out,
                );
                self.set_facility(i, facility);
                self.touch(i, ts);
                self.emit(SessionEventKind::Opened, None, facility, at, out);
                out.put_session(key, self.state_of(beat, facility, ts, offset));
                if let Some(old) = self.take_legacy(i) {
                    out.delete_session(old);
                }
                Ok(Applied::Moved)
            }
        }
    }

    /// A beat of an open session was refused: its changelog record is written again with
    /// the refused beat's offset as the one to refresh after. A restore then never raises
    /// the session's last-seen with it, even once a later checkpoint's stream time has
    /// passed its timestamp (the clock alone cannot tell a refused beat from an applied one).
    fn record_refusal(&mut self, offset: i64, beat: &Beat<'_>, out: &mut impl SessionOutput) {
        let key = session_key(beat.user_id, beat.session_id);
        let Some(i) = self.find(key) else {
            return;
        };
        let slot = self.slots[i as usize];
        out.put_session(
            key,
            self.state_of(beat, slot.facility, slot.last_seen, offset),
        );
        if let Some(old) = self.take_legacy(i) {
            out.delete_session(old);
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
            self.emit(
                SessionEventKind::Closed,
                Some(CloseReason::Timeout),
                slot.facility,
                deadline,
                out,
            );
            self.close(self.head, out);
            closed += 1;
        }
        closed
    }

    /// Writes the mark of each quiet session that needs one ([`crate::window`]): last seen
    /// more than [`window::quiet_after`] before the stream time, and not marked within
    /// [`window::mark_every`]. A mark is the session's last-seen as of the last heartbeats
    /// offset applied, so that a restore after this commit re-reads only the beats after it
    /// for the session instead of going back to its open. Walks the head of the expiry order
    /// (the quiet sessions only), at most once per [`window::mark_walk`] of stream time. Returns
    /// the marks written.
    pub fn mark_quiet(&mut self, out: &mut impl SessionOutput) -> usize {
        let now = self.stream_time;
        let next_walk = self
            .last_mark_walk
            .saturating_add(window::mark_walk(self.timeout));
        if self.position < 0 || now == i64::MIN || now < next_walk {
            return 0;
        }
        self.last_mark_walk = now;
        let quiet_before = now - window::quiet_after(self.timeout);
        let renew_before = now - window::mark_every(self.timeout);
        let stamp = mark_stamp(now);
        let mut written = 0;
        let mut i = self.head;
        while i != NIL {
            let slot = self.slots[i as usize];
            if slot.last_seen >= quiet_before {
                break;
            }
            if slot.marked == 0 || i64::from(slot.marked) * 1000 <= renew_before {
                let mark = SessionMark {
                    last_seen: slot.last_seen,
                    offset: self.position,
                };
                out.put_mark(slot.key, mark);
                self.slots[i as usize].marked = stamp;
                written += 1;
            }
            i = slot.next;
        }
        written
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
            close_reason: None,
        }
    }

    /// Restore: a changelog record (the session opened or moved), applied in log order.
    /// A record of schema v1 (no user id; `key` is [`legacy_session_key`]) restores a
    /// session whose owner is not known yet: [`Self::refresh`] finds it in the re-read beats.
    pub fn restore_session(&mut self, key: SessionKey, state: SessionStateRef<'_>) {
        let facility = self.intern(state.facility_id, state.region_id);
        let i = match self.find(key) {
            Some(i) => {
                self.set_facility(i, facility);
                self.touch(i, state.last_seen);
                i
            }
            None => self.insert(key, facility, state.last_seen),
        };
        if state.user_id.is_empty() {
            self.legacy.insert(i, key);
        }
        let i = i as usize;
        if self.restore_offsets.len() <= i {
            self.restore_offsets.resize(i + 1, i64::MAX);
        }
        self.restore_offsets[i] = state.open_offset;
    }

    /// Restore: a mark read from the changelog (`None`: its tombstone), in log order; kept
    /// until [`Self::apply_marks`].
    pub fn restore_mark(&mut self, key: SessionKey, mark: Option<SessionMark>) {
        match mark {
            Some(m) => self.restore_marks.insert(key, m),
            None => self.restore_marks.remove(&key),
        };
    }

    /// Restore, once the changelog is read whole and the clock set: each mark raises its
    /// session's last-seen to the mark's and moves the offset its beats apply after to the
    /// mark's, as the session record itself would have if it had been written then. Both
    /// only move forward: a session record written after the mark (a move, a refused
    /// beat) holds a later offset and a last-seen at least the mark's. A mark of a session
    /// not open (closed in the same transaction as the mark's tombstone) or of a schema-v1
    /// record (whose owner is found by the beats after its open) is left out: a mark is a
    /// hint, and without it the restore reads further back to the same state.
    pub fn apply_marks(&mut self) {
        let stamp = mark_stamp(self.stream_time);
        for (key, m) in std::mem::take(&mut self.restore_marks) {
            let Some(i) = self.find(key) else {
                continue;
            };
            // Its close tombstones the mark; renewed a `mark_every` after the restore.
            self.slots[i as usize].marked = stamp;
            if self.legacy.contains_key(&i) {
                continue;
            }
            if m.last_seen > self.slots[i as usize].last_seen {
                self.raise_for_relink(i, m.last_seen);
            }
            if let Some(open) = self.restore_offsets.get_mut(i as usize) {
                *open = (*open).max(m.offset);
            }
        }
        // In one merge, not one walk back from the tail each: here the list is in the
        // changelog's order (opens), and a mark's last-seen is recent, later than most
        // opens (1 M sessions with 10 k marks: 1.0 s one at a time, 12 ms merged; `cargo
        // bench --bench stage1`).
        self.relink_refreshed();
    }

    /// Restore is over: the open offsets are not needed any more, and a v1 session whose
    /// owner no re-read beat named stays keyed by its session id alone. No live beat matches
    /// that key, so it closes at its deadline (its facility's count stays right) and its
    /// owner's next beat opens a session of its own.
    pub fn finish_restore(&mut self) {
        self.restore_offsets = Vec::new();
        let slots = &self.slots;
        self.legacy.retain(|&i, old| slots[i as usize].key != *old);
    }

    /// Restore: a changelog tombstone (the session closed).
    pub fn restore_delete(&mut self, key: SessionKey) {
        if let Some(i) = self.find(key) {
            self.remove(i);
        }
    }

    /// Restore: a beat re-read from the heartbeats raises its session's last-seen exactly as
    /// it did when first processed: if it came after the session's open (or move), from the
    /// same user, and names the same facility. Apply in offset order.
    ///
    /// A session restored from a v1 record is given the owner of the first beat at or after
    /// its open offset with its session id and facility: the beat that opened it when that
    /// is still in the window, which every later beat of the session agrees with.
    ///
    /// Call [`Self::set_clock`] first: a beat stamped after the checkpoint's stream time was
    /// never applied (every beat the live path applies raises the stream time to at least
    /// its timestamp), so it is one the live path refused (`timestamp_in_future`, a dead
    /// letter) and refreshes nothing. Without this, a refused beat an hour ahead kept its
    /// session open for that hour after a restart.
    pub fn refresh(&mut self, b: &WindowBeat) {
        if b.ts > self.stream_time {
            return;
        }
        let Some(i) = self.find(b.key).or_else(|| self.claim_legacy(b)) else {
            return;
        };
        if self.raises(i, b) {
            self.touch(i, b.ts);
        }
    }

    /// Whether the re-read beat `b` raises slot `i`'s last-seen: it came after the
    /// session's open (or move), names its facility, and is newer.
    fn raises(&self, i: u32, b: &WindowBeat) -> bool {
        let slot = self.slots[i as usize];
        self.restore_offsets
            .get(i as usize)
            .is_some_and(|&open| b.offset > open)
            && b.ts > slot.last_seen
            && self.facility_hash_of(slot.facility) == b.facility
    }

    /// Restore: whether sessions of schema v1 came from the changelog. Their owners are
    /// found by the first beat after their open, so their window is read oldest first.
    pub fn restores_legacy(&self) -> bool {
        !self.legacy.is_empty()
    }

    /// Restore, the window read newest first: given that every record before offset
    /// `before` is stamped before `t`, the smallest open offset of the sessions that such a
    /// record could still raise — last seen before `t`, and opened (or moved) before
    /// `before - 1` — or `None` when no session is left that an older beat could change.
    /// Walks only the sessions last seen before `t` (the head of the expiry order).
    pub fn unsettled_from(&self, t: i64, before: i64) -> Option<i64> {
        let mut oldest: Option<i64> = None;
        let mut i = self.head;
        while i != NIL && self.slots[i as usize].last_seen < t {
            if let Some(&open) = self.restore_offsets.get(i as usize) {
                if open < before - 1 {
                    oldest = Some(oldest.map_or(open, |o| o.min(open)));
                }
            }
            i = self.slots[i as usize].next;
        }
        oldest
    }

    /// Restore: [`Self::refresh`] for a beat read after newer ones (the window read newest
    /// first). The same rule, so the same last-seen whatever the order (it only ever raises
    /// it to a beat's stamp); the slot goes back into expiry order in
    /// [`Self::relink_refreshed`], with the others an older stretch of the window raised,
    /// not one at a time from the tail (the newest sessions are all after it). Not for
    /// schema-v1 sessions ([`Self::restores_legacy`]).
    pub fn refresh_earlier(&mut self, b: &WindowBeat) {
        if b.ts > self.stream_time {
            return;
        }
        let Some(i) = self.find(b.key) else {
            return;
        };
        if self.raises(i, b) {
            self.raise_for_relink(i, b.ts);
        }
    }

    /// Raises slot `i`'s last-seen and leaves it where it is in the expiry list, noted for
    /// [`Self::relink_refreshed`], which must run before the list is walked again.
    fn raise_for_relink(&mut self, i: u32, last_seen: i64) {
        self.slots[i as usize].last_seen = last_seen;
        self.refreshed.push(i);
    }

    /// Puts the slots [`Self::refresh_earlier`] (or [`Self::apply_marks`]) raised back in
    /// expiry order: out of the list, sorted by their new last-seen, then merged in from the
    /// head in one walk (for the older beats: they were last seen before every session the
    /// newer beats settled).
    pub fn relink_refreshed(&mut self) {
        let mut moved = std::mem::take(&mut self.refreshed);
        // By new last-seen; a slot raised twice is there twice, side by side.
        moved.sort_unstable_by_key(|&i| (self.slots[i as usize].last_seen, i));
        moved.dedup();
        for &i in &moved {
            self.unlink(i);
        }
        let mut at = self.head;
        for i in moved {
            let t = self.slots[i as usize].last_seen;
            while at != NIL && self.slots[at as usize].last_seen <= t {
                at = self.slots[at as usize].next;
            }
            self.link_before(i, at);
        }
    }

    /// The open sessions as the expiry order holds them: key, facility id, last seen.
    #[cfg(test)]
    pub(crate) fn in_expiry_order(&self) -> Vec<(SessionKey, String, i64)> {
        let mut sessions = Vec::with_capacity(self.open);
        let mut i = self.head;
        while i != NIL {
            let slot = self.slots[i as usize];
            let facility = self.facilities[slot.facility as usize].0.to_string();
            sessions.push((slot.key, facility, slot.last_seen));
            i = slot.next;
        }
        sessions
    }

    /// The v1 session `b` names, re-keyed to `b`'s owner, if it has none yet and `b` can be
    /// its beat.
    fn claim_legacy(&mut self, b: &WindowBeat) -> Option<u32> {
        if self.legacy.is_empty() {
            return None;
        }
        let i = self.find(b.legacy_key)?;
        let open = *self.restore_offsets.get(i as usize)?;
        let slot = self.slots[i as usize];
        if !self.legacy.contains_key(&i)
            || b.offset < open
            || self.facility_hash_of(slot.facility) != b.facility
        {
            return None;
        }
        if let Ok(entry) = self.table.find_entry(slot.key[0], |&j| j == i) {
            entry.remove();
        }
        self.slots[i as usize].key = b.key;
        let slots = &self.slots;
        self.table
            .insert_unique(b.key[0], i, |&j| slots[j as usize].key[0]);
        Some(i)
    }

    fn facility_hash_of(&self, facility: u32) -> u64 {
        facility_hash(&self.facilities[facility as usize].0)
    }

    fn find(&self, key: SessionKey) -> Option<u32> {
        self.table
            .find(key[0], |&i| self.slots[i as usize].key == key)
            .copied()
    }

    /// The changelog key of slot `i` when it is not the slot's own (a v1 record), removed.
    fn take_legacy(&mut self, i: u32) -> Option<SessionKey> {
        if self.legacy.is_empty() {
            return None;
        }
        self.legacy.remove(&i)
    }

    fn state_of(
        &self,
        beat: &Beat<'_>,
        facility: u32,
        last_seen: i64,
        open_offset: i64,
    ) -> SessionState {
        let (f, r) = &self.facilities[facility as usize];
        SessionState {
            session_id: beat.session_id.to_string(),
            user_id: beat.user_id.to_string(),
            facility_id: f.to_string(),
            region_id: r.to_string(),
            last_seen,
            open_offset,
        }
    }

    fn emit(
        &mut self,
        kind: SessionEventKind,
        close_reason: Option<CloseReason>,
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
            close_reason,
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
        let ids = (facility_id.into(), region_id.into());
        let i = match self.free_facilities.pop() {
            Some(i) => {
                self.facilities[i as usize] = ids;
                i
            }
            None => {
                self.facilities.push(ids);
                self.facility_sessions.push(0);
                (self.facilities.len() - 1) as u32
            }
        };
        self.facility_index.insert(facility_id.into(), i);
        i
    }

    /// One session fewer at `facility`; its ids are dropped with its last session.
    fn release(&mut self, facility: u32) {
        let n = &mut self.facility_sessions[facility as usize];
        *n -= 1;
        if *n == 0 {
            let (f, _) = std::mem::take(&mut self.facilities[facility as usize]);
            self.facility_index.remove(&f);
            self.free_facilities.push(facility);
        }
    }

    /// Moves slot `i` to `facility` (counted there first, so that a move to the same
    /// facility never frees it).
    fn set_facility(&mut self, i: u32, facility: u32) {
        self.facility_sessions[facility as usize] += 1;
        let old = std::mem::replace(&mut self.slots[i as usize].facility, facility);
        self.release(old);
    }

    /// Facilities this partition holds ids of (those with open sessions here).
    pub fn facilities_held(&self) -> usize {
        self.facility_index.len()
    }

    fn insert(&mut self, key: SessionKey, facility: u32, last_seen: i64) -> u32 {
        let slot = Slot {
            key,
            last_seen,
            facility,
            prev: NIL,
            next: NIL,
            marked: 0,
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            self.slots[i as usize] = slot;
            i
        } else {
            if self.slots.len() == self.slots.capacity() {
                // Grow by a quarter, not double: a doubled slab holds up to one empty 40-byte
                // slot per session (10 M open sessions in one partition: ~67 bytes a session
                // instead of ~50), and the state should be what the sessions need.
                self.slots
                    .reserve_exact(self.slots.capacity() / 4 + SLAB_MIN_GROWTH);
            }
            self.slots.push(slot);
            (self.slots.len() - 1) as u32
        };
        let slots = &self.slots;
        self.table
            .insert_unique(key[0], i, |&j| slots[j as usize].key[0]);
        self.link_sorted(i);
        self.open += 1;
        self.facility_sessions[facility as usize] += 1;
        i
    }

    /// Closes slot `i`: frees it and tombstones its changelog record, and its mark if one
    /// was written.
    fn close(&mut self, i: u32, out: &mut impl SessionOutput) {
        let Slot { key, marked, .. } = self.slots[i as usize];
        let changelog_key = self.remove(i);
        out.delete_session(changelog_key);
        if marked != 0 {
            out.delete_mark(key);
        }
    }

    /// Frees slot `i`; returns the key of its changelog record (to tombstone).
    fn remove(&mut self, i: u32) -> SessionKey {
        let key = self.slots[i as usize].key;
        if let Ok(entry) = self.table.find_entry(key[0], |&j| j == i) {
            entry.remove();
        }
        self.unlink(i);
        self.slots[i as usize].next = self.free;
        self.free = i;
        self.open -= 1;
        self.release(self.slots[i as usize].facility);
        self.take_legacy(i).unwrap_or(key)
    }

    fn touch(&mut self, i: u32, last_seen: i64) {
        // The tail stays the tail when raised; lowered (a restore's changelog record older
        // than the slot's time), it may belong further in.
        let raised = last_seen >= self.slots[i as usize].last_seen;
        self.slots[i as usize].last_seen = last_seen;
        if raised && self.tail == i {
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
        self.link_before(i, next);
    }

    /// Links slot `i` just before slot `at` (at the tail when `at` is [`NIL`]).
    fn link_before(&mut self, i: u32, at: u32) {
        let prev = if at == NIL {
            self.tail
        } else {
            self.slots[at as usize].prev
        };
        self.slots[i as usize].prev = prev;
        self.slots[i as usize].next = at;
        if prev == NIL {
            self.head = i;
        } else {
            self.slots[prev as usize].next = i;
        }
        if at == NIL {
            self.tail = i;
        } else {
            self.slots[at as usize].prev = i;
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

/// The longest facility or region id a snapshot may hold: a longer length field is damage.
const SNAPSHOT_MAX_ID_BYTES: usize = 64 * 1024;

/// One session in a snapshot: its key (16 bytes), last seen (8), facility (4), when its
/// mark was written (4, 0: never).
const SNAPSHOT_SESSION_BYTES: usize = 32;

/// Why a snapshot's sessions could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("damaged: {0}")]
    Damaged(&'static str),
}

impl SessionTask {
    /// Whether [`Self::write_sessions`] can stand for this task: not while it restores, and
    /// not while it holds sessions from schema-v1 changelog records (their old keys, which
    /// closing them must tombstone, are not in a snapshot).
    pub fn can_snapshot(&self) -> bool {
        self.restore_offsets.is_empty() && self.legacy.is_empty()
    }

    /// Writes the open sessions for [`Self::read_sessions`]: the facilities they are at
    /// (count, then each id and region id with its length), then the sessions in expiry
    /// order (count, then key, last seen, facility and mark stamp of each), little-endian.
    /// The clock is not in it: the caller keeps it beside (a checkpoint).
    pub fn write_sessions(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut index = vec![NIL; self.facilities.len()];
        let mut live = 0u32;
        for (i, n) in self.facility_sessions.iter().enumerate() {
            if *n > 0 {
                index[i] = live;
                live += 1;
            }
        }
        w.write_all(&live.to_le_bytes())?;
        for (i, (f, r)) in self.facilities.iter().enumerate() {
            if index[i] == NIL {
                continue;
            }
            for id in [f, r] {
                w.write_all(&(id.len() as u32).to_le_bytes())?;
                w.write_all(id.as_bytes())?;
            }
        }
        w.write_all(&(self.open as u64).to_le_bytes())?;
        let mut buf = [0u8; SNAPSHOT_SESSION_BYTES];
        let mut i = self.head;
        while i != NIL {
            let s = &self.slots[i as usize];
            buf[..8].copy_from_slice(&s.key[0].to_le_bytes());
            buf[8..16].copy_from_slice(&s.key[1].to_le_bytes());
            buf[16..24].copy_from_slice(&s.last_seen.to_le_bytes());
            buf[24..28].copy_from_slice(&index[s.facility as usize].to_le_bytes());
            buf[28..].copy_from_slice(&s.marked.to_le_bytes());
            w.write_all(&buf)?;
            i = s.next;
        }
        Ok(())
    }

    /// A task holding the sessions [`Self::write_sessions`] wrote, with its clock at
    /// `(stream_time, next_seq)`. Anything that cannot have been written so (a facility
    /// listed twice or without sessions, a session listed twice, out of expiry order or at
    /// a facility not listed) is an error, never a task that differs from the one written.
    pub fn read_sessions(
        partition: i32,
        timeout_ms: i64,
        max_future_ms: i64,
        (stream_time, next_seq): (i64, i64),
        r: &mut impl std::io::Read,
    ) -> Result<SessionTask, SnapshotError> {
        let mut task = SessionTask::new(partition, timeout_ms, max_future_ms);
        task.set_clock(stream_time, next_seq);
        let mut word = [0u8; 4];
        r.read_exact(&mut word)?;
        let facilities = u32::from_le_bytes(word);
        let mut id = Vec::new();
        for n in 0..facilities {
            let mut ids: [String; 2] = Default::default();
            for slot in &mut ids {
                r.read_exact(&mut word)?;
                let len = u32::from_le_bytes(word) as usize;
                if len > SNAPSHOT_MAX_ID_BYTES {
                    return Err(SnapshotError::Damaged("an id longer than any id"));
                }
                id.resize(len, 0);
                r.read_exact(&mut id)?;
                *slot = String::from_utf8(std::mem::take(&mut id))
                    .map_err(|_| SnapshotError::Damaged("an id that is not UTF-8"))?;
            }
            if task.intern(&ids[0], &ids[1]) != n {
                return Err(SnapshotError::Damaged("a facility listed twice"));
            }
        }
        let mut count = [0u8; 8];
        r.read_exact(&mut count)?;
        let sessions = u64::from_le_bytes(count);
        // Reserved up to what the file can hold at most; a damaged count fails below.
        let reserve = sessions.min(1 << 28) as usize;
        task.slots.reserve_exact(reserve);
        {
            let slots = &task.slots;
            task.table.reserve(reserve, |&j| slots[j as usize].key[0]);
        }
        let mut buf = [0u8; SNAPSHOT_SESSION_BYTES];
        let mut last = i64::MIN;
        for _ in 0..sessions {
            r.read_exact(&mut buf)?;
            let word = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]));
            let key = [word(0), word(8)];
            let last_seen = word(16) as i64;
            let facility = u32::from_le_bytes(buf[24..28].try_into().unwrap_or([0xff; 4]));
            let marked = u32::from_le_bytes(buf[28..].try_into().unwrap_or([0; 4]));
            if facility >= facilities {
                return Err(SnapshotError::Damaged("a session at a facility not listed"));
            }
            if last_seen < last {
                return Err(SnapshotError::Damaged("sessions out of expiry order"));
            }
            if task.find(key).is_some() {
                return Err(SnapshotError::Damaged("a session listed twice"));
            }
            last = last_seen;
            let i = task.insert(key, facility, last_seen);
            task.slots[i as usize].marked = marked;
        }
        if task.facility_sessions.contains(&0) {
            return Err(SnapshotError::Damaged("a facility without sessions"));
        }
        Ok(task)
    }
}

/// Collects outputs in memory: tests, benchmarks and the runner's per-record buffer.
#[derive(Default, Debug)]
pub struct Collected {
    pub events: Vec<SessionEvent>,
    pub puts: Vec<(SessionKey, SessionState)>,
    pub deletes: Vec<SessionKey>,
    /// Marks and their tombstones (`None`), in order.
    pub marks: Vec<(SessionKey, Option<SessionMark>)>,
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
    fn put_mark(&mut self, key: SessionKey, mark: SessionMark) {
        self.marks.push((key, Some(mark)));
    }
    fn delete_mark(&mut self, key: SessionKey) {
        self.marks.push((key, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: i64 = 90_000;
    const WALL: i64 = i64::MAX / 2;

    fn beat<'a>(s: &'a str, f: &'a str) -> Beat<'a> {
        beat_as("u", s, f)
    }
    fn beat_as<'a>(u: &'a str, s: &'a str, f: &'a str) -> Beat<'a> {
        Beat {
            session_id: s,
            user_id: u,
            facility_id: f,
            region_id: "r",
            kind: HeartbeatKind::Beat,
        }
    }
    fn end(s: &str) -> Beat<'_> {
        end_as("u", s)
    }
    fn end_as<'a>(u: &'a str, s: &'a str) -> Beat<'a> {
        Beat {
            kind: HeartbeatKind::End,
            ..beat_as(u, s, "f")
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
    fn facilities_whose_sessions_all_closed_are_forgotten() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        let ids: Vec<(String, String)> = (0..1_000)
            .map(|i| (format!("s{i}"), format!("f{i}")))
            .collect();
        for (o, (s, f)) in ids.iter().enumerate() {
            t.on_heartbeat(o as i64, 1_000, &beat(s, f), WALL, &mut out)
                .unwrap();
        }
        assert_eq!(t.facilities_held(), 1_000);
        // Half end, the other half time out; one moves first (from f0 to "elsewhere").
        t.on_heartbeat(1_000, 2_000, &beat("s0", "elsewhere"), WALL, &mut out)
            .unwrap();
        assert_eq!(t.facilities_held(), 1_000, "f0 freed, elsewhere taken");
        for (o, (s, _)) in ids.iter().enumerate().take(500) {
            t.on_heartbeat(2_000 + o as i64, 3_000, &end(s), WALL, &mut out)
                .unwrap();
        }
        assert_eq!(t.facilities_held(), 500);
        t.advance_to(2_000 + T + 1, &mut out);
        assert_eq!(t.open_sessions(), 0);
        assert_eq!(t.facilities_held(), 0, "no ids kept without sessions");
        // Every close named its facility (emitted before the ids were dropped).
        let closed: Vec<&str> = out
            .events
            .iter()
            .filter(|e| e.kind == Closed)
            .map(|e| e.facility_id.as_str())
            .collect();
        assert_eq!(closed.len(), 1_001);
        assert!(closed.iter().all(|f| !f.is_empty()));
        // Indexes are reused: new facilities do not grow the table.
        for i in 0..1_000 {
            let (s, f) = (format!("n{i}"), format!("g{i}"));
            t.on_heartbeat(5_000 + i, 200_000, &beat(&s, &f), WALL, &mut out)
                .unwrap();
        }
        assert_eq!(t.facilities_held(), 1_000);
        assert!(t.facilities.len() <= 1_001, "{}", t.facilities.len());
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
        assert_eq!(out.deletes, vec![session_key("u", "s")]);
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

    /// A beat the live path refused (stamped past the clock's allowance) is still in the
    /// re-read window after a crash; it must not keep its session open until its timestamp.
    #[test]
    fn a_refused_future_beat_refreshes_nothing_on_restore() {
        let mut live = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        live.on_heartbeat(0, 1_000, &beat("s", "f"), 1_000, &mut out)
            .unwrap();
        let refused = live.on_heartbeat(1, 3_600_000, &beat("s", "f"), 1_000, &mut out);
        assert_eq!(refused.map_err(|r| r.code), Err("timestamp_in_future"));
        let (key, state) = out.puts[0].clone();
        let mut restored = SessionTask::new(0, T, 60_000);
        restored.restore_session(key, state.borrowed());
        restored.set_clock(live.stream_time(), live.next_seq());
        restored.refresh(&WindowBeat::new(&beat("s", "f"), 3_600_000, 1));
        restored.finish_restore();
        assert_eq!(restored.next_expiry(), live.next_expiry());
        assert_eq!(restored.next_expiry(), Some(1_000 + T + 1));
    }

    /// A refused beat whose timestamp a later checkpoint's stream time has passed: the clock
    /// alone cannot tell it was refused, so the refusal itself is recorded (the session's
    /// changelog record is written again with the refused beat's offset).
    #[test]
    fn a_refused_beat_the_stream_time_later_passed_refreshes_nothing_on_restore() {
        let max_future = 60_000;
        let mut live = SessionTask::new(0, T, max_future);
        let mut out = Collected::default();
        live.on_heartbeat(0, 1_000, &beat("s", "f"), 1_000, &mut out)
            .unwrap();
        // Stamped 100 s ahead of the wall clock when read: refused.
        let refused = live.on_heartbeat(1, 101_000, &beat("s", "f"), 1_000, &mut out);
        assert_eq!(refused.map_err(|r| r.code), Err("timestamp_in_future"));
        // Then real time catches up: the session beats on, the stream time passes 101 s.
        let mut offset = 2;
        for ts in (31_000..=91_000).step_by(30_000) {
            live.on_heartbeat(offset, ts, &beat("s", "f"), ts, &mut out)
                .unwrap();
            offset += 1;
        }
        live.on_heartbeat(offset, 105_000, &beat("o", "g"), 105_000, &mut out)
            .unwrap();
        assert!(live.stream_time() > 101_000);

        let mut restored = SessionTask::new(0, T, max_future);
        for (key, state) in &out.puts {
            restored.restore_session(*key, state.borrowed());
        }
        restored.set_clock(live.stream_time(), live.next_seq());
        restored.refresh(&WindowBeat::new(&beat("s", "f"), 101_000, 1));
        for (i, ts) in (31_000..=91_000).step_by(30_000).enumerate() {
            restored.refresh(&WindowBeat::new(&beat("s", "f"), ts, 2 + i as i64));
        }
        restored.finish_restore();
        assert_eq!(restored.next_expiry(), live.next_expiry());
        assert_eq!(restored.next_expiry(), Some(91_000 + T + 1));
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
        restored.restore_session(key, state.borrowed());
        restored.set_clock(live.stream_time(), live.next_seq());
        // The opening beat's offset or before: not after the open.
        restored.refresh(&WindowBeat::new(&beat("s", "f"), 45_000, 0));
        restored.refresh(&WindowBeat::new(&beat("s", "f"), 31_000, 1));
        // Another facility, or another user: not this session's beat.
        restored.refresh(&WindowBeat::new(&beat("s", "other"), 40_000, 2));
        restored.refresh(&WindowBeat::new(&beat_as("v", "s", "f"), 40_000, 3));
        restored.finish_restore();
        assert_eq!(restored.next_expiry(), live.next_expiry());
    }

    #[test]
    fn another_identity_can_neither_close_nor_move_a_session() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        t.on_heartbeat(0, 1_000, &beat_as("victim", "s", "fV"), WALL, &mut out)
            .unwrap();
        assert_eq!(
            t.on_heartbeat(1, 2_000, &end_as("attacker", "s"), WALL, &mut out),
            Ok(Applied::IgnoredEnd),
            "END for a session the attacker never opened"
        );
        assert_eq!(
            t.on_heartbeat(2, 3_000, &beat_as("attacker", "s", "fA"), WALL, &mut out),
            Ok(Applied::Opened),
            "a beat naming another facility opens the attacker's own session"
        );
        assert_eq!(
            t.on_heartbeat(3, 4_000, &end_as("attacker", "s"), WALL, &mut out),
            Ok(Applied::Closed),
            "and the attacker's END closes only that one"
        );
        assert_eq!(
            t.on_heartbeat(4, 5_000, &beat_as("victim", "s", "fV"), WALL, &mut out),
            Ok(Applied::Extended),
            "the victim's session is still open where it was"
        );
        assert_eq!(
            kinds(&out),
            vec![
                (Opened, "fV".into(), 1_000),
                (Opened, "fA".into(), 3_000),
                (Closed, "fA".into(), 4_000)
            ]
        );
        assert_eq!(out.deletes, vec![session_key("attacker", "s")]);
        t.advance_to(1_000_000, &mut out);
        assert_eq!(
            kinds(&out).last().unwrap(),
            &(Closed, "fV".into(), 5_000 + T),
            "the victim's session closes at its own deadline"
        );
        assert_eq!(out.puts[0].1.user_id, "victim");
    }

    #[test]
    fn two_identities_with_one_session_id_are_two_sessions() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        t.on_heartbeat(0, 1_000, &beat_as("a", "s", "f"), WALL, &mut out)
            .unwrap();
        assert_eq!(
            t.on_heartbeat(1, 2_000, &beat_as("b", "s", "f"), WALL, &mut out),
            Ok(Applied::Opened)
        );
        assert_eq!(t.open_sessions(), 2);
        assert_ne!(out.puts[0].0, out.puts[1].0, "two changelog keys");
        assert_eq!(
            t.on_heartbeat(2, 3_000, &end_as("a", "s"), WALL, &mut out),
            Ok(Applied::Closed)
        );
        assert_eq!(t.open_sessions(), 1);
        assert_eq!(
            kinds(&out),
            vec![
                (Opened, "f".into(), 1_000),
                (Opened, "f".into(), 2_000),
                (Closed, "f".into(), 3_000)
            ],
            "the facility counts both, and keeps b's after a's END"
        );
    }

    #[test]
    fn the_key_separates_user_from_session() {
        assert_ne!(session_key("ab", "c"), session_key("a", "bc"));
        assert_ne!(session_key("u", "s"), session_key("s", "u"));
        assert_ne!(session_key("u", "s"), legacy_session_key("s"));
        let long = "x".repeat(3 * MAX_ID_BYTES);
        assert_ne!(session_key(&long, "s"), session_key("s", &long));
    }

    /// What a changelog of schema v1 held for a session: keyed by its id alone, no owner.
    fn v1_record(s: &str, f: &str, last_seen: i64, open_offset: i64) -> (SessionKey, SessionState) {
        let state = SessionState {
            session_id: s.into(),
            user_id: String::new(),
            facility_id: f.into(),
            region_id: "r".into(),
            last_seen,
            open_offset,
        };
        (legacy_session_key(s), state)
    }

    #[test]
    fn a_v1_changelog_restores_with_owners_from_the_reread_beats() {
        let mut t = SessionTask::new(0, T, 60_000);
        let (k1, state) = v1_record("s", "f", 1_000, 10);
        t.restore_session(k1, state.borrowed());
        let (k2, other) = v1_record("moved", "g", 2_000, 11);
        t.restore_session(k2, other.borrowed());
        t.set_clock(40_000, 5);
        // The window: the opening beat (its user owns the session), another user's beat
        // with the same id (under v1 it extended the session; now it is not the owner's),
        // and the owner's later beat.
        for b in [
            WindowBeat::new(&beat_as("victim", "s", "f"), 1_000, 10),
            WindowBeat::new(&beat_as("mover", "moved", "g"), 2_000, 11),
            WindowBeat::new(&beat_as("attacker", "s", "f"), 35_000, 12),
            WindowBeat::new(&beat_as("victim", "s", "f"), 31_000, 13),
        ] {
            t.refresh(&b);
        }
        t.finish_restore();
        assert_eq!(t.open_sessions(), 2);
        assert_eq!(t.next_expiry(), Some(2_000 + T + 1));
        let mut out = Collected::default();
        assert_eq!(
            t.on_heartbeat(14, 41_000, &end_as("attacker", "s"), WALL, &mut out),
            Ok(Applied::IgnoredEnd)
        );
        assert_eq!(
            t.on_heartbeat(15, 42_000, &beat_as("mover", "moved", "h"), WALL, &mut out),
            Ok(Applied::Moved)
        );
        assert_eq!(
            t.on_heartbeat(16, 43_000, &end_as("victim", "s"), WALL, &mut out),
            Ok(Applied::Closed)
        );
        assert_eq!(
            kinds(&out),
            vec![
                (Closed, "g".into(), 42_000),
                (Opened, "h".into(), 42_000),
                (Closed, "f".into(), 43_000)
            ]
        );
        // The move rewrote the record under the new key and tombstoned the v1 one; the END
        // tombstoned the v1 record the session was restored from.
        assert_eq!(out.puts.len(), 1);
        assert_eq!(out.puts[0].0, session_key("mover", "moved"));
        assert_eq!(out.puts[0].1.user_id, "mover");
        assert_eq!(out.deletes, vec![k2, k1]);
    }

    #[test]
    fn a_v1_session_is_refreshed_only_by_its_owners_beats() {
        let mut t = SessionTask::new(0, T, 60_000);
        let (k1, state) = v1_record("s", "f", 1_000, 10);
        t.restore_session(k1, state.borrowed());
        t.set_clock(40_000, 5);
        for b in [
            WindowBeat::new(&beat_as("victim", "s", "f"), 1_000, 10),
            WindowBeat::new(&beat_as("attacker", "s", "f"), 35_000, 11),
            WindowBeat::new(&beat_as("victim", "s", "f"), 31_000, 12),
        ] {
            t.refresh(&b);
        }
        t.finish_restore();
        assert_eq!(t.next_expiry(), Some(31_000 + T + 1));
        let mut out = Collected::default();
        assert_eq!(t.advance_to(31_000 + T + 1, &mut out), 1);
        assert_eq!(out.deletes, vec![k1], "the v1 record is tombstoned");
    }

    #[test]
    fn a_v1_session_without_reread_beats_still_closes_at_its_deadline() {
        let mut t = SessionTask::new(0, T, 60_000);
        let (k1, state) = v1_record("s", "f", 1_000, 10);
        t.restore_session(k1, state.borrowed());
        // A beat before the open offset is an older session's: it names no owner.
        t.set_clock(2_000, 1);
        t.refresh(&WindowBeat::new(&beat_as("u", "s", "f"), 900, 9));
        t.finish_restore();
        let mut out = Collected::default();
        assert_eq!(
            t.on_heartbeat(11, 3_000, &beat_as("u", "s", "f"), WALL, &mut out),
            Ok(Applied::Opened),
            "no live beat matches a session without a known owner"
        );
        t.advance_to(1_000 + T + 1, &mut out);
        assert_eq!(out.deletes, vec![k1]);
        assert_eq!(t.open_sessions(), 1);
        assert_eq!(
            kinds(&out),
            vec![(Opened, "f".into(), 3_000), (Closed, "f".into(), 1_000 + T)]
        );
    }

    /// A session without a beat for [`window::quiet_after`] is marked at the next walk,
    /// with its last-seen and the offset of the last record applied; the mark is renewed
    /// every [`window::mark_every`] while it stays quiet, and tombstoned when it closes. A
    /// session that beats on time is never marked, and its close writes no mark tombstone.
    #[test]
    fn quiet_sessions_are_marked_renewed_and_their_marks_tombstoned() {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        let quiet = session_key("u", "quiet");
        let beating = session_key("u", "beating");
        t.on_heartbeat(0, 1_000, &beat("quiet", "f"), WALL, &mut out)
            .unwrap();
        let mut offset = 1;
        let mut marks_at = Vec::new();
        // "beating" beats every 30 s; a commit (and walk) every second for 100 s.
        for now in (1_000..=101_000).step_by(1_000) {
            if now % 30_000 == 1_000 {
                t.on_heartbeat(offset, now, &beat("beating", "f"), WALL, &mut out)
                    .unwrap();
                offset += 1;
            }
            t.advance_to(now, &mut out);
            let before = out.marks.len();
            t.mark_quiet(&mut out);
            if out.marks.len() > before {
                marks_at.push(now);
            }
        }
        let puts: Vec<_> = out.marks.iter().filter(|(_, m)| m.is_some()).collect();
        assert!(
            puts.iter()
                .all(|(k, m)| *k == quiet && m.is_some_and(|m| m.last_seen == 1_000)),
            "only the quiet session is marked, at its last beat: {puts:?}"
        );
        // Walks at most every 1.25 s, so every other second here (1 s, 3 s, ...). Quiet
        // since 1 s: first marked once 32.5 s passed (the walk at 35 s), renewed once 17.5 s
        // passed (53 s, 71 s, 89 s), closed at its deadline (91 s).
        assert_eq!(marks_at, [35_000, 53_000, 71_000, 89_000]);
        assert_eq!(
            out.deletes,
            [quiet],
            "the quiet session closed at its deadline"
        );
        assert_eq!(
            out.marks.last(),
            Some(&(quiet, None)),
            "its mark was tombstoned with it"
        );
        // Each mark names the last record applied before it: "beating"'s beats at 1 s, 31 s,
        // 61 s, 91 s are offsets 1 to 4.
        let offsets: Vec<i64> = puts.iter().map(|(_, m)| m.unwrap().offset).collect();
        assert_eq!(offsets, [2, 2, 3, 3]);
        // The session that beat on time closes without a mark tombstone.
        t.on_heartbeat(offset, 101_500, &end("beating"), WALL, &mut out)
            .unwrap();
        assert_eq!(out.deletes, [quiet, beating]);
        assert_eq!(out.marks.iter().filter(|(_, m)| m.is_none()).count(), 1);
    }

    /// Stage-1 outputs in the order they were made, as the changelog would hold them.
    #[derive(Default)]
    struct Log {
        events: Vec<SessionEvent>,
        changelog: Vec<(SessionKey, Option<SessionState>)>,
        marks: Vec<(SessionKey, Option<SessionMark>)>,
    }

    impl SessionOutput for Log {
        fn event(&mut self, event: SessionEvent) {
            self.events.push(event);
        }
        fn put_session(&mut self, key: SessionKey, state: SessionState) {
            self.changelog.push((key, Some(state)));
        }
        fn delete_session(&mut self, key: SessionKey) {
            self.changelog.push((key, None));
        }
        fn put_mark(&mut self, key: SessionKey, mark: SessionMark) {
            self.marks.push((key, Some(mark)));
        }
        fn delete_mark(&mut self, key: SessionKey) {
            self.marks.push((key, None));
        }
    }

    // A reference model: per (user, session), its open interval; the state machine must
    // close each session exactly where the model says, whatever the order of sessions, and
    // its changelog must hold exactly the open sessions, under their owners' keys.
    proptest! {
        #[test]
        fn matches_a_naive_model(beats in proptest::collection::vec((0u8..3, 0u8..8, 0u8..3, 0u32..200, any::<bool>()), 1..300)) {
            let mut t = SessionTask::new(0, 10_000, 60_000);
            let mut out = Log::default();
            // The naive model: (user, session) -> (facility, last_seen), scanning everything each step.
            let mut model: std::collections::HashMap<(u8, u8), (u8, i64)> = Default::default();
            let mut model_events = Vec::new();
            let mut now = 0i64;
            let mut window = Vec::new();
            for (i, (u, s, f, dt, is_end)) in beats.into_iter().enumerate() {
                now += dt as i64 * 100;
                let mut expired: Vec<(i64, u8, (u8, u8))> = model.iter().filter(|(_, (_, ls))| ls + 10_000 < now).map(|(k, (f, ls))| (ls + 10_000, *f, *k)).collect();
                expired.sort();
                for (at, f, k) in expired { model.remove(&k); model_events.push((Closed, f, at)); }
                let (uid, sid, fid) = (format!("u{u}"), format!("s{s}"), format!("f{f}"));
                let b = Beat { session_id: &sid, user_id: &uid, facility_id: &fid, region_id: "r", kind: if is_end { HeartbeatKind::End } else { HeartbeatKind::Beat } };
                t.on_heartbeat(i as i64, now, &b, WALL, &mut out).unwrap();
                if !is_end {
                    window.push(WindowBeat::new(&b, now, i as i64));
                }
                let k = (u, s);
                match (model.get(&k).copied(), is_end) {
                    (None, false) => { model.insert(k, (f, now)); model_events.push((Opened, f, now)); }
                    (Some((of, _)), true) => { model.remove(&k); model_events.push((Closed, of, now)); }
                    (Some((of, _)), false) if of != f => { model.insert(k, (f, now)); model_events.push((Closed, of, now)); model_events.push((Opened, f, now)); }
                    (Some(_), false) => { model.insert(k, (f, now)); }
                    (None, true) => {}
                }
            }
            let got: Vec<(SessionEventKind, u8, i64)> = out.events.iter().map(|e| (e.kind, e.facility_id[1..].parse().unwrap(), e.at)).collect();
            // Sessions that expire at the same instant may come in any order in the model.
            let norm = |mut v: Vec<(SessionEventKind, u8, i64)>| { v.sort_by_key(|(k, f, at)| (*at, *k as u8, *f)); v };
            prop_assert_eq!(norm(got), norm(model_events));
            prop_assert_eq!(t.open_sessions(), model.len());
            // Restoring from that changelog and the re-read beats gives the same sessions.
            let mut restored = SessionTask::new(0, 10_000, 60_000);
            for (key, state) in &out.changelog {
                match state {
                    Some(s) => restored.restore_session(*key, s.borrowed()),
                    None => restored.restore_delete(*key),
                }
            }
            restored.set_clock(t.stream_time(), t.next_seq());
            for b in &window { restored.refresh(b); }
            restored.finish_restore();
            prop_assert_eq!(restored.open_sessions(), t.open_sessions());
            prop_assert_eq!(restored.next_expiry(), t.next_expiry());
            let mut compacted: std::collections::HashMap<SessionKey, (String, String)> = Default::default();
            for (key, state) in out.changelog {
                match state {
                    Some(s) => { compacted.insert(key, (s.user_id, s.facility_id)); }
                    None => { compacted.remove(&key); }
                }
            }
            let expected: std::collections::HashMap<SessionKey, (String, String)> = model.iter().map(|((u, s), (f, _))| (session_key(&format!("u{u}"), &format!("s{s}")), (format!("u{u}"), format!("f{f}")))).collect();
            prop_assert_eq!(compacted, expected);
        }

        /// A task read back from its snapshot at any point goes on exactly as the live one:
        /// the same events, changelog writes and marks for the same beats and commits,
        /// then the same expiries (the marks' tombstones among them).
        #[test]
        fn a_snapshot_goes_on_as_the_live_task(
            beats in proptest::collection::vec((0u8..3, 0u8..8, 0u8..4, 0u32..200, any::<bool>()), 1..300),
            split in 0usize..300,
        ) {
            let split = split.min(beats.len());
            let mut live = SessionTask::new(0, 10_000, 60_000);
            let mut warm = None;
            let (mut live_out, mut warm_out) = (Log::default(), Log::default());
            let mut now = 0i64;
            // Commits (each with its walk for marks) far enough apart that every one walks,
            // whether the task walked before (live) or not (warm).
            let mut walked = i64::MIN / 2;
            let start_warm = |live: &SessionTask, next: i64| {
                let mut w = round_trip(live);
                w.set_next_offset(next);
                w
            };
            for (i, (u, s, f, dt, is_end)) in beats.into_iter().enumerate() {
                if i == split {
                    warm = Some(start_warm(&live, i as i64));
                }
                now += dt as i64 * 100;
                let (uid, sid, fid) = (format!("u{u}"), format!("s{s}"), format!("f{f}"));
                let b = Beat { session_id: &sid, user_id: &uid, facility_id: &fid, region_id: "r", kind: if is_end { HeartbeatKind::End } else { HeartbeatKind::Beat } };
                live.on_heartbeat(i as i64, now, &b, WALL, &mut live_out).unwrap();
                if let Some(w) = warm.as_mut() {
                    w.on_heartbeat(i as i64, now, &b, WALL, &mut warm_out).unwrap();
                }
                if now - walked >= crate::window::mark_walk(10_000) {
                    walked = now;
                    live.mark_quiet(&mut live_out);
                    if let Some(w) = warm.as_mut() {
                        w.mark_quiet(&mut warm_out);
                    }
                }
            }
            let mut warm = warm.unwrap_or_else(|| start_warm(&live, split as i64));
            let skip = live_out.events.len() - warm_out.events.len();
            let skip_changelog = live_out.changelog.len() - warm_out.changelog.len();
            let skip_marks = live_out.marks.len() - warm_out.marks.len();
            live.advance_to(now + 60_000, &mut live_out);
            warm.advance_to(now + 60_000, &mut warm_out);
            let events = |l: &Log, from: usize| -> Vec<(SessionEventKind, String, i64, i64)> {
                l.events[from..].iter().map(|e| (e.kind, e.facility_id.clone(), e.at, e.source_seq)).collect()
            };
            prop_assert_eq!(events(&live_out, skip), events(&warm_out, 0));
            let changelog = |l: &Log, from: usize| -> Vec<(SessionKey, Option<(String, i64)>)> {
                l.changelog[from..].iter().map(|(k, s)| (*k, s.as_ref().map(|s| (s.facility_id.clone(), s.last_seen)))).collect()
            };
            prop_assert_eq!(changelog(&live_out, skip_changelog), changelog(&warm_out, 0));
            prop_assert_eq!(&live_out.marks[skip_marks..], &warm_out.marks[..]);
            prop_assert_eq!(warm.open_sessions(), 0);
            prop_assert_eq!(warm.facilities_held(), 0);
        }
    }

    fn round_trip(task: &SessionTask) -> SessionTask {
        let mut bytes = Vec::new();
        task.write_sessions(&mut bytes).unwrap();
        let read = SessionTask::read_sessions(
            task.partition(),
            10_000,
            60_000,
            (task.stream_time(), task.next_seq()),
            &mut &bytes[..],
        )
        .unwrap();
        assert_eq!(read.open_sessions(), task.open_sessions());
        assert_eq!(read.facilities_held(), task.facilities_held());
        assert_eq!(read.next_expiry(), task.next_expiry());
        read
    }

    fn snapshot_of(sessions: &[(&str, &str, i64)]) -> Vec<u8> {
        let mut t = SessionTask::new(0, T, 60_000);
        let mut out = Collected::default();
        for (i, (s, f, ts)) in sessions.iter().enumerate() {
            t.on_heartbeat(i as i64, *ts, &beat(s, f), WALL, &mut out)
                .unwrap();
        }
        let mut bytes = Vec::new();
        t.write_sessions(&mut bytes).unwrap();
        bytes
    }

    fn read_back(bytes: &[u8]) -> Result<SessionTask, SnapshotError> {
        SessionTask::read_sessions(0, T, 60_000, (0, 1), &mut &bytes[..])
    }

    #[test]
    fn a_snapshot_that_cannot_have_been_written_is_refused() {
        // Two facilities (ids "f" and "g", region "r"), then sessions of 28 bytes.
        let bytes = snapshot_of(&[("a", "f", 1_000), ("b", "g", 2_000), ("c", "f", 3_000)]);
        assert_eq!(read_back(&bytes).unwrap().open_sessions(), 3);
        let sessions_at = 4 + 2 * (4 + 1 + 4 + 1) + 8;
        // A facility listed twice: "g" renamed "f".
        let mut twice = bytes.clone();
        twice[4 + 10 + 4] = b'f';
        assert!(matches!(
            read_back(&twice),
            Err(SnapshotError::Damaged("a facility listed twice"))
        ));
        // A session at a facility not listed.
        let mut unlisted = bytes.clone();
        unlisted[sessions_at + 24] = 7;
        assert!(matches!(
            read_back(&unlisted),
            Err(SnapshotError::Damaged(_))
        ));
        // Out of expiry order: the second session's last seen before the first's.
        let mut order = bytes.clone();
        order[sessions_at + 28 + 16..sessions_at + 28 + 24].copy_from_slice(&0i64.to_le_bytes());
        assert!(matches!(
            read_back(&order),
            Err(SnapshotError::Damaged("sessions out of expiry order"))
        ));
        // A session listed twice: the third's key is the second's.
        let mut dup = bytes.clone();
        let second: Vec<u8> = dup[sessions_at + 28..sessions_at + 44].to_vec();
        dup[sessions_at + 56..sessions_at + 72].copy_from_slice(&second);
        assert!(read_back(&dup).is_err());
        // Cut short.
        assert!(matches!(
            read_back(&bytes[..bytes.len() - 1]),
            Err(SnapshotError::Io(_))
        ));
        // A facility no session is at: the only session at "g" left out.
        let two = snapshot_of(&[("a", "f", 1_000), ("b", "g", 2_000)]);
        let mut unused = two[..two.len() - 28].to_vec();
        unused[sessions_at - 8..sessions_at].copy_from_slice(&1u64.to_le_bytes());
        assert!(matches!(
            read_back(&unused),
            Err(SnapshotError::Damaged("a facility without sessions"))
        ));
    }
}
