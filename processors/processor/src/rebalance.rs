//! The stage consumer's context: the rebalance callback (partitions restored before they
//! are fetched; revoked ones committed or, when lost, aborted) and the statistics it reads
//! (lag, broker reachability, the group state the assignment watchdog reports).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use presence_core::kafka::{log_client_error, BrokerWatch};
use presence_core::metrics::ConsumerLag;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;

use crate::member::Member;
use crate::runner::partition_list;
use crate::stage::Stage;

/// The consumer group handler's state as librdkafka's last statistics showed it (for the
/// assignment watchdog's messages).
#[derive(Debug, Clone, Default)]
pub struct GroupState {
    pub state: String,
    pub join_state: String,
    pub assignment_size: i32,
}

pub struct StageContext<S: Stage> {
    pub shared: Arc<Mutex<Member<S>>>,
    /// This stage's `presence_consumer_lag` series: only assigned partitions have one.
    pub lag: ConsumerLag,
    /// Shared with the producer: either client's live connection keeps `<stage>.kafka` ready.
    pub brokers: BrokerWatch,
    pub group: Arc<Mutex<GroupState>>,
    /// Set when the run loop has let this consumer go (it closes on a thread of its own):
    /// from then on its callbacks leave the member alone, which the next consumer owns.
    pub retired: AtomicBool,
}

impl<S: Stage> StageContext<S> {
    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: Stage> ClientContext for StageContext<S> {
    fn error(&self, error: KafkaError, reason: &str) {
        // Connection errors show on readiness (the producer's watch); librdkafka reconnects
        // by itself.
        if !BrokerWatch::is_connection_error(&error) {
            log_client_error(S::NAME, error, reason);
        }
    }

    fn stats(&self, statistics: Statistics) {
        if self.is_retired() {
            return;
        }
        self.brokers.on_stats(&statistics);
        if let Some(cgrp) = &statistics.cgrp {
            *lock(&self.group) = GroupState {
                state: cgrp.state.clone(),
                join_state: cgrp.join_state.clone(),
                assignment_size: cgrp.assignment_size,
            };
        }
        self.lag.on_stats(&statistics);
    }
}

impl<S: Stage> ConsumerContext for StageContext<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        if self.is_retired() {
            // Closing: give everything up, touch nothing of the member.
            if err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                let _ = consumer.incremental_unassign(tpl);
            }
            return;
        }
        let mut g = lock(&self.shared);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Nothing may be in flight while partitions restore: a long restore must not
                // hold a transaction open.
                g.finish_transaction(consumer);
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(
                    stage = S::NAME,
                    ?partitions,
                    "partitions assigned; restoring state"
                );
                match g.restore(consumer, &partitions) {
                    Ok(starts) => {
                        for (p, start) in starts {
                            if let Err(e) = tpl.set_partition_offset(g.topic, p, start) {
                                // The partition then starts at its committed offset, which
                                // the state was restored for: the same place.
                                tracing::error!(stage = S::NAME, partition = p, error = %e, "cannot set the start offset; starting at the committed offset");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(stage = S::NAME, error = %e, "restore failed; will retry");
                        g.health
                            .set_unready(g.health_name, format!("restore failed: {e}"));
                        g.needs_rewind = true;
                    }
                }
                g.assigned.extend(partitions);
                if let Err(e) = consumer.incremental_assign(tpl) {
                    // The partitions are not ours after all: the assignment watchdog
                    // replaces the consumer if the group leaves them unowned.
                    tracing::error!(stage = S::NAME, error = %e, "incremental assign failed");
                    for e in tpl.elements() {
                        g.drop_partition(e.partition());
                    }
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                if lost {
                    // Another member may own them already: nothing of ours may commit.
                    g.metrics
                        .partitions_lost
                        .with_label_values(&[S::NAME])
                        .inc();
                    g.abort("partitions_lost");
                    g.needs_rewind = true;
                } else {
                    g.finish_transaction(consumer);
                }
                // librdkafka keeps an application's pause across an unassign: a partition
                // paused to read in step would come back paused when assigned again.
                let paused: Vec<i32> = tpl
                    .elements()
                    .iter()
                    .map(|e| e.partition())
                    .filter(|p| g.paused.contains(p))
                    .collect();
                if !paused.is_empty() {
                    if let Err(e) = consumer.resume(&partition_list(g.topic, &paused)) {
                        tracing::warn!(stage = S::NAME, error = %e, "cannot resume revoked partitions paused to read in step");
                    }
                }
                for e in tpl.elements() {
                    g.drop_partition(e.partition());
                }
                tracing::info!(stage = S::NAME, lost, partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "partitions revoked");
                if let Err(e) = consumer.incremental_unassign(tpl) {
                    tracing::error!(stage = S::NAME, error = %e, "incremental unassign failed");
                }
            }
            other => {
                tracing::error!(stage = S::NAME, error = ?other, "rebalance error");
            }
        }
    }
}
