//! Stage 1's Kafka edge: `heartbeats` in; session events, the sessions changelog and dead
//! letters out. The rules live in [`crate::sessions`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use presence_core::codec::{decode, encode};
use presence_core::records::{HeartbeatKind, HeartbeatRef, SessionStateRef};
use presence_core::registry::IdCache;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::Offset;
use serde::{Deserialize, Serialize};

use crate::align::{self, Reading};
use crate::metrics::{Counts, Metrics};
use crate::records::{SessionEvent, SessionMark, SessionState};
use crate::restore::{offsets_for_times, read_partition, Record};
use crate::sessions::{
    key_bytes, key_from_bytes, mark_key_bytes, mark_key_from_bytes, Applied, Beat, SessionKey,
    SessionOutput, SessionTask, WindowBeat,
};
use crate::snapshot::{self, Outcome};
use crate::stage::{Clock, Committed, EndOf, Out, RestoreIo, Stage};
use crate::window::{self, Window};

#[derive(Clone, Copy)]
pub struct Topics {
    pub heartbeats: &'static str,
    pub transitions: &'static str,
    pub changelog: &'static str,
    pub dead_letters: &'static str,
    /// Partitions of the transitions topic: each gets every watermark.
    pub transition_partitions: i32,
}

impl Topics {
    /// The topic names of `t`, kept for the life of the process (records name their topic
    /// by `&'static str`).
    pub fn of(t: &presence_core::config::TopicsConfig, transition_partitions: i32) -> Topics {
        Topics {
            heartbeats: crate::leak(t.heartbeats.clone()),
            transitions: crate::leak(t.session_transitions()),
            changelog: crate::leak(t.sessions_changelog()),
            dead_letters: crate::leak(t.dead_letters.clone()),
            transition_partitions,
        }
    }
}

/// Beats of the re-read window that a stage-1 restore holds at most before it has applied
/// the changelog (they can only be applied after it): 262,144 × 56 bytes = 14 MiB. That
/// covers the whole window of a partition of ~85,000 sessions beating every 30 s with the
/// default 90 s timeout (a million sessions over the 12 default partitions), so such a
/// restore reads both at once as before; a larger partition's re-read waits for the
/// changelog past this point instead of holding its window whole (3 M beats, 170 MB, for a
/// million sessions on one partition).
pub const WINDOW_AHEAD_BEATS: usize = 1 << 18;

/// The window's beats go from the re-read to the restore in chunks of this many (448 KiB),
/// so that the hand-over costs one channel message per 8,192 beats.
const WINDOW_CHUNK_BEATS: usize = 8192;

/// Stored with each committed heartbeats offset: the partition's clock at that point.
#[derive(Serialize, Deserialize, Clone)]
pub struct Checkpoint {
    /// Stream time, ms.
    pub t: i64,
    /// Next source_seq.
    pub s: i64,
}

pub struct SessionsStage {
    topics: Topics,
    timeout: i64,
    max_future: i64,
    tasks: HashMap<i32, SessionTask>,
    caught_up: HashSet<i32>,
    /// Each partition's latest record timestamp (for the commit cadence).
    latest_record: HashMap<i32, i64>,
    counts: Counts,
    /// Session events were emitted in the open transaction.
    events_pending: bool,
    /// When a transaction with session events last committed.
    last_events: Option<std::time::Instant>,
    expiry_delays: Vec<f64>,
    /// Registry ids of heartbeats in the `confluent` framing, resolved on first sight.
    ids: Arc<IdCache>,
    /// Partitions restored at once (`processor.restore_concurrency`).
    restore_concurrency: usize,
    /// Whether a restore reads the timeout window newest first ([`window`]); off only in
    /// the benchmark that measures it against the whole window.
    newest_first: bool,
    /// Records the restores read again from the heartbeats (the benchmark reports them).
    window_records: AtomicU64,
    /// Where shutdown snapshots go ([`crate::snapshot`]); `None`: none are written or read.
    snapshots: Option<PathBuf>,
    /// Snapshots found at restore since the last publish, by [`Outcome`] (used, stale,
    /// damaged): restores run on threads of their own.
    snapshot_outcomes: [AtomicU64; 3],
}

