//! The processor's metrics, in one place. Hot paths count into plain integers
//! ([`Counts`]) and publish here once per transaction.

use presence_core::metrics::{
    counter, counter_vec, gauge, gauge_vec, histogram, histogram_vec, ConsumerLag, LATENCY_BUCKETS,
};
use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub heartbeats: IntCounterVec,
    pub open_sessions: IntGauge,
    pub online_facilities: IntGauge,
    pub transitions: IntCounterVec,
    pub dead_letters: IntCounterVec,
    /// `presence_consumer_lag{stage,partition}`: each stage's consumer context holds a
    /// [`ConsumerLag`] over it.
    pub consumer_lag: IntGaugeVec,
    pub commit_seconds: HistogramVec,
    /// `presence_transaction_step_seconds{stage,step}`: where a commit's time goes.
    pub commit_step_seconds: HistogramVec,
    pub aborts: IntCounterVec,
    /// Kafka clients thrown away and built again after librdkafka declared them fatal.
    pub client_rebuilds: IntCounterVec,
    /// Kafka clients a stage watchdog replaced (see `watchdog.rs`).
    pub watchdog: IntCounterVec,
    /// Rebalances in which the group took partitions away without a revoke (the member was
    /// dropped, say frozen past its session timeout): nothing of them was committed.
    pub partitions_lost: IntCounterVec,
    /// `presence_takeover_fences_total{stage,outcome}`: departed owners of partitions taken
    /// over whose transactional id was fenced (`crate::takeover`), or could not be.
    pub takeover_fences: IntCounterVec,
    pub restore_seconds: HistogramVec,
    pub restored_records: IntCounterVec,
    /// `presence_snapshot_restores_total{outcome}`: stage-1 shutdown snapshots found at
    /// restore, used or not (`crate::snapshot`).
    pub snapshot_restores: IntCounterVec,
    /// `presence_session_marks_total`: quiet sessions' marks written (`crate::window`).
    pub session_marks: IntCounter,
    pub expiry_delay: Histogram,
    pub transition_latency: Histogram,
    pub buffered_events: IntGauge,
    pub spilled_events: IntCounter,
    /// `presence_stage2_facilities{place}`: facilities held by stage 2, in `memory` or on
    /// `disk` (quiet for longer than `processor.facility_retention`).
    pub facilities: IntGaugeVec,
    pub state_bytes: IntGauge,
}

