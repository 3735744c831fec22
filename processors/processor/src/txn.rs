//! The transaction state machine of one stage: its transactional producer, the open
//! transaction, and librdkafka's error classes. Retriable calls are retried until
//! [`TXN_RETRY_DEADLINE`]; abortable errors abort (the caller rewinds); fatal ones (a fenced
//! producer) replace the producer. The producer watchdog replaces it too when transaction
//! calls keep failing for [`PRODUCER_FAILING_LIMIT`] — a producer that lost its broker for
//! good looks exactly like that.
//!
//! A replacement never blocks the stage's loop for long: the new producer's
//! `init_transactions` is tried for at most [`INIT_ATTEMPT_TIMEOUT`] per turn of the loop
//! ([`Txn::ready`]), and resumed on the next turn, so that the loop keeps serving its
//! consumer (rebalance events, the group session) while the broker is away. Until the new
//! producer is ready no transaction opens; the stage holds its input and rewinds after.

use std::sync::Arc;
use std::time::{Duration, Instant};

use presence_core::kafka::BrokerWatch;
use presence_core::telemetry::Health;
use presence_core::Shutdown;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::metrics::Metrics;
use crate::stage::Out;
use crate::watchdog::FailureWatch;

/// Delivery reports are served by the producer's own thread, which transactional flushes,
/// commits and aborts rely on. Its context reports broker reachability (readiness): the
/// producer's thread serves it even while the stage's loop is blocked in a transaction call.
pub type TxnProducer = ThreadedProducer<BrokerWatch>;

/// How long one transaction call (send offsets, commit, abort) may block.
pub const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a retriable transaction step is retried before the transaction is aborted.
pub const TXN_RETRY_DEADLINE: Duration = Duration::from_secs(30);
/// How long `init_transactions` may take when the stage starts (the broker must answer).
pub const INIT_TRANSACTIONS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one turn of a producer replacement may wait in `init_transactions` before the
/// loop goes round (the call is resumed next turn).
pub const INIT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Transaction calls failing without a success for this long: the producer watchdog
/// replaces the producer. Twice the retry deadline, so that one slow coordinator move
/// does not trigger it; below the stage's liveness limit (`runner::STALL`).
pub const PRODUCER_FAILING_LIMIT: Duration = Duration::from_secs(60);

/// How long `send_offsets_to_transaction` may block, whatever librdkafka does with its own
/// timeout ([`TXN_CALL_TIMEOUT`]): past this the call is left on its thread and the producer
/// is replaced. librdkafka 2.12 does not time out the call while the group coordinator is
/// away (its coordinator requests never expire: librdkafka issue #5456); seen in
/// `cli/tests/broker_restart.rs`, where a call made as the broker stopped had not returned
/// 90 s later, long after the broker was back, and the stage's loop stood still with it.
pub const SEND_OFFSETS_LIMIT: Duration = Duration::from_secs(15);

/// Runs `call` on a thread of its own and waits at most `limit` for its result: `None` if
/// it has not returned by then (the thread is left to finish or block on its own). For
/// librdkafka calls that may block past their own timeout.
pub fn within<T: Send + 'static>(
    limit: Duration,
    name: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // The receiver is gone when the caller stopped waiting: nothing to tell.
            let _ = tx.send(call());
        })
        .ok()?;
    rx.recv_timeout(limit).ok()
}

/// Why a transaction step failed, in librdkafka's classes.
pub enum TxnFailure {
    /// Abort, rewind, go on.
    Abortable(String),
    /// The producer is unusable (fenced or fatal): rebuild it, then rewind.
    Fatal(String),
}

/// Ok(true): retry the same call.
fn classify(e: KafkaError) -> Result<bool, TxnFailure> {
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => Err(TxnFailure::Fatal(t.to_string())),
        KafkaError::Transaction(t) if t.txn_requires_abort() => {
            Err(TxnFailure::Abortable(t.to_string()))
        }
        KafkaError::Transaction(t) if t.is_retriable() => Ok(true),
        _ => Err(TxnFailure::Abortable(e.to_string())),
    }
}

