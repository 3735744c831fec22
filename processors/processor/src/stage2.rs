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
use crate::stage::{Committed, Out, RestoreIo, Stage};

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

/// Stored with each committed transitions offset. The last seq applied per source used to
/// be here (`a`), one number per heartbeats partition: with hundreds of partitions that
/// outgrows what the broker keeps with an offset (`offset.metadata.max.bytes`, 4096). It
/// is now a record of the partition's changelog ([`APPLIED_KEY`]), written in the same
/// transaction as the offset, and the checkpoint only says so (`c`), whatever the
/// partition count. `a` is still read, for offsets committed before.
#[derive(Serialize, Deserialize, Default)]
pub struct Checkpoint {
    /// Per source partition, the last seq applied (checkpoints written before `c`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub a: Vec<i64>,
    /// The applied seqs are the changelog's [`APPLIED_KEY`] record.
    #[serde(default)]
    pub c: bool,
}

/// Key of the changelog record holding a partition's last applied seq per source. It starts
/// with a NUL byte, which no facility id has.
pub const APPLIED_KEY: &[u8] = b"\0presence.applied";

/// The applied seqs as a changelog value: a version byte, then each seq as 8 bytes,
/// big-endian (80 KB for 10,000 partitions, far below a record's limit).
pub fn encode_applied(applied: &[i64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 8 * applied.len());
    v.push(1u8);
    for a in applied {
        v.extend_from_slice(&a.to_be_bytes());
    }
    v
}

pub fn decode_applied(bytes: &[u8]) -> Result<Vec<i64>, String> {
    match bytes.split_first() {
        Some((1, rest)) if rest.len() % 8 == 0 => Ok(rest
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                i64::from_be_bytes(b)
            })
            .collect()),
        Some((1, rest)) => Err(format!(
            "{} bytes after the version: not whole seqs",
            rest.len()
        )),
        Some((v, _)) => Err(format!("unknown version {v}")),
        None => Err("empty".into()),
    }
}

pub struct FacilitiesStage {
    topics: Topics,
    sources: usize,
    hold: i64,
    tasks: HashMap<i32, FacilityTask>,
    /// Per partition, the applied seqs last written to the changelog.
    applied_written: HashMap<i32, Vec<i64>>,
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
            tasks: HashMap::new(),
            applied_written: HashMap::new(),
            counts: Counts::default(),
            latencies: Vec::new(),
            status_header: Header::SingleObject,
        }
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
        let mut task = FacilityTask::new(partition, self.sources, self.hold);
        let mut latest: HashMap<String, FacilityState> = HashMap::new();
        let mut bad = 0u64;
        let mut applied: Option<Vec<i64>> = None;
        let mut bad_applied: Option<String> = None;
        read_partition(
            io.config,
            self.topics.changelog,
            partition,
            Offset::Beginning,
            None,
            |m| match m.payload().map(decode::<FacilityState>) {
                _ if m.key() == Some(APPLIED_KEY) => match m.payload().map(decode_applied) {
                    Some(Ok(a)) => applied = Some(a),
                    Some(Err(e)) => bad_applied = Some(e),
                    None => applied = None,
                },
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
        if let Some(e) = bad_applied {
            // Restoring with other seqs would apply events twice or never: stop here.
            anyhow::bail!(
                "{}/{partition}: the applied-seqs record does not decode ({e})",
                self.topics.changelog
            );
        }
        for state in latest.into_values() {
            task.restore_facility(state);
        }
        let mut in_changelog = false;
        match (committed.and_then(|c| c.checkpoint), applied) {
            (Some(c), Some(a)) if c.c => {
                task.set_applied(&a);
                in_changelog = true;
            }
            (Some(c), None) if c.c => anyhow::bail!(
                "{}/{partition}: the committed checkpoint says the applied seqs are in the changelog, and they are not (was the changelog deleted?)",
                self.topics.changelog
            ),
            // Committed before the seqs moved to the changelog.
            (Some(c), _) => task.set_applied(&c.a),
            // Nothing committed: nothing was applied.
            (None, _) => {}
        }
        if in_changelog {
            self.applied_written
                .insert(partition, task.applied().to_vec());
        } else {
            // The first commit writes them, whatever it applied.
            self.applied_written.remove(&partition);
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
        self.applied_written.remove(&partition);
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

    fn on_tick(&mut self, _now: i64, _out: &mut Vec<Out>) {}

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
            // The applied seqs commit with the offsets (see `Checkpoint`), when they moved.
            let applied = task.applied();
            if self.applied_written.get(p).map(Vec::as_slice) != Some(applied) {
                out.push(Out::record(
                    self.topics.changelog,
                    Some(*p),
                    Some(APPLIED_KEY.to_vec()),
                    Some(encode_applied(applied)),
                ));
                self.applied_written.insert(*p, applied.to_vec());
            }
        }
    }

    fn commit_point(&self, partition: i32, next_offset: i64) -> (i64, Option<Checkpoint>) {
        match self.tasks.get(&partition) {
            Some(t) => (
                t.commit_offset(next_offset),
                Some(Checkpoint {
                    a: Vec::new(),
                    c: true,
                }),
            ),
            None => (next_offset, None),
        }
    }

    fn next_wakeup(&self) -> Option<i64> {
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

    fn publish(&mut self, metrics: &Metrics) {
        self.counts.publish(metrics);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::encode_checkpoint;

    /// At the largest heartbeats partition count the configuration allows (10,000), the
    /// checkpoint stored with an offset stays a few bytes, and the applied seqs round-trip
    /// through their changelog record.
    #[test]
    fn the_checkpoint_is_small_at_the_maximum_partition_count() {
        let applied: Vec<i64> = (0..10_000).map(|i| i64::MAX - i).collect();
        let metadata = encode_checkpoint(
            "facilities",
            &Checkpoint {
                a: Vec::new(),
                c: true,
            },
        )
        .unwrap();
        assert_eq!(metadata, r#"{"c":true}"#);
        let before = encode_checkpoint(
            "facilities",
            &Checkpoint {
                a: applied.clone(),
                c: false,
            },
        );
        assert!(before.is_err(), "the old form would not fit");
        let record = encode_applied(&applied);
        assert_eq!(record.len(), 1 + 8 * 10_000);
        assert_eq!(decode_applied(&record).unwrap(), applied);
    }

    #[test]
    fn old_checkpoints_still_read_and_damaged_applied_records_are_errors() {
        let old: Checkpoint = serde_json::from_str(r#"{"a":[3,4]}"#).unwrap();
        assert_eq!((old.a, old.c), (vec![3, 4], false));
        assert!(decode_applied(&[]).is_err());
        assert!(decode_applied(&[2, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        assert!(decode_applied(&[1, 0, 0]).is_err());
        assert_eq!(decode_applied(&[1]).unwrap(), Vec::<i64>::new());
    }
}