impl Metrics {
    pub fn new(r: &Registry) -> Metrics {
        Metrics {
            heartbeats: counter_vec(
                r,
                "presence_heartbeats_processed_total",
                "Heartbeats applied by stage 1, by what they did",
                &["outcome"],
            ),
            open_sessions: gauge(
                r,
                "presence_open_sessions",
                "Open sessions held by this instance",
            ),
            online_facilities: gauge(
                r,
                "presence_online_facilities",
                "ONLINE facilities held by this instance",
            ),
            transitions: counter_vec(
                r,
                "presence_transitions_emitted_total",
                "Records written to facility-status",
                &["status"],
            ),
            dead_letters: counter_vec(
                r,
                "presence_dead_letters_total",
                "Records sent to the dead-letter topic",
                &["error_code"],
            ),
            consumer_lag: ConsumerLag::register(r),
            commit_seconds: histogram_vec(
                r,
                "presence_transaction_commit_seconds",
                "Time to send offsets and commit one transaction",
                &["stage"],
                LATENCY_BUCKETS,
            ),
            commit_step_seconds: histogram_vec(
                r,
                "presence_transaction_step_seconds",
                "Time of each step of a transaction's commit: offsets (send_offsets_to_transaction: AddOffsetsToTxn and TxnOffsetCommit), deliveries (waiting for the transaction's records to be acknowledged), commit (EndTxn)",
                &["stage", "step"],
                LATENCY_BUCKETS,
            ),
            aborts: counter_vec(
                r,
                "presence_transaction_aborts_total",
                "Transactions aborted and rewound",
                &["stage", "reason"],
            ),
            client_rebuilds: counter_vec(
                r,
                "presence_kafka_client_rebuilds_total",
                "Kafka clients rebuilt after a fatal error (fenced consumer or producer)",
                &["stage", "client"],
            ),
            partitions_lost: counter_vec(
                r,
                "presence_partitions_lost_total",
                "Rebalances in which a stage lost its partitions (dropped from the group, say frozen past its session timeout): its open transaction was aborted and it reads again from the committed offsets",
                &["stage"],
            ),
            takeover_fences: counter_vec(
                r,
                "presence_takeover_fences_total",
                "Departed owners of partitions taken over whose transactional id a restore fenced, so that their open transaction was aborted at once (outcome fenced), or could not fence (failed: their transaction ends at its timeout)",
                &["stage", "outcome"],
            ),
            watchdog: counter_vec(
                r,
                "presence_watchdog_replacements_total",
                "Kafka clients a stage watchdog replaced: a consumer without partitions while its group left some unowned, a producer whose transaction calls kept failing",
                &["stage", "client"],
            ),
            restore_seconds: histogram_vec(
                r,
                "presence_restore_seconds",
                "Time to restore one partition's state",
                &["stage"],
                LATENCY_BUCKETS,
            ),
            restored_records: counter_vec(
                r,
                "presence_restored_records_total",
                "Records read while restoring state",
                &["stage"],
            ),
            snapshot_restores: counter_vec(
                r,
                "presence_snapshot_restores_total",
                "Stage-1 shutdown snapshots found when a partition restored: used (its changelog was not read), stale (the partition moved on since it was written) or damaged; the last two restore from the changelog",
                &["outcome"],
            ),
            session_marks: counter(
                r,
                "presence_session_marks_total",
                "Marks of quiet sessions written to the sessions changelog (a session without a beat for most of a restore's newest step, renewed every half step): a restore re-reads only the beats after a mark for its session",
            ),
            expiry_delay: histogram(
                r,
                "presence_expiry_delay_seconds",
                "Wall-clock delay past a session's deadline when it expired (caught-up partitions)",
                LATENCY_BUCKETS,
            ),
            transition_latency: histogram(
                r,
                "presence_transition_latency_seconds",
                "From a transition's event time to its emission to facility-status",
                LATENCY_BUCKETS,
            ),
            buffered_events: gauge(
                r,
                "presence_stage2_buffered_events",
                "Session events waiting for every source's watermark",
            ),
            spilled_events: counter(
                r,
                "presence_stage2_spilled_events_total",
                "Session events let go from memory while a source's watermark stood still (processor.max_buffered_events), read again from Kafka later",
            ),
            facilities: gauge_vec(
                r,
                "presence_stage2_facilities",
                "Facilities held by stage 2 on this instance: in memory, or on disk (quiet for longer than processor.facility_retention)",
                &["place"],
            ),
            state_bytes: gauge(
                r,
                "presence_session_state_bytes",
                "Heap held by stage-1 session state",
            ),
        }
    }
}

/// Per-transaction tallies, published by [`Counts::publish`].
#[derive(Default)]
pub struct Counts {
    pub heartbeats: [u64; 6],
    pub dead_letters: Vec<&'static str>,
    pub online: u64,
    pub offline: u64,
    pub marks: u64,
}

pub const OUTCOMES: [&str; 6] = [
    "opened",
    "extended",
    "moved",
    "closed",
    "ignored_end",
    "ignored_late",
];

impl Counts {
    pub fn publish(&mut self, m: &Metrics) {
        for (i, n) in self.heartbeats.iter_mut().enumerate() {
            if *n > 0 {
                m.heartbeats.with_label_values(&[OUTCOMES[i]]).inc_by(*n);
                *n = 0;
            }
        }
        for code in self.dead_letters.drain(..) {
            m.dead_letters.with_label_values(&[code]).inc();
        }
        if self.online > 0 {
            m.transitions
                .with_label_values(&["ONLINE"])
                .inc_by(std::mem::take(&mut self.online));
        }
        if self.marks > 0 {
            m.session_marks.inc_by(std::mem::take(&mut self.marks));
        }
        if self.offline > 0 {
            m.transitions
                .with_label_values(&["OFFLINE"])
                .inc_by(std::mem::take(&mut self.offline));
        }
    }
}
