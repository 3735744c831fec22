//! The contract between a stage's logic and the runner that drives it: what a stage is
//! asked to do ([`Stage`]), what it hands back ([`Out`] records, a checkpoint per committed
//! offset), and what it gets for rebuilding a partition ([`RestoreIo`], [`Committed`]).
//! A stage knows nothing about transactions, rebalances or client rebuilds.

use std::collections::{BTreeSet, HashMap};

use rdkafka::config::ClientConfig;
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::metrics::Metrics;

pub use presence_core::now_ms;

/// What the broker keeps with a committed offset at most, in bytes: Kafka's default
/// `offset.metadata.max.bytes`. A longer checkpoint would fail every commit, so the runner
/// refuses to build one (an error naming the stage), and each stage's checkpoint is small
/// by construction (stage 2 keeps its per-source table in its changelog).
pub const OFFSET_METADATA_MAX_BYTES: usize = 4096;

/// One record of the open transaction.
pub struct Out {
    pub topic: &'static str,
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
}

impl Out {
    /// A record with no headers; `partition: None` leaves it to the key's partitioner.
    pub fn record(
        topic: &'static str,
        partition: Option<i32>,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    ) -> Out {
        Out {
            topic,
            partition,
            key,
            value,
            headers: None,
        }
    }

    /// `m` as a dead letter: original key and bytes, headers saying what and where.
    pub fn dead_letter(
        topic: &'static str,
        source_topic: &str,
        m: &BorrowedMessage<'_>,
        code: &str,
        message: &str,
    ) -> Out {
        Out {
            topic,
            partition: None,
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: Some(presence_core::kafka::dead_letter_headers(
                code,
                message,
                source_topic,
                m.partition(),
                m.offset(),
                m.timestamp().to_millis(),
            )),
        }
    }
}

/// A partition's committed offset and the stage's checkpoint stored with it (`None` when
/// the metadata is not a checkpoint of this stage).
#[derive(Clone)]
pub struct Committed<C> {
    pub offset: i64,
    pub checkpoint: Option<C>,
}

/// A partition's end offset (high watermark) as the broker says now; `None` when it does not
/// answer.
pub type EndOf<'a> = dyn Fn(&str, i32) -> Option<i64> + 'a;

/// What the stage's rebuild of a partition needs from Kafka.
pub struct RestoreIo<'a> {
    pub config: &'a ClientConfig,
}

/// The wall clock as each input partition's expiry may follow it (stage 1). Replays
/// advance time with the records; a caught-up partition follows the wall clock, except
/// that it trails it by `processor.allowed_lateness` (beats still on their way count at
/// their own time) and stands still where the brokers, or the partition's leader, went
/// away until producers have delivered what they held (`BrokerWatch`).
pub struct Clock<'a> {
    /// The wall clock as far as the partitions may follow it (ms since the epoch): the wall
    /// clock, or earlier while records fetched before it may still be unread.
    pub now: i64,
    /// The wall clock itself, for what is measured against it (how late an expiry is).
    pub wall: i64,
    lateness: i64,
    limit: &'a dyn Fn(i32) -> i64,
}

impl<'a> Clock<'a> {
    /// `limit(partition)`: how far the wall clock may go for that partition at `now`.
    pub fn new(now: i64, lateness: i64, limit: &'a dyn Fn(i32) -> i64) -> Clock<'a> {
        Clock {
            now,
            wall: now,
            lateness,
            limit,
        }
    }

    /// The wall clock is `wall`, later than `now` (the clock waits for unread records).
    pub fn with_wall(mut self, wall: i64) -> Clock<'a> {
        self.wall = wall.max(self.now);
        self
    }

    /// Where `partition`'s clock may be now.
    pub fn at(&self, partition: i32) -> i64 {
        (self.limit)(partition).min(self.now) - self.lateness
    }

    /// When (on the wall clock) `partition`'s clock reaches `t`; `None` while it is held,
    /// since a held clock moves only when the brokers come back, which nothing can wait for.
    pub fn reaches(&self, partition: i32, t: i64) -> Option<i64> {
        if (self.limit)(partition) < self.now {
            return None;
        }
        Some(t.saturating_add(self.lateness))
    }
}

