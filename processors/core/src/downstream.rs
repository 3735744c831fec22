//! The consumer loop the notifier and the sink share: read `facility-status`
//! (read_committed) in batches, hand each batch to a writer whose effects are idempotent
//! (newer `seq` wins, history unique per facility and `seq`), and commit the offsets only
//! after the writer took the batch. A store that is unreachable ([`WriteError::Retry`]:
//! refused or reset connections, timeouts) is retried with backoff, for as long as it
//! takes, with the same batch: health and metrics say so meanwhile, nothing is skipped.
//! A crash between write and commit replays the batch, which the writer absorbs.
//!
//! Reading and writing overlap ([`pipeline`]): the next batch is fetched and decoded while
//! the current one is written, so that the store does not idle while the consumer decodes,
//! nor the consumer while the store writes. Batches are still written one at a time, in the
//! order read, and each commits its offsets only after its own write; the batch read ahead
//! is dropped, uncommitted, on a rewind or shutdown.
//!
//! A record that does not decode, or that the store refuses for what it holds
//! ([`WriteError::Refused`], [`POISON_ATTEMPTS`] times in a row, found by writing a refused
//! batch one record at a time), goes to the dead-letter topic with the processor's headers
//! (`presence.error.code`, `presence.error.message`, `presence.source.*`) and is counted in
//! `presence_<role>_dead_letters_total{error_code}`, before its offset is committed; the
//! rest of its partition flows on.
//!
//! Kafka: readiness has a `kafka` component that is 503 while the consumer reaches no
//! broker ([`BrokerWatch`]). A consumer that librdkafka declares fatal ends the loop with an
//! error, so that the process exits non-zero and its supervisor starts a fresh one.
//!
//! A store that lost everything (Redis restarted without persistence, a database restored
//! empty) says so with [`WriteError::Rewind`]: the loop then reads its partitions again
//! from the beginning. `facility-status` is compacted, so that is every facility's newest
//! transition, and the seq-guarded writes make the replay harmless.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntCounterVec, Registry};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;

use crate::codec::decode_framed;
use crate::config::Config;
use crate::kafka::{
    dead_letter_headers, downstream_consumer_config, idempotent_producer_config, BrokerWatch,
};
use crate::metrics::{self, ConsumerLag};
use crate::records::FacilityStatus;
use crate::telemetry::Health;
use crate::Shutdown;
use events::{
    BatchWritten, DeadLetterCause, DeadLettered, StoreEmptied, StoreRecovered, StoreRefused,
    StoreUnavailable,
};

mod events;

/// One transition and where it came from.
#[derive(Debug, Clone)]
pub struct Received {
    pub status: FacilityStatus,
    pub partition: i32,
    pub offset: i64,
    /// The record as read, for the dead-letter topic.
    pub raw: Raw,
}

/// A record's key, bytes and timestamp as read.
#[derive(Debug, Clone)]
pub struct Raw {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub timestamp: Option<i64>,
}