/// The most stage-1 partitions restored at once by default. A partition's restore is two
/// read_committed consumers (its changelog and its window's beats), each with one fetch in
/// flight at a time: while a fetch travels, its consumer has drained what it had, so one
/// partition's restore leaves the cores idle part of the time (a quarter of the samples of
/// a 1 M-session restore two at a time on two cores were idle) and the next partition's
/// fills that. Each one holds up to [`WINDOW_AHEAD_BEATS`] (14 MiB) and two restore
/// consumers' queues (2 × 8 MiB) beside the state it builds: four at once bound that to
/// about 120 MiB.
pub const RESTORE_CONCURRENCY_MAX: usize = 4;

/// Partitions restored at once per core by default: two. 10 M sessions on 12 partitions,
/// two cores (`presence bench restore --sessions 10000000 --partitions 12`): 29.3 s four at
/// a time against 35.9 s two at a time (0.82, same runs); 3 M: 8.0 s against 9.9 s, six at
/// a time 7.5 s. Larger fetches instead (8 MiB a fetch, 64 MiB queues) did as well two at a
/// time but held 1.2 GiB beside the state. Since records are taken from librdkafka in
/// batches ([`crate::restore`]) a restore waits less and the gain is smaller: 16.6 s four
/// at a time against 17.3 s two at a time (0.96, same runs), still not a loss.
pub const RESTORE_CONCURRENCY_PER_CORE: usize = 2;

