//! Reading a partition from a given offset to its end: how both stages rebuild state from
//! their changelogs, and how stage 1 re-reads the recent heartbeats that refresh
//! last-seen times (it never writes a changelog record per beat).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use presence_core::kafka::QuietEof;
use rdkafka::bindings as rdsys;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// How long a restore may see no progress before it gives up (and is retried).
const STALL: Duration = Duration::from_secs(60);

/// A record as a restore reads it, borrowed from librdkafka until the next batch is taken.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    offset: i64,
    timestamp: Option<i64>,
}

impl<'a> Record<'a> {
    pub fn key(&self) -> Option<&'a [u8]> {
        self.key
    }
    /// `None` for a tombstone.
    pub fn payload(&self) -> Option<&'a [u8]> {
        self.payload
    }
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// The record's timestamp in ms, as `Timestamp::to_millis` gives it live.
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }
}

/// Records taken from librdkafka's queue at once. A restore reads tens of millions of
/// records, and taking them one by one through the event API cost, per record, a wait on
/// the queue's condition with two clock reads, an event wrapper with its reference count,
/// and the client's poll bookkeeping: a 3 M-session restore one partition after another
/// took 11.7–12.0 s that way and 6.6–7.0 s in batches (docs/benchmarks.md, "Restore, 10 M
/// sessions"). Past a few hundred records a call the per-call cost is spread thin; 1,024
/// pointers are 8 KiB.
const BATCH: usize = 1024;

