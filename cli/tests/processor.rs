//! The processor end to end against the real broker: its `facility-status` output must equal
//! what the reference model (presence_core::sim::oracle) computes from the heartbeat log,
//! however the processor is killed, restarted or scaled.

mod support;

use std::time::Duration;

use presence_core::sim::{generate, oracle, SimConfig};
use support::*;

const TIMEOUT_MS: u64 = 3_005;

#[tokio::test(flavor = "multi_thread")]
async fn output_equals_the_oracle() {
    let _one = serial();
    let c = setup(TIMEOUT_MS).await;
    let log = generate(&SimConfig::compressed(11, 2_000, 100, now_ms() - 3_600_000));
    let expected = oracle(&log, TIMEOUT_MS as i64);
    produce(&c, &log).await;
    let mut p = spawn_processor(&c, "a", &[]);
    let mut reader = StatusReader::new(&c);
    let done = reader.read_until(Duration::from_secs(120), |s| s.len() >= expected.len());
    reader.drain();
    kill9(&mut p);
    let got = as_expected(&reader.seen);
    assert!(done && got == expected, "{}", diff(&expected, &got));
}

/// kill -9 at random instants, and once exactly between send_offsets_to_transaction and
/// commit_transaction: the output is still the oracle's, no seq doubled or missing.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_any_instant_changes_nothing() {
    use rand::{Rng, SeedableRng};
    let _one = serial();
    let c = setup(TIMEOUT_MS).await;
    let log = generate(&SimConfig::compressed(12, 2_000, 100, now_ms() - 3_600_000));
    let expected = oracle(&log, TIMEOUT_MS as i64);
    produce(&c, &log).await;
    let mut reader = StatusReader::new(&c);
    // The worst instant first: offsets sent, transaction not committed.
    for crash_at in ["3", "8"] {
        let mut p = spawn_processor(&c, "a", &[("FAILPOINT_CRASH_AFTER_OFFSETS", crash_at)]);
        let status = p.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(6), "the crash point must have aborted the process: {status:?}");
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
    let mut p = spawn_processor(&c, "a", &[]);
    let done = reader.read_until(Duration::from_secs(120), |s| s.len() >= expected.len());
    reader.drain();
    kill9(&mut p);
    let got = as_expected(&reader.seen);
    assert!(done && got == expected, "{}", diff(&expected, &got));
}

/// Two instances split the partitions; one is killed mid-run and the other takes its
/// partitions over, restoring their state from the changelogs.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_one_killed() {
    let _one = serial();
    let c = setup(TIMEOUT_MS).await;
    let log = generate(&SimConfig::compressed(13, 2_000, 100, now_ms() - 3_600_000));
    let expected = oracle(&log, TIMEOUT_MS as i64);
    produce(&c, &log).await;
    let mut reader = StatusReader::new(&c);
    let mut a = spawn_processor(&c, "a", &[]);
    let mut b = spawn_processor(&c, "b", &[]);
    reader.read_until(Duration::from_secs(60), |s| s.len() >= expected.len() / 4);
    kill9(&mut b);
    let done = reader.read_until(Duration::from_secs(180), |s| s.len() >= expected.len());
    reader.drain();
    kill9(&mut a);
    let got = as_expected(&reader.seen);
    assert!(done && got == expected, "{}", diff(&expected, &got));
}