/// The default of `processor.restore_concurrency`: [`RESTORE_CONCURRENCY_PER_CORE`] per
/// core, at most [`RESTORE_CONCURRENCY_MAX`].
pub fn restore_concurrency() -> usize {
    (cores() * RESTORE_CONCURRENCY_PER_CORE).clamp(1, RESTORE_CONCURRENCY_MAX)
}

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl SessionsStage {
    pub fn new(topics: Topics, timeout_ms: i64, max_future_ms: i64) -> SessionsStage {
        SessionsStage {
            topics,
            timeout: timeout_ms,
            max_future: max_future_ms,
            tasks: HashMap::new(),
            caught_up: HashSet::new(),
            latest_record: HashMap::new(),
            counts: Counts::default(),
            events_pending: false,
            last_events: None,
            expiry_delays: Vec::new(),
            ids: Arc::new(IdCache::none()),
            restore_concurrency: restore_concurrency(),
            newest_first: true,
            window_records: AtomicU64::new(0),
            snapshots: None,
            snapshot_outcomes: Default::default(),
        }
    }

    /// Writes a snapshot of each partition's sessions into `dir` when the stage stops
    /// cleanly, and restores a partition from its snapshot when it is still at that point
    /// ([`crate::snapshot`]).
    pub fn with_snapshots(mut self, dir: PathBuf) -> SessionsStage {
        self.snapshots = Some(dir);
        self
    }

    /// Restores at most `n` partitions at once; 0 is the default ([`restore_concurrency`]),
    /// as `processor.restore_concurrency` says.
    pub fn with_restore_concurrency(mut self, n: usize) -> SessionsStage {
        self.restore_concurrency = match n {
            0 => restore_concurrency(),
            n => n,
        };
        self
    }

    /// Restores read the whole timeout window, oldest first, as before [`window`]: the
    /// baseline of `presence bench restore`.
    pub fn reading_whole_windows(mut self) -> SessionsStage {
        self.newest_first = false;
        self
    }

    /// Records the restores so far read again from the heartbeats' timeout windows.
    pub fn window_records_read(&self) -> u64 {
        self.window_records.load(Ordering::Relaxed)
    }

    /// Reads heartbeats in the `confluent` framing too, resolving their ids through `ids`
    /// (without it, such records are dead letters that say to configure the registry).
    pub fn with_registry_ids(mut self, ids: Arc<IdCache>) -> SessionsStage {
        self.ids = ids;
        self
    }

    /// Shutdown snapshots counted at restore and not yet published: used, stale, damaged.
    pub fn snapshot_outcomes(&self) -> [u64; 3] {
        self.snapshot_outcomes
            .each_ref()
            .map(|n| n.load(Ordering::Relaxed))
    }

    /// Heap bytes of every partition's session state (`presence_session_state_bytes`).
    pub fn state_bytes(&self) -> usize {
        self.tasks.values().map(SessionTask::heap_bytes).sum()
    }

    /// Open sessions over every partition this stage holds.
    pub fn open_sessions(&self) -> usize {
        self.tasks.values().map(SessionTask::open_sessions).sum()
    }

    /// Whether `partition`'s latest record is older than [`align::REPLAYING_MS`] (or none was
    /// read yet): live records are stamped on receipt, so they are fresh.
    fn replaying(&self, partition: i32, now: i64) -> bool {
        self.latest_record
            .get(&partition)
            .is_none_or(|&ts| now - ts > align::REPLAYING_MS)
    }

    /// Rebuilds `partition`'s sessions from its changelog and the heartbeats of the timeout
    /// window before `committed`. Touches nothing of the stage, so that several partitions
    /// can load at once.
    fn load(
        &self,
        partition: i32,
        committed: Option<Committed<Checkpoint>>,
        io: &RestoreIo<'_>,
    ) -> anyhow::Result<SessionTask> {
        let started = std::time::Instant::now();
        // Marks written before the first new record name the committed point.
        let next_offset = committed.as_ref().map(|c| c.offset);
        if let Some(mut task) = self.warm(partition, committed.as_ref(), io) {
            task.set_next_offset(next_offset.unwrap_or(0));
            tracing::info!(
                partition,
                open_sessions = task.open_sessions(),
                seconds = started.elapsed().as_secs_f64(),
                "sessions restored from the shutdown snapshot (the changelog was not read)"
            );
            return Ok(task);
        }
        // Beats after a session's open raised its last-seen without a changelog write; the
        // ones that matter are younger than the timeout at the checkpoint. They are re-read
        // newest first (`window`): the newest step on a second thread while the changelog
        // restores, then the older part only if a session is still unsettled.
        let step = window::step(self.timeout);
        let checkpoint = committed.as_ref().and_then(|c| c.checkpoint.clone());
        let window = match &committed {
            Some(Committed {
                offset,
                checkpoint: Some(c),
            }) => {
                let from_t = c.t.saturating_sub(self.timeout + 1_000);
                let newest_t = if self.newest_first {
                    window::newest_time(c.t, step, from_t)
                } else {
                    from_t
                };
                let found = offsets_for_times(
                    io.config,
                    self.topics.heartbeats,
                    partition,
                    &[from_t, newest_t],
                    *offset,
                )?;
                found[0].map(|from| {
                    let w = Window {
                        from: from.min(*offset),
                        until: *offset,
                    };
                    (w, w.newest_from(found[1]), newest_t)
                })
            }
            _ => None,
        };
        let mut task = SessionTask::new(partition, self.timeout, self.max_future);
        let mut bad = 0u64;
        let mut window_records = 0u64;
        let mut changelog_seconds = 0.0;
        let mut newest_seconds = 0.0;
        let heartbeats = self.topics.heartbeats;
        let ids = &*self.ids;
        // The beats of `[from, until)`, each to `f`; the records read.
        let reread = |from: i64, until: i64, f: &mut dyn FnMut(&WindowBeat)| {
            read_partition(
                io.config,
                heartbeats,
                partition,
                Offset::Offset(from),
                Some(until),
                |m| {
                    if let Some(b) = window_beat(m, ids) {
                        f(&b);
                    }
                    ControlFlow::Continue(())
                },
            )
        };
        let changelog_records = std::thread::scope(|scope| -> anyhow::Result<u64> {
            // The newest step's beats can only be applied once the changelog is in, so what
            // the re-read finds before then waits here, in chunks, up to a bound: past it the
            // re-read waits for the changelog, then both go on in step (a million sessions
            // on one partition are ~3 M beats, 170 MB held whole).
            let (chunks, beats_in) = std::sync::mpsc::sync_channel::<Vec<WindowBeat>>(
                WINDOW_AHEAD_BEATS / WINDOW_CHUNK_BEATS,
            );
            let reader = scope.spawn(move || -> anyhow::Result<u64> {
                let Some((w, newest, _)) = window else {
                    return Ok(0);
                };
                let mut chunk = Vec::with_capacity(WINDOW_CHUNK_BEATS);
                let mut gone = false;
                let n = read_partition(
                    io.config,
                    heartbeats,
                    partition,
                    Offset::Offset(newest),
                    Some(w.until),
                    |m| {
                        if let Some(b) = window_beat(m, ids) {
                            chunk.push(b);
                        }
                        if chunk.len() < WINDOW_CHUNK_BEATS {
                            return ControlFlow::Continue(());
                        }
                        let full =
                            std::mem::replace(&mut chunk, Vec::with_capacity(WINDOW_CHUNK_BEATS));
                        // The restore gave up (the changelog read failed): stop reading.
                        gone = chunks.send(full).is_err();
                        if gone {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    },
                )?;
                if !gone && !chunk.is_empty() {
                    // A send fails only when the restore gave up.
                    let _ = chunks.send(chunk);
                }
                Ok(n)
            });
            let n = read_partition(
                io.config,
                self.topics.changelog,
                partition,
                Offset::Beginning,
                None,
                |m| {
                    if let Some(key) = m.key().and_then(mark_key_from_bytes) {
                        match m.payload().map(decode::<SessionMark>) {
                            None => task.restore_mark(key, None),
                            Some(Ok(mark)) => task.restore_mark(key, Some(mark)),
                            Some(Err(_)) => bad += 1,
                        }
                        return ControlFlow::Continue(());
                    }
                    let Some(key) = m.key().and_then(key_from_bytes) else {
                        bad += 1;
                        return ControlFlow::Continue(());
                    };
                    let Some(bytes) = m.payload() else {
                        task.restore_delete(key);
                        return ControlFlow::Continue(());
                    };
                    // Borrowed from the record (no copy of its ids) unless it is of an
                    // older schema version, which the resolving decoder reads.
                    match SessionStateRef::decode(bytes) {
                        Ok(Some(state)) => task.restore_session(key, state),
                        Ok(None) => match decode::<SessionState>(bytes) {
                            Ok(state) => task.restore_session(key, state.borrowed()),
                            Err(_) => bad += 1,
                        },
                        Err(_) => bad += 1,
                    }
                    ControlFlow::Continue(())
                },
            )?;
            changelog_seconds = started.elapsed().as_secs_f64();
            // The clock first: refresh ignores beats stamped after it (refused ones).
            if let Some(c) = &checkpoint {
                task.set_clock(c.t, c.s);
            }
            task.apply_marks();
            // Schema-v1 sessions find their owners in offset order: the older part of the
            // window first, then the newest step.
            let legacy = task.restores_legacy();
            if let (true, Some((w, newest, _))) = (legacy, window) {
                window_records += reread(w.from, newest, &mut |b| task.refresh(b))?;
            }
            // In offset order; ends when the re-read has sent its last chunk (or failed).
            for chunk in beats_in {
                for b in &chunk {
                    task.refresh(b);
                }
            }
            window_records += reader
                .join()
                .map_err(|_| anyhow::anyhow!("the heartbeats re-read panicked"))??;
            newest_seconds = started.elapsed().as_secs_f64();
            if let (false, Some((w, newest, t))) = (legacy, window) {
                window_records += w.refresh_older(&mut task, newest, t, reread)?;
            }
            Ok(n)
        })?;
        if bad > 0 {
            tracing::error!(
                partition,
                bad,
                topic = self.topics.changelog,
                "changelog records that do not decode were skipped"
            );
        }
        task.finish_restore();
        task.set_next_offset(next_offset.unwrap_or(0));
        self.window_records
            .fetch_add(window_records, Ordering::Relaxed);
        tracing::info!(
            partition,
            open_sessions = task.open_sessions(),
            changelog_records,
            window_records,
            changelog_seconds,
            newest_seconds,
            seconds = started.elapsed().as_secs_f64(),
            "sessions restored"
        );
        Ok(task)
    }

    /// The committed point of `partition` in this stage's topics that a shutdown snapshot
    /// is written at and checked against.
    fn point(
        &self,
        partition: i32,
        offset: i64,
        stream_time: i64,
        next_seq: i64,
    ) -> snapshot::Point {
        snapshot::Point {
            heartbeats: self.topics.heartbeats.to_string(),
            changelog: self.topics.changelog.to_string(),
            partition,
            offset,
            stream_time,
            next_seq,
        }
    }

    /// `partition`'s shutdown snapshot, if it has one written at `committed`'s point. A
    /// snapshot that is not (stale, damaged) is logged and counted; the caller restores from
    /// the changelog.
    fn warm(
        &self,
        partition: i32,
        committed: Option<&Committed<Checkpoint>>,
        io: &RestoreIo<'_>,
    ) -> Option<SessionTask> {
        let dir = self.snapshots.as_ref()?;
        let (offset, checkpoint) = match committed {
            Some(Committed {
                offset,
                checkpoint: Some(c),
            }) => (*offset, c),
            // Nothing committed with a checkpoint: whatever a file says is not this state.
            _ => (-1, &Checkpoint { t: i64::MIN, s: 0 }),
        };
        let point = self.point(partition, offset, checkpoint.t, checkpoint.s);
        let found = snapshot::take(dir, &point, self.timeout, self.max_future)?.and_then(
            |(task, header)| {
                // Nothing committed to the changelog after the snapshot (the offset and the
                // checkpoint say the stage wrote nothing; this says nobody else did).
                let after = read_partition(
                    io.config,
                    self.topics.changelog,
                    partition,
                    Offset::Offset(header.changelog_end),
                    None,
                    |_| ControlFlow::Break(()),
                );
                match after {
                    Ok(0) => Ok(task),
                    Ok(_) => Err((
                        Outcome::Stale,
                        format!(
                            "changelog records were committed after it (past offset {} of {})",
                            header.changelog_end, self.topics.changelog
                        ),
                    )),
                    Err(e) => Err((
                        Outcome::Stale,
                        format!("cannot tell whether the changelog moved on since: {e}"),
                    )),
                }
            },
        );
        let outcome = match &found {
            Ok(_) => Outcome::Used,
            Err((outcome, _)) => *outcome,
        };
        self.snapshot_outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        match found {
            Ok(task) => Some(task),
            // Stale is the usual case once the partition moved on (it went to another
            // instance, or this one ran on from a kill): said, not warned about.
            Err((Outcome::Stale, why)) => {
                tracing::info!(
                    partition,
                    file = %snapshot::path(dir, partition).display(),
                    why,
                    "shutdown snapshot is stale; restoring from the changelog"
                );
                None
            }
            Err((outcome, why)) => {
                tracing::warn!(
                    partition,
                    file = %snapshot::path(dir, partition).display(),
                    outcome = outcome.label(),
                    why,
                    "shutdown snapshot not used; restoring from the changelog"
                );
                None
            }
        }
    }

    fn install(&mut self, partition: i32, task: SessionTask) {
        self.caught_up.remove(&partition);
        self.tasks.insert(partition, task);
    }

    fn dead_letter(
        &mut self,
        m: &BorrowedMessage<'_>,
        code: &'static str,
        message: &str,
        out: &mut Vec<Out>,
    ) {
        self.counts.dead_letters.push(code);
        tracing::debug!(
            partition = m.partition(),
            offset = m.offset(),
            code,
            message,
            "heartbeat to the dead-letter topic"
        );
        out.push(Out::dead_letter(
            self.topics.dead_letters,
            self.topics.heartbeats,
            m,
            code,
            message,
        ));
    }
}

fn window_beat(m: &Record<'_>, ids: &IdCache) -> Option<WindowBeat> {
    let ts = m.timestamp()?;
    let payload = m.payload()?;
    // A failed lookup leaves the id unresolved: the beat was a dead letter live too.
    let _ = ids.ensure_blocking(payload);
    let mut slot = None;
    let beat = HeartbeatRef::decode_any_framed(payload, &mut slot, ids).ok()?;
    // What the live path refused (dead letters) or what does not extend: not a refresh.
    if beat.kind != HeartbeatKind::Beat || m.key() != Some(beat.session_id.as_bytes()) {
        return None;
    }
    Some(WindowBeat::new(&Beat::of(&beat), ts, m.offset()))
}

/// Turns stage-1 outputs into records of the open transaction.
struct Emitter<'a> {
    topics: &'a Topics,
    partition: i32,
    out: &'a mut Vec<Out>,
    /// While expiring on the wall clock: the time now, and where each expiry's delay past
    /// its deadline goes.
    expiry_delays: Option<(i64, &'a mut Vec<f64>)>,
}

impl SessionOutput for Emitter<'_> {
    fn event(&mut self, event: SessionEvent) {
        if let Some((now, delays)) = &mut self.expiry_delays {
            delays.push((*now - event.at) as f64 / 1000.0);
        }
        let value = encode(&event);
        self.out.push(Out::record(
            self.topics.transitions,
            None,
            Some(event.facility_id.into_bytes()),
            Some(value),
        ));
    }
    fn put_session(&mut self, key: SessionKey, state: SessionState) {
        self.changelog(&key_bytes(&key), Some(encode(&state)));
    }
    fn delete_session(&mut self, key: SessionKey) {
        self.changelog(&key_bytes(&key), None);
    }
    fn put_mark(&mut self, key: SessionKey, mark: SessionMark) {
        self.changelog(&mark_key_bytes(&key), Some(encode(&mark)));
    }
    fn delete_mark(&mut self, key: SessionKey) {
        self.changelog(&mark_key_bytes(&key), None);
    }
}

