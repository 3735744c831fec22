//! Stage 1 reads a backlog's partitions in step (`presence_processor::align`), so stage 2,
//! which applies an event only once every source's watermark has passed it, holds only a
//! few seconds of event time in memory. Without it librdkafka read a backlog one partition
//! after another, and stage 2 held nearly every event of the backlog (issue 13: ~990 k
//! events, most of a 293 MiB peak, for a million sessions opening).

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use presence_core::config::Secret;
use presence_core::records::{HeartbeatKind, Status};
use presence_testkit::sim::SimRecord;
use support::*;

/// Sessions of the backlog, each opening with its one beat.
const SESSIONS: usize = 48_000;
const FACILITIES: usize = 2_400;
/// Event time the backlog spans: its beats are this far apart in total.
const SPAN_MS: i64 = 600_000;

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_is_read_in_step_and_stage_2_holds_little_of_it() {
    let _one = serial();
    let mut c = presence_testkit::isolated_config();
    c.topics.heartbeats_partitions = 6;
    // Nobody expires while the backlog drains.
    c.processor.session_timeout = Duration::from_millis(3_600_005);
    // Stage 2 also holds, for a moment, each transaction of stage 1 (events come before the
    // watermarks that release them): short transactions keep that small beside the backlog.
    c.processor.commit_interval = Duration::from_millis(20);
    presence_testkit::ensure_topics(&c).await;
    let _cleanup = Cleanup::new(&c);
    // librdkafka's reading order at the scale of a test: with a queue this small it is full
    // after every fetch (every partition leaves the fetch list, and the next request starts
    // again at the first one), and with shares this small only the first partition of a
    // request gets one of the producer's batches. Without alignment that reads the six
    // partitions one after another.
    for (key, value) in [
        ("queued.min.messages", "200"),
        ("max.partition.fetch.bytes", "8192"),
    ] {
        c.kafka.properties.insert(key.into(), Secret::new(value));
    }
    let t0 = presence_core::now_ms() - SPAN_MS - 60_000;
    let backlog: Vec<SimRecord> = (0..SESSIONS)
        .map(|s| SimRecord {
            ts: t0 + s as i64 * SPAN_MS / SESSIONS as i64,
            heartbeat: heartbeat(
                &format!("s{s}"),
                &format!("f{}", s % FACILITIES),
                HeartbeatKind::Beat,
            ),
        })
        .collect();
    produce(&c, &backlog).await;

    let ops = presence_testkit::free_port();
    c.processor.ops_listen = ([127, 0, 0, 1], ops).into();
    let shutdown = presence_core::Shutdown::new();
    let processor = processor_in_process(&c, &shutdown).await;
    let mut reader = StatusReader::new(&c);
    let mut most: f64 = 0.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while !reader.read_until(Duration::from_millis(20), |s| s.len() >= FACILITIES) {
        most = most.max(metric_sum(ops, "presence_stage2_buffered_events", "").await);
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {FACILITIES} facilities ONLINE after 180 s",
            reader.seen.len()
        );
    }
    processor.stop(Duration::from_secs(30)).await;

    // Read in step, stage 2 holds the events of 10 s of event time (of 600 s here: ~800)
    // plus a transaction or two of stage 1: 3.6–4.3 k in three runs. One partition after
    // another (alignment switched off), 28–30 k.
    assert!(
        most < (SESSIONS / 4) as f64,
        "stage 2 held up to {most} of {SESSIONS} session events: the partitions were not read in step"
    );
    assert!(
        reader
            .seen
            .iter()
            .all(|s| s.status == Status::Online && s.seq == 1),
        "every facility goes ONLINE once: {:?}",
        reader
            .seen
            .iter()
            .filter(|s| s.status != Status::Online || s.seq != 1)
            .take(5)
            .collect::<Vec<_>>()
    );
    eprintln!("stage 2 held at most {most} of {SESSIONS} events");
}
