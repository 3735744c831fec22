//! One stage member's state between its consumer and its producer: the stage, the open
//! transaction, the positions of the assigned partitions, and the steps that tie them
//! together — commit (outputs, changelog and offsets in one transaction), restore (a
//! partition from its changelog and committed offset) and rewind (every partition back to
//! what was committed, after an abort). Shared by the run loop and the rebalance callback
//! behind one mutex; both run on the stage's thread.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::metrics::Metrics;
use crate::stage::{encode_checkpoint, Committed, Out, RestoreIo, Stage};
use crate::takeover::{Stamped, Successor};
use crate::txn::Txn;
use presence_core::metrics::ConsumerLag;
use presence_core::telemetry::{Health, Pulse};

/// How long reading the committed offsets may block. Short: while the group coordinator
/// moves or loads (a broker restart), the loop should go round (serving rebalance events)
/// and retry rather than block here.
pub const COMMITTED_OFFSETS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a seek back to the committed offsets may block.
pub const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// Seeks every partition of `tpl` and fails unless each one's seek began. librdkafka
/// reports a partition it could not seek (its fetcher stopping or not started, a partition
/// it does not know) in that partition's entry of the returned list, not as the call's
/// error, and such a partition goes on from wherever its fetcher was: after an abort, past
/// the records of the aborted transaction, whose effects the restored state no longer has.
/// The error names each partition and its reason.
pub fn seek_each<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: TopicPartitionList,
) -> anyhow::Result<()> {
    let result = consumer
        .seek_partitions(tpl, SEEK_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("cannot seek: {e}"))?;
    let failed: Vec<String> = result
        .elements()
        .iter()
        .filter_map(|e| {
            let err = e.error().err()?;
            Some(format!(
                "{}/{} to {:?}: {err}",
                e.topic(),
                e.partition(),
                e.offset()
            ))
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cannot seek {}", failed.join(", "))
    }
}

pub struct Member<S: Stage> {
    pub stage: S,
    pub txn: Txn,
    pub restore_config: ClientConfig,
    pub consumed_since_commit: bool,
    /// Next offset per assigned partition (committed, or one past the last consumed).
    pub positions: HashMap<i32, i64>,
    pub assigned: BTreeSet<i32>,
    /// Assigned partitions paused by the runner to read in step (`Stage::to_pause`).
    pub paused: BTreeSet<i32>,
    /// Records read from each assigned partition since it was assigned or last resumed.
    pub read: HashMap<i32, u64>,
    pub needs_rewind: bool,
    /// A defect that stops the stage (a checkpoint that cannot be stored): the run loop
    /// ends the stage with it.
    pub defect: Option<String>,
    pub metrics: Metrics,
    pub health: Health,
    pub health_name: &'static str,
    pub topic: &'static str,
    pub pulse: std::sync::Arc<Pulse>,
    /// This instance, stamped on every checkpoint, and the fence of a departed one.
    pub successor: Successor,
}

impl<S: Stage> Member<S> {
    /// Hands the stage's outputs to the open transaction; a failed produce schedules a rewind.
    pub fn send(&mut self, out: &mut Vec<Out>) {
        if self.txn.send(out).is_err() {
            self.consumed_since_commit = false;
            self.needs_rewind = true;
        }
    }

    pub fn abort(&mut self, reason: &'static str) {
        self.txn.abort(reason);
        self.consumed_since_commit = false;
    }

    /// Commits the open transaction; on failure aborts it and schedules a rewind.
    pub fn finish_transaction<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let idle_commit_due = self.stage.commits_when_idle() && !self.assigned.is_empty();
        if !(self.txn.is_open() || self.consumed_since_commit || idle_commit_due) {
            return;
        }
        if self.needs_rewind {
            self.abort("rewind_pending");
            return;
        }
        let started = Instant::now();
        let mut out = Vec::new();
        self.stage.before_commit(presence_core::now_ms(), &mut out);
        if let Some(defect) = self.stage.defect() {
            // The stage's state is not what its outputs say: nothing of it may commit.
            tracing::error!(stage = S::NAME, error = %defect, "aborting and stopping the stage");
            self.defect = Some(defect.to_string());
            self.abort("defect");
            self.needs_rewind = true;
            return;
        }
        self.send(&mut out);
        if self.needs_rewind {
            return;
        }
        if !self.txn.begin() {
            // The producer is being replaced: what was consumed is read again after.
            self.consumed_since_commit = false;
            self.needs_rewind = true;
            return;
        }
        let tpl = match self.offsets() {
            Ok(tpl) => tpl,
            Err(e) => {
                // Nothing of this transaction may commit without its checkpoint.
                tracing::error!(stage = S::NAME, error = %e, "cannot build the offsets to commit; aborting and stopping the stage");
                self.abort("defect");
                self.needs_rewind = true;
                self.defect = Some(e.to_string());
                return;
            }
        };
        let before_commit = started.elapsed();
        let group = consumer.group_metadata();
        match self.txn.commit(&tpl, group) {
            Ok(()) => {
                self.consumed_since_commit = false;
                self.metrics
                    .commit_seconds
                    .with_label_values(&[S::NAME])
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(
                    stage = S::NAME,
                    ms = started.elapsed().as_millis() as u64,
                    before_ms = before_commit.as_millis() as u64,
                    partitions = tpl.count(),
                    "committed"
                );
                self.stage.publish(&self.metrics);
                if self.stage.held_back().is_none() {
                    self.health.set_ready(self.health_name);
                }
            }
            Err(failure) => {
                self.txn.failed(failure);
                self.consumed_since_commit = false;
                self.needs_rewind = true;
            }
        }
    }

    /// The offsets to commit, each with the stage's checkpoint as its metadata. Errors are
    /// defects (a checkpoint that does not serialise or is too long, an offset that
    /// librdkafka refuses), never dropped: an offset committed without its checkpoint would
    /// restore the stage wrongly.
    fn offsets(&self) -> anyhow::Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for &p in &self.assigned {
            let Some(&next) = self.positions.get(&p) else {
                continue;
            };
            let (offset, checkpoint) = self.stage.commit_point(p, next);
            let metadata = match checkpoint {
                Some(checkpoint) => encode_checkpoint(
                    S::NAME,
                    &Stamped {
                        checkpoint,
                        instance: Some(self.successor.instance.clone()),
                    },
                )?,
                None => String::new(),
            };
            tpl.add_partition_offset(self.topic, p, Offset::Offset(offset))
                .map_err(|e| {
                    anyhow::anyhow!("offset {offset} of {}/{p} is refused: {e}", self.topic)
                })?;
            let mut e = tpl.find_partition(self.topic, p).ok_or_else(|| {
                anyhow::anyhow!("{}/{p} is missing from the offsets just built", self.topic)
            })?;
            e.set_metadata(metadata);
        }
        Ok(tpl)
    }

    /// Restores `partitions` from their changelogs and committed offsets; returns where
    /// each one starts.
    pub fn restore<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partitions: &[i32],
    ) -> anyhow::Result<Vec<(i32, Offset)>> {
        // First, a departed owner's open transaction aborted: it holds the committed offsets
        // (its pending offset commit), the changelogs and stage 2's input at its first
        // record until it ends.
        let fenced = self.successor.take_over(self.topic, partitions);
        for (outcome, n) in [
            ("fenced", fenced.fenced.len()),
            ("failed", fenced.failed.len()),
        ] {
            self.metrics
                .takeover_fences
                .with_label_values(&[S::NAME, outcome])
                .inc_by(n as u64);
        }
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(self.topic, p);
        }
        let committed = consumer.committed_offsets(tpl, COMMITTED_OFFSETS_TIMEOUT)?;
        let io = RestoreIo {
            config: &self.restore_config,
        };
        let mut load = Vec::new();
        let mut starts = Vec::new();
        for e in committed.elements() {
            let p = e.partition();
            // A partition whose committed offset could not be read (its coordinator moving,
            // an offset commit still in a transaction after librdkafka's retries) must not
            // count as "nothing committed": that restarts it from the beginning with a fresh
            // sequence, whose events stage 2 takes for ones it has already applied.
            if let Err(err) = e.error() {
                anyhow::bail!(
                    "cannot read the committed offset of {}/{p}: {err}; restoring again",
                    self.topic
                );
            }
            let c = match e.offset() {
                Offset::Offset(offset) => Some(Committed {
                    offset,
                    checkpoint: match serde_json::from_str::<Stamped<S::Checkpoint>>(e.metadata()) {
                        Ok(stamped) => Some(stamped.checkpoint),
                        Err(err) => {
                            tracing::warn!(stage = S::NAME, partition = p, error = %err, "committed offset without a presence checkpoint; the stage starts its clock afresh");
                            None
                        }
                    },
                }),
                _ => None,
            };
            let start = c
                .as_ref()
                .map_or(Offset::Beginning, |c| Offset::Offset(c.offset));
            load.push((p, c));
            starts.push((p, start));
        }
        let took = {
            // The restore has a progress check of its own (a minute without records).
            let _hold = self.pulse.hold();
            self.stage.restore_partitions(load, &io)?
        };
        for (p, took) in took {
            let seconds = took.as_secs_f64();
            self.metrics
                .restore_seconds
                .with_label_values(&[S::NAME])
                .observe(seconds);
            let start = starts.iter().find(|(q, _)| *q == p).map(|(_, s)| s);
            tracing::info!(
                stage = S::NAME,
                partition = p,
                ?start,
                seconds,
                "partition restored"
            );
        }
        for (p, start) in &starts {
            if let Offset::Offset(o) = *start {
                self.positions.insert(*p, o);
            }
        }
        Ok(starts)
    }

    /// After an abort: every assigned partition back to its committed state.
    pub fn rewind<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> anyhow::Result<()> {
        let partitions: Vec<i32> = self.assigned.iter().copied().collect();
        for &p in &partitions {
            self.stage.revoke(p);
            self.positions.remove(&p);
        }
        let starts = self.restore(consumer, &partitions)?;
        let mut tpl = TopicPartitionList::new();
        for (p, start) in starts {
            tpl.add_partition_offset(self.topic, p, start)?;
        }
        if tpl.count() > 0 {
            seek_each(consumer, tpl)?;
        }
        self.needs_rewind = false;
        tracing::info!(
            stage = S::NAME,
            ?partitions,
            "rewound to the committed offsets"
        );
        Ok(())
    }

    /// Drops `partition` (revoked or lost): its state, position and lag series.
    pub fn drop_partition(&mut self, partition: i32) {
        self.stage.revoke(partition);
        self.assigned.remove(&partition);
        self.paused.remove(&partition);
        self.read.remove(&partition);
        self.positions.remove(&partition);
        ConsumerLag::for_stage(&self.metrics.consumer_lag, S::NAME).forget(partition);
    }
}
