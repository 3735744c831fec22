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
//! process, and its rate against a plain consumer), README "Benchmarks".

use rdkafka::config::ClientConfig;

use crate::config::KafkaConfig;

/// Measured (`presence bench throughput --heartbeats 2000000 --sessions 200000`, one run
/// each, load 4–8): 8 MiB of queue with 1 MiB partition fetches and 4 MiB responses kept the
/// processor at 125 MiB peak but cut its rate to 0.35x of the old settings (104 k/s against
/// 300 k/s, 655 MiB); 32 MiB / 4 MiB / 16 MiB (the values below) gave 236 k/s at 464 MiB.
/// Neither meets issue 13 (256 MiB at 90% of the rate): the fetch response and its
/// decompressed batches, not the queue, are what the rate needs. Those runs shared the two
/// cores with builds. Measured again alone (release, three runs per invocation, the old
/// settings passed as `kafka.properties`): these values 375 k/s and 409 k/s at 291 and 281 MiB
/// peak, the old ones 381 k/s at 679 MiB: the same rate at 0.42x the memory.
///
/// Prefetch of a stage consumer: at most this many KiB of records wait in its queue before
/// it stops fetching (librdkafka default 65,536 = 64 MiB). 32 MiB, half the default: 8 MiB
/// (about 60,000 heartbeats) starved the stage (see above).
pub const STAGE_QUEUED_MAX_KBYTES: u32 = 32 * 1024;

/// Prefetch of a stage consumer in records (librdkafka default 100,000, each costing about
/// 200 bytes of librdkafka bookkeeping besides its bytes): 50,000 records, the same order as
/// [`STAGE_QUEUED_MAX_KBYTES`] at heartbeat sizes, so neither bound lets the other run away
/// (stage 2's records are smaller: a record-count bound matters there).
pub const STAGE_QUEUED_MIN_MESSAGES: u32 = 50_000;

/// Largest fetch response a consumer asks for (librdkafka default 52,428,800 = 50 MiB); a
/// response arrives on top of what is queued, so this bounds the overshoot. 16 MiB is four
/// partitions' worth at [`PARTITION_FETCH_BYTES`] (the processor asked for 64 MiB before;
/// 4 MiB starved the stage). librdkafka raises it to `message.max.bytes` (1 MB) at least, and the broker
/// always returns at least one record batch, so large batches still get through.
pub const FETCH_MAX_BYTES: u32 = 16 * 1024 * 1024;

/// Largest share of a fetch response one partition gets (librdkafka default 1,048,576;
/// the processor used 4 MiB before issue 13, and keeps it: 1 MiB cut the rate to a third,
/// see above); [`FETCH_MAX_BYTES`] is what bounds a response now.
pub const PARTITION_FETCH_BYTES: u32 = 4 * 1024 * 1024;

/// Restore consumers read one partition each (the changelog, and for stage 1 the
/// heartbeats of the timeout window, two at a time) as fast as the broker serves them, and
/// they decode faster than stage 1 processes. 16 MiB of queue (the processor used a
/// 1,000,000-record minimum before, with 64 MiB) is ~110,000 changelog records: the broker
/// serves the next fetch long before the restore has drained it.
pub const RESTORE_QUEUED_MAX_KBYTES: u32 = 16 * 1024;

/// Restore prefetch in records: 100,000 (librdkafka's default; the processor asked for
/// 1,000,000 before, which with ~200 bytes of bookkeeping each is 200 MiB per consumer).
pub const RESTORE_QUEUED_MIN_MESSAGES: u32 = 100_000;

/// A restore consumer's share per fetch (the processor used 16 MiB before): 4 MiB, so one
/// response is ~30,000 changelog records, the same as [`RESTORE_FETCH_MAX_BYTES`].
pub const RESTORE_PARTITION_FETCH_BYTES: u32 = 4 * 1024 * 1024;

/// A restore consumer's whole response: it holds one partition, so the same as its share.
pub const RESTORE_FETCH_MAX_BYTES: u32 = 4 * 1024 * 1024;

/// Records a transactional producer may hold unsent or unacknowledged (librdkafka default
/// 100,000). Every transaction waits for all of its records before it commits, so the queue
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
    if !k.properties.contains_key(key) {
        c.set(key, value.to_string());
    }
}

/// A stage's group consumer (`heartbeats` for stage 1, `session-transitions` for stage 2).
pub fn stage_consumer(c: &mut ClientConfig, k: &KafkaConfig) {
    budget(c, k, "queued.max.messages.kbytes", STAGE_QUEUED_MAX_KBYTES);
    budget(c, k, "queued.min.messages", STAGE_QUEUED_MIN_MESSAGES);
    budget(c, k, "fetch.max.bytes", FETCH_MAX_BYTES);
    budget(c, k, "max.partition.fetch.bytes", PARTITION_FETCH_BYTES);
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
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("32768"));
        assert_eq!(c.get("max.partition.fetch.bytes"), Some("4194304"));
        let mut p = ClientConfig::new();
        transactional_producer(&mut p, &k);
        assert_eq!(p.get("queue.buffering.max.messages"), Some("50000"));
        // librdkafka accepts every value.
        assert!(c.create_native_config().is_ok());
        assert!(p.create_native_config().is_ok());
        let mut r = ClientConfig::new();
        restore_consumer(&mut r, &k);
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
        assert_eq!(c.get("fetch.max.bytes"), Some("16777216"));
    }
}