impl Emitter<'_> {
    /// A sessions-changelog record of this partition (`None`: a tombstone).
    fn changelog(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        self.out.push(Out::record(
            self.topics.changelog,
            Some(self.partition),
            Some(key.to_vec()),
            value,
        ));
    }
}

impl Stage for SessionsStage {
    const NAME: &'static str = "sessions";
    type Checkpoint = Checkpoint;

    fn input_topic(&self) -> &'static str {
        self.topics.heartbeats
    }

    fn restore(
        &mut self,
        partition: i32,
        committed: Option<Committed<Checkpoint>>,
        io: &RestoreIo<'_>,
    ) -> anyhow::Result<()> {
        let task = self.load(partition, committed, io)?;
        self.install(partition, task);
        Ok(())
    }

    /// Up to [`restore_concurrency`] partitions at once, each on a thread of its own: a
    /// partition's restore reads only its own changelog and window.
    fn restore_partitions(
        &mut self,
        partitions: Vec<(i32, Option<Committed<Checkpoint>>)>,
        io: &RestoreIo<'_>,
    ) -> anyhow::Result<Vec<(i32, std::time::Duration)>> {
        let threads = self.restore_concurrency.min(partitions.len()).max(1);
        let queue = std::sync::Mutex::new(partitions.into_iter());
        let done = std::sync::Mutex::new(Vec::new());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let this = &*self;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                        let Some((p, c)) = crate::rebalance::lock(&queue).next() else {
                            return;
                        };
                        let started = std::time::Instant::now();
                        let loaded = this.load(p, c, io);
                        failed.fetch_or(loaded.is_err(), std::sync::atomic::Ordering::Relaxed);
                        crate::rebalance::lock(&done).push((p, loaded, started.elapsed()));
                    }
                });
            }
        });
        // What restored is kept, as one after another would have: a failure marks the
        // member for a rewind, which restores every assigned partition again.
        let mut took = Vec::new();
        let mut first_error = None;
        for (p, loaded, elapsed) in done.into_inner().unwrap_or_else(|e| e.into_inner()) {
            match loaded {
                Ok(task) => {
                    self.install(p, task);
                    took.push((p, elapsed));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(took),
        }
    }

    fn revoke(&mut self, partition: i32) {
        self.tasks.remove(&partition);
        self.caught_up.remove(&partition);
        self.latest_record.remove(&partition);
    }

    fn on_message(&mut self, m: &BorrowedMessage<'_>, now: i64, out: &mut Vec<Out>) {
        let partition = m.partition();
        self.caught_up.remove(&partition);
        let Some(payload) = m.payload() else {
            return self.dead_letter(
                m,
                "missing_value",
                "record has no value; send an Avro Heartbeat",
                out,
            );
        };
        if let Err(e) = self.ids.ensure_blocking(payload) {
            // The bytes stay in the dead-letter topic, to be replayed once the registry
            // answers again.
            return self.dead_letter(m, "unresolved_schema_id", &e.to_string(), out);
        }
        let mut slot = None;
        let beat = match HeartbeatRef::decode_any_framed(payload, &mut slot, &*self.ids) {
            Ok(b) => b,
            Err(e) => return self.dead_letter(m, e.code(), &e.to_string(), out),
        };
        if m.key() != Some(beat.session_id.as_bytes()) {
            return self.dead_letter(
                m,
                "key_mismatch",
                "the record key must be the session id, so that a session stays on one partition",
                out,
            );
        }
        let Some(ts) = m.timestamp().to_millis() else {
            return self.dead_letter(
                m,
                "missing_timestamp",
                "record has no timestamp; the event time is the record timestamp",
                out,
            );
        };
        self.latest_record.insert(partition, ts);
        let Some(task) = self.tasks.get_mut(&partition) else {
            return;
        };
        let mut emitter = Emitter {
            topics: &self.topics,
            partition,
            out,
            expiry_delays: None,
        };
        match task.on_heartbeat(m.offset(), ts, &Beat::of(&beat), now, &mut emitter) {
            Ok(applied) => {
                self.events_pending |=
                    matches!(applied, Applied::Opened | Applied::Moved | Applied::Closed);
                let i = match applied {
                    Applied::Opened => 0,
                    Applied::Extended => 1,
                    Applied::Moved => 2,
                    Applied::Closed => 3,
                    Applied::IgnoredEnd => 4,
                    Applied::IgnoredLate => 5,
                };
                self.counts.heartbeats[i] += 1;
            }
            Err(rejected) => self.dead_letter(m, rejected.code, &rejected.message, out),
        }
    }

    fn on_eof(&mut self, partition: i32) {
        self.caught_up.insert(partition);
    }

    /// A snapshot of each partition at the point its last transaction committed.
    fn on_clean_stop(&mut self, positions: &HashMap<i32, i64>, end_of: &EndOf<'_>) {
        let Some(dir) = &self.snapshots else {
            return;
        };
        let started = std::time::Instant::now();
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "no shutdown snapshots: cannot create their directory; the next start restores from the changelogs (point processor.state_dir at a writable local directory, or set processor.shutdown_snapshots = false)");
            return;
        }
        snapshot::clear(dir, false);
        let (mut written, mut sessions) = (0usize, 0usize);
        for (&p, task) in &self.tasks {
            let Some(&offset) = positions.get(&p) else {
                continue;
            };
            if !task.can_snapshot() {
                tracing::info!(
                    partition = p,
                    "no shutdown snapshot: the partition holds sessions of schema-v1 changelog records"
                );
                continue;
            }
            let Some(changelog_end) = end_of(self.topics.changelog, p) else {
                tracing::warn!(
                    partition = p,
                    topic = self.topics.changelog,
                    "no shutdown snapshot: the broker did not say where the changelog ends"
                );
                continue;
            };
            let header = snapshot::Header {
                point: self.point(p, offset, task.stream_time(), task.next_seq()),
                changelog_end,
                sessions: task.open_sessions() as u64,
            };
            match snapshot::write(dir, &header, task) {
                Ok(()) => {
                    written += 1;
                    sessions += task.open_sessions();
                }
                // The next start restores this partition from its changelog, as always.
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "shutdown snapshot not written")
                }
            }
        }
        tracing::info!(
            partitions = written,
            open_sessions = sessions,
            dir = %dir.display(),
            seconds = started.elapsed().as_secs_f64(),
            "shutdown snapshots written"
        );
    }

    fn on_tick(&mut self, clock: &Clock<'_>, out: &mut Vec<Out>) {
        for p in &self.caught_up {
            let Some(task) = self.tasks.get_mut(p) else {
                continue;
            };
            let now = clock.at(*p);
            let mut emitter = Emitter {
                topics: &self.topics,
                partition: *p,
                out,
                // Measured on the real wall clock: a clock held back for unread
                // records makes expiries later, and that is part of the delay.
                expiry_delays: Some((clock.wall, &mut self.expiry_delays)),
            };
            if task.advance_to(now, &mut emitter) > 0 {
                self.events_pending = true;
            }
        }
    }

    fn before_commit(&mut self, _now: i64, out: &mut Vec<Out>) {
        for (&partition, task) in &mut self.tasks {
            let mut emitter = Emitter {
                topics: &self.topics,
                partition,
                out,
                expiry_delays: None,
            };
            self.counts.marks += task.mark_quiet(&mut emitter) as u64;
            let wm = task.watermark();
            if wm.at == i64::MIN {
                continue;
            }
            let bytes = encode(&wm);
            for q in 0..self.topics.transition_partitions {
                out.push(Out::record(
                    self.topics.transitions,
                    Some(q),
                    None,
                    Some(bytes.clone()),
                ));
            }
        }
    }

    fn commit_point(&self, partition: i32, next_offset: i64) -> (i64, Option<Checkpoint>) {
        let checkpoint = self.tasks.get(&partition).map(|t| Checkpoint {
            t: t.stream_time(),
            s: t.next_seq(),
        });
        (next_offset, checkpoint)
    }

    fn next_wakeup(&self, clock: &Clock<'_>) -> Option<i64> {
        self.caught_up
            .iter()
            .filter_map(|p| clock.reaches(*p, self.tasks.get(p)?.next_expiry()?))
            .min()
    }

    fn commits_when_idle(&self) -> bool {
        true
    }

    fn urgent(&self) -> bool {
        // Stage 2 releases an event once every source's watermark passed it, and the other
        // partitions' watermarks may trail the event's at the first commit: keep commits
        // quick for a moment after events, so those watermarks follow soon.
        self.events_pending
            || self
                .last_events
                .is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(50))
    }

    fn to_pause(&self, paused: &BTreeSet<i32>, read_a_fetch: &BTreeSet<i32>) -> BTreeSet<i32> {
        let now = crate::stage::now_ms();
        let readings = self.tasks.iter().map(|(p, t)| Reading {
            partition: *p,
            stream_time: t.stream_time(),
            at_end: self.caught_up.contains(p),
            replaying: self.replaying(*p, now),
            read_a_fetch: read_a_fetch.contains(p),
        });
        align::to_pause(readings, paused, align::WINDOW_MS)
    }

    fn backlogged(&self) -> bool {
        // Live records are stamped on receipt, so they are fresh; a partition whose latest
        // record is more than a second old, and that has not reached its end, is replaying.
        let now = crate::stage::now_ms();
        self.tasks
            .keys()
            .any(|p| !self.caught_up.contains(p) && self.replaying(*p, now))
    }

    fn publish(&mut self, metrics: &Metrics) {
        if std::mem::take(&mut self.events_pending) {
            self.last_events = Some(std::time::Instant::now());
        }
        self.counts.publish(metrics);
        for outcome in [Outcome::Used, Outcome::Stale, Outcome::Damaged] {
            let n = self.snapshot_outcomes[outcome as usize].swap(0, Ordering::Relaxed);
            if n > 0 {
                metrics
                    .snapshot_restores
                    .with_label_values(&[outcome.label()])
                    .inc_by(n);
            }
        }
        for d in self.expiry_delays.drain(..) {
            metrics.expiry_delay.observe(d.max(0.0));
        }
        metrics
            .open_sessions
            .set(self.tasks.values().map(|t| t.open_sessions() as i64).sum());
        metrics
            .state_bytes
            .set(self.tasks.values().map(|t| t.heap_bytes() as i64).sum());
    }
}
