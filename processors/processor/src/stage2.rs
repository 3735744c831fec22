//! Stage 2's Kafka edge: session events in; `facility-status` and the facilities changelog
//! out. The rules live in [`crate::facilities`].

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;

use presence_core::codec::{decode, encode, encode_with, Header};
use presence_core::records::{FacilityStatus, Status};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::Offset;
use serde::{Deserialize, Serialize};

use crate::cold::ColdStore;
use crate::facilities::{EventError, FacilityOutput, FacilityTask};
use crate::metrics::{Counts, Metrics};
use crate::records::{FacilityState, SessionEvent};
use crate::restore::read_partition;
use crate::stage::{Clock, Committed, Out, RestoreIo, Stage};

pub struct Topics {
    pub transitions: &'static str,
    pub status: &'static str,
    pub changelog: &'static str,
    pub dead_letters: &'static str,
}

impl Topics {
    /// The topic names of `t`, kept for the life of the process.
    pub fn of(t: &presence_core::config::TopicsConfig) -> Topics {
        Topics {
            transitions: crate::leak(t.session_transitions()),
            status: crate::leak(t.facility_status.clone()),
            changelog: crate::leak(t.facilities_changelog()),
            dead_letters: crate::leak(t.dead_letters.clone()),
        }
    }
}

/// Stored with each committed transitions offset: the last seq applied per source.
#[derive(Serialize, Deserialize)]
pub struct Checkpoint {
    /// Per source partition, the last seq applied.
    pub a: Vec<i64>,
    /// The partition's clock (low watermark, event time) for retention: a restore moves the
    /// changelog's facilities quiet for longer than `processor.facility_retention` at this
    /// time straight to disk. Absent in checkpoints written before retention existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w: Option<i64>,
}

pub struct FacilitiesStage {
    topics: Topics,
    sources: usize,
    hold: i64,
    /// Per partition, at most this many events wait for a stalled source.
    max_buffered: usize,
    /// Events let go from memory and read again later, not yet in the metrics.
    spilled: u64,
    tasks: HashMap<i32, FacilityTask>,
    counts: Counts,
    latencies: Vec<f64>,
    /// When the buffer and its slowest source were last logged (debug level).
    last_spread_log: std::time::Instant,
    /// How `facility-status` records are framed (`schema_registry.framing`).
    status_header: Header,
    /// `processor.facility_retention` (ms) and this instance's directory under
    /// `processor.state_dir`; `None` keeps every facility in memory.
    retention: Option<(i64, PathBuf)>,
    /// A facility store failed: the stage stops (see [`Stage::defect`]).
    defect: Option<String>,
}

impl FacilitiesStage {
    pub fn new(topics: Topics, sources: usize, hold_ms: i64) -> FacilitiesStage {
        FacilitiesStage {
            topics,
            sources,
            hold: hold_ms,
            max_buffered: crate::facilities::DEFAULT_MAX_BUFFERED,
            spilled: 0,
            tasks: HashMap::new(),
            counts: Counts::default(),
            latencies: Vec::new(),
            last_spread_log: std::time::Instant::now(),
            status_header: Header::SingleObject,
            retention: None,
            defect: None,
        }
    }

    /// Moves facilities quiet for longer than `after_ms` to one store per partition in `dir`
    /// (`processor.facility_retention`, `processor.state_dir`).
    pub fn with_retention(mut self, after_ms: i64, dir: PathBuf) -> FacilitiesStage {
        self.retention = Some((after_ms, dir));
        self
    }

    /// The facility store failed: nothing more of this stage may commit.
    fn fail(&mut self, partition: i32, e: impl std::fmt::Display) {
        tracing::error!(partition, error = %e, "stage 2's facility store failed; the stage stops");
        self.defect
            .get_or_insert_with(|| format!("partition {partition}: {e}"));
    }

    /// Bounds each partition's buffer (`processor.max_buffered_events`).
    pub fn with_max_buffered(mut self, events: usize) -> FacilitiesStage {
        self.max_buffered = events;
        self
    }

    /// Writes `facility-status` with `header` (the registry id of the current schema, for
    /// the `confluent` framing) instead of single-object encoding.
    pub fn with_status_header(mut self, header: Header) -> FacilitiesStage {
        self.status_header = header;
        self
    }

    fn dead_letter(
        &mut self,
        m: &BorrowedMessage<'_>,
        code: &'static str,
        message: &str,
        out: &mut Vec<Out>,
    ) {
        self.counts.dead_letters.push(code);
        tracing::error!(
            partition = m.partition(),
            offset = m.offset(),
            code,
            message,
            "internal session event to the dead-letter topic"
        );
        out.push(Out::dead_letter(
            self.topics.dead_letters,
            self.topics.transitions,
            m,
            code,
            message,
        ));
    }
}

