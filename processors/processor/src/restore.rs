//! Reading a partition from a given offset to its end: how both stages rebuild state from
//! their changelogs, and how stage 1 re-reads the recent heartbeats that refresh
//! last-seen times (it never writes a changelog record per beat).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// How long a restore may see no progress before it gives up (and is retried).
const STALL: Duration = Duration::from_secs(60);

/// A context that keeps the end-of-partition notices out of the logs.
struct Quiet;

impl ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        presence_core::kafka::log_client_error("restore", error, reason);
    }
}

impl ConsumerContext for Quiet {}

/// Calls `f` for each record of `topic`/`partition` from `from` up to `until` (exclusive)
/// or, without `until`, to the partition's end (read_committed), until `f` says
/// [`ControlFlow::Break`] (its caller gave up: nothing more to read). Returns the record
/// count.
pub fn read_partition(
    config: &ClientConfig,
    topic: &str,
    partition: i32,
    from: Offset,
    until: Option<i64>,
    mut f: impl FnMut(&BorrowedMessage<'_>) -> ControlFlow<()>,
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer<Quiet> = config.create_with_context(Quiet)?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(30))?;
    let end = until.map_or(high, |u| u.min(high));
    let start = match from {
        Offset::Offset(o) => o.max(low),
        _ => low,
    };
    if start >= end {
        drop_aside(consumer);
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&tpl)?;
    let mut n = 0u64;
    let mut progress = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if m.offset() >= end {
                    break;
                }
                let flow = f(&m);
                n += 1;
                if flow.is_break() {
                    break;
                }
                if n.is_multiple_of(4096) {
                    progress = Instant::now();
                }
                if m.offset() + 1 >= end {
                    break;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            // A broker of the cluster that is away (refused connection, leader moving):
            // librdkafka reconnects and fetches from the new leader by itself. Giving up here
            // restarted whole restores for as long as one broker of three was down (chaos
            // run, seed 4); the no-progress bound below still ends a read that never moves.
            Some(Err(e)) if presence_core::kafka::is_transient(&e) => {
                tracing::debug!(topic, partition, error = %e, "restore read: transient broker error; librdkafka retries");
            }
            Some(Err(e)) => return Err(anyhow::anyhow!("reading {topic}/{partition}: {e}")),
            None if progress.elapsed() > STALL => {
                anyhow::bail!("reading {topic}/{partition} made no progress for {} s (an open transaction of a dead instance?)", STALL.as_secs())
            }
            None => {}
        }
    }
    drop_aside(consumer);
    Ok(n)
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

/// The first offset of `topic`/`partition` whose timestamp is at or after `ts`, if any.
pub fn offset_for_time(
    config: &ClientConfig,
    topic: &str,
    partition: i32,
    ts: i64,
) -> anyhow::Result<Option<i64>> {
    let consumer: BaseConsumer = config.create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(ts.max(0)))?;
    let found = consumer.offsets_for_times(tpl, Duration::from_secs(30))?;
    drop_aside(consumer);
    Ok(found.elements().first().and_then(|e| match e.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }))
}