/// A stage's logic as the runner drives it. All methods run on the runner's thread.
pub trait Stage: Send + 'static {
    /// `sessions` or `facilities`: metric label, group and transactional-id suffix.
    const NAME: &'static str;
    /// What the stage stores with each committed offset (as JSON in the offset metadata, at
    /// most [`OFFSET_METADATA_MAX_BYTES`]), so that it commits atomically with the offset.
    type Checkpoint: Serialize + DeserializeOwned;
    fn input_topic(&self) -> &'static str;
    /// Rebuilds `partition`'s state for consuming from `committed` (or from the beginning
    /// when nothing was committed).
    fn restore(
        &mut self,
        partition: i32,
        committed: Option<Committed<Self::Checkpoint>>,
        io: &RestoreIo<'_>,
    ) -> anyhow::Result<()>;
    /// [`Stage::restore`] of each of `partitions`; returns how long each took. Default: one
    /// after another. On a failure, the partitions restored before it stay restored.
    fn restore_partitions(
        &mut self,
        partitions: Vec<(i32, Option<Committed<Self::Checkpoint>>)>,
        io: &RestoreIo<'_>,
    ) -> anyhow::Result<Vec<(i32, std::time::Duration)>> {
        let mut took = Vec::with_capacity(partitions.len());
        for (p, committed) in partitions {
            let started = std::time::Instant::now();
            self.restore(p, committed, io)?;
            took.push((p, started.elapsed()));
        }
        Ok(took)
    }
    fn revoke(&mut self, partition: i32);
    fn on_message(&mut self, message: &BorrowedMessage<'_>, now: i64, out: &mut Vec<Out>);
    /// The partition has no more records for now.
    fn on_eof(&mut self, partition: i32);
    /// The stage stops cleanly, and its last transaction committed every assigned partition
    /// at `positions` (partition → next offset), with the checkpoints of the state it holds
    /// now. `end_of(topic, partition)` asks the broker for a partition's end offset (high
    /// watermark). Default: nothing.
    fn on_clean_stop(&mut self, _positions: &HashMap<i32, i64>, _end_of: &EndOf<'_>) {}
    /// Wall-clock work (expiry on caught-up partitions), each partition as far as `clock`
    /// lets it go.
    fn on_tick(&mut self, clock: &Clock<'_>, out: &mut Vec<Out>);
    /// Just before a commit: watermarks, changelog flushes.
    fn before_commit(&mut self, now: i64, out: &mut Vec<Out>);
    /// The offset to commit for `partition` and the checkpoint to store with it.
    fn commit_point(&self, partition: i32, next_offset: i64) -> (i64, Option<Self::Checkpoint>);
    /// When `on_tick` next has something to do (wall clock, ms since the epoch).
    fn next_wakeup(&self, clock: &Clock<'_>) -> Option<i64>;
    /// Whether to commit even when nothing was consumed (stage 1: watermarks).
    fn commits_when_idle(&self) -> bool;
    /// Whether some partition is replaying a backlog. Commits are synchronous, so while
    /// replaying the runner commits ten times less often (at most once a second): latency
    /// does not matter for records that are already late, throughput does.
    fn backlogged(&self) -> bool;
    /// Whether the open transaction holds something a user waits for (a session event, a
    /// facility transition): then it commits after a tenth of the commit interval instead
    /// of the whole interval.
    fn urgent(&self) -> bool;
    /// Partitions to hold paused so that the assigned partitions are read in step
    /// ([`crate::align`]), given those paused now and those that read what librdkafka
    /// prefetched for them since they were assigned or last resumed. Default: none.
    fn to_pause(&self, _paused: &BTreeSet<i32>, _read_a_fetch: &BTreeSet<i32>) -> BTreeSet<i32> {
        BTreeSet::new()
    }
    /// For `/readyz`: why the stage holds part of its input back, if it does (a memory
    /// bound). Default: never.
    fn held_back(&self) -> Option<String> {
        None
    }
    /// Input positions to read again: `(partition, offset)`. A stage that let records go
    /// from memory to stay within a bound asks for them here once it can take them (they
    /// are still in Kafka: nothing is lost). The runner seeks there. Default: none.
    fn take_seeks(&mut self) -> Vec<(i32, i64)> {
        Vec::new()
    }
    /// A failure that stops the stage (stage 2's facility store on a full or read-only
    /// disk): the runner aborts the open transaction and ends the stage with it, never
    /// commits past it. It stays once set. Default: never.
    fn defect(&self) -> Option<&str> {
        None
    }
    /// Publishes per-transaction tallies and gauges.
    fn publish(&mut self, metrics: &Metrics);
}

/// The offset metadata that carries `checkpoint`: compact JSON, refused (an error naming the
/// stage and the size) when it is longer than the broker keeps.
pub fn encode_checkpoint<C: Serialize>(stage: &str, checkpoint: &C) -> anyhow::Result<String> {
    let json = serde_json::to_string(checkpoint)
        .map_err(|e| anyhow::anyhow!("the {stage} stage's checkpoint does not serialise: {e}"))?;
    if json.len() > OFFSET_METADATA_MAX_BYTES {
        anyhow::bail!(
            "the {stage} stage's checkpoint is {} bytes, more than the {OFFSET_METADATA_MAX_BYTES} the broker keeps with an offset (offset.metadata.max.bytes); this is a defect of the stage",
            json.len()
        );
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_longer_than_the_broker_keeps_is_an_error() {
        let small = encode_checkpoint("facilities", &vec![1i64; 3]).unwrap();
        assert_eq!(small, "[1,1,1]");
        let e = encode_checkpoint("facilities", &vec![1_000_000i64; 1000]).unwrap_err();
        assert!(e.to_string().contains("offset.metadata.max.bytes"), "{e}");
    }
}
