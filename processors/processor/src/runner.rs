//! The Kafka edge both stages share: one consumer-group member and one transactional
//! producer per stage, on a thread of their own, around a [`Stage`] that knows nothing
//! about transactions.
//!
//! Every transaction holds the stage's output records, its changelog writes and its input
//! offsets (with the stage's clock in the offset metadata), so all of them become visible
//! together or not at all. Partitions are restored (changelog, then whatever the stage
//! needs) inside the rebalance callback, before the consumer fetches them, and the consumer
//! then starts exactly at the committed offsets the state belongs to. Errors follow
//! librdkafka's transactional rules: retriable calls are retried; abortable errors abort the
//! transaction, rebuild every assigned partition's state from its changelog and seek back
//! to the committed offsets; fatal ones (a fenced producer) also rebuild the producer.
//!
//! # Broker restarts and fatal clients
//!
//! librdkafka never recovers a client it declared fatal. A static group member is fenced
//! (`FencedInstanceId`) when the coordinator takes a newer join for its
//! `group.instance.id` — after a broker restart that can be its own abandoned join — and an
//! idempotent or transactional producer can be fenced by its coordinator. The loop checks
//! both clients every time round: a fatal producer is rebuilt and the state rewound; a
//! fatal consumer is closed (the open transaction aborted, every partition dropped) and a
//! new one joins, which restores its partitions from the changelogs as on any assignment.
//! Fenced again and again within a minute (another live instance with the same
//! `processor.instance_id`), the stage gives up with an error and the process exits
//! non-zero.
//!
//! Health: readiness component `<stage>` is the stage itself (restores, rewinds, rebuilt
//! clients, failing transactions); `<stage>.kafka` is 503 while neither the consumer nor
//! the producer has a live broker connection. Liveness: the loop beats a pulse every time round, also while it waits for a
//! broker to come back; `/healthz` fails once it has not for [`STALL`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use presence_core::config::Config;
use presence_core::kafka::{base_config, consumer_config, BrokerWatch, BROKER_WATCH_INTERVAL_MS};
use presence_core::telemetry::{Health, Pulse};
use presence_core::Shutdown;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

/// Delivery reports are served by the producer's own thread, which transactional flushes,
/// commits and aborts rely on.
/// Its context reports broker reachability (readiness): the producer's thread serves it
/// even while the stage's loop is blocked in a transaction call.
type TxnProducer = ThreadedProducer<BrokerWatch>;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::metrics::Metrics;

/// A stage loop that has not gone round for this long is stuck, and `/healthz` says so.
/// Every blocking step it takes is bounded well below: transaction calls give up after
/// 30 s, a producer rebuild attempt after 30 s, and a restore (during which the check is
/// held) after a minute without records.
pub const STALL: Duration = Duration::from_secs(120);

/// Fatal consumer errors this close together mean another live instance shares this one's
/// `group.instance.id`: rebuilding would only fence it back, so the stage stops.
const FENCED_AGAIN_WITHIN: Duration = Duration::from_secs(60);
const MAX_FENCES: usize = 3;

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
pub struct Committed<C> {
    pub offset: i64,
    pub checkpoint: Option<C>,
}

/// What the stage's rebuild of a partition needs from Kafka.
pub struct RestoreIo<'a> {
    pub config: &'a ClientConfig,
}

/// A stage's logic as the runner drives it. All methods run on the runner's thread.
pub trait Stage: Send + 'static {
    /// `sessions` or `facilities`: metric label, group and transactional-id suffix.
    const NAME: &'static str;
    /// What the stage stores with each committed offset (as JSON in the offset metadata),
    /// so that it commits atomically with the offset.
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
    fn revoke(&mut self, partition: i32);
    fn on_message(&mut self, message: &BorrowedMessage<'_>, now: i64, out: &mut Vec<Out>);
    /// The partition has no more records for now.
    fn on_eof(&mut self, partition: i32);
    /// Wall-clock work (expiry on caught-up partitions).
    fn on_tick(&mut self, now: i64, out: &mut Vec<Out>);
    /// Just before a commit: watermarks, changelog flushes.
    fn before_commit(&mut self, now: i64, out: &mut Vec<Out>);
    /// The offset to commit for `partition` and the checkpoint to store with it.
    fn commit_point(&self, partition: i32, next_offset: i64) -> (i64, Option<Self::Checkpoint>);
    /// When `on_tick` next has something to do (ms since the epoch).
    fn next_wakeup(&self) -> Option<i64>;
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
    /// Publishes per-transaction tallies and gauges.
    fn publish(&mut self, metrics: &Metrics);
}