/// Where a batch goes. Applying the same batch twice, or an older transition after a newer
/// one, must leave the newest state: the loop replays after failures and crashes.
pub trait Writer: Send {
    /// The dependency's name in health, metrics and logs (`redis`, `postgres`).
    const DEPENDENCY: &'static str;
    fn write<'a>(
        &'a mut self,
        batch: &'a [Received],
    ) -> impl Future<Output = Result<(), WriteError>> + Send + 'a;

    /// Gets ready for the first write (connects, migrates) while the consumer joins its
    /// group and fetches, instead of after the first batch arrived. Whatever goes wrong here
    /// is met again, and handled, by the first write.
    fn prepare(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The store is unreachable, busy or timed out: retry the batch with backoff, forever.
    /// Anything the writer cannot attribute to the records themselves belongs here.
    #[error("{0}")]
    Retry(String),
    /// The store refuses what the records hold (a value out of its range, a constraint):
    /// the same records will fail the same way. `code` is a metric label and header, from
    /// a small fixed set per writer.
    #[error("{code}: {message}")]
    Refused { code: &'static str, message: String },
    /// The store holds none of what was written before: read everything again.
    #[error("the store is empty: {0}")]
    Rewind(String),
}

/// Batching of the loop.
#[derive(Debug, Clone)]
pub struct Batching {
    pub max_records: usize,
    /// How long a partial batch waits for more records.
    pub linger: Duration,
}

/// The loop's metrics, `presence_<role>_*`, and the consumer's lag
/// (`presence_consumer_lag{stage="<role>"}`). Store health is `presence_dependency_up`
/// (the readiness component named after the store). What is counted is also logged, in one
/// place: [`events`].
#[derive(Clone)]
pub struct Metrics {
    pub applied: IntCounter,
    pub batch_seconds: Histogram,
    pub errors: IntCounter,
    pub dead_letters: IntCounterVec,
    /// Wall time from the processor's emission to this writer taking the transition.
    pub delivery_seconds: Histogram,
    pub rewinds: IntCounter,
    pub lag: ConsumerLag,
}

impl Metrics {
    /// Metric names start with `presence_<role>_`.
    pub fn new(registry: &Registry, role: &'static str) -> Metrics {
        let name = |thing: &str| format!("presence_{role}_{thing}");
        Metrics {
            applied: metrics::counter(
                registry,
                &name("transitions_total"),
                "Transitions written (replays included)",
            ),
            batch_seconds: metrics::histogram(
                registry,
                &name("batch_seconds"),
                "Time to write one batch",
                &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
            ),
            errors: metrics::counter(
                registry,
                &name("write_errors_total"),
                "Failed batch writes (each retried)",
            ),
            dead_letters: metrics::counter_vec(
                registry,
                &name("dead_letters_total"),
                "facility-status records sent to the dead-letter topic: undecodable, or refused by the store POISON_ATTEMPTS times",
                &["error_code"],
            ),
            delivery_seconds: metrics::histogram(
                registry,
                &name("delivery_seconds"),
                "From the processor's emission to this write",
                &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0],
            ),
            rewinds: metrics::counter(
                registry,
                &name("rewinds_total"),
                "Re-reads of facility-status from the beginning after the store lost its data",
            ),
            lag: ConsumerLag::for_stage(&ConsumerLag::register(registry), role),
        }
    }
}

/// The consumer's context: broker readiness and consumer lag from librdkafka's statistics;
/// a revoked partition's lag series goes with it.
struct DownstreamContext {
    watch: BrokerWatch,
    lag: ConsumerLag,
}

impl ClientContext for DownstreamContext {
    fn stats(&self, statistics: Statistics) {
        self.watch.on_stats(&statistics);
        self.lag.on_stats(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.watch.error(error, reason);
    }
}

impl ConsumerContext for DownstreamContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            for e in tpl.elements() {
                self.lag.forget(e.partition());
            }
        }
    }
}

/// A whole downstream process: `/metrics`, `/healthz` and `/readyz` on `ops_listen`, and
/// [`run`] with metrics named `presence_<role>_*`, until `shutdown`. `registry` may already
/// hold the process's other metrics, and `health` its other readiness components (the sink's
/// open-sessions follower), so that one `/metrics` and one `/readyz` serve them all.
#[allow(clippy::too_many_arguments)]
pub async fn serve<W: Writer>(
    registry: Registry,
    health: Health,
    config: &Config,
    role: &'static str,
    group_id: &str,
    ops_listen: std::net::SocketAddr,
    batching: Batching,
    writer: W,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let metrics = Metrics::new(&registry, role);
    let (addr, server) =
        crate::telemetry::serve_ops(ops_listen, registry, health.clone(), shutdown.clone()).await?;
    tracing::info!(%addr, role, "metrics and health");
    let result = run(
        config,
        role,
        group_id,
        batching,
        writer,
        metrics,
        health,
        shutdown.clone(),
    )
    .await;
    shutdown.trigger();
    let _ = server.await;
    result
}

