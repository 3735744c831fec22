//! The processor's memory budget for its Kafka clients: what librdkafka may hold in
//! prefetched records and unsent output, per client role.
//!
//! librdkafka's defaults are sized for throughput with memory to spare: a consumer keeps
//! fetching until 100,000 records or 64 MiB wait in its queue, plus one fetch response of up to
//! 50 MiB in flight, and a producer queues up to 100,000 records or 1 GiB. The processor runs
//! two consumers, two transactional producers and, while partitions restore, two more
//! consumers: with the defaults its buffers (about 1 GiB while it drains a backlog, issue 13)
//! dwarfed its session state (53 bytes a session, 53 MiB at a million sessions). The numbers
//! here bound every buffer to tens of milliseconds of work at the rates the stages reach
//! (about 700 k records/s on two cores, records of 100–150 bytes), which is all a consumer
//! needs to never wait for the broker and all a producer needs to keep its batches full.
//!
//! A property the operator passes through (`kafka.properties`) wins over the budget: a
//! deployment with memory to spare and a remote broker may want deeper prefetch.
//!
//! `presence bench throughput` measures the effect (peak resident memory of the processor
//! process, and its rate against a plain consumer), README "Benchmarks". 8 M heartbeats of
//! 1 M sessions, run for run against the budget before (16 MiB responses, 4 MiB per
//! partition, the 1 s back-off): peak 291 MiB against 499 MiB at 1.24x the rate (medians of
//! three, 2026-11-29, on the shared two cores); with stage 2's buffer shrinking too, 293
//! against 511 MiB at 1.33x.

use rdkafka::config::ClientConfig;

use crate::config::KafkaConfig;

/// What a fetched record costs in librdkafka 2.12: one `rd_kafka_op_t` allocation of 304
/// bytes (its 112-byte header and the fetch variant of its union, measured with `sizeof`
/// against the vendored headers), plus its share of the response or decompressed batch it
/// points into (a heartbeat: ~130 bytes). So ~450 bytes a heartbeat, three times its
/// payload, and `queued.max.messages.kbytes`, which counts payload bytes only, understates
/// the queue threefold: the record count is the bound that holds.
///
/// What held the memory (issue 13): a consumer stops fetching once its queue holds
/// `queued.min.messages` records, but the fetch it issued before then arrives on top in
/// full. With 16 MiB responses of lz4 batches (~50 bytes a heartbeat on the wire) that is
/// ~330,000 records, ~140 MiB, per stage consumer, against ~22 MiB for the 50,000 queued
/// records before it. The fetch response, not the queue, is what to bound.
///
/// Why small bounds starved the stages before (8 MiB of queue, 4 MiB responses: 0.35x the
/// rate): a consumer whose queue is over a threshold backs off for `fetch.queue.backoff.ms`,
/// 1,000 ms by default, while the stage drains a small queue in tens of ms and then waits
/// for the rest of the second. [`FETCH_QUEUE_BACKOFF_MS`] is the fix; with it, a queue of
/// tens of milliseconds of work is enough.
///
/// Back-off of a consumer whose queue is full, in ms (librdkafka default 1,000): 10 ms, the
/// stage consumers' `fetch.wait.max.ms`, so that a fetch goes out within 10 ms of the queue
/// falling below [`STAGE_QUEUED_MIN_MESSAGES`] (~4,000 heartbeats of stage 1's work at
/// 400 k/s). It costs the broker thread a wake-up per 10 ms while the queue is full.
pub const FETCH_QUEUE_BACKOFF_MS: u32 = 10;

/// Prefetch of a stage consumer in records (librdkafka default 100,000): 20,000, ~9 MiB at
/// ~450 bytes a heartbeat and ~50 ms of stage 1's work at 400 k heartbeats/s, which covers
/// the back-off ([`FETCH_QUEUE_BACKOFF_MS`]) and a fetch's round trip to a loaded broker
/// several times over. With [`FETCH_MAX_BYTES`] on top the queue peaks at ~60,000 records,
/// ~27 MiB (it was ~380,000, ~170 MiB).
pub const STAGE_QUEUED_MIN_MESSAGES: u32 = 20_000;

