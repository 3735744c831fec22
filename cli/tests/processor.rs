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