/// Consumes `facility-status` as group `group_id` into `writer` until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn run<W: Writer>(
    config: &Config,
    role: &'static str,
    group_id: &str,
    batching: Batching,
    mut writer: W,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let topic = config.topics.facility_status.as_str();
    let watch = BrokerWatch::new(&health, "kafka", &config.kafka.brokers);
    let context = DownstreamContext {
        watch,
        lag: metrics.lag.clone(),
    };
    let consumer: StreamConsumer<DownstreamContext> =
        downstream_consumer_config(&config.kafka, role, group_id).create_with_context(context)?;
    consumer.subscribe(&[topic])?;
    // Transitions in the `confluent` framing: registry ids resolved once each.
    let ids = crate::registry::IdCache::new(&config.schema_registry)?;
    // The group join goes on in librdkafka meanwhile.
    let subject = crate::registry::value_subject(topic);
    tokio::join!(ids.prewarm::<FacilityStatus>(&subject), writer.prepare());
    health.register(W::DEPENDENCY);
    health.set_ready(W::DEPENDENCY);
    tracing::info!(
        topic,
        group_id,
        store = W::DEPENDENCY,
        "consuming transitions"
    );

    let mut source = Source {
        consumer: &consumer,
        topic,
        batching: &batching,
        ids: &ids,
        shutdown: &shutdown,
    };
    let mut apply = Apply {
        consumer: &consumer,
        topic,
        dead_letter_topic: &config.topics.dead_letters,
        writer: &mut writer,
        dead_letters: DeadLetters::new(config, role)?,
        metrics: &metrics,
        health: &health,
        shutdown: &shutdown,
        undecodable_handled: BTreeMap::new(),
        refused_handled: BTreeMap::new(),
    };
    loop {
        match pipeline(&mut source, &mut apply).await? {
            Ended::Stopped => return Ok(()),
            Ended::Rewind(why) => {
                // The batch read ahead, if any, is gone with the pipeline: everything is
                // read again from the beginning.
                let assignment = consumer.assignment()?;
                StoreEmptied {
                    store: W::DEPENDENCY,
                    why: &why,
                    partitions: assignment.count(),
                }
                .emit(&metrics);
                for e in assignment.elements() {
                    consumer.seek(
                        e.topic(),
                        e.partition(),
                        rdkafka::Offset::Beginning,
                        Duration::from_secs(10),
                    )?;
                }
            }
        }
    }
}

/// How a [`pipeline`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Shutdown: what was not committed is replayed by whoever consumes next.
    Stopped,
    /// The store lost its data: read everything again (the caller seeks).
    Rewind(String),
}

/// The reading half of the loop: batches as read and decoded, in order.
trait ReadBatches {
    type Batch: Send;
    /// The next batch; `None` on shutdown.
    fn read(&mut self) -> impl Future<Output = anyhow::Result<Option<Self::Batch>>> + Send;
}

/// The writing half: writes a batch (retrying as long as it takes) and then commits its
/// offsets. `None`: done, go on; otherwise the pipeline ends.
trait ApplyBatches<B> {
    fn apply(&mut self, batch: B) -> impl Future<Output = anyhow::Result<Option<Ended>>> + Send;
}

/// Reads the next batch while the current one is applied, so that the store does not wait
/// for the consumer to fetch and decode, nor the consumer for the store. Batches are applied
/// one at a time, in the order read; each commits its offsets only after its own write, so
/// offsets are committed in order and never past a batch that is not written (the batch
/// read ahead is not committed before it is applied itself). At most two batches are held:
/// the one being applied and the one read ahead.
///
/// When applying ends the pipeline (shutdown, rewind), the batch read ahead is dropped
/// uncommitted, and a read in progress with it: after a rewind everything is read again, and
/// after a shutdown whoever consumes next reads it. A read that fails (a fatal consumer
/// error) or sees shutdown while a batch is applied lets that batch finish and commit first.
async fn pipeline<R: ReadBatches>(
    source: &mut R,
    apply: &mut impl ApplyBatches<R::Batch>,
) -> anyhow::Result<Ended> {
    let Some(mut next) = source.read().await? else {
        return Ok(Ended::Stopped);
    };
    loop {
        let mut applying = std::pin::pin!(apply.apply(next));
        let mut reading = std::pin::pin!(source.read());
        let mut read_ahead = None;
        let applied = loop {
            tokio::select! {
                biased;
                applied = &mut applying => break applied,
                read = &mut reading, if read_ahead.is_none() => read_ahead = Some(read),
            }
        };
        if let Some(ended) = applied? {
            return Ok(ended);
        }
        let read = match read_ahead {
            Some(read) => read,
            None => reading.await,
        };
        next = match read? {
            Some(batch) => batch,
            None => return Ok(Ended::Stopped),
        };
    }
}