impl Drop for FacilitiesStage {
    /// The stage ends: its stores go with their tasks, then this instance's directory
    /// under `processor.state_dir` if nothing else is in it.
    fn drop(&mut self) {
        self.tasks.clear();
        if let Some((_, dir)) = &self.retention {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

struct Emitter<'a> {
    topics: &'a Topics,
    status_header: Header,
    partition: i32,
    out: &'a mut Vec<Out>,
    counts: &'a mut Counts,
    latencies: &'a mut Vec<f64>,
}

impl FacilityOutput for Emitter<'_> {
    fn status(&mut self, status: FacilityStatus) {
        match status.status {
            Status::Online => self.counts.online += 1,
            Status::Offline => self.counts.offline += 1,
        }
        self.latencies
            .push((status.emitted_at - status.since) as f64 / 1000.0);
        let value = encode_with(&status, self.status_header);
        self.out.push(Out::record(
            self.topics.status,
            None,
            Some(status.facility_id.into_bytes()),
            Some(value),
        ));
    }
    fn put_facility(&mut self, state: FacilityState) {
        let value = encode(&state);
        self.out.push(Out::record(
            self.topics.changelog,
            Some(self.partition),
            Some(state.facility_id.into_bytes()),
            Some(value),
        ));
    }
}

impl Stage for FacilitiesStage {
    const NAME: &'static str = "facilities";
    type Checkpoint = Checkpoint;

    fn input_topic(&self) -> &'static str {
        self.topics.transitions
    }

    fn restore(
        &mut self,
        partition: i32,
        committed: Option<Committed<Checkpoint>>,
        io: &RestoreIo<'_>,
    ) -> anyhow::Result<()> {
        // An earlier task of this partition (and its store file) goes before the new one
        // makes its own.
        self.tasks.remove(&partition);
        let mut task = FacilityTask::new(partition, self.sources, self.hold)
            .with_max_buffered(self.max_buffered);
        let checkpoint = committed.and_then(|c| c.checkpoint);
        if let Some((after, dir)) = &self.retention {
            // The store is a cache of the changelog: emptied, then rebuilt below.
            let path = dir.join(format!("facilities-{partition}.redb"));
            let store = match ColdStore::create(path) {
                Ok(store) => store,
                Err(e) => {
                    self.fail(partition, &e);
                    return Err(e.into());
                }
            };
            task = task.with_retention(*after, store);
            if let Some(w) = checkpoint.as_ref().and_then(|c| c.w) {
                task.set_restored_clock(w);
            }
        }
        let mut bad = 0u64;
        let mut failed = None;
        // Record by record (a later record of a facility replaces an earlier one), so that
        // quiet facilities go to disk without ever being held in memory all at once.
        read_partition(
            io.config,
            self.topics.changelog,
            partition,
            Offset::Beginning,
            None,
            |m| {
                let done = match m.payload().map(decode::<FacilityState>) {
                    Some(Ok(state)) => task.restore_facility(state),
                    Some(Err(_)) => {
                        bad += 1;
                        Ok(())
                    }
                    None => match m.key() {
                        Some(k) => task.restore_delete(String::from_utf8_lossy(k).as_ref()),
                        None => Ok(()),
                    },
                };
                match done {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                }
            },
        )?;
        if let Some(e) = failed.map_or_else(|| task.finish_restore().err(), Some) {
            self.fail(partition, &e);
            return Err(e.into());
        }
        if bad > 0 {
            tracing::error!(
                partition,
                bad,
                topic = self.topics.changelog,
                "changelog records that do not decode were skipped"
            );
        }
        if let Some(c) = checkpoint {
            task.set_applied(&c.a);
        }
        tracing::info!(
            partition,
            online = task.online_facilities(),
            in_memory = task.in_memory(),
            on_disk = task.on_disk(),
            "facilities restored"
        );
        self.tasks.insert(partition, task);
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.tasks.remove(&partition);
    }

    fn on_message(&mut self, m: &BorrowedMessage<'_>, now: i64, out: &mut Vec<Out>) {
        let Some(payload) = m.payload() else {
            return self.dead_letter(m, "missing_value", "session event without a value", out);
        };
        let event = match decode::<SessionEvent>(payload) {
            Ok(e) => e,
            Err(e) => return self.dead_letter(m, e.code(), &e.to_string(), out),
        };
        let partition = m.partition();
        if self.defect.is_some() {
            // The stage stops: nothing more of it is taken.
            return;
        }
        let Some(task) = self.tasks.get_mut(&partition) else {
            return;
        };
        let mut emitter = Emitter {
            topics: &self.topics,
            status_header: self.status_header,
            partition,
            out,
            counts: &mut self.counts,
            latencies: &mut self.latencies,
        };
        match task.on_event(m.offset(), event, now, &mut emitter) {
            Ok(_) => {}
            Err(EventError::UnknownSource(message)) => {
                self.dead_letter(m, "unknown_source", &message, out)
            }
            Err(EventError::Store(e)) => self.fail(partition, e),
        }
    }

