//! Stage 2, pure: open-session counts per facility of one `session-transitions` partition,
//! and the ONLINE/OFFLINE transitions they make.
//!
//! Events from the stage-1 partitions interleave in this partition in whatever order the
//! tasks committed. To make the output independent of that order (and so identical after a
//! crash and replay), events wait in a buffer and are applied in `(at, source partition,
//! source seq)` order once every source's watermark has passed their `at`. A source's
//! events are skipped when their seq is not above the last one applied, so replaying the
//! partition from an earlier offset applies nothing twice.
//!
//! The buffer is bounded. While one source's watermark stands still (its stage-1 owner is
//! slow, stalled or gone), the other sources' events would otherwise pile up without limit.
//! Beyond `max_buffered` events the task lets the latest ones go: it keeps the events before
//! a threshold time `T` and drops every event at or after `T` (now and as they arrive),
//! remembering the first offset it dropped. Releasing stays in order, since nothing kept comes
//! after anything dropped, and watermarks keep being read. Once every source's watermark has
//! reached `T` (everything kept is applied), the task asks to read the partition again from that offset ([`FacilityTask::take_seek`]):
//! the dropped events come back from Kafka, those applied meanwhile are skipped by seq. While
//! it reads again up to where it had been, the watermarks it knows are ahead of the events it
//! reads, so it releases nothing at or after `T` until it is back there (and events let go
//! again meanwhile wait for the next round, each round's `T` later than the last). The committed offset
//! never passes a dropped event, so a crash loses nothing either. Within one source, `at`
//! never decreases with seq (stage 1 stamps events with its partition clock), so "every event
//! at or after `T`" is a suffix of each source's events. The bound is exceeded only by events
//! that all share one millisecond `at`, which cannot be split.
//!
//! Retention (`processor.facility_retention`, [`FacilityTask::with_retention`]): a facility
//! that is OFFLINE with no open session and no flap hold pending is *quiet*; once its last
//! change is older than the retention on the partition's clock (the low watermark, event
//! time, so the choice is the same on every run), [`FacilityTask::retire_quiet`] moves it
//! from memory to the partition's [`ColdStore`]. An event for a facility not in memory
//! looks in the store first and takes it back, `seq` and all, so its next transition is
//! `seq + 1` exactly as if it had never left: the output does not depend on the retention.
//! Quiet facilities wait in an index ordered by their last change, never in a scan.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use hashbrown::HashMap;
use presence_core::records::{FacilityStatus, Status};

use crate::cold::{ColdError, ColdStore};
use crate::records::{FacilityState, SessionEvent, SessionEventKind};

/// Events one partition's task holds at most while a source's watermark stands still
/// (`processor.max_buffered_events`): about 100 bytes each.
pub const DEFAULT_MAX_BUFFERED: usize = 500_000;

/// Room (events) the buffer keeps however empty it is: 4,096 events, ~400 KiB, so that a
/// live partition never reallocates it.
const SHRINK_BUFFER_ABOVE: usize = 4096;

pub trait FacilityOutput {
    /// A transition for `facility-status`.
    fn status(&mut self, status: FacilityStatus);
    /// Changelog: the facility's state after this transaction.
    fn put_facility(&mut self, state: FacilityState);
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    at: i64,
    source: i32,
    seq: i64,
    offset: i64,
    opened: bool,
    facility_id: String,
    region_id: String,
}

/// Events at or after `at` were let go; the first of them is at offset `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spill {
    at: i64,
    from: i64,
}

/// Reading a partition again after a spill: up to offset `until` the watermarks are ahead of
/// the events, so only events before `below` may be released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Replay {
    until: i64,
    below: i64,
}

/// Why [`FacilityTask::on_event`] could not take a record.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The record names a source partition the task does not have: a dead letter.
    #[error("{0}")]
    UnknownSource(String),
    /// The facility store failed: the stage must stop (nothing of it may be committed).
    #[error(transparent)]
    Store(#[from] ColdError),
}

/// Quiet facilities on disk: the retention, the store, and the quiet ones still in memory.
struct Cold {
    /// A quiet facility moves to the store once its last change is this much (ms) older
    /// than the partition's clock.
    after: i64,
    store: ColdStore,
    /// Quiet facilities in memory: (last change, facility).
    quiet: BTreeSet<(i64, String)>,
    /// The partition's clock as committed before a restore (the low watermark then).
    restored_clock: i64,
}

/// When a quiet facility last changed (`None` while it is not quiet: ONLINE, sessions
/// open, or an OFFLINE held back by the flap hold).
fn quiet_since(s: &FacilityState) -> Option<i64> {
    (!s.online && s.open_sessions == 0 && s.pending_offline_since.is_none())
        .then(|| s.last_event_at.unwrap_or(s.since).max(s.since))
}

/// What was applied, for metrics: latency from each transition's event time to emission.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub applied: usize,
    pub duplicates: usize,
    pub transitions: usize,
}

pub struct FacilityTask {
    partition: i32,
    hold: i64,
    facilities: HashMap<String, FacilityState>,
    /// Per source partition: the last seq applied, and the highest watermark seen.
    applied: Vec<i64>,
    watermarks: Vec<i64>,
    buffer: BinaryHeap<Reverse<Pending>>,
    /// At most this many events wait in `buffer`.
    max_buffered: usize,
    /// Events let go because the buffer was full: to read again from `from`.
    spill: Option<Spill>,
    /// A read-again position not yet taken by the runner.
    seek: Option<i64>,
    /// While reading again: nothing at or after `below` is released before offset `until`.
    replay: Option<Replay>,
    /// The offset after the furthest record taken.
    reached: i64,
    /// Events let go from memory (read again later), for metrics.
    pub spilled: u64,
    /// Flap hold: (when OFFLINE is due, facility).
    timers: BTreeSet<(i64, String)>,
    dirty: hashbrown::HashSet<String>,
    online: usize,
    /// Counts going below zero: a stage-1 defect, reported in metrics.
    pub negative_counts: u64,
    /// Retention: `None` keeps every facility in memory.
    cold: Option<Cold>,
}

impl FacilityTask {
    /// `sources`: the number of heartbeats partitions (every one sends watermarks).
    /// `hold_ms`: flap damping; 0 emits OFFLINE at once.
    pub fn new(partition: i32, sources: usize, hold_ms: i64) -> FacilityTask {
        FacilityTask {
            partition,
            hold: hold_ms,
            facilities: HashMap::new(),
            applied: vec![0; sources],
            watermarks: vec![i64::MIN; sources],
            buffer: BinaryHeap::new(),
            max_buffered: DEFAULT_MAX_BUFFERED,
            spill: None,
            seek: None,
            replay: None,
            reached: 0,
            spilled: 0,
            timers: BTreeSet::new(),
            dirty: Default::default(),
            online: 0,
            negative_counts: 0,
            cold: None,
        }
    }