/// A batch as read: the transitions that decode, in the order read; the records that do
/// not (for the dead-letter topic); and per partition the offset after the batch,
/// committed once the batch is written.
struct ReadBatch {
    decoded: Vec<Received>,
    undecodable: Vec<Undecodable>,
    next_offsets: BTreeMap<i32, i64>,
}

struct Undecodable {
    partition: i32,
    offset: i64,
    raw: Raw,
    code: &'static str,
    message: String,
}

/// Reads `facility-status` in batches of up to `max_records`, a partial one after `linger`.
struct Source<'a> {
    consumer: &'a StreamConsumer<DownstreamContext>,
    topic: &'a str,
    batching: &'a Batching,
    ids: &'a crate::registry::IdCache,
    shutdown: &'a Shutdown,
}

impl ReadBatches for Source<'_> {
    type Batch = ReadBatch;

    async fn read(&mut self) -> anyhow::Result<Option<ReadBatch>> {
        let (consumer, topic, ids, shutdown) = (self.consumer, self.topic, self.ids, self.shutdown);
        let first = tokio::select! {
            m = consumer.recv() => m,
            _ = shutdown.wait() => return Ok(None),
        };
        let deadline = tokio::time::Instant::now() + self.batching.linger;
        let mut messages = vec![first];
        while messages.len() < self.batching.max_records {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        let mut batch = ReadBatch {
            decoded: Vec::with_capacity(messages.len()),
            undecodable: Vec::new(),
            next_offsets: BTreeMap::new(),
        };
        for m in messages {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        // librdkafka never recovers a client it declared fatal: exit, and let
                        // the supervisor start a fresh one (offsets are committed only after
                        // the store took a batch, so nothing is lost).
                        anyhow::bail!("the {topic} consumer hit a fatal Kafka error ({code:?}: {reason}); exiting so that the process is restarted with a new client");
                    }
                    tracing::warn!(error = %e, "Kafka consumer error; librdkafka retries by itself");
                    continue;
                }
            };
            let (partition, offset) = (m.partition(), m.offset());
            batch.next_offsets.insert(partition, offset + 1);
            let raw = Raw {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                timestamp: m.timestamp().to_millis(),
            };
            // Until the registry answers, nothing moves: the offset is not committed past
            // a record that could not be read yet.
            while let Err(e) = ids.ensure(&raw.payload).await {
                tracing::warn!(partition, offset, error = %e, "cannot resolve the schema id of a transition; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = shutdown.wait() => return Ok(None),
                }
            }
            match decode_framed::<FacilityStatus>(&raw.payload, ids) {
                Ok(status) => batch.decoded.push(Received {
                    status,
                    partition,
                    offset,
                    raw,
                }),
                Err(e) => batch.undecodable.push(Undecodable {
                    partition,
                    offset,
                    raw,
                    code: e.code(),
                    message: e.to_string(),
                }),
            }
        }
        Ok(Some(batch))
    }
}

/// Dead-letters a batch's undecodable records, writes the rest (one at a time when the
/// store keeps refusing the batch, dead-lettering each refused record), then commits.
struct Apply<'a, W> {
    consumer: &'a StreamConsumer<DownstreamContext>,
    topic: &'a str,
    dead_letter_topic: &'a str,
    writer: &'a mut W,
    dead_letters: DeadLetters,
    metrics: &'a Metrics,
    health: &'a Health,
    shutdown: &'a Shutdown,
    /// Per partition, the offset below which every record's dead letter (if it needed one)
    /// was already sent by this process: a rewind re-reads those records, and must not send
    /// their dead letters again. (Across a crash before the offset commit a dead letter can
    /// still be sent twice: the dead-letter topic is at-least-once, like every consumer here.)
    undecodable_handled: BTreeMap<i32, i64>,
    refused_handled: BTreeMap<i32, i64>,
}

fn handled(seen: &BTreeMap<i32, i64>, partition: i32, offset: i64) -> bool {
    seen.get(&partition).is_some_and(|&to| offset < to)
}

fn mark(seen: &mut BTreeMap<i32, i64>, partition: i32, offset: i64) {
    let to = seen.entry(partition).or_insert(0);
    *to = (*to).max(offset + 1);
}