/// Where a transaction step reports: metrics, readiness, liveness, shutdown.
pub struct TxnIo {
    pub stage: &'static str,
    pub metrics: Metrics,
    pub health: Health,
    pub health_name: &'static str,
    pub shutdown: Shutdown,
}

pub struct Txn {
    /// `None` while a replacement is under way: the old producer is dropped as soon as the
    /// replacement starts (it would only retry calls of a transaction that is given up).
    /// Shared only with a call that runs on a thread of its own ([`within`]).
    producer: Option<Arc<TxnProducer>>,
    config: ClientConfig,
    brokers: BrokerWatch,
    open: bool,
    started: Instant,
    failing: FailureWatch,
    /// A replacement under way: nothing is committed with `producer` any more.
    replacing: Option<Replacement>,
    io: TxnIo,
}

/// A producer being replaced: the candidate whose `init_transactions` is resumed each turn.
struct Replacement {
    why: &'static str,
    since: Instant,
    candidate: Option<TxnProducer>,
}

/// Builds a transactional producer and initialises its transactions.
pub fn create_producer(config: &ClientConfig, brokers: &BrokerWatch) -> KafkaResult<TxnProducer> {
    let producer: TxnProducer = config.create_with_context(brokers.clone())?;
    producer.init_transactions(INIT_TRANSACTIONS_TIMEOUT)?;
    Ok(producer)
}

impl Txn {
    pub fn new(config: ClientConfig, brokers: BrokerWatch, io: TxnIo) -> KafkaResult<Txn> {
        let producer = create_producer(&config, &brokers)?;
        Ok(Txn {
            producer: Some(Arc::new(producer)),
            config,
            brokers,
            open: false,
            started: Instant::now(),
            failing: FailureWatch::new(PRODUCER_FAILING_LIMIT),
            replacing: None,
            io,
        })
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// When the open transaction began (or the last one ended).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// librdkafka's fatal error of the producer, if it has one.
    pub fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.producer.as_ref()?.client().fatal_error()
    }

    /// Opens a transaction unless one is open; whether one is open. A producer that cannot
    /// begin one is replaced (nothing is open then, and the caller rewinds).
    pub fn begin(&mut self) -> bool {
        if self.open {
            return true;
        }
        let Some(producer) = self.producer.as_ref() else {
            return false;
        };
        match producer.begin_transaction() {
            Ok(()) => {
                self.open = true;
                self.started = Instant::now();
            }
            Err(e) => {
                tracing::error!(stage = self.io.stage, error = %e, "begin_transaction failed; replacing the producer");
                self.rebuild("begin_failed");
            }
        }
        self.open
    }