    /// Moves facilities quiet for longer than `after_ms` (event time) to `store` (see the
    /// module documentation). Call before restoring.
    pub fn with_retention(mut self, after_ms: i64, store: ColdStore) -> FacilityTask {
        self.cold = Some(Cold {
            after: after_ms.max(1),
            store,
            quiet: BTreeSet::new(),
            restored_clock: i64::MIN,
        });
        self
    }

    /// Restore: the partition's clock as committed (the checkpoint's `w`), so that the
    /// changelog's quiet facilities go straight to the store. Call before restoring.
    pub fn set_restored_clock(&mut self, t: i64) {
        if let Some(cold) = self.cold.as_mut() {
            cold.restored_clock = t;
        }
    }

    /// The partition's clock for retention: the low watermark, or the one committed before
    /// a restore while the sources have not all spoken again.
    pub fn clock(&self) -> i64 {
        let restored = self.cold.as_ref().map_or(i64::MIN, |c| c.restored_clock);
        self.watermark().max(restored)
    }

    /// Facilities held in memory.
    pub fn in_memory(&self) -> usize {
        self.facilities.len()
    }

    /// Facilities in the store (as of its last write).
    pub fn on_disk(&self) -> usize {
        self.cold.as_ref().map_or(0, |c| c.store.len())
    }

    /// Bounds the buffer at `n` events (at least 2; see the module documentation).
    pub fn with_max_buffered(mut self, n: usize) -> FacilityTask {
        self.max_buffered = n.max(2);
        self
    }

    /// Where to read this partition again (events let go to stay within the bound), once.
    pub fn take_seek(&mut self) -> Option<i64> {
        self.seek.take()
    }