/// The messages of one batch, destroyed before the next is taken and when the read ends
/// (also when the caller stops early or panics), before the queue and the client.
struct Batch {
    messages: Vec<*mut rdsys::rd_kafka_message_t>,
    len: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            messages: vec![std::ptr::null_mut(); BATCH],
            len: 0,
        }
    }

    /// Takes up to `max` queued messages, waiting up to `timeout_ms` for more until it has
    /// `max` (librdkafka's batch call waits for a full batch): so the whole batch is taken
    /// without waiting, and only an empty queue is waited on, for one message.
    fn take(&mut self, queue: &Queue, timeout_ms: i32, max: usize) -> usize {
        self.clear();
        // SAFETY: the queue is alive (`Queue` destroys it on drop, after this batch), and
        // librdkafka writes at most `max` pointers into the array, which holds BATCH.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                queue.0,
                timeout_ms,
                self.messages.as_mut_ptr(),
                max.min(BATCH),
            )
        };
        self.len = n.max(0) as usize;
        self.len
    }

    /// The `i`-th message taken, or the error it carries with its offset (for the end of
    /// a partition, where the fetch stands).
    fn get(&self, i: usize) -> Result<Record<'_>, (KafkaError, i64)> {
        // SAFETY: i < len: librdkafka returned a valid message there, alive until `clear`,
        // which needs `&mut self` (so not while the returned record borrows the batch).
        let m = unsafe { &*self.messages[..self.len][i] };
        if m.err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let e = match m.err {
                rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__PARTITION_EOF => {
                    KafkaError::PartitionEOF(m.partition)
                }
                e => KafkaError::MessageConsumption(e.into()),
            };
            return Err((e, m.offset));
        }
        // SAFETY: librdkafka's pointer and length of the message's bytes, or null.
        let bytes = |ptr: *const u8, len: usize| {
            (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr, len) })
        };
        let mut kind = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: reads the message's own timestamp fields.
        let ts = unsafe { rdsys::rd_kafka_message_timestamp(m, &mut kind) };
        let available =
            kind != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ts != -1;
        Ok(Record {
            key: bytes(m.key as *const u8, m.key_len),
            payload: bytes(m.payload as *const u8, m.len),
            offset: m.offset,
            timestamp: available.then_some(ts),
        })
    }

    fn clear(&mut self) {
        for &m in &self.messages[..self.len] {
            // SAFETY: each was returned by the batch call and is destroyed once.
            unsafe { rdsys::rd_kafka_message_destroy(m) };
        }
        self.len = 0;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The consumer's queue, where its assigned partitions' messages arrive.
struct Queue(*mut rdsys::rd_kafka_queue_t);

impl Queue {
    fn of<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> anyhow::Result<Queue> {
        // SAFETY: the client is alive; the returned reference is released on drop.
        let q = unsafe { rdsys::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        anyhow::ensure!(!q.is_null(), "the restore consumer has no consumer queue");
        Ok(Queue(q))
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: the reference taken in `of`, released once.
        unsafe { rdsys::rd_kafka_queue_destroy(self.0) };
    }
}

/// Calls `f` for each record of `topic`/`partition` from `from` up to `until` (exclusive)
/// or, without `until`, to the partition's end, until `f` says [`ControlFlow::Break`] (its
/// caller gave up: nothing more to read). Returns the record count.
///
/// The end, read_committed, is where no transaction is open any more: every record
/// committed is read, those committed *behind* a transaction still open too. A
/// read_committed client sees nothing past the partition's last stable offset (the first
/// record of its oldest open transaction), and both its end-of-partition and the end the
/// broker answers it stand there; a read that ended at the first of them missed the records
/// committed after it. So a read to the end ends at an end-of-partition only where the
/// partition's high watermark is too (no transaction open); below it, it waits for the
/// transaction to end (committed, its records come; aborted, they never do). That is how a
/// restore sees the whole of a transaction already committed whose commit marker has not
/// reached this partition yet (markers are written partition by partition after the commit
/// returns, and a broker killed meanwhile delays them by its failover): its offsets may
/// already be readable, and a state read without its records is older than they say
/// (seed 7 of the long chaos run). A transaction that never ends holds the read until the
/// no-progress bound gives up; the owners' open transactions are ended before a restore
/// (taken over: fenced; their own: committed or aborted), a dead instance's by
/// `transaction.timeout.ms`.
pub fn read_partition(
    config: &ClientConfig,
    topic: &str,
    partition: i32,
    from: Offset,
    until: Option<i64>,
    mut f: impl FnMut(&Record<'_>) -> ControlFlow<()>,
) -> anyhow::Result<u64> {
    if let (Offset::Offset(from), Some(until)) = (from, until) {
        if from >= until {
            return Ok(0);
        }
    }
    let consumer: BaseConsumer<QuietEof> = config.create_with_context(QuietEof("restore"))?;
    // A read starts where it is told (an offset the log no longer holds starts at its
    // earliest, `auto.offset.reset`) without asking the broker for the partition's bounds
    // first: a new client's first watermark query took ~0.7 s now and then (a restore of 12
    // partitions of 83 k sessions: one in three), where reading the whole range took 0.1 s;
    // and what it answers a read_committed client is the last stable offset, not the end.
    let end = until.unwrap_or(i64::MAX);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, from)?;
    consumer.assign(&tpl)?;
    let queue = Queue::of(&consumer)?;
    let mut batch = Batch::new();
    let mut n = 0u64;
    let mut progress = Instant::now();
    // Where a transaction open on the partition held the read: (last stable offset, high
    // watermark), for the log and the no-progress error.
    let mut held: Option<(i64, i64)> = None;
    'read: loop {
        // What is queued, without waiting; when nothing is, wait for the next message.
        if batch.take(&queue, 0, BATCH) == 0 {
            batch.take(&queue, 100, 1);
        }
        let before = n;
        for i in 0..batch.len {
            match batch.get(i) {
                Ok(m) => {
                    if m.offset >= end {
                        break 'read;
                    }
                    let flow = f(&m);
                    n += 1;
                    if flow.is_break() || m.offset + 1 >= end {
                        break 'read;
                    }
                }
                // The end of what the leader serves, read_committed. A read to a committed
                // offset waits past one before that offset: a leader just elected serves
                // less than was committed for a while (its high watermark catching up), and
                // librdkafka goes on fetching the rest (the no-progress bound below still
                // ends it).
                Err((KafkaError::PartitionEOF(_), at)) if at >= end => break 'read,
                Err((KafkaError::PartitionEOF(_), at)) if until.is_none() => {
                    match high_watermark(&consumer, topic, partition) {
                        Some(high) if at < high => {
                            if held.is_none() {
                                tracing::info!(topic, partition, last_stable = at, high_watermark = high, "a transaction is open on the partition: the read to its end waits for it to end (records committed after it are behind it)");
                            }
                            held = Some((at, high));
                        }
                        _ => break 'read,
                    }
                }
                Err((KafkaError::PartitionEOF(_), _)) => {}
                // A broker of the cluster that is away (refused connection, leader moving):
                // librdkafka reconnects and fetches from the new leader by itself. Giving up
                // here restarted whole restores for as long as one broker of three was down
                // (chaos run, seed 4); the no-progress bound below still ends a read that
                // never moves.
                Err((e, _)) if presence_core::kafka::is_transient(&e) => {
                    tracing::debug!(topic, partition, error = %e, "restore read: transient broker error; librdkafka retries");
                }
                Err((e, _)) => return Err(anyhow::anyhow!("reading {topic}/{partition}: {e}")),
            }
        }
        // Progress is records handed on: neither an empty wait nor a batch of transient
        // errors alone is any, so a read that only ever sees a broker away still ends here.
        if n > before {
            progress = Instant::now();
        } else if progress.elapsed() > STALL {
            match held {
                Some((at, high)) => anyhow::bail!(
                    "reading {topic}/{partition} made no progress for {} s: a transaction open on it holds its last stable offset at {at}, below its high watermark {high} (a dead instance's, until transaction.timeout.ms ends it; one that never ends is a broker fault: see kafka-transactions.sh --list)",
                    STALL.as_secs()
                ),
                None => anyhow::bail!(
                    "reading {topic}/{partition} made no progress for {} s (its leader away?)",
                    STALL.as_secs()
                ),
            }
        }
    }
    // The messages, then the queue, go before the client.
    drop(batch);
    drop(queue);
    drop_aside(consumer);
    Ok(n)
}

/// The partition's high watermark as `consumer`'s last fetch answered it (librdkafka keeps
/// it whatever the isolation level, beside the last stable offset a read_committed fetch
/// ends at); `None` before any fetch answered.
fn high_watermark<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client is alive; librdkafka only writes the two offsets given.
    let err = unsafe {
        rdsys::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// Drops `consumer` on a thread of its own. librdkafka takes about 100 ms to destroy a
/// client (its threads' shutdown), and a stage-1 restore made three of them in turn for
/// each partition: 12 partitions restored one after another waited 3.6 s for nothing. These
/// consumers hold no group membership and commit nothing, so nothing needs to wait for it.
fn drop_aside<C: ConsumerContext + 'static>(consumer: BaseConsumer<C>) {
    // Should the thread not start, the closure, and the consumer with it, drops here.
    let _ = std::thread::Builder::new()
        .name("restore-drop".into())
        .spawn(move || drop(consumer));
}

/// For each of `times`, the first offset of `topic`/`partition` stamped at or after it, if
/// any before `until` (every earlier record is stamped before it: the broker's lookup of the
/// log's time index). The broker looks only below its end (the last stable offset, for a
/// read_committed client), which a leader just elected can hold below what was committed
/// for a while: `None` from such a leader would say nothing about the records before
/// `until`, so the lookups are asked again until the broker's end has reached `until` (a
/// chaos run with broker kills once expired sessions up to 40 s early; this could do it).
/// One client for all of them: a new client's first request to a broker took ~0.7 s now
/// and then. A lookup that meets a broker error the cluster recovers from by itself (a
/// leader moving: `NOT_LEADER_OR_FOLLOWER`, `FENCED_LEADER_EPOCH` from a client whose
/// metadata is a leader behind) is asked again, within the same no-progress bound: seed 7's
/// long run (session 24) failed a whole stage-1 restore on `FENCED_LEADER_EPOCH` after a
/// broker kill, and the stage rejoined its group before it restored again (a 70.8 s silence
/// with other faults).
pub fn offsets_for_times(
    config: &ClientConfig,
    topic: &str,
    partition: i32,
    times: &[i64],
    until: i64,
) -> anyhow::Result<Vec<Option<i64>>> {
    let consumer: BaseConsumer<QuietEof> = config.create_with_context(QuietEof("restore"))?;
    let started = Instant::now();
    let lookup = |target: Offset| -> anyhow::Result<Option<i64>> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, target)?;
        let found = loop {
            match consumer.offsets_for_times(tpl.clone(), Duration::from_secs(30)) {
                Ok(found) => break found,
                Err(e) if presence_core::kafka::is_transient(&e) && started.elapsed() < STALL => {
                    tracing::debug!(topic, partition, error = %e, "offset lookup: transient broker error; asking again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(found.elements().first().and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }))
    };
    let found = loop {
        let found = times
            .iter()
            .map(|&ts| lookup(Offset::Offset(ts.max(0))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Offset::End asks for the broker's end the same way (-1 is "latest").
        let end = lookup(Offset::End)?.unwrap_or(-1);
        if end >= until {
            break found;
        }
        if started.elapsed() > STALL {
            drop_aside(consumer);
            anyhow::bail!(
                "{topic}/{partition} ends at {end} on its leader, before the committed offset {until}, for {} s: is a broker that held it lost?",
                STALL.as_secs()
            );
        }
        tracing::debug!(
            topic,
            partition,
            end,
            until,
            "the leader's end is behind the committed offset; asking again"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    drop_aside(consumer);
    Ok(found)
}