    fn on_eof(&mut self, _partition: i32) {}

    fn on_tick(&mut self, _clock: &Clock<'_>, _out: &mut Vec<Out>) {}

    fn before_commit(&mut self, _now: i64, out: &mut Vec<Out>) {
        let mut failed = None;
        for (p, task) in self.tasks.iter_mut() {
            let mut emitter = Emitter {
                topics: &self.topics,
                status_header: self.status_header,
                partition: *p,
                out,
                counts: &mut self.counts,
                latencies: &mut self.latencies,
            };
            task.flush_changelog(&mut emitter);
            // Changelog written first: a facility moves to disk with its last state.
            if let Err(e) = task.retire_quiet() {
                failed.get_or_insert((*p, e));
            }
        }
        if let Some((p, e)) = failed {
            self.fail(p, e);
        }
    }

    fn defect(&self) -> Option<&str> {
        self.defect.as_deref()
    }

    fn commit_point(&self, partition: i32, next_offset: i64) -> (i64, Option<Checkpoint>) {
        match self.tasks.get(&partition) {
            Some(t) => (
                t.commit_offset(next_offset),
                Some(Checkpoint {
                    a: t.applied().to_vec(),
                    w: Some(t.clock()).filter(|&w| w > i64::MIN),
                }),
            ),
            None => (next_offset, None),
        }
    }

    fn next_wakeup(&self, _clock: &Clock<'_>) -> Option<i64> {
        None
    }

    fn commits_when_idle(&self) -> bool {
        false
    }

    fn backlogged(&self) -> bool {
        false
    }

    fn urgent(&self) -> bool {
        !self.latencies.is_empty()
    }

    fn held_back(&self) -> Option<String> {
        let (partition, (source, watermark, from)) = self
            .tasks
            .iter()
            .filter_map(|(p, t)| t.spilling().map(|s| (*p, s)))
            .min_by_key(|(p, _)| *p)?;
        let behind = if watermark == i64::MIN {
            "has sent no watermark yet".to_string()
        } else {
            format!(
                "is {} s behind the clock",
                (presence_core::now_ms() - watermark) / 1000
            )
        };
        Some(format!(
            "stage 2 partition {partition} holds processor.max_buffered_events = {} session events and reads the rest again later from offset {from}: heartbeats partition {source} {behind} (its stage-1 owner is slow, stalled or gone; see presence_consumer_lag{{stage=\"sessions\"}})",
            self.max_buffered
        ))
    }

    fn take_seeks(&mut self) -> Vec<(i32, i64)> {
        for t in self.tasks.values_mut() {
            self.spilled += std::mem::take(&mut t.spilled);
        }
        self.tasks
            .iter_mut()
            .filter_map(|(p, t)| t.take_seek().map(|o| (*p, o)))
            .collect()
    }

    fn publish(&mut self, metrics: &Metrics) {
        if tracing::enabled!(tracing::Level::DEBUG)
            && self.last_spread_log.elapsed() > std::time::Duration::from_secs(1)
        {
            self.last_spread_log = std::time::Instant::now();
            for (p, t) in &self.tasks {
                if let Some((source, low, high)) = t.watermark_spread() {
                    tracing::debug!(
                        partition = p,
                        buffered = t.buffered(),
                        slowest_source = source,
                        behind_fastest_ms = high.saturating_sub(low),
                        "stage 2 buffer and the source holding it back"
                    );
                }
            }
        }
        self.counts.publish(metrics);
        metrics
            .spilled_events
            .inc_by(std::mem::take(&mut self.spilled));
        for l in self.latencies.drain(..) {
            metrics.transition_latency.observe(l.max(0.0));
        }
        metrics.online_facilities.set(
            self.tasks
                .values()
                .map(|t| t.online_facilities() as i64)
                .sum(),
        );
        metrics
            .buffered_events
            .set(self.tasks.values().map(|t| t.buffered() as i64).sum());
        metrics
            .facilities
            .with_label_values(&["memory"])
            .set(self.tasks.values().map(|t| t.in_memory() as i64).sum());
        metrics
            .facilities
            .with_label_values(&["disk"])
            .set(self.tasks.values().map(|t| t.on_disk() as i64).sum());
    }
}