    /// While events are let go: the source whose watermark is lowest (the one everything
    /// waits for), its watermark, and the offset they will be read again from.
    pub fn spilling(&self) -> Option<(usize, i64, i64)> {
        let spill = self.spill?;
        let (source, w) = self
            .watermarks
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(_, w)| w)?;
        Some((source, w, spill.from))
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn online_facilities(&self) -> usize {
        self.online
    }

    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The first source whose watermark is the lowest, and that watermark.
    fn low_watermark(&self) -> Option<(usize, i64)> {
        self.watermarks
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|(_, w)| *w)
    }

    /// The source whose watermark is lowest, with that watermark, and the highest watermark:
    /// what holds the buffer back.
    pub fn watermark_spread(&self) -> Option<(usize, i64, i64)> {
        let (slowest, low) = self.low_watermark()?;
        Some((slowest, low, self.watermarks.iter().copied().max()?))
    }

    /// The low watermark over all sources: events before it are final.
    pub fn watermark(&self) -> i64 {
        self.low_watermark().map_or(i64::MIN, |(_, w)| w)
    }

    /// Restore: a facility from the changelog (a later record of the same facility replaces
    /// an earlier one). One quiet for longer than the retention at the committed clock goes
    /// straight to the store.
    pub fn restore_facility(&mut self, state: FacilityState) -> Result<(), ColdError> {
        self.restore_delete(&state.facility_id)?;
        let clock = self.clock();
        if let Some(cold) = self.cold.as_mut() {
            if quiet_since(&state).is_some_and(|t| t.saturating_add(cold.after) < clock) {
                return cold.store.put(&state);
            }
        }
        if let Some(since) = state.pending_offline_since {
            self.timers
                .insert((since + self.hold, state.facility_id.clone()));
        }
        if state.online {
            self.online += 1;
        }
        if let (Some(cold), Some(t)) = (self.cold.as_mut(), quiet_since(&state)) {
            cold.quiet.insert((t, state.facility_id.clone()));
        }
        self.facilities.insert(state.facility_id.clone(), state);
        Ok(())
    }

    /// Restore: a facility's tombstone, or an earlier record replaced by a later one.
    pub fn restore_delete(&mut self, facility: &str) -> Result<(), ColdError> {
        if let Some(old) = self.facilities.remove(facility) {
            if let Some(since) = old.pending_offline_since {
                self.timers
                    .remove(&(since + self.hold, old.facility_id.clone()));
            }
            if old.online {
                self.online -= 1;
            }
            if let (Some(cold), Some(t)) = (self.cold.as_mut(), quiet_since(&old)) {
                cold.quiet.remove(&(t, old.facility_id));
            }
        }
        match self.cold.as_mut() {
            Some(cold) => cold.store.remove(facility),
            None => Ok(()),
        }
    }

    /// Restore done: the store's buffered writes go to disk.
    pub fn finish_restore(&mut self) -> Result<(), ColdError> {
        match self.cold.as_mut() {
            Some(cold) => cold.store.flush(),
            None => Ok(()),
        }
    }

    /// Moves the facilities quiet for longer than the retention on the partition's clock
    /// from memory to the store, and writes the store. Call after [`Self::flush_changelog`]
    /// (a facility with a changelog write pending stays until the next time). Returns how
    /// many moved.
    pub fn retire_quiet(&mut self) -> Result<usize, ColdError> {
        let clock = self.clock();
        let Some(cold) = self.cold.as_mut() else {
            return Ok(0);
        };
        let mut moved = 0;
        let mut dirty = Vec::new();
        while let Some((t, _)) = cold.quiet.first() {
            if t.saturating_add(cold.after) >= clock {
                break;
            }
            let Some((t, facility)) = cold.quiet.pop_first() else {
                break;
            };
            if self.dirty.contains(&facility) {
                dirty.push((t, facility));
                continue;
            }
            if let Some(state) = self.facilities.get(&facility) {
                cold.store.put(state)?;
                self.facilities.remove(&facility);
                moved += 1;
            }
        }
        cold.quiet.extend(dirty);
        cold.store.flush()?;
        // Give the memory back once most of the table is gone.
        let (len, capacity) = (self.facilities.len(), self.facilities.capacity());
        if capacity > 1024 && len < capacity / 4 {
            self.facilities.shrink_to(len * 2);
        }
        Ok(moved)
    }

    /// Restore: the last applied seq per source, as committed with the offsets.
    pub fn set_applied(&mut self, applied: &[i64]) {
        for (slot, &seq) in self.applied.iter_mut().zip(applied) {
            *slot = seq;
        }
    }

    pub fn applied(&self) -> &[i64] {
        &self.applied
    }

    /// The offset to commit for this partition: the first event not applied yet, so a
    /// restart re-reads everything still in the buffer.
    pub fn commit_offset(&self, next_offset: i64) -> i64 {
        let buffered = self.buffer.iter().map(|p| p.0.offset).min();
        let spilled = self.spill.map(|s| s.from);
        [buffered, spilled, self.seek]
            .into_iter()
            .flatten()
            .fold(next_offset, i64::min)
    }

    /// Takes one record of the partition at `offset`; applies whatever became final.
    pub fn on_event(
        &mut self,
        offset: i64,
        event: SessionEvent,
        now: i64,
        out: &mut impl FacilityOutput,
    ) -> Result<Released, EventError> {
        if self.seek.is_some() {
            // Asked to read again from an earlier offset: the records after it in this burst
            // come again after the seek.
            return Ok(Released::default());
        }
        // Back where a read-again started (this record included, it is taken below): the
        // watermarks known are this far's again. Before any early return, so that a record
        // skipped as a duplicate counts too.
        self.reached = self.reached.max(offset + 1);
        if self.replay.is_some_and(|r| offset + 1 >= r.until) {
            self.replay = None;
        }
        let source = usize::try_from(event.source_partition)
            .ok()
            .filter(|&s| s < self.watermarks.len())
            .ok_or_else(|| EventError::UnknownSource(format!("source partition {} outside 0..{}: topics.heartbeats_partitions must match the heartbeats topic", event.source_partition, self.watermarks.len())))?;
        match event.kind {
            SessionEventKind::Watermark => {
                self.watermarks[source] = self.watermarks[source].max(event.at);
            }
            SessionEventKind::Opened | SessionEventKind::Closed => {
                if event.source_seq <= self.applied[source] {
                    return Ok(Released {
                        duplicates: 1,
                        ..Default::default()
                    });
                }
                if let Some(spill) = self.spill.as_mut().filter(|s| event.at >= s.at) {
                    spill.from = spill.from.min(offset);
                    self.spilled += 1;
                } else {
                    self.buffer.push(Reverse(Pending {
                        at: event.at,
                        source: event.source_partition,
                        seq: event.source_seq,
                        offset,
                        opened: event.kind == SessionEventKind::Opened,
                        facility_id: event.facility_id,
                        region_id: event.region_id,
                    }));
                    if self.buffer.len() > self.max_buffered {
                        self.let_go();
                    }
                }
            }
        }
        let released = self.release(now, out)?;
        if self.replay.is_none() && self.spill.is_some_and(|s| self.watermark() >= s.at) {
            if let Some(spill) = self.spill.take() {
                // Every source has passed the events let go and no earlier read-again is under
                // way: everything kept is applied, so read them again (the runner seeks there).
                self.seek = Some(spill.from);
                self.replay = Some(Replay {
                    until: self.reached,
                    below: spill.at,
                });
            }
        }
        Ok(released)
    }

    /// Lets the latest quarter of the buffer go: keeps the events before a threshold time,
    /// drops every event at or after it and remembers the first offset dropped.
    fn let_go(&mut self) {
        let mut events: Vec<Pending> = std::mem::take(&mut self.buffer)
            .into_iter()
            .map(|Reverse(p)| p)
            .collect();
        events.sort_unstable();
        let keep = self.max_buffered - self.max_buffered / 4;
        let mut threshold = events[keep.min(events.len() - 1)].at;
        let mut first_dropped = events.partition_point(|p| p.at < threshold);
        if first_dropped == 0 {
            // Everything kept would share the first `at`: keep that millisecond whole.
            threshold += 1;
            first_dropped = events.partition_point(|p| p.at < threshold);
        }
        if first_dropped == events.len() {
            self.buffer = events.into_iter().map(Reverse).collect();
            return;
        }
        let dropped = events.split_off(first_dropped);
        self.spilled += dropped.len() as u64;
        let from = dropped.iter().map(|p| p.offset).min().unwrap_or(i64::MAX);
        self.spill = Some(match self.spill {
            Some(s) => Spill {
                at: s.at.min(threshold),
                from: s.from.min(from),
            },
            None => Spill {
                at: threshold,
                from,
            },
        });
        self.buffer = events.into_iter().map(Reverse).collect();
    }

    /// Applies, in order, every buffered event and due flap timer before the watermark.
    pub fn release(
        &mut self,
        now: i64,
        out: &mut impl FacilityOutput,
    ) -> Result<Released, ColdError> {
        // Nothing at or after an event let go, or not yet read again, is final: neither
        // events nor flap timers pass it.
        let bound = [self.replay.map(|r| r.below), self.spill.map(|s| s.at)]
            .into_iter()
            .flatten()
            .fold(i64::MAX, i64::min);
        let (tie_source, low) = self
            .low_watermark()
            .map_or((i32::MIN, i64::MIN), |(s, w)| (s as i32, w));
        let w = low.min(bound);
        // An event at exactly the low watermark is final too when no event that sorts before
        // it can still come: a source whose watermark is `low` may still send events at `low`,
        // and in `(at, source, seq)` order those come after this one if that source is this
        // event's own (a later seq) or a later one. Without this, an event whose beat was its
        // partition's latest when stage 1 committed (its own watermark equal to its `at`)
        // waited for stage 1's next commit: ~20 ms on the p99 of beat → transition.
        // (`tie_source` is the first source at `low`: `min_by_key` keeps the first minimum.)
        let mut r = Released::default();
        while let Some(Reverse(top)) = self.buffer.peek() {
            let tie_is_final = top.at == low && low < bound && top.source <= tie_source;
            if top.at >= w && !tie_is_final {
                break;
            }
            let Some(Reverse(p)) = self.buffer.pop() else {
                break;
            };
            r.transitions += self.fire_timers(p.at, now, out);
            let source = p.source as usize;
            if p.seq <= self.applied[source] {
                r.duplicates += 1;
                continue;
            }
            self.applied[source] = p.seq;
            r.applied += 1;
            r.transitions += self.apply(&p, now, out)?;
        }
        if w > i64::MIN {
            r.transitions += self.fire_timers(w - 1, now, out);
        }
        self.shrink_buffer();
        Ok(r)
    }

    /// Gives back the buffer's room once it is three quarters empty: a drained backlog
    /// otherwise leaves its high-water mark allocated and resident (a million sessions
    /// opening at once left ~12 MiB per partition, 69 MiB over six, in an idle processor).
    /// Halving the room only below a quarter keeps the cost of regrowing amortised.
    fn shrink_buffer(&mut self) {
        let (len, room) = (self.buffer.len(), self.buffer.capacity());
        if room > SHRINK_BUFFER_ABOVE && len < room / 4 {
            self.buffer.shrink_to((len * 2).max(SHRINK_BUFFER_ABOVE));
        }
    }

    /// Fires flap timers due at or before `t`.
    fn fire_timers(&mut self, t: i64, now: i64, out: &mut impl FacilityOutput) -> usize {
        let mut fired = 0;
        while let Some((due, _)) = self.timers.first() {
            if *due > t {
                break;
            }
            let Some((_, facility)) = self.timers.pop_first() else {
                break;
            };
            let Some(state) = self.facilities.get_mut(&facility) else {
                continue;
            };
            let Some(since) = state.pending_offline_since.take() else {
                continue;
            };
            let previous = state.since;
            state.online = false;
            state.seq += 1;
            state.since = since;
            self.online -= 1;
            out.status(status_of(state, previous, now));
            if let (Some(cold), Some(t)) = (self.cold.as_mut(), quiet_since(state)) {
                cold.quiet.insert((t, facility.clone()));
            }
            self.dirty.insert(facility);
            fired += 1;
        }
        fired
    }

    fn apply(
        &mut self,
        p: &Pending,
        now: i64,
        out: &mut impl FacilityOutput,
    ) -> Result<usize, ColdError> {
        if let Some(cold) = self.cold.as_mut() {
            // Quiet for longer than the retention: back from the store, seq and all.
            if !self.facilities.contains_key(p.facility_id.as_str()) {
                if let Some(state) = cold.store.take(&p.facility_id)? {
                    self.facilities.insert(p.facility_id.clone(), state);
                }
            }
        }
        let state = self
            .facilities
            .entry_ref(p.facility_id.as_str())
            .or_insert_with(|| FacilityState {
                facility_id: p.facility_id.clone(),
                region_id: p.region_id.clone(),
                open_sessions: 0,
                online: false,
                seq: 0,
                since: p.at,
                pending_offline_since: None,
                last_event_at: None,
            });
        let quiet_before = quiet_since(state);
        if p.opened {
            state.region_id.clone_from(&p.region_id);
        }
        state.last_event_at = Some(p.at);
        let previous = state.since;
        let mut transitions = 0;
        let mut changed = true;
        if p.opened {
            state.open_sessions += 1;
            if state.open_sessions == 1 {
                if let Some(since) = state.pending_offline_since.take() {
                    // Reopened within the hold: the OFFLINE never happened.
                    self.timers
                        .remove(&(since + self.hold, p.facility_id.clone()));
                } else if !state.online {
                    state.online = true;
                    state.seq += 1;
                    state.since = p.at;
                    self.online += 1;
                    out.status(status_of(state, previous, now));
                    transitions += 1;
                }
            }
        } else if state.open_sessions == 0 {
            // Not written to the changelog (as before retention existed): the count stays 0.
            self.negative_counts += 1;
            changed = false;
        } else {
            state.open_sessions -= 1;
            if state.open_sessions == 0 && state.online {
                if self.hold > 0 {
                    state.pending_offline_since = Some(p.at);
                    self.timers
                        .insert((p.at + self.hold, p.facility_id.clone()));
                } else {
                    state.online = false;
                    state.seq += 1;
                    state.since = p.at;
                    self.online -= 1;
                    out.status(status_of(state, previous, now));
                    transitions += 1;
                }
            }
        }
        let quiet_after = quiet_since(state);
        if let Some(cold) = self.cold.as_mut().filter(|_| quiet_before != quiet_after) {
            if let Some(t) = quiet_before {
                cold.quiet.remove(&(t, p.facility_id.clone()));
            }
            if let Some(t) = quiet_after {
                cold.quiet.insert((t, p.facility_id.clone()));
            }
        }
        if changed && !self.dirty.contains(p.facility_id.as_str()) {
            self.dirty.insert(p.facility_id.clone());
        }
        Ok(transitions)
    }

    /// Writes every facility changed since the last flush to the changelog (once each,
    /// however often it changed): called just before each commit.
    pub fn flush_changelog(&mut self, out: &mut impl FacilityOutput) -> usize {
        let n = self.dirty.len();
        for f in self.dirty.drain() {
            if let Some(state) = self.facilities.get(&f) {
                out.put_facility(state.clone());
            }
        }
        n
    }
}