pub use presence_core::now_ms;

struct Shared<S: Stage> {
    stage: S,
    producer: TxnProducer,
    producer_config: ClientConfig,
    brokers: BrokerWatch,
    restore_config: ClientConfig,
    txn_open: bool,
    txn_started: Instant,
    consumed_since_commit: bool,
    /// Next offset per assigned partition (committed, or one past the last consumed).
    positions: HashMap<i32, i64>,
    assigned: BTreeSet<i32>,
    needs_rewind: bool,
    metrics: Metrics,
    health: Health,
    health_name: &'static str,
    topic: &'static str,
    pulse: Arc<Pulse>,
    shutdown: Shutdown,
}

struct StageContext<S: Stage> {
    shared: Arc<Mutex<Shared<S>>>,
    metrics: Metrics,
    /// Shared with the producer: either client's live connection keeps `<stage>.kafka` ready.
    brokers: BrokerWatch,
}

fn lock<S: Stage>(m: &Mutex<Shared<S>>) -> MutexGuard<'_, Shared<S>> {
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
        self.brokers.on_stats(&statistics);
        for topic in statistics.topics.values() {
            for (p, part) in &topic.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[S::NAME, &p.to_string()])
                        .set(part.consumer_lag);
                }
            }
        }
    }
}

impl<S: Stage> ConsumerContext for StageContext<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
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
                                tracing::error!(stage = S::NAME, partition = p, error = %e, "cannot set the start offset");
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
                    tracing::error!(stage = S::NAME, error = %e, "incremental assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                if lost {
                    // Another member may own them already: nothing of ours may commit.
                    g.abort("partitions_lost");
                    g.needs_rewind = true;
                } else {
                    g.finish_transaction(consumer);
                }
                for e in tpl.elements() {
                    g.stage.revoke(e.partition());
                    g.assigned.remove(&e.partition());
                    g.positions.remove(&e.partition());
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[S::NAME, &e.partition().to_string()])
                        .set(0);
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

/// librdkafka's error events, minus the end-of-partition notices we ask for on purpose.
pub fn log_client_error(stage: &str, error: KafkaError, reason: &str) {
    if matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
    {
        return;
    }
    tracing::warn!(stage, error = %error, reason, "Kafka client error");
}

/// Why a transaction step failed, in librdkafka's classes.
enum TxnFailure {
    /// Abort, rewind, go on.
    Abortable(String),
    /// The producer is unusable (fenced or fatal): rebuild it, then rewind.
    Fatal(String),
}

fn classify(e: KafkaError) -> Result<bool, TxnFailure> {
    // Ok(true): retry the same call.
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => Err(TxnFailure::Fatal(t.to_string())),
        KafkaError::Transaction(t) if t.txn_requires_abort() => {
            Err(TxnFailure::Abortable(t.to_string()))
        }
        KafkaError::Transaction(t) if t.is_retriable() => Ok(true),
        _ => Err(TxnFailure::Abortable(e.to_string())),
    }
}

impl<S: Stage> Shared<S> {
    /// How long until the open transaction (or, when none is open, the next idle one) is
    /// due: `interval` after it began, a tenth of that while the stage holds something a
    /// user waits for.
    fn until_commit(&self, interval: Duration) -> Duration {
        let interval = if self.stage.urgent() {
            interval / 10
        } else {
            interval
        };
        interval.saturating_sub(self.txn_started.elapsed())
    }

    fn begin(&mut self) {
        if self.txn_open {
            return;
        }
        match self.producer.begin_transaction() {
            Ok(()) => {
                self.txn_open = true;
                self.txn_started = Instant::now();
            }
            Err(e) => {
                tracing::error!(stage = S::NAME, error = %e, "begin_transaction failed; rebuilding the producer");
                self.rebuild_producer();
            }
        }
    }

