//! The processor against the wider oracle (`presence_testkit::oracle::oracle_placed`) through the
//! real broker: a log with late, out-of-order, tied and future-dated beats, beats exactly at
//! a session's deadline, beats refused for a timestamp past the clock's allowance, and a flap
//! hold, each record produced to a partition the test chooses (the oracle models each
//! partition's stream time). The processor is killed -9 mid-work and restarted, so restore
//! meets the same log; the whole `facility-status` topic, read to its end offsets, must be
//! the oracle's, and every refused beat must be dead-lettered exactly once.

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use presence_core::codec::encode;
use presence_testkit::oracle::{oracle_placed, OracleConfig, Placed};
use presence_testkit::sim::{generate, SimConfig};
use rand::{Rng, SeedableRng};
use support::*;

/// Even, so deadlines land on the log's 10 ms grid and beats can hit them exactly.
const TIMEOUT_MS: i64 = 3_000;
const HOLD_MS: i64 = 700;
const PARTITIONS: i32 = 3;

/// A generated log, disturbed: per record, with the seed's dice, late by up to two
/// timeouts (5%), tied with the record before it (5%), ahead of the rest by up to 5 s (1%),
/// exactly at its session's deadline (3%), or stamped ten minutes past the wall clock
/// (refused, 0.3%). Each record goes to its session's partition, in log order.
fn disturbed_log(seed: u64, start_ms: i64, refuse_at: i64) -> (Vec<Placed>, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let log = generate(&SimConfig::compressed(seed, 600, 40, start_ms));
    let mut last_of: HashMap<(String, String), i64> = HashMap::new();
    let mut placed = Vec::with_capacity(log.len());
    let mut previous = i64::MIN;
    let mut refused = 0;
    for mut r in log {
        let session = (r.heartbeat.user_id.clone(), r.heartbeat.session_id.clone());
        let dice: f64 = rng.gen();
        r.ts = if dice < 0.05 {
            r.ts - rng.gen_range(1..2 * TIMEOUT_MS)
        } else if dice < 0.10 && previous > i64::MIN {
            previous
        } else if dice < 0.11 {
            r.ts + rng.gen_range(1..5_000)
        } else if dice < 0.14 {
            last_of.get(&session).map_or(r.ts, |last| last + TIMEOUT_MS)
        } else if dice < 0.143 {
            refused += 1;
            refuse_at
        } else {
            r.ts
        };
        if r.ts != refuse_at {
            previous = r.ts;
            last_of.insert(session, r.ts);
        }
        // The session's partition, as a key-hashing producer would pick one.
        let partition = (r
            .heartbeat
            .session_id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
            % PARTITIONS as u32) as i32;
        placed.push(Placed {
            partition,
            record: r,
            wall: None,
        });
    }
    (placed, refused)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disturbed_log_with_a_flap_hold_and_a_kill_equals_the_oracle() {
    let _one = serial();
    let seed = test_seed();
    let started = Instant::now();
    let mut c = setup(TIMEOUT_MS as u64).await;
    c.processor.flap_hold = Duration::from_millis(HOLD_MS as u64);
    let _cleanup = Cleanup::new(&c);
    let now = now_ms();
    // Past the processor's allowance (60 s) but within the broker's own
    // (`log.message.timestamp.after.max.ms`, 1 h), which would refuse the whole batch.
    let refuse_at = now + 10 * 60_000;
    let (log, refused) = disturbed_log(seed, now - 6 * 3_600_000, refuse_at);
    let expected = oracle_placed(
        &log,
        &OracleConfig {
            timeout_ms: TIMEOUT_MS,
            flap_hold_ms: HOLD_MS,
            // Anything up to the processor's allowance (max_clock_skew, 60 s) past the wall
            // clock is taken; the refused records are ten minutes past it.
            reject_after: now + 60_000,
            max_future_ms: i64::MAX,
        },
    );
    let late = log
        .windows(2)
        .filter(|w| w[1].partition == w[0].partition && w[1].record.ts < w[0].record.ts)
        .count();
    assert!(
        refused > 0 && late > 0,
        "seed {seed}: the log must hold refused ({refused}) and out-of-order ({late}) records"
    );
    let records: Vec<Encoded> = log
        .iter()
        .map(|p| Encoded {
            key: p.record.heartbeat.session_id.clone(),
            value: encode(&p.record.heartbeat),
            ts: p.record.ts,
            partition: Some(p.partition),
        })
        .collect();
    produce_encoded(&c, &records).await;
    let n = expected.len();
    eprintln!(
        "seed {seed}: {} heartbeats ({late} out of order, {refused} refused), {n} transitions expected",
        log.len()
    );
    let mut reader = StatusReader::new(&c);
    // A backlog read from the start: stage 1's partitions advance at their own pace, so stage
    // 2 waits for the slowest source's watermark; with a bound of 100 events it lets events
    // go and reads them again (counted, and checked below), and the output must not change.
    let ops = presence_testkit::free_port().to_string();
    let ops_listen = format!("127.0.0.1:{ops}");
    let fast = [
        ("PRESENCE_PROCESSOR__COMMIT_INTERVAL", "20ms"),
        ("PRESENCE_PROCESSOR__MAX_BUFFERED_EVENTS", "100"),
    ];
    let mut p = watched_processor(&c, "a", &fast);
    let mark = n * 2 / 5;
    assert!(
        reader.read_until(Duration::from_secs(120), |s| s.len() >= mark),
        "seed {seed}: output stuck at {} of {mark} for 120 s",
        reader.seen.len()
    );
    kill9(&mut p);
    let committed = check_committed_at_kill(&c, &expected, &format!("seed {seed}, kill"));
    eprintln!(
        "seed {seed}: killed with {committed} of {n} committed at {:?}",
        started.elapsed()
    );
    let p = watched_processor(
        &c,
        "a",
        &[
            fast[0],
            fast[1],
            ("PRESENCE_PROCESSOR__OPS_LISTEN", &ops_listen),
        ],
    );
    let port: u16 = ops.parse().unwrap_or_default();
    assert!(
        reader.read_until(Duration::from_secs(120), |s| s.len() >= n),
        "seed {seed}: output stuck at {} of {n} for 120 s",
        reader.seen.len()
    );
    let spilled = metric_sum(port, "presence_stage2_spilled_events_total", "").await;
    eprintln!("seed {seed}: the restarted processor's stage 2 let {spilled} events go and read them again");
    assert!(
        spilled > 0.0,
        "seed {seed}: the 100-event bound was never reached, so reading again went untested"
    );
    finish(&c, &expected, reader, vec![p], &format!("seed {seed}"));
    let letters: Vec<String> =
        presence_testkit::read_to_end(&c, &c.topics.dead_letters, Duration::from_secs(60))
            .iter()
            .map(|m| presence_testkit::header(m, "presence.error.code"))
            .collect();
    assert_eq!(
        letters,
        vec!["timestamp_in_future".to_string(); refused],
        "seed {seed}: each refused beat dead-lettered once"
    );
    eprintln!("seed {seed}: done in {:?}", started.elapsed());
}