/// The status record of `state` right after a transition; `previous` is the `since` it had
/// before (meaningless before the first transition, seq 1).
fn status_of(state: &FacilityState, previous: i64, now: i64) -> FacilityStatus {
    FacilityStatus {
        facility_id: state.facility_id.clone(),
        region_id: state.region_id.clone(),
        status: if state.online {
            Status::Online
        } else {
            Status::Offline
        },
        open_sessions: state.open_sessions,
        since: state.since,
        seq: state.seq,
        emitted_at: now,
        previous_since: (state.seq > 1).then_some(previous),
    }
}

#[derive(Default, Debug)]
pub struct Collected {
    pub statuses: Vec<FacilityStatus>,
    pub states: Vec<FacilityState>,
}

impl FacilityOutput for Collected {
    fn status(&mut self, status: FacilityStatus) {
        self.statuses.push(status);
    }
    fn put_facility(&mut self, state: FacilityState) {
        self.states.push(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ev(kind: SessionEventKind, src: i32, seq: i64, at: i64, f: &str) -> SessionEvent {
        SessionEvent {
            kind,
            source_partition: src,
            source_seq: seq,
            at,
            facility_id: f.into(),
            region_id: "r".into(),
            close_reason: None,
        }
    }
    fn open(src: i32, seq: i64, at: i64, f: &str) -> SessionEvent {
        ev(SessionEventKind::Opened, src, seq, at, f)
    }
    fn close(src: i32, seq: i64, at: i64, f: &str) -> SessionEvent {
        ev(SessionEventKind::Closed, src, seq, at, f)
    }
    /// Three sources' events from generated steps (source, time step, what, facility): 0 a
    /// watermark, 1 a close, else an open; then every source's final watermark.
    fn event_log(steps: &[(usize, i64, u8, usize)]) -> Vec<SessionEvent> {
        let mut at = [0i64; 3];
        let mut seq = [0i64; 3];
        let mut log = Vec::new();
        for &(src, dt, what, f) in steps {
            at[src] += dt;
            let facility = format!("f{f}");
            match what {
                0 => log.push(wm(src as i32, at[src])),
                1 => {
                    seq[src] += 1;
                    log.push(close(src as i32, seq[src], at[src], &facility))
                }
                _ => {
                    seq[src] += 1;
                    log.push(open(src as i32, seq[src], at[src], &facility))
                }
            }
        }
        for src in 0..3 {
            log.push(wm(src, 1_000_000));
        }
        log
    }

    fn wm(src: i32, at: i64) -> SessionEvent {
        ev(SessionEventKind::Watermark, src, 0, at, "")
    }
    fn summary(c: &Collected) -> Vec<(String, Status, i64, i64, i32)> {
        c.statuses
            .iter()
            .map(|s| {
                (
                    s.facility_id.clone(),
                    s.status,
                    s.since,
                    s.seq,
                    s.open_sessions,
                )
            })
            .collect()
    }

    #[test]
    fn a_drained_buffer_gives_its_room_back() {
        let mut t = FacilityTask::new(0, 1, 0).with_max_buffered(usize::MAX);
        let mut out = Collected::default();
        for i in 0..100_000i64 {
            let e = open(0, i + 1, 1_000 + i, &format!("f{}", i % 50));
            t.on_event(i, e, 0, &mut out).unwrap();
        }
        assert!(t.buffer.capacity() >= 100_000);
        t.on_event(100_000, wm(0, 1_000_000), 0, &mut out).unwrap();
        assert_eq!(t.buffered(), 0);
        assert!(
            t.buffer.capacity() <= SHRINK_BUFFER_ABOVE,
            "room for {} events kept",
            t.buffer.capacity()
        );
    }

    #[test]
    fn emits_only_on_flips_with_seq_counting_up() {
        let mut t = FacilityTask::new(0, 1, 0);
        let mut out = Collected::default();
        for (o, e) in [
            open(0, 1, 10, "f"),
            open(0, 2, 20, "f"),
            close(0, 3, 30, "f"),
            close(0, 4, 40, "f"),
            open(0, 5, 50, "f"),
            wm(0, 100),
        ]
        .into_iter()
        .enumerate()
        {
            t.on_event(o as i64, e, 999, &mut out).unwrap();
        }
        assert_eq!(
            summary(&out),
            vec![
                ("f".into(), Status::Online, 10, 1, 1),
                ("f".into(), Status::Offline, 40, 2, 0),
                ("f".into(), Status::Online, 50, 3, 1)
            ]
        );
        assert_eq!(t.online_facilities(), 1);
    }

    #[test]
    fn nothing_is_applied_before_every_source_passed_it() {
        let mut t = FacilityTask::new(0, 2, 0);
        let mut out = Collected::default();
        t.on_event(0, open(1, 1, 10, "f"), 0, &mut out).unwrap();
        t.on_event(1, wm(1, 100), 0, &mut out).unwrap();
        assert!(out.statuses.is_empty(), "source 0 has not spoken yet");
        assert_eq!(
            t.commit_offset(2),
            0,
            "the buffered event must be re-read after a crash"
        );
        t.on_event(2, wm(0, 10), 0, &mut out).unwrap();
        assert!(
            out.statuses.is_empty(),
            "source 0 may still send an event at 10, which comes before source 1's"
        );
        t.on_event(3, wm(0, 11), 0, &mut out).unwrap();
        assert_eq!(out.statuses.len(), 1);
        assert_eq!(t.commit_offset(4), 4);
    }

    #[test]
    fn an_event_at_the_watermark_is_final_once_nothing_can_come_before_it() {
        let mut t = FacilityTask::new(0, 2, 0);
        let mut out = Collected::default();
        t.on_event(0, open(0, 1, 10, "f"), 0, &mut out).unwrap();
        // Its own source's watermark equals its `at` (its beat was the partition's latest).
        t.on_event(1, wm(0, 10), 0, &mut out).unwrap();
        assert!(out.statuses.is_empty(), "source 1 has not spoken yet");
        // Source 1 may still send events at 10, but (10, 1, _) sorts after (10, 0, 1), and
        // source 0's later events have later seqs.
        t.on_event(2, wm(1, 10), 0, &mut out).unwrap();
        assert_eq!(out.statuses.len(), 1);
        assert_eq!(t.commit_offset(3), 3);
    }

    /// The hand-over case that flaps without ordering: one session closes on source 0 after
    /// another opened on source 1, but source 0's close arrives first.
    #[test]
    fn interleaving_across_sources_does_not_flap() {
        let run = |order: &[SessionEvent]| {
            let mut t = FacilityTask::new(0, 2, 0);
            let mut out = Collected::default();
            t.on_event(0, open(0, 1, 10, "f"), 0, &mut out).unwrap();
            for (i, e) in order.iter().enumerate() {
                t.on_event(i as i64 + 1, e.clone(), 0, &mut out).unwrap();
            }
            t.on_event(99, wm(0, 1000), 0, &mut out).unwrap();
            t.on_event(100, wm(1, 1000), 0, &mut out).unwrap();
            summary(&out)
        };
        let a = run(&[close(0, 2, 100, "f"), open(1, 1, 90, "f")]);
        let b = run(&[open(1, 1, 90, "f"), close(0, 2, 100, "f")]);
        assert_eq!(a, b);
        assert_eq!(
            a,
            vec![("f".into(), Status::Online, 10, 1, 1)],
            "never went offline"
        );
    }

    #[test]
    fn replayed_events_are_skipped_by_seq() {
        let mut t = FacilityTask::new(0, 1, 0);
        let mut out = Collected::default();
        t.on_event(0, open(0, 1, 10, "f"), 0, &mut out).unwrap();
        t.on_event(1, wm(0, 20), 0, &mut out).unwrap();
        let applied = t.applied().to_vec();
        let mut restored = FacilityTask::new(0, 1, 0);
        restored.set_applied(&applied);
        for s in std::mem::take(&mut out.states) {
            restored.restore_facility(s).unwrap();
        }
        t.flush_changelog(&mut out);
        for s in out.states.drain(..) {
            restored.restore_facility(s).unwrap();
        }
        let mut again = Collected::default();
        let r = restored
            .on_event(0, open(0, 1, 10, "f"), 0, &mut again)
            .unwrap();
        assert_eq!(r.duplicates, 1);
        restored.on_event(1, wm(0, 20), 0, &mut again).unwrap();
        assert!(again.statuses.is_empty());
        assert_eq!(restored.online_facilities(), 1);
    }

    #[test]
    fn flap_hold_drops_a_short_offline_and_delays_a_real_one() {
        let mut t = FacilityTask::new(0, 1, 5_000);
        let mut out = Collected::default();
        let events = [
            open(0, 1, 0, "f"),
            close(0, 2, 1_000, "f"),
            open(0, 3, 3_000, "f"),
            close(0, 4, 10_000, "f"),
            wm(0, 14_999),
        ];
        for (o, e) in events.into_iter().enumerate() {
            t.on_event(o as i64, e, 0, &mut out).unwrap();
        }
        assert_eq!(
            summary(&out),
            vec![("f".into(), Status::Online, 0, 1, 1)],
            "reopened within the hold; the second hold not over yet"
        );
        t.on_event(9, wm(0, 15_001), 0, &mut out).unwrap();
        assert_eq!(
            summary(&out)[1],
            ("f".into(), Status::Offline, 10_000, 2, 0),
            "since is when it really went offline"
        );
    }

    #[test]
    fn changelog_writes_each_changed_facility_once_per_flush() {
        let mut t = FacilityTask::new(0, 1, 0);
        let mut out = Collected::default();
        for (o, e) in [
            open(0, 1, 1, "a"),
            open(0, 2, 2, "a"),
            open(0, 3, 3, "b"),
            wm(0, 10),
        ]
        .into_iter()
        .enumerate()
        {
            t.on_event(o as i64, e, 0, &mut out).unwrap();
        }
        assert_eq!(t.flush_changelog(&mut out), 2);
        assert_eq!(t.flush_changelog(&mut out), 0);
        let a = out.states.iter().find(|s| s.facility_id == "a").unwrap();
        assert_eq!(a.open_sessions, 2);
    }

    /// Reads `log` like the runner does: one record at a time, seeking back when the task
    /// asks. Checks the bound and that the commit offset never passes an event not yet
    /// applied; returns the transitions and the final changelog.
    fn read_bounded(
        log: &[SessionEvent],
        sources: usize,
        hold: i64,
        max: usize,
    ) -> (Collected, usize) {
        let mut t = FacilityTask::new(0, sources, hold).with_max_buffered(max);
        let mut out = Collected::default();
        let (mut pos, mut reads) = (0usize, 0usize);
        while pos < log.len() {
            // Bursts of three records, as the runner polls: a seek is taken after the burst.
            for _ in 0..3 {
                if pos == log.len() {
                    break;
                }
                t.on_event(pos as i64, log[pos].clone(), 0, &mut out)
                    .unwrap();
                reads += 1;
                // Events of one millisecond are never split: each source has at most one per
                // millisecond, and an event not applied yet can be buffered twice while read again.
                let bound = if max >= 2 * sources { max } else { 2 * sources };
                assert!(
                    t.buffered() <= bound,
                    "{} events buffered, bound {max}",
                    t.buffered()
                );
                pos += 1;
                assert!(t.commit_offset(pos as i64) <= pos as i64);
            }
            assert!(
                reads <= 50 * log.len() + 100,
                "still reading again after {reads} records of {}",
                log.len()
            );
            if let Some(from) = t.take_seek() {
                assert!(from < pos as i64, "seek forward to {from} from {pos}");
                pos = from as usize;
            }
        }
        t.flush_changelog(&mut out);
        (out, reads)
    }

    fn read_unbounded(log: &[SessionEvent], sources: usize, hold: i64) -> Collected {
        let mut t = FacilityTask::new(0, sources, hold).with_max_buffered(usize::MAX);
        let mut out = Collected::default();
        for (o, e) in log.iter().enumerate() {
            t.on_event(o as i64, e.clone(), 0, &mut out).unwrap();
        }
        t.flush_changelog(&mut out);
        out
    }

    fn changelog(c: &Collected) -> BTreeMap<String, (bool, i32, i64, i64)> {
        c.states
            .iter()
            .map(|s| {
                (
                    s.facility_id.clone(),
                    (s.online, s.open_sessions, s.seq, s.since),
                )
            })
            .collect()
    }

    /// Source 1 stands still while source 0 keeps sending: the buffer stays within its
    /// bound, the events let go are read again, and the output is what an unbounded buffer
    /// gives.
    #[test]
    fn a_stalled_source_does_not_grow_the_buffer_and_changes_nothing() {
        let mut log = vec![open(1, 1, 5, "g"), wm(1, 6)];
        for i in 0..200i64 {
            let f = format!("f{}", i % 7);
            log.push(if i % 2 == 0 {
                open(0, i + 1, 10 + i, &f)
            } else {
                close(0, i + 1, 10 + i, &f)
            });
            log.push(wm(0, 10 + i));
        }
        log.push(close(1, 2, 300, "g"));
        log.push(wm(1, 1_000));
        log.push(wm(0, 1_000));
        let (bounded, reads) = read_bounded(&log, 2, 0, 16);
        let unbounded = read_unbounded(&log, 2, 0);
        assert_eq!(summary(&bounded), summary(&unbounded));
        assert_eq!(changelog(&bounded), changelog(&unbounded));
        assert!(
            reads > log.len(),
            "events were let go and read again ({reads} reads)"
        );
        assert!(summary(&unbounded).len() > 50, "the load makes transitions");
    }

    #[test]
    fn while_events_are_let_go_the_task_names_the_source_it_waits_for() {
        let mut t = FacilityTask::new(0, 2, 0).with_max_buffered(4);
        let mut out = Collected::default();
        t.on_event(0, wm(0, 9), 0, &mut out).unwrap();
        t.on_event(0, wm(1, 5), 0, &mut out).unwrap();
        for i in 0..6i64 {
            t.on_event(i + 1, open(0, i + 1, 10 + i, "f"), 0, &mut out)
                .unwrap();
        }
        let (source, watermark, from) = t.spilling().expect("over the bound");
        assert_eq!((source, watermark), (1, 5));
        assert!(t.commit_offset(7) <= from);
        assert_eq!(t.take_seek(), None, "source 1 has not passed them yet");
        t.on_event(7, wm(1, 100), 0, &mut out).unwrap();
        t.on_event(8, wm(0, 100), 0, &mut out).unwrap();
        assert_eq!(
            t.take_seek(),
            Some(from),
            "every source passed them: read from the first let go"
        );
        assert!(t.spilling().is_none());
    }

    proptest::proptest! {
        /// Any interleaving of sources (each in at order, with watermarks that never pass
        /// its own later events), any bound, with or without a flap hold: the output equals
        /// the unbounded buffer's.
        #[test]
        fn a_bounded_buffer_gives_the_unbounded_output(
            steps in proptest::collection::vec((0usize..3, 1i64..4, 0u8..4, 0usize..5), 1..300),
            max in 2usize..24,
            hold in 0i64..6,
        ) {
            let sources = 3;
            let log = event_log(&steps);
            let (bounded, _) = read_bounded(&log, sources, hold, max);
            let unbounded = read_unbounded(&log, sources, hold);
            proptest::prop_assert_eq!(summary(&bounded), summary(&unbounded));
            proptest::prop_assert_eq!(changelog(&bounded), changelog(&unbounded));
        }
    }

    /// A task that moves facilities quiet for longer than `after` ms to a store in `dir`.
    fn with_store(dir: &tempfile::TempDir, sources: usize, hold: i64, after: i64) -> FacilityTask {
        let store = ColdStore::create(dir.path().join("facilities-0.redb")).unwrap();
        FacilityTask::new(0, sources, hold)
            .with_max_buffered(usize::MAX)
            .with_retention(after, store)
    }

    /// Reads `log` as the runner does with retention on: a commit (changelog flush, then
    /// quiet facilities to disk) after every `commit_every` records.
    fn read_retained(
        log: &[SessionEvent],
        sources: usize,
        hold: i64,
        commit_every: usize,
    ) -> (Collected, usize) {
        let dir = tempfile::tempdir().unwrap();
        let mut t = with_store(&dir, sources, hold, 1);
        let mut out = Collected::default();
        let mut moved = 0;
        for (o, e) in log.iter().enumerate() {
            t.on_event(o as i64, e.clone(), 0, &mut out).unwrap();
            if o % commit_every == 0 {
                t.flush_changelog(&mut out);
                moved += t.retire_quiet().unwrap();
            }
        }
        t.flush_changelog(&mut out);
        moved += t.retire_quiet().unwrap();
        assert_eq!(
            t.in_memory() + t.on_disk(),
            facilities_seen(log),
            "no facility lost"
        );
        (out, moved)
    }

    fn facilities_seen(log: &[SessionEvent]) -> usize {
        log.iter()
            .filter(|e| e.kind != SessionEventKind::Watermark)
            .map(|e| e.facility_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    /// Many facilities go OFFLINE and stay quiet: they leave memory for the store; one that
    /// comes back continues its seq by one, and goes back to the store when quiet again.
    #[test]
    fn quiet_facilities_leave_memory_and_come_back_with_their_seq() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = with_store(&dir, 1, 0, 1_000);
        let mut out = Collected::default();
        let n = 500;
        let mut o = 0i64;
        let mut next = |t: &mut FacilityTask, e: SessionEvent, out: &mut Collected| {
            t.on_event(o, e, 7, out).unwrap();
            o += 1;
        };
        for i in 0..n {
            next(&mut t, open(0, i + 1, 10 + i, &format!("f{i}")), &mut out);
        }
        for i in 0..n {
            next(
                &mut t,
                close(0, n + i + 1, 600 + i, &format!("f{i}")),
                &mut out,
            );
        }
        next(&mut t, wm(0, 1_200), &mut out);
        t.flush_changelog(&mut out);
        assert_eq!(t.retire_quiet().unwrap(), 0, "quiet for less than 1 s");
        assert_eq!((t.in_memory(), t.on_disk()), (n as usize, 0));
        // One second of event time later, every facility has been quiet long enough.
        next(&mut t, wm(0, 600 + n + 1_001), &mut out);
        t.flush_changelog(&mut out);
        assert_eq!(t.retire_quiet().unwrap(), n as usize);
        assert_eq!((t.in_memory(), t.on_disk()), (0, n as usize));
        assert_eq!(out.statuses.len(), 2 * n as usize);
        // f7 comes back: ONLINE with seq 3, exactly as if it had stayed in memory.
        out.statuses.clear();
        next(&mut t, open(0, 2 * n + 1, 5_000, "f7"), &mut out);
        next(&mut t, wm(0, 5_001), &mut out);
        assert_eq!(
            summary(&out),
            vec![("f7".into(), Status::Online, 5_000, 3, 1)]
        );
        assert_eq!(
            out.statuses[0].previous_since,
            Some(607),
            "its OFFLINE's since"
        );
        t.flush_changelog(&mut out);
        t.retire_quiet().unwrap();
        assert_eq!((t.in_memory(), t.on_disk()), (1, n as usize - 1));
        assert_eq!(t.online_facilities(), 1);
        // Quiet again: back to disk; a close for a facility on disk (a stage-1 defect)
        // changes nothing either.
        next(&mut t, close(0, 2 * n + 2, 5_100, "f7"), &mut out);
        next(&mut t, close(0, 2 * n + 3, 5_100, "f8"), &mut out);
        next(&mut t, wm(0, 9_000), &mut out);
        t.flush_changelog(&mut out);
        t.retire_quiet().unwrap();
        assert_eq!((t.in_memory(), t.on_disk()), (0, n as usize));
        assert_eq!(
            summary(&out)[1],
            ("f7".into(), Status::Offline, 5_100, 4, 0)
        );
        assert_eq!(t.negative_counts, 1);
    }

    /// An ONLINE facility, one whose OFFLINE the flap hold still holds back, and one with
    /// its changelog write pending never leave memory, however old.
    #[test]
    fn only_quiet_facilities_leave_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = with_store(&dir, 1, 0, 1);
        let mut out = Collected::default();
        for (o, e) in [
            open(0, 1, 10, "on"),
            open(0, 2, 10, "q"),
            close(0, 3, 11, "q"),
            wm(0, 4_000),
        ]
        .into_iter()
        .enumerate()
        {
            t.on_event(o as i64, e, 0, &mut out).unwrap();
        }
        assert_eq!(t.retire_quiet().unwrap(), 0, "changelog write pending");
        t.flush_changelog(&mut out);
        assert_eq!(t.retire_quiet().unwrap(), 1);
        assert_eq!((t.in_memory(), t.on_disk()), (1, 1));
        assert!(t.facilities.contains_key("on"));

        let dir = tempfile::tempdir().unwrap();
        let mut t = with_store(&dir, 1, 5_000, 1);
        for (o, e) in [
            open(0, 1, 10, "on"),
            open(0, 2, 10, "held"),
            close(0, 3, 20, "held"),
            wm(0, 4_000),
        ]
        .into_iter()
        .enumerate()
        {
            t.on_event(o as i64, e, 0, &mut out).unwrap();
        }
        t.flush_changelog(&mut out);
        assert_eq!(t.retire_quiet().unwrap(), 0, "the hold is not over");
        t.on_event(9, wm(0, 6_000), 0, &mut out).unwrap();
        t.flush_changelog(&mut out);
        assert_eq!(
            t.retire_quiet().unwrap(),
            1,
            "OFFLINE at 5,020, quiet since 20"
        );
        assert_eq!((t.in_memory(), t.on_disk()), (1, 1));
        assert!(t.facilities.contains_key("on"));
    }

    /// Restore: the changelog's facilities quiet for longer than the retention at the
    /// committed clock go straight to the store, the others to memory; a later record of a
    /// facility replaces an earlier one wherever it is; revived ones continue their seq.
    #[test]
    fn restore_sends_quiet_facilities_straight_to_disk() {
        let state =
            |f: &str, online: bool, seq: i64, at: i64, pending: Option<i64>| FacilityState {
                facility_id: f.into(),
                region_id: "r".into(),
                open_sessions: i32::from(online),
                online,
                seq,
                since: at,
                pending_offline_since: pending,
                last_event_at: Some(at),
            };
        let dir = tempfile::tempdir().unwrap();
        let mut t = with_store(&dir, 1, 500, 1_000);
        t.set_restored_clock(10_000);
        let changelog = [
            state("old", false, 2, 100, None),
            state("older", false, 4, 50, None),
            state("recent", false, 2, 9_500, None),
            state("on", true, 1, 100, None),
            state("held", true, 1, 100, Some(200)),
            state("back", false, 2, 100, None),
            // A later record of "back": ONLINE again, so in memory.
            state("back", true, 3, 9_900, None),
            // And "recent" again, now quiet long enough at this clock: to disk.
            state("recent", false, 2, 8_000, None),
        ];
        for s in changelog {
            t.restore_facility(s).unwrap();
        }
        t.restore_delete("nothing-here").unwrap();
        t.finish_restore().unwrap();
        assert_eq!((t.in_memory(), t.on_disk()), (3, 3));
        assert_eq!(t.online_facilities(), 3);
        let mut out = Collected::default();
        t.on_event(0, open(0, 1, 10_100, "older"), 0, &mut out)
            .unwrap();
        t.on_event(1, wm(0, 10_101), 0, &mut out).unwrap();
        // "held"'s OFFLINE (due at 700) fired with the first watermark.
        assert_eq!(
            summary(&out),
            vec![
                ("held".into(), Status::Offline, 200, 2, 1),
                ("older".into(), Status::Online, 10_100, 5, 1),
            ]
        );
        assert_eq!(t.clock(), 10_101);
    }

    /// The store's directory is gone (a disk unmounted, a volume deleted): retiring quiet
    /// facilities fails with an error naming `processor.state_dir`, and the facility it was
    /// moving is not lost: it comes back, seq and all.
    #[test]
    fn a_store_that_cannot_write_is_an_error_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        std::fs::create_dir(&gone).unwrap();
        let store = ColdStore::create(gone.join("facilities-0.redb")).unwrap();
        let mut t = FacilityTask::new(0, 1, 0).with_retention(1, store);
        let mut out = Collected::default();
        for (o, e) in [open(0, 1, 10, "f"), close(0, 2, 20, "f"), wm(0, 100)]
            .into_iter()
            .enumerate()
        {
            t.on_event(o as i64, e, 0, &mut out).unwrap();
        }
        t.flush_changelog(&mut out);
        std::fs::remove_dir(&gone).unwrap();
        let e = t.retire_quiet().unwrap_err().to_string();
        assert!(e.contains("processor.state_dir"), "{e}");
        out.statuses.clear();
        t.on_event(3, open(0, 3, 200, "f"), 0, &mut out).unwrap();
        t.on_event(4, wm(0, 300), 0, &mut out).unwrap();
        assert_eq!(summary(&out), vec![("f".into(), Status::Online, 200, 3, 1)]);
    }

    proptest::proptest! {
        /// Any interleaving of sources, with or without a flap hold, commits at any
        /// rhythm: with a retention of 1 ms (facilities leave memory at every commit and
        /// come back) the output and the changelog equal those with retention off.
        #[test]
        fn retention_changes_nothing_in_the_output(
            steps in proptest::collection::vec((0usize..3, 0i64..4, 0u8..4, 0usize..6), 1..300),
            hold in prop_oneof![Just(0i64), 1i64..6],
            commit_every in 1usize..8,
        ) {
            let sources = 3;
            let log = event_log(&steps);
            let (retained, _) = read_retained(&log, sources, hold, commit_every);
            let plain = read_unbounded(&log, sources, hold);
            proptest::prop_assert_eq!(&retained.statuses, &plain.statuses);
            proptest::prop_assert_eq!(changelog(&retained), changelog(&plain));
        }
    }

    #[test]
    fn a_long_quiet_log_moves_facilities_to_disk_and_back() {
        // Facilities open and close in turn, far apart in time: every one leaves memory
        // between its sessions, and the output equals retention off.
        let mut log = Vec::new();
        for i in 0..300i64 {
            let f = format!("f{}", i % 10);
            log.push(open(0, 2 * i + 1, i * 100, &f));
            log.push(close(0, 2 * i + 2, i * 100 + 10, &f));
            log.push(wm(0, i * 100 + 50));
        }
        log.push(wm(0, 1_000_000));
        let (retained, moved) = read_retained(&log, 1, 0, 1);
        assert!(moved >= 290, "{moved} moves");
        let plain = read_unbounded(&log, 1, 0);
        assert_eq!(retained.statuses, plain.statuses);
        assert_eq!(
            summary(&plain).last().map(|s| s.3),
            Some(60),
            "seq 60 for f9"
        );
    }

    #[test]
    fn an_unknown_source_is_an_error_not_a_panic() {
        let mut t = FacilityTask::new(0, 2, 0);
        let e = t
            .on_event(0, open(5, 1, 1, "f"), 0, &mut Collected::default())
            .unwrap_err();
        assert!(matches!(e, EventError::UnknownSource(_)), "{e}");
        assert!(e.to_string().contains("heartbeats_partitions"), "{e}");
    }
}