impl<W: Writer> ApplyBatches<ReadBatch> for Apply<'_, W> {
    async fn apply(&mut self, read: ReadBatch) -> anyhow::Result<Option<Ended>> {
        let (topic, metrics, health, shutdown) =
            (self.topic, self.metrics, self.health, self.shutdown);
        for u in &read.undecodable {
            if handled(&self.undecodable_handled, u.partition, u.offset) {
                tracing::debug!(partition = u.partition, offset = u.offset, error = %u.message, "undecodable transition read again after a rewind; its dead letter was sent already");
                continue;
            }
            let from = (topic, u.partition, u.offset);
            if !self
                .dead_letters
                .send(from, &u.raw, u.code, &u.message, shutdown)
                .await
            {
                return Ok(Some(Ended::Stopped));
            }
            DeadLettered {
                cause: DeadLetterCause::Undecodable,
                code: u.code,
                message: &u.message,
                partition: u.partition,
                offset: u.offset,
                dead_letter_topic: self.dead_letter_topic,
            }
            .emit(metrics);
        }
        for (&partition, &next) in &read.next_offsets {
            mark(&mut self.undecodable_handled, partition, next - 1);
        }
        let batch = read.decoded;
        if !batch.is_empty() {
            let mut outcome =
                write_until_done(self.writer, &batch, metrics, health, shutdown).await;
            if let Done::Refused { code, message } = &outcome {
                // Some record of the batch is refused by the store, again and again: write
                // them one by one, and dead-letter each one that is refused on its own.
                tracing::warn!(store = W::DEPENDENCY, code, error = %message, records = batch.len(), "the store keeps refusing a batch; writing its records one at a time to find the refused ones");
                outcome = Done::Written;
                for r in &batch {
                    match write_until_done(
                        self.writer,
                        std::slice::from_ref(r),
                        metrics,
                        health,
                        shutdown,
                    )
                    .await
                    {
                        Done::Written => {}
                        Done::Refused { code, .. }
                            if handled(&self.refused_handled, r.partition, r.offset) =>
                        {
                            tracing::debug!(partition = r.partition, offset = r.offset, code, "refused transition read again after a rewind; its dead letter was sent already");
                        }
                        Done::Refused { code, message } => {
                            let from = (topic, r.partition, r.offset);
                            if !self
                                .dead_letters
                                .send(from, &r.raw, code, &message, shutdown)
                                .await
                            {
                                return Ok(Some(Ended::Stopped));
                            }
                            DeadLettered {
                                cause: DeadLetterCause::Refused {
                                    store: W::DEPENDENCY,
                                    facility: &r.status.facility_id,
                                    seq: r.status.seq,
                                },
                                code,
                                message: &message,
                                partition: r.partition,
                                offset: r.offset,
                                dead_letter_topic: self.dead_letter_topic,
                            }
                            .emit(metrics);
                        }
                        other => {
                            outcome = other;
                            break;
                        }
                    }
                    mark(&mut self.refused_handled, r.partition, r.offset);
                }
            }
            match outcome {
                Done::Written | Done::Refused { .. } => {}
                Done::Stopped => return Ok(Some(Ended::Stopped)),
                Done::Rewind(why) => return Ok(Some(Ended::Rewind(why))),
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &read.next_offsets {
            tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(*o))?;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            // Harmless: the batch is written; a replay after a rebalance is absorbed.
            tracing::debug!(error = %e, "offset commit failed");
        }
        Ok(None)
    }
}

/// How many times in a row the store may refuse a batch (or, once it is split, one record)
/// for what it holds ([`WriteError::Refused`]) before the record goes to the dead-letter
/// topic. With the retry backoff (0.1 s doubling) that is 1.5 s of refusals. Outages
/// ([`WriteError::Retry`]) never count.
pub const POISON_ATTEMPTS: u32 = 5;

/// The dead-letter topic, for records that cannot be decoded or that the store refuses.
/// The producer is rebuilt if librdkafka declares it fatal; a send that fails is retried
/// with backoff until it succeeds (the source offset is not committed meanwhile).
struct DeadLetters {
    topic: String,
    producer: FutureProducer,
    config: rdkafka::ClientConfig,
}

impl DeadLetters {
    fn new(config: &Config, role: &str) -> anyhow::Result<DeadLetters> {
        let client_config = idempotent_producer_config(&config.kafka, role);
        Ok(DeadLetters {
            topic: config.topics.dead_letters.clone(),
            producer: client_config.create()?,
            config: client_config,
        })
    }

