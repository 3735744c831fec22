//! Stage 2's Kafka edge: session events in; `facility-status` and the facilities changelog
//! out. The rules live in [`crate::facilities`].

use std::collections::HashMap;

use presence_core::codec::{decode, encode, encode_with, Header};
use presence_core::records::{FacilityStatus, Status};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::Offset;
use serde::{Deserialize, Serialize};

use crate::facilities::{FacilityOutput, FacilityTask};
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
    /// How `facility-status` records are framed (`schema_registry.framing`).
    status_header: Header,
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
            status_header: Header::SingleObject,
        }
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
        let mut task = FacilityTask::new(partition, self.sources, self.hold)
            .with_max_buffered(self.max_buffered);
        let mut latest: HashMap<String, FacilityState> = HashMap::new();
        let mut bad = 0u64;
        read_partition(
            io.config,
            self.topics.changelog,
            partition,
            Offset::Beginning,
            None,
            |m| match m.payload().map(decode::<FacilityState>) {
                Some(Ok(state)) => {
                    latest.insert(state.facility_id.clone(), state);
                }
                Some(Err(_)) => bad += 1,
                None => {
                    if let Some(k) = m.key() {
                        latest.remove(String::from_utf8_lossy(k).as_ref());
                    }
                }
            },
        )?;
        if bad > 0 {
            tracing::error!(
                partition,
                bad,
                topic = self.topics.changelog,
                "changelog records that do not decode were skipped"
            );
        }
        for state in latest.into_values() {
            task.restore_facility(state);
        }
        if let Some(c) = committed.and_then(|c| c.checkpoint) {
            task.set_applied(&c.a);
        }
        tracing::info!(
            partition,
            online = task.online_facilities(),
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
        if let Err(message) = task.on_event(m.offset(), event, now, &mut emitter) {
            self.dead_letter(m, "unknown_source", &message, out);
        }
    }

    fn on_eof(&mut self, _partition: i32) {}

    fn on_tick(&mut self, _clock: &Clock<'_>, _out: &mut Vec<Out>) {}

    fn before_commit(&mut self, _now: i64, out: &mut Vec<Out>) {
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
        }
    }

    fn commit_point(&self, partition: i32, next_offset: i64) -> (i64, Option<Checkpoint>) {
        match self.tasks.get(&partition) {
            Some(t) => (
                t.commit_offset(next_offset),
                Some(Checkpoint {
                    a: t.applied().to_vec(),
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
    }
}