    /// Hands `out` to the producer inside the open transaction (opening one). Err: the
    /// transaction cannot hold a record and was aborted; the caller rewinds.
    pub fn send(&mut self, out: &mut Vec<Out>) -> Result<(), String> {
        if out.is_empty() {
            return Ok(());
        }
        if !self.begin() {
            out.clear();
            return Err("no transaction can open: the producer is being replaced".into());
        }
        let records = std::mem::take(out);
        for o in records {
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
            let Some(producer) = self.producer.as_ref() else {
                self.open = false;
                return Err("the producer is being replaced".into());
            };
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        // The local queue is full: wait for deliveries to free it.
                        record = r;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err((e, _)) => {
                        tracing::error!(stage = self.io.stage, topic = o.topic, error = %e, "produce failed; aborting the transaction");
                        self.abort("produce_failed");
                        return Err(format!("produce to {} failed: {e}", o.topic));
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends `offsets` (with `group`'s metadata) into the open transaction and commits it.
    /// On failure the transaction is left for the caller to abort ([`Txn::failed`]).
    pub fn commit(
        &mut self,
        offsets: &TopicPartitionList,
        group: Option<ConsumerGroupMetadata>,
    ) -> Result<(), TxnFailure> {
        let deadline = Instant::now() + TXN_RETRY_DEADLINE;
        let step = Instant::now();
        if offsets.count() > 0 {
            let cgm = Arc::new(
                group.ok_or_else(|| TxnFailure::Abortable("no consumer group metadata".into()))?,
            );
            let offsets = Arc::new(offsets.clone());
            let thread = format!("{}-send-offsets", self.io.stage);
            self.retrying("send_offsets_to_transaction", deadline, |p| {
                let (p, offsets, cgm) = (p.clone(), offsets.clone(), cgm.clone());
                within(SEND_OFFSETS_LIMIT, &thread, move || {
                    p.send_offsets_to_transaction(&offsets, &cgm, TXN_CALL_TIMEOUT)
                })
            })?;
            crash_point_after_offsets();
        }
        let step = self.observe_step("offsets", step);
        // rdkafka's commit_transaction flushes by polling in steps of up to 100 ms, and with a
        // threaded producer the delivery reports go to the producer's own thread, so each
        // commit would wait a full step. Wait for the deliveries here instead.
        let flush_deadline = Instant::now() + TXN_CALL_TIMEOUT;
        while self
            .producer
            .as_ref()
            .is_some_and(|p| p.in_flight_count() > 0)
            && Instant::now() < flush_deadline
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        let step = self.observe_step("deliveries", step);
        self.retrying("commit_transaction", deadline, |p| {
            Some(p.commit_transaction(TXN_CALL_TIMEOUT))
        })?;
        self.observe_step("commit", step);
        self.open = false;
        self.failing.succeeded();
        Ok(())
    }

    /// Records the time since `since` as the commit step `step`; returns now.
    fn observe_step(&self, step: &str, since: Instant) -> Instant {
        self.io
            .metrics
            .commit_step_seconds
            .with_label_values(&[self.io.stage, step])
            .observe(since.elapsed().as_secs_f64());
        Instant::now()
    }

    /// After a failed commit: aborts (abortable) or rebuilds the producer (fatal), and runs
    /// the producer watchdog. The caller rewinds either way.
    pub fn failed(&mut self, failure: TxnFailure) {
        match failure {
            TxnFailure::Abortable(reason) => {
                tracing::warn!(stage = self.io.stage, %reason, "transaction failed; aborting and rewinding to the committed offsets");
                self.abort("abortable");
            }
            TxnFailure::Fatal(reason) => {
                tracing::error!(stage = self.io.stage, %reason, "producer failed fatally (fenced?); rebuilding it and rewinding");
                self.io
                    .metrics
                    .aborts
                    .with_label_values(&[self.io.stage, "fatal"])
                    .inc();
                self.rebuild("fatal");
                return;
            }
        }
        if let Some(failing) = self.failing.failed(Instant::now()) {
            let reason = format!("transaction calls kept failing for {} s", failing.as_secs());
            tracing::error!(stage = self.io.stage, %reason, "producer watchdog: replacing the transactional producer");
            self.io
                .metrics
                .watchdog
                .with_label_values(&[self.io.stage, "producer"])
                .inc();
            self.io.health.set_unready(
                self.io.health_name,
                format!("watchdog: {reason}; replacing the transactional producer"),
            );
            self.rebuild("watchdog");
        }
    }

    /// Runs one transaction step, repeating it while librdkafka calls its error retriable
    /// and `deadline` has not passed; other errors are classified by [`classify`]. A step
    /// that returns `None` did not return in time ([`within`]): the producer is unusable.
    fn retrying(
        &mut self,
        what: &str,
        deadline: Instant,
        mut step: impl FnMut(&Arc<TxnProducer>) -> Option<KafkaResult<()>>,
    ) -> Result<(), TxnFailure> {
        loop {
            let Some(producer) = self.producer.as_ref() else {
                return Err(TxnFailure::Fatal("the producer is being replaced".into()));
            };
            let Some(result) = step(producer) else {
                tracing::error!(
                    stage = self.io.stage,
                    call = what,
                    limit_s = SEND_OFFSETS_LIMIT.as_secs(),
                    "a transaction call did not return in time (librdkafka issue #5456: the group coordinator went away during the call); leaving it blocked on its thread and replacing the producer"
                );
                return Err(TxnFailure::Fatal(format!(
                    "{what} did not return within {} s",
                    SEND_OFFSETS_LIMIT.as_secs()
                )));
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if classify(e)? && Instant::now() < deadline {
                        self.io.health.set_unready(
                            self.io.health_name,
                            "Kafka does not answer transaction calls; retrying",
                        );
                        continue;
                    }
                    return Err(TxnFailure::Abortable(format!("{what} kept failing")));
                }
            }
        }
    }

    /// Aborts the open transaction, if any (a producer that cannot abort is rebuilt).
    pub fn abort(&mut self, reason: &'static str) {
        if !self.open {
            return;
        }
        self.io
            .metrics
            .aborts
            .with_label_values(&[self.io.stage, reason])
            .inc();
        let aborted = match self.producer.as_ref() {
            Some(p) => p.abort_transaction(TXN_CALL_TIMEOUT),
            None => Ok(()),
        };
        if let Err(e) = aborted {
            tracing::error!(stage = self.io.stage, error = %e, "abort_transaction failed; rebuilding the producer");
            self.rebuild("abort_failed");
        }
        self.open = false;
    }

    /// Starts replacing the producer: nothing more is committed with the old one, and no
    /// transaction opens until [`Txn::ready`] has initialised a new one. `why` is for the
    /// log only.
    pub fn rebuild(&mut self, why: &'static str) {
        self.open = false;
        self.failing.succeeded();
        if self.replacing.is_some() {
            return;
        }
        self.io
            .metrics
            .client_rebuilds
            .with_label_values(&[self.io.stage, "producer"])
            .inc();
        // Dropped now (its queue purged, at most half a second): nothing more is committed
        // with it, and the new one fences it anyway.
        self.producer = None;
        self.replacing = Some(Replacement {
            why,
            since: Instant::now(),
            candidate: None,
        });
        self.ready();
    }

    /// Whether the producer can take transactions; while it is being replaced, one step
    /// of the replacement (at most [`INIT_ATTEMPT_TIMEOUT`]).
    pub fn ready(&mut self) -> bool {
        let Some(r) = self.replacing.as_mut() else {
            return true;
        };
        if self.io.shutdown.is_triggered() {
            return false;
        }
        let candidate = match r.candidate.take() {
            Some(c) => c,
            None => match self.config.create_with_context(self.brokers.clone()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(stage = self.io.stage, error = %e, "cannot create a transactional producer; trying again");
                    return false;
                }
            },
        };
        match candidate.init_transactions(INIT_ATTEMPT_TIMEOUT) {
            Ok(()) => {
                tracing::info!(
                    stage = self.io.stage,
                    why = r.why,
                    seconds = r.since.elapsed().as_secs_f64(),
                    "transactional producer replaced"
                );
                self.producer = Some(Arc::new(candidate));
                self.replacing = None;
                true
            }
            Err(e) => {
                let resumable =
                    matches!(&e, KafkaError::Transaction(t) if t.is_retriable() && !t.is_fatal());
                if r.since.elapsed() > INIT_TRANSACTIONS_TIMEOUT {
                    self.io.health.set_unready(
                        self.io.health_name,
                        format!(
                            "cannot initialise a new transactional producer for {} s: {e}",
                            r.since.elapsed().as_secs()
                        ),
                    );
                }
                if resumable {
                    // Resumed next turn: a timed-out init_transactions may be called again.
                    r.candidate = Some(candidate);
                } else {
                    tracing::error!(stage = self.io.stage, error = %e, "initialising a new transactional producer failed; starting over");
                }
                false
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_returns_in_time_gives_its_result() {
        assert_eq!(within(Duration::from_secs(30), "test-call", || 7), Some(7));
    }

    #[test]
    fn a_call_that_blocks_past_the_limit_is_left_behind_and_the_caller_goes_on() {
        // The call blocks until the test releases it, as librdkafka's send_offsets does
        // while the group coordinator is away (issue #5456).
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let started = Instant::now();
        let result = within(Duration::from_millis(50), "test-call", move || {
            let _ = blocked.recv();
            let _ = done_tx.send(());
            7
        });
        assert_eq!(result, None, "no result from a call that has not returned");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the caller waited {:?}, not the 50 ms limit",
            started.elapsed()
        );
        // The call still finishes on its own thread once it is released.
        release.send(()).expect("the call is waiting");
        done.recv_timeout(Duration::from_secs(10))
            .expect("the left call finished once released");
    }
}