/// Prefetch of a stage consumer in KiB of payload (librdkafka default 65,536 = 64 MiB): 8 MiB.
/// At the processor's record sizes (heartbeats ~90 bytes of payload, session events less)
/// [`STAGE_QUEUED_MIN_MESSAGES`] is reached far below it; this stops a run of large records
/// (up to `message.max.bytes` each) from queueing 20,000 of them.
pub const STAGE_QUEUED_MAX_KBYTES: u32 = 8 * 1024;

/// Largest fetch response a consumer asks for (librdkafka default 52,428,800 = 50 MiB; the
/// processor asked for 64 MiB before issue 13, then 16 MiB): 2 MiB, ~40,000 lz4-compressed
/// heartbeats or ~16,000 uncompressed ones, ~18 MiB in memory at most, which arrives on top
/// of the queue. Still ~100 ms of stage 1's work per round trip. librdkafka raises it to
/// `message.max.bytes` (1 MB) at least, and the broker always returns at least one record
/// batch, so large batches still get through.
pub const FETCH_MAX_BYTES: u32 = 2 * 1024 * 1024;

/// Largest share of a fetch response one partition gets (librdkafka default 1,048,576;
/// the processor used 4 MiB before): 1 MiB. Not less: a partition whose first batch is
/// larger than its share gets nothing in a response that already holds data, and producers'
/// batches go up to 1 MB (librdkafka's `batch.size`). Smaller shares do not make the
/// partitions read in step either (128 KiB was tried): librdkafka starts each request at the
/// same partition after its queue was full, so a backlog is read nearly one partition after
/// another whatever the share. Stage 1 pauses partitions that run ahead instead
/// (`presence_processor::align`).
pub const PARTITION_FETCH_BYTES: u32 = 1024 * 1024;

/// Restore consumers read one partition each (the changelog, and for stage 1 the
/// heartbeats of the timeout window, two at a time) as fast as the broker serves them.
/// 30,000 records (librdkafka's default 100,000; the processor asked for 1,000,000 before
/// issue 13, ~300 MiB at 304 bytes of `rd_kafka_op_t` each): ~14 MiB per consumer at
/// ~450 bytes a record, ~30 ms of a restore at a million records a second; with the 10 ms
/// back-off ([`FETCH_QUEUE_BACKOFF_MS`]) the next fetch is out long before it is drained.
pub const RESTORE_QUEUED_MIN_MESSAGES: u32 = 30_000;

/// Restore prefetch in KiB of payload: 8 MiB, for the same reason as
/// [`STAGE_QUEUED_MAX_KBYTES`] (changelog records are ~100 bytes, window beats ~90).
pub const RESTORE_QUEUED_MAX_KBYTES: u32 = 8 * 1024;

/// A restore consumer's share per fetch (the processor used 16 MiB, then 4 MiB): 1 MiB,
/// ~20,000 compressed changelog records, ~9 MiB in memory on top of its queue; the same as
/// [`PARTITION_FETCH_BYTES`], and for the same reason not less.
pub const RESTORE_PARTITION_FETCH_BYTES: u32 = 1024 * 1024;

/// A restore consumer's whole response: it holds one partition, so the same as its share
/// (librdkafka raises it to `message.max.bytes` if that is larger).
pub const RESTORE_FETCH_MAX_BYTES: u32 = 1024 * 1024;

/// Records a transactional producer may hold unsent or unacknowledged (librdkafka default
/// 100,000), each one allocation of its 176-byte `rd_kafka_msg_t` with key and value copied
/// in (~280 bytes for the processor's records): 50,000 is ~14 MiB. Every transaction waits for all of its records before it commits, so the queue
/// only needs to cover the records in flight between two deliveries: 50,000 is ~70 ms of
/// stage 1's output while a million sessions open at once (two records per open: the event
/// and the changelog write). When full, the runner waits for deliveries (2 ms steps).
pub const PRODUCER_QUEUE_MESSAGES: u32 = 50_000;

/// The same queue in KiB (librdkafka default 1,048,576 = 1 GiB): 16 MiB, ~100,000 of the
/// processor's records, so the record count above is the bound that applies and this only
/// stops a run of unusually large records (dead letters carry the original bytes, up to
/// `message.max.bytes` each).
pub const PRODUCER_QUEUE_KBYTES: u32 = 16 * 1024;