    /// Sends `r`, read `from` (topic, partition, offset), with headers saying why (`code`,
    /// `message`) and where from. Returns false on shutdown before it was sent.
    async fn send(
        &mut self,
        from: (&str, i32, i64),
        r: &Raw,
        code: &'static str,
        message: &str,
        shutdown: &Shutdown,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Some((fatal, reason)) = self.producer.client().fatal_error() {
                tracing::warn!(error = ?fatal, reason, "the dead-letter producer hit a fatal error; building a new one");
                match self.config.create() {
                    Ok(p) => self.producer = p,
                    Err(e) => tracing::error!(error = %e, "cannot build the dead-letter producer"),
                }
            }
            let headers = dead_letter_headers(code, message, from.0, from.1, from.2, r.timestamp);
            let mut record = FutureRecord::to(&self.topic)
                .payload(&r.payload)
                .headers(headers);
            if let Some(k) = &r.key {
                record = record.key(k);
            }
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => return true,
                Err((e, _)) => {
                    tracing::warn!(topic = %self.topic, error = %e, retry_in = ?backoff, "cannot write to the dead-letter topic; retrying (offsets are not committed past the record)");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait() => return false,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

enum Done {
    Written,
    /// Shutdown: not committed, replayed by whoever consumes next.
    Stopped,
    Rewind(String),
    /// Refused [`POISON_ATTEMPTS`] times in a row; the last refusal.
    Refused {
        code: &'static str,
        message: String,
    },
}

/// Retries `batch` with backoff until it is written, the store asks for a rewind, refuses
/// it [`POISON_ATTEMPTS`] times in a row, or shutdown.
async fn write_until_done<W: Writer>(
    writer: &mut W,
    batch: &[Received],
    metrics: &Metrics,
    health: &Health,
    shutdown: &Shutdown,
) -> Done {
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    let mut refusals = 0u32;
    loop {
        let started = Instant::now();
        match writer.write(batch).await {
            Ok(()) => {
                let emitted_at: Vec<i64> = batch.iter().map(|r| r.status.emitted_at).collect();
                BatchWritten {
                    records: batch.len(),
                    elapsed: started.elapsed(),
                    emitted_at: &emitted_at,
                    now_ms: crate::now_ms(),
                }
                .emit(metrics);
                if failures > 0 {
                    StoreRecovered {
                        store: W::DEPENDENCY,
                        failures,
                    }
                    .emit(health);
                }
                return Done::Written;
            }
            Err(WriteError::Rewind(why)) => return Done::Rewind(why),
            Err(WriteError::Refused { code, message }) => {
                refusals += 1;
                let last = refusals >= POISON_ATTEMPTS;
                StoreRefused {
                    store: W::DEPENDENCY,
                    code,
                    message: &message,
                    refusals,
                    records: batch.len(),
                    retry_in: (!last).then_some(backoff),
                }
                .emit(metrics);
                if last {
                    return Done::Refused { code, message };
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return Done::Stopped,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(WriteError::Retry(e)) => {
                failures += 1;
                StoreUnavailable {
                    store: W::DEPENDENCY,
                    error: &e,
                    failures,
                    retry_in: backoff,
                }
                .emit(metrics, health);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return Done::Stopped,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::sync::watch;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Read(u32),
        WriteStarted(u32),
        Committed(u32),
    }

    type Log = Arc<Mutex<Vec<Event>>>;

    fn log(log: &Log, e: Event) {
        log.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    fn events(log: &Log) -> Vec<Event> {
        log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Batches (numbered from 0) as scripted, then `None` (shutdown); counts its reads.
    struct Script {
        reads: std::vec::IntoIter<Result<u32, &'static str>>,
        log: Log,
        count: watch::Sender<u32>,
    }

    impl ReadBatches for Script {
        type Batch = u32;

        async fn read(&mut self) -> anyhow::Result<Option<u32>> {
            let next = self.reads.next();
            self.count.send_modify(|n| *n += 1);
            match next {
                Some(Ok(b)) => {
                    log(&self.log, Event::Read(b));
                    Ok(Some(b))
                }
                Some(Err(e)) => Err(anyhow::anyhow!(e)),
                None => Ok(None),
            }
        }
    }

    /// "Writes" a batch only once the next read has happened (so it fails unless reading
    /// goes on while it writes), then commits, or ends the pipeline at `end_at`.
    struct Store {
        log: Log,
        reads: watch::Receiver<u32>,
        end_at: Option<(u32, Ended)>,
    }

    impl ApplyBatches<u32> for Store {
        async fn apply(&mut self, batch: u32) -> anyhow::Result<Option<Ended>> {
            log(&self.log, Event::WriteStarted(batch));
            // Batch b is read number b + 1; the read after it is number b + 2.
            let read_on = tokio::time::timeout(
                Duration::from_secs(10),
                self.reads.wait_for(|&n| n > batch + 1),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            assert!(
                read_on,
                "the read after batch {batch} did not happen while it was written"
            );
            if self.end_at.as_ref().is_some_and(|(at, _)| *at == batch) {
                return Ok(self.end_at.take().map(|(_, ended)| ended));
            }
            log(&self.log, Event::Committed(batch));
            Ok(None)
        }
    }

    fn stages(
        script: Vec<Result<u32, &'static str>>,
        end_at: Option<(u32, Ended)>,
    ) -> (Script, Store, Log) {
        let events = Log::default();
        let (count, reads) = watch::channel(0);
        let source = Script {
            reads: script.into_iter(),
            log: events.clone(),
            count,
        };
        let store = Store {
            log: events.clone(),
            reads,
            end_at,
        };
        (source, store, events)
    }

    #[tokio::test]
    async fn the_next_batch_is_read_while_one_is_written_and_commits_follow_writes_in_order() {
        let (mut source, mut store, log) = stages((0..4).map(Ok).collect(), None);
        let ended = pipeline(&mut source, &mut store).await;
        assert_eq!(ended.ok(), Some(Ended::Stopped));
        use Event::*;
        assert_eq!(
            events(&log),
            [
                Read(0),
                WriteStarted(0),
                Read(1),
                Committed(0),
                WriteStarted(1),
                Read(2),
                Committed(1),
                WriteStarted(2),
                Read(3),
                Committed(2),
                WriteStarted(3),
                Committed(3),
            ]
        );
    }

    #[tokio::test]
    async fn a_rewind_drops_the_batch_read_ahead_uncommitted() {
        let (mut source, mut store, log) = stages(
            (0..6).map(Ok).collect(),
            Some((2, Ended::Rewind("emptied".into()))),
        );
        let ended = pipeline(&mut source, &mut store).await;
        assert_eq!(ended.ok(), Some(Ended::Rewind("emptied".into())));
        let log = events(&log);
        assert!(
            log.contains(&Event::Read(3)),
            "batch 3 was read ahead: {log:?}"
        );
        let applied: Vec<&Event> = log
            .iter()
            .filter(|e| matches!(e, Event::Committed(_) | Event::WriteStarted(_)))
            .collect();
        assert_eq!(
            applied,
            [
                &Event::WriteStarted(0),
                &Event::Committed(0),
                &Event::WriteStarted(1),
                &Event::Committed(1),
                &Event::WriteStarted(2),
            ],
            "nothing after the rewinding batch is written or committed"
        );
    }

    #[tokio::test]
    async fn a_failed_read_lets_the_batch_being_written_commit_first() {
        let (mut source, mut store, log) =
            stages(vec![Ok(0), Ok(1), Err("fatal consumer error")], None);
        let ended = pipeline(&mut source, &mut store).await;
        assert!(
            ended
                .as_ref()
                .is_err_and(|e| e.to_string() == "fatal consumer error"),
            "{ended:?}"
        );
        let log = events(&log);
        assert_eq!(log.last(), Some(&Event::Committed(1)), "{log:?}");
    }

    #[tokio::test]
    async fn a_stopping_write_ends_the_pipeline_without_committing() {
        let (mut source, mut store, log) =
            stages((0..3).map(Ok).collect(), Some((0, Ended::Stopped)));
        let ended = pipeline(&mut source, &mut store).await;
        assert_eq!(ended.ok(), Some(Ended::Stopped));
        assert!(!events(&log)
            .iter()
            .any(|e| matches!(e, Event::Committed(_))));
    }
}
