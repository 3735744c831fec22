//! The processor's metrics, in one place. Hot paths count into plain integers
//! ([`Counts`]) and publish here once per transaction.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub heartbeats: IntCounterVec,
    pub open_sessions: IntGauge,
    pub online_facilities: IntGauge,
    pub transitions: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub commit_seconds: HistogramVec,
    pub aborts: IntCounterVec,
    /// Kafka clients thrown away and built again after librdkafka declared them fatal.
    pub client_rebuilds: IntCounterVec,
    /// Clients the stage watchdogs replaced (a consumer that lost its partitions for good,
    /// a producer whose transaction calls kept failing).
    pub watchdog: IntCounterVec,
    pub restore_seconds: HistogramVec,
    pub restored_records: IntCounterVec,
    pub expiry_delay: Histogram,
    pub transition_latency: Histogram,
    pub buffered_events: IntGauge,
    pub state_bytes: IntGauge,
}

fn buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let m = Metrics {
            heartbeats: IntCounterVec::new(
                Opts::new("presence_heartbeats_processed_total", "Heartbeats applied by stage 1, by what they did"),
                &["outcome"],
            )
            .expect("metric"),
            open_sessions: IntGauge::new("presence_open_sessions", "Open sessions held by this instance").expect("metric"),
            online_facilities: IntGauge::new("presence_online_facilities", "ONLINE facilities held by this instance").expect("metric"),
            transitions: IntCounterVec::new(Opts::new("presence_transitions_emitted_total", "Records written to facility-status"), &["status"])
                .expect("metric"),
            dead_letters: IntCounterVec::new(Opts::new("presence_dead_letters_total", "Records sent to the dead-letter topic"), &["error_code"])
                .expect("metric"),
            consumer_lag: IntGaugeVec::new(Opts::new("presence_consumer_lag", "Records not consumed yet, per input partition"), &["stage", "partition"])
                .expect("metric"),
            commit_seconds: HistogramVec::new(
                HistogramOpts::new("presence_transaction_commit_seconds", "Time to send offsets and commit one transaction").buckets(buckets()),
                &["stage"],
            )
            .expect("metric"),
            aborts: IntCounterVec::new(Opts::new("presence_transaction_aborts_total", "Transactions aborted and rewound"), &["stage", "reason"])
                .expect("metric"),
            client_rebuilds: IntCounterVec::new(Opts::new("presence_kafka_client_rebuilds_total", "Kafka clients rebuilt after a fatal error (fenced consumer or producer)"), &["stage", "client"])
                .expect("metric"),
            watchdog: IntCounterVec::new(Opts::new("presence_watchdog_replacements_total", "Kafka clients a stage watchdog replaced: a consumer without partitions while its group left some unowned, a producer whose transaction calls kept failing"), &["stage", "client"])
                .expect("metric"),
            restore_seconds: HistogramVec::new(
                HistogramOpts::new("presence_restore_seconds", "Time to restore one partition's state").buckets(buckets()),
                &["stage"],
            )
            .expect("metric"),
            restored_records: IntCounterVec::new(Opts::new("presence_restored_records_total", "Records read while restoring state"), &["stage"])
                .expect("metric"),
            expiry_delay: Histogram::with_opts(
                HistogramOpts::new("presence_expiry_delay_seconds", "Wall-clock delay past a session's deadline when it expired (caught-up partitions)")
                    .buckets(buckets()),
            )
            .expect("metric"),
            transition_latency: Histogram::with_opts(
                HistogramOpts::new("presence_transition_latency_seconds", "From a transition's event time to its emission to facility-status")
                    .buckets(buckets()),
            )
            .expect("metric"),
            buffered_events: IntGauge::new("presence_stage2_buffered_events", "Session events waiting for every source's watermark").expect("metric"),
            state_bytes: IntGauge::new("presence_session_state_bytes", "Heap held by stage-1 session state").expect("metric"),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.heartbeats.clone()),
            Box::new(m.open_sessions.clone()),
            Box::new(m.online_facilities.clone()),
            Box::new(m.transitions.clone()),
            Box::new(m.dead_letters.clone()),
            Box::new(m.consumer_lag.clone()),
            Box::new(m.commit_seconds.clone()),
            Box::new(m.aborts.clone()),
            Box::new(m.client_rebuilds.clone()),
            Box::new(m.watchdog.clone()),
            Box::new(m.restore_seconds.clone()),
            Box::new(m.restored_records.clone()),
            Box::new(m.expiry_delay.clone()),
            Box::new(m.transition_latency.clone()),
            Box::new(m.buffered_events.clone()),
            Box::new(m.state_bytes.clone()),
        ];
        for c in collectors {
            // Only fails for a duplicate registration, which cannot happen with a fresh registry.
            let _ = registry.register(c);
        }
        m
    }
}

/// Per-transaction tallies, published by [`Counts::publish`].
#[derive(Default)]
pub struct Counts {
    pub heartbeats: [u64; 6],
    pub dead_letters: Vec<&'static str>,
    pub online: u64,
    pub offline: u64,
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
        if self.offline > 0 {
            m.transitions
                .with_label_values(&["OFFLINE"])
                .inc_by(std::mem::take(&mut self.offline));
        }
    }
}