/// Largest record batch per partition (librdkafka default 1,000,000 bytes): 256 KiB. A
/// batch is compressed into a copy when it is sent, so this bounds the copies of the ~30
/// partitions a stage writes (its output, changelog and the other stage's input); at the
/// processor's record sizes it is still ~2,000 records a batch, which keeps the broker's
/// per-batch cost negligible.
pub const PRODUCER_BATCH_BYTES: u32 = 256 * 1024;

/// Sets `key` to `value` unless the operator passed the same key through.
fn budget(c: &mut ClientConfig, k: &KafkaConfig, key: &str, value: u32) {
    crate::kafka::unless_passed(c, k, key, value.to_string());
}

/// The records a stage consumer prefetches for each partition (`queued.min.messages`, as
/// the operator set it or [`STAGE_QUEUED_MIN_MESSAGES`]): what a pause throws away.
pub fn stage_prefetch_records(k: &KafkaConfig) -> u64 {
    k.properties
        .get("queued.min.messages")
        .and_then(|v| v.expose().parse().ok())
        .unwrap_or(STAGE_QUEUED_MIN_MESSAGES.into())
}

/// A stage's group consumer (`heartbeats` for stage 1, `session-transitions` for stage 2).
pub fn stage_consumer(c: &mut ClientConfig, k: &KafkaConfig) {
    budget(c, k, "queued.max.messages.kbytes", STAGE_QUEUED_MAX_KBYTES);
    budget(c, k, "queued.min.messages", STAGE_QUEUED_MIN_MESSAGES);
    budget(c, k, "fetch.max.bytes", FETCH_MAX_BYTES);
    budget(c, k, "max.partition.fetch.bytes", PARTITION_FETCH_BYTES);
    budget(c, k, "fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
}

/// A consumer that reads one partition back to rebuild state (changelogs, stage 1's window).
pub fn restore_consumer(c: &mut ClientConfig, k: &KafkaConfig) {
    budget(
        c,
        k,
        "queued.max.messages.kbytes",
        RESTORE_QUEUED_MAX_KBYTES,
    );
    budget(c, k, "queued.min.messages", RESTORE_QUEUED_MIN_MESSAGES);
    budget(c, k, "fetch.max.bytes", RESTORE_FETCH_MAX_BYTES);
    budget(
        c,
        k,
        "max.partition.fetch.bytes",
        RESTORE_PARTITION_FETCH_BYTES,
    );
    budget(c, k, "fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
}

/// A stage's transactional producer.
pub fn transactional_producer(c: &mut ClientConfig, k: &KafkaConfig) {
    budget(
        c,
        k,
        "queue.buffering.max.messages",
        PRODUCER_QUEUE_MESSAGES,
    );
    budget(c, k, "queue.buffering.max.kbytes", PRODUCER_QUEUE_KBYTES);
    budget(c, k, "batch.size", PRODUCER_BATCH_BYTES);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;

    #[test]
    fn the_budget_sets_each_bound() {
        let k = KafkaConfig::default();
        let mut c = ClientConfig::new();
        stage_consumer(&mut c, &k);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("8192"));
        assert_eq!(c.get("queued.min.messages"), Some("20000"));
        assert_eq!(c.get("fetch.max.bytes"), Some("2097152"));
        assert_eq!(c.get("max.partition.fetch.bytes"), Some("1048576"));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("10"));
        let mut p = ClientConfig::new();
        transactional_producer(&mut p, &k);
        assert_eq!(p.get("queue.buffering.max.messages"), Some("50000"));
        // librdkafka accepts every value.
        assert!(c.create_native_config().is_ok());
        assert!(p.create_native_config().is_ok());
        let mut r = ClientConfig::new();
        restore_consumer(&mut r, &k);
        assert_eq!(r.get("queued.min.messages"), Some("30000"));
        assert_eq!(r.get("fetch.queue.backoff.ms"), Some("10"));
        assert!(r.create_native_config().is_ok());
    }

    #[test]
    fn a_passed_through_property_wins() {
        let mut k = KafkaConfig::default();
        k.properties
            .insert("queued.min.messages".into(), Secret::new("100000"));
        let mut c = crate::kafka::base_config(&k, "test");
        stage_consumer(&mut c, &k);
        assert_eq!(c.get("queued.min.messages"), Some("100000"));
        assert_eq!(c.get("fetch.max.bytes"), Some("2097152"));
    }
}
