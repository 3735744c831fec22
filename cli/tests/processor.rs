//! The processor end to end against the real broker: its `facility-status` output must equal
//! what the reference model (presence_core::sim::oracle) computes from the heartbeat log,
//! however the processor is killed, restarted or scaled.

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use presence_core::sim::{generate, oracle, SimConfig};
use support::*;

const TIMEOUT_MS: u64 = 3_005;

/// Fresh topics holding a generated log of 2,000 sessions over 100 facilities (an hour ago,
/// so everything is a replay), the transitions the oracle expects, and a reader.
async fn case(
    seed: u64,
) -> (
    presence_core::config::Config,
    Vec<presence_core::sim::Expected>,
    StatusReader,
) {
    let c = setup(TIMEOUT_MS).await;
    let log = generate(&SimConfig::compressed(
        seed,
        2_000,
        100,
        now_ms() - 3_600_000,
    ));
    let expected = oracle(&log, TIMEOUT_MS as i64);
    produce(&c, &log).await;
    let reader = StatusReader::new(&c);
    (c, expected, reader)
}

/// Reads until every expected transition arrived (or two minutes), then asserts equality.
fn finish(
    mut reader: StatusReader,
    expected: &[presence_core::sim::Expected],
    mut last: std::process::Child,
) {
    let done = reader.read_until(Duration::from_secs(180), |s| s.len() >= expected.len());
    reader.drain();
    kill9(&mut last);
    let got = as_expected(&reader.seen);
    assert!(done && got == expected, "{}", diff(expected, &got));
}

#[tokio::test(flavor = "multi_thread")]
async fn output_equals_the_oracle() {
    let _one = serial();
    let (c, expected, reader) = case(11).await;
    let p = spawn_processor(&c, "a", &[]);
    finish(reader, &expected, p);
}

/// kill -9 at random instants, and once exactly between send_offsets_to_transaction and
/// commit_transaction: the output is still the oracle's, no seq doubled or missing.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_any_instant_changes_nothing() {
    use rand::{Rng, SeedableRng};
    let _one = serial();
    let (c, expected, mut reader) = case(12).await;
    // The worst instant first: offsets sent, transaction not committed.
    for crash_at in ["3", "8"] {
        let mut p = spawn_processor(&c, "a", &[("FAILPOINT_CRASH_AFTER_OFFSETS", crash_at)]);
        let status = p.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(6),
            "the crash point must have aborted the process: {status:?}"
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for _ in 0..4 {
        let mut p = spawn_processor(&c, "a", &[]);
        let before = reader.seen.len();
        // Let it make some progress (some output), then kill it at a random instant.
        reader.read_until(Duration::from_secs(30), |s| s.len() > before);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1_500)));
        kill9(&mut p);
    }
    let p = spawn_processor(&c, "a", &[]);
    finish(reader, &expected, p);
}

/// Two instances split the partitions; one is killed mid-run and the other takes its
/// partitions over, restoring their state from the changelogs.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_one_killed() {
    let _one = serial();
    let (c, expected, mut reader) = case(13).await;
    let a = spawn_processor(&c, "a", &[]);
    let mut b = spawn_processor(&c, "b", &[]);
    reader.read_until(Duration::from_secs(60), |s| s.len() >= expected.len() / 4);
    kill9(&mut b);
    finish(reader, &expected, a);
}