    fn send(&mut self, out: &mut Vec<Out>) {
        if out.is_empty() {
            return;
        }
        self.begin();
        for o in out.drain(..) {
            let mut record = BaseRecord::<[u8], [u8]>::to(o.topic);
            if let Some(k) = &o.key {
                record = record.key(&k[..]);
            }
            if let Some(v) = &o.value {
                record = record.payload(&v[..]);
            }
            if let Some(p) = o.partition {
                record = record.partition(p);
            }
            if let Some(h) = o.headers {
                record = record.headers(h);
            }
            let mut record = record;
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // The local queue is full: wait for deliveries to free it.
                        record = r;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err((e, _)) => {
                        // The transaction cannot hold this record: it must not commit.
                        tracing::error!(stage = S::NAME, topic = o.topic, error = %e, "produce failed; aborting the transaction");
                        self.abort("produce_failed");
                        self.needs_rewind = true;
                        return;
                    }
                }
            }
        }
    }

    /// Commits the open transaction; on failure aborts it and schedules a rewind.
    fn finish_transaction(&mut self, consumer: &BaseConsumer<StageContext<S>>) {
        let idle_commit_due = self.stage.commits_when_idle() && !self.assigned.is_empty();
        if !(self.txn_open || self.consumed_since_commit || idle_commit_due) {
            return;
        }
        if self.needs_rewind {
            self.abort("rewind_pending");
            return;
        }
        let started = Instant::now();
        let mut out = Vec::new();
        self.stage.before_commit(now_ms(), &mut out);
        self.send(&mut out);
        if self.needs_rewind {
            return;
        }
        self.begin();
        let mut tpl = TopicPartitionList::new();
        for &p in &self.assigned {
            if let Some(&next) = self.positions.get(&p) {
                let (offset, checkpoint) = self.stage.commit_point(p, next);
                let metadata = checkpoint
                    .and_then(|c| serde_json::to_string(&c).ok())
                    .unwrap_or_default();
                if tpl
                    .add_partition_offset(self.topic, p, Offset::Offset(offset))
                    .is_ok()
                {
                    if let Some(mut e) = tpl.find_partition(self.topic, p) {
                        e.set_metadata(metadata);
                    }
                }
            }
        }
        let before_commit = started.elapsed();
        let result = self.commit_with_retries(consumer, &tpl);
        match result {
            Ok(()) => {
                self.txn_open = false;
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
                self.health.set_ready(self.health_name);
            }
            Err(TxnFailure::Abortable(reason)) => {
                tracing::warn!(stage = S::NAME, %reason, "transaction failed; aborting and rewinding to the committed offsets");
                self.abort("abortable");
                self.needs_rewind = true;
            }
            Err(TxnFailure::Fatal(reason)) => {
                tracing::error!(stage = S::NAME, %reason, "producer failed fatally (fenced?); rebuilding it and rewinding");
                self.metrics
                    .aborts
                    .with_label_values(&[S::NAME, "fatal"])
                    .inc();
                self.rebuild_producer();
                self.needs_rewind = true;
            }
        }
    }

    fn commit_with_retries(
        &mut self,
        consumer: &BaseConsumer<StageContext<S>>,
        tpl: &TopicPartitionList,
    ) -> Result<(), TxnFailure> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let timeout = Duration::from_secs(10);
        if tpl.count() > 0 {
            let cgm = consumer
                .group_metadata()
                .ok_or_else(|| TxnFailure::Abortable("no consumer group metadata".into()))?;
            self.retrying("send_offsets_to_transaction", deadline, |p| {
                p.send_offsets_to_transaction(tpl, &cgm, timeout)
            })?;
            crash_point_after_offsets();
        }
        // rdkafka's commit_transaction flushes by polling in steps of up to 100 ms, and with a
        // threaded producer the delivery reports go to the producer's own thread, so each
        // commit would wait a full step. Wait for the deliveries here instead.
        let flush_deadline = Instant::now() + timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < flush_deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        self.retrying("commit_transaction", deadline, |p| {
            p.commit_transaction(timeout)
        })
    }

    /// Runs one transaction step, repeating it while librdkafka calls its error retriable
    /// and `deadline` has not passed; other errors are classified by [`classify`].
    fn retrying(
        &mut self,
        what: &str,
        deadline: Instant,
        mut step: impl FnMut(&TxnProducer) -> rdkafka::error::KafkaResult<()>,
    ) -> Result<(), TxnFailure> {
        loop {
            match step(&self.producer) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if classify(e)? && Instant::now() < deadline {
                        self.health.set_unready(
                            self.health_name,
                            "Kafka does not answer transaction calls; retrying",
                        );
                        continue;
                    }
                    return Err(TxnFailure::Abortable(format!("{what} kept failing")));
                }
            }
        }
    }

    fn abort(&mut self, reason: &'static str) {
        if !self.txn_open {
            return;
        }
        self.metrics
            .aborts
            .with_label_values(&[S::NAME, reason])
            .inc();
        if let Err(e) = self.producer.abort_transaction(Duration::from_secs(10)) {
            tracing::error!(stage = S::NAME, error = %e, "abort_transaction failed; rebuilding the producer");
            self.rebuild_producer();
        }
        self.txn_open = false;
        self.consumed_since_commit = false;
    }

    fn rebuild_producer(&mut self) {
        self.txn_open = false;
        self.metrics
            .client_rebuilds
            .with_label_values(&[S::NAME, "producer"])
            .inc();
        loop {
            // Waiting for the broker is not being stuck; shutdown still stops the wait (the
            // old producer stays, aborted: nothing more is committed with it).
            self.pulse.beat();
            if self.shutdown.is_triggered() {
                return;
            }
            match create_producer(&self.producer_config, &self.brokers) {
                Ok(p) => {
                    self.producer = p;
                    tracing::info!(stage = S::NAME, "transactional producer rebuilt");
                    return;
                }
                Err(e) => {
                    self.health.set_unready(
                        self.health_name,
                        format!("cannot initialise the transactional producer: {e}"),
                    );
                    tracing::error!(stage = S::NAME, error = %e, "cannot initialise the transactional producer; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Restores `partitions` from their changelogs and committed offsets; returns where
    /// each one starts.
    fn restore(
        &mut self,
        consumer: &BaseConsumer<StageContext<S>>,
        partitions: &[i32],
    ) -> anyhow::Result<Vec<(i32, Offset)>> {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(self.topic, p);
        }
        // Short: while the group coordinator moves or loads (a broker restart), the loop
        // should go round (serving rebalance events) and retry rather than block here.
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        let io = RestoreIo {
            config: &self.restore_config,
        };
        let mut starts = Vec::new();
        for e in committed.elements() {
            let p = e.partition();
            let c = match e.offset() {
                Offset::Offset(offset) => Some(Committed {
                    offset,
                    checkpoint: match serde_json::from_str(e.metadata()) {
                        Ok(c) => Some(c),
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
            let started = Instant::now();
            {
                // The restore has a progress check of its own (a minute without records).
                let _hold = self.pulse.hold();
                self.stage.restore(p, c, &io)?;
            }
            self.metrics
                .restore_seconds
                .with_label_values(&[S::NAME])
                .observe(started.elapsed().as_secs_f64());
            tracing::info!(
                stage = S::NAME,
                partition = p,
                ?start,
                seconds = started.elapsed().as_secs_f64(),
                "partition restored"
            );
            if let Offset::Offset(o) = start {
                self.positions.insert(p, o);
            }
            starts.push((p, start));
        }
        Ok(starts)
    }

    /// After an abort: every assigned partition back to its committed state.
    fn rewind(&mut self, consumer: &BaseConsumer<StageContext<S>>) -> anyhow::Result<()> {
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
            consumer.seek_partitions(tpl, Duration::from_secs(10))?;
        }
        self.needs_rewind = false;
        tracing::info!(
            stage = S::NAME,
            ?partitions,
            "rewound to the committed offsets"
        );
        Ok(())
    }
}

/// Tests of exactly-once set `FAILPOINT_CRASH_AFTER_OFFSETS=N` to kill the process (as
/// kill -9 would) right after the Nth `send_offsets_to_transaction`, before the commit:
/// the worst instant for a crash. Never set in production.
fn crash_point_after_offsets() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        std::env::var("FAILPOINT_CRASH_AFTER_OFFSETS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(at) = at {
        if N.fetch_add(1, Ordering::SeqCst) + 1 == *at {
            eprintln!("FAILPOINT_CRASH_AFTER_OFFSETS={at}: aborting between send_offsets_to_transaction and commit_transaction");
            std::process::abort();
        }
    }
}

fn create_producer(config: &ClientConfig, brokers: &BrokerWatch) -> anyhow::Result<TxnProducer> {
    let producer: TxnProducer = config.create_with_context(brokers.clone())?;
    producer.init_transactions(Duration::from_secs(30))?;
    Ok(producer)
}

/// Why one consumer's run ended.
enum Ended {
    Shutdown,
    /// librdkafka declared the consumer fatal: build a new one.
    Fatal(String),
    /// A rewind failed: typically the consumer cannot get its partitions' committed offsets
    /// because its group coordinator does not answer it (after a broker restart, while the
    /// member is being fenced or rebalanced). Retrying with the same member has been seen
    /// to time out again and again; a new member finds the coordinator afresh, and its
    /// assignment restores every partition as usual.
    Rejoin(String),
}

/// Runs `stage` until `shutdown`: blocks the calling thread.
pub fn run_stage<S: Stage>(
    config: &Config,
    stage: S,
    metrics: Metrics,
    health: Health,
    health_name: &'static str,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let pc = &config.processor;
    let instance = if pc.instance_id.is_empty() {
        presence_core::kafka::hostname()
    } else {
        pc.instance_id.clone()
    };
    let group = format!("{}.{}", pc.group_id, S::NAME);
    let mut producer_config = base_config(&config.kafka, &format!("processor-{}", S::NAME));
    producer_config
        .set("transactional.id", format!("{group}.{instance}"))
        // A crashed instance's open transaction blocks read_committed readers until it times out.
        .set("transaction.timeout.ms", "10000")
        .set("linger.ms", "5")
        // Right after a commit the coordinator answers CONCURRENT_TRANSACTIONS until the
        // markers are written; librdkafka retries after retry.backoff.ms (default 100 ms),
        // which would add 100 ms to every commit.
        .set("retry.backoff.ms", "5")
        .set("retry.backoff.max.ms", "100")
        .set("compression.type", "lz4")
        // Broker reachability for readiness (BrokerWatch).
        .set("statistics.interval.ms", BROKER_WATCH_INTERVAL_MS);
    presence_core::kafka_memory::transactional_producer(&mut producer_config, &config.kafka);
    let restore_config = crate::restore::restore_config(
        &config.kafka,
        &format!("processor-{}-restore", S::NAME),
        &format!("{group}.restore"),
    );
    let topic = stage.input_topic();
    let brokers = BrokerWatch::new(
        &health,
        crate::leak(format!("{health_name}.kafka")),
        &config.kafka.brokers,
    );
    let producer = create_producer(&producer_config, &brokers).map_err(|e| {
        anyhow::anyhow!("cannot start the {} stage's transactional producer at {}: {e}; is Kafka up (make stack) and KAFKA_BROKERS right?", S::NAME, config.kafka.brokers)
    })?;
    health.register(health_name);
    let pulse = health.pulse(health_name, STALL);
    let shared = Arc::new(Mutex::new(Shared {
        stage,
        producer,
        producer_config,
        brokers,
        restore_config,
        txn_open: false,
        txn_started: Instant::now(),
        consumed_since_commit: false,
        positions: HashMap::new(),
        assigned: BTreeSet::new(),
        needs_rewind: false,
        metrics: metrics.clone(),
        health: health.clone(),
        health_name,
        topic,
        pulse: pulse.clone(),
        shutdown: shutdown.clone(),
    }));
    let mut cc = consumer_config(&config.kafka, &format!("processor-{}", S::NAME), &group);
    // Static membership: a restarted instance takes its partitions back at once instead of
    // waiting for the group to notice that its predecessor is gone.
    cc.set("group.instance.id", format!("{}.{instance}", S::NAME))
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .set("max.partition.fetch.bytes", "4194304")
        .set("fetch.max.bytes", "67108864")
        // Lag metrics, and broker reachability (with the producer's).
        .set("statistics.interval.ms", BROKER_WATCH_INTERVAL_MS)
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    presence_core::kafka_memory::stage_consumer(&mut cc, &config.kafka);
    let mut fences: Vec<Instant> = Vec::new();
    loop {
        let consumer: BaseConsumer<StageContext<S>> = cc.create_with_context(StageContext {
            shared: shared.clone(),
            metrics: metrics.clone(),
            brokers: lock(&shared).brokers.clone(),
        })?;
        consumer.subscribe(&[topic])?;
        health.set_ready(health_name);
        tracing::info!(stage = S::NAME, %group, topic, "stage running");
        let created = Instant::now();
        let reason = match consume::<S>(&consumer, &shared, config, &pulse, &shutdown) {
            Ended::Shutdown => {
                close_on_shutdown(consumer, &shared);
                return Ok(());
            }
            Ended::Fatal(reason) => {
                let now = Instant::now();
                fences.retain(|t| now.duration_since(*t) < FENCED_AGAIN_WITHIN);
                fences.push(now);
                if fences.len() >= MAX_FENCES {
                    anyhow::bail!("the {} stage's consumer was declared fatal {} times within {:?} (last: {reason}); another running instance probably has the same processor.instance_id '{instance}': give each instance its own", S::NAME, fences.len(), FENCED_AGAIN_WITHIN);
                }
                tracing::warn!(stage = S::NAME, %reason, "the consumer is unusable (librdkafka declared it fatal); closing it, then joining again with a new one and restoring from the changelogs");
                reason
            }
            Ended::Rejoin(reason) => {
                tracing::warn!(stage = S::NAME, %reason, "cannot rewind with this consumer; closing it, then joining again with a new one and restoring from the changelogs");
                reason
            }
        };
        metrics
            .client_rebuilds
            .with_label_values(&[S::NAME, "consumer"])
            .inc();
        health.set_unready(
            health_name,
            format!("replacing the Kafka consumer ({reason}); its partitions restore from the changelogs"),
        );
        {
            // Nothing of this member may commit any more: the rebalance callbacks the close
            // runs must abort, not commit.
            let mut g = lock(&shared);
            g.abort("consumer_fatal");
            g.needs_rewind = true;
        }
        drop(consumer);
        let mut g = lock(&shared);
        let left: Vec<i32> = std::mem::take(&mut g.assigned).into_iter().collect();
        for p in left {
            g.stage.revoke(p);
            metrics
                .consumer_lag
                .with_label_values(&[S::NAME, &p.to_string()])
                .set(0);
        }
        g.positions.clear();
        g.needs_rewind = false;
        drop(g);
        if created.elapsed() < Duration::from_secs(1) {
            // Never rebuild in a tight loop (the broker may still be away).
            std::thread::sleep(Duration::from_secs(1));
        }
        pulse.beat();
        if shutdown.is_triggered() {
            return Ok(());
        }
    }
}

/// The consume-process-produce loop over one consumer, until shutdown or until a client is
/// fatal. A fatal producer is rebuilt here; a fatal consumer ends the run.
fn consume<S: Stage>(
    consumer: &BaseConsumer<StageContext<S>>,
    shared: &Mutex<Shared<S>>,
    config: &Config,
    pulse: &Pulse,
    shutdown: &Shutdown,
) -> Ended {
    let base_interval = config.processor.commit_interval;
    let backlog_interval = (base_interval * 10)
        .min(Duration::from_secs(1))
        .max(base_interval);
    let mut out = Vec::new();
    while !shutdown.is_triggered() {
        pulse.beat();
        if let Some((code, reason)) = consumer.client().fatal_error() {
            return Ended::Fatal(format!("{code:?}: {reason}"));
        }
        // Replaying: long transactions for throughput. Live: `commit_interval`.
        let (commit_interval, timeout) = {
            let mut g = lock(shared);
            if let Some((code, reason)) = g.producer.client().fatal_error() {
                tracing::error!(stage = S::NAME, error = ?code, reason, "the transactional producer is unusable (librdkafka declared it fatal); rebuilding it and rewinding");
                g.health.set_unready(
                    g.health_name,
                    format!("rebuilding the transactional producer after a fatal error: {reason}"),
                );
                g.rebuild_producer();
                g.needs_rewind = true;
            }
            let commit_interval = if g.stage.backlogged() {
                backlog_interval
            } else {
                base_interval
            };
            let mut t = Duration::from_millis(50);
            if let Some(wake) = g.stage.next_wakeup() {
                t = t.min(Duration::from_millis((wake - now_ms()).clamp(0, 50) as u64));
            }
            if g.txn_open {
                t = t.min(g.until_commit(commit_interval));
            }
            (commit_interval, t)
        };
        // Drain what is ready in one burst: the clock, ticks and commit checks run once per
        // burst, not per record. Outputs are handed to the producer after every record, since
        // a rebalance inside the next poll may commit the transaction.
        let mut wait = timeout;
        for _ in 0..1024 {
            let Some(polled) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let mut g = lock(shared);
            match polled {
                Ok(m) if !g.needs_rewind => {
                    if g.assigned.contains(&m.partition()) {
                        g.begin();
                        g.stage.on_message(&m, now_ms(), &mut out);
                        g.positions.insert(m.partition(), m.offset() + 1);
                        g.consumed_since_commit = true;
                        g.send(&mut out);
                    }
                }
                Ok(_) => {}
                Err(KafkaError::PartitionEOF(p)) => g.stage.on_eof(p),
                Err(KafkaError::MessageConsumptionFatal(code)) => {
                    return Ended::Fatal(
                        consumer
                            .client()
                            .fatal_error()
                            .map_or_else(|| format!("{code:?}"), |(c, r)| format!("{c:?}: {r}")),
                    );
                }
                Err(e) => {
                    // Connection errors are on readiness (`<stage>.kafka`) already, and
                    // librdkafka retries by itself.
                    tracing::debug!(stage = S::NAME, error = %e, "consumer error");
                }
            }
            if g.txn_open && g.until_commit(commit_interval).is_zero() {
                break;
            }
        }
        let mut g = lock(shared);
        let now = now_ms();
        if !g.needs_rewind {
            g.stage.on_tick(now, &mut out);
            g.send(&mut out);
        }
        let commit_due = g.until_commit(commit_interval).is_zero();
        let due = g.txn_open && commit_due;
        let idle_due =
            !g.txn_open && g.stage.commits_when_idle() && !g.assigned.is_empty() && commit_due;
        if (due || idle_due) && !g.needs_rewind {
            if idle_due {
                g.begin();
            }
            g.finish_transaction(consumer);
        }
        if g.needs_rewind {
            g.abort("rewind");
            out.clear();
            if consumer.client().fatal_error().is_some() {
                // Rewinding needs a live consumer: build one first (next time round).
                continue;
            }
            match g.rewind(consumer) {
                Ok(()) => g.health.set_ready(g.health_name),
                Err(e) => {
                    g.health
                        .set_unready(g.health_name, format!("cannot restore state: {e}"));
                    return Ended::Rejoin(format!("rewind failed: {e}"));
                }
            }
        }
    }
    Ended::Shutdown
}

/// SIGTERM: commits the open transaction (unless a rewind is pending) and leaves.
fn close_on_shutdown<S: Stage>(consumer: BaseConsumer<StageContext<S>>, shared: &Mutex<Shared<S>>) {
    tracing::info!(
        stage = S::NAME,
        "shutting down: committing the open transaction"
    );
    {
        let mut g = lock(shared);
        if !g.needs_rewind && consumer.client().fatal_error().is_none() {
            g.finish_transaction(&consumer);
        } else {
            g.abort("shutdown");
        }
    }
    consumer.unsubscribe();
    // Let the revoke callback run (it commits nothing more: the transaction is closed).
    let _ = consumer.poll(Duration::from_millis(100));
}
