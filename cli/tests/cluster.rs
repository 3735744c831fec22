//! The processor on a replicated three-node Kafka cluster (KRaft quorum of three,
//! replication 3, min ISR 2, as `make cluster` runs it) while brokers are killed with
//! kill -9 and restarted and the processor itself is killed: its `facility-status` output
//! must still equal the oracle's, no transition lost or doubled.

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use presence_testkit::isolated_config;
use presence_testkit::oracle::oracle;
use presence_testkit::sim::{generate, SimConfig};
use support::*;

const TIMEOUT_MS: u64 = 3_005;

/// 2,000 sessions over 100 facilities (an hour ago, a replay) on replicated topics; the
/// processor is killed once and brokers are killed and restarted under it.
// Out of `make test` for now: it passed three runs in four; the fourth (a CI dry run) failed in
// the test's own end-offset read right after a broker kill, which now retries. Run it with
// `cargo test -p presence --test cluster -- --ignored` until it has a clean record.
#[ignore = "one failure in four runs (test helper, since fixed); being watched before it gates CI"]
#[tokio::test(flavor = "multi_thread")]
async fn broker_and_processor_kills_on_a_replicated_cluster_change_nothing() {
    let _one = serial();
    let cluster = Cluster::start();
    let mut c = isolated_config();
    c.kafka.brokers = cluster.brokers();
    c.topics.replication_factor = 3;
    c.processor.session_timeout = Duration::from_millis(TIMEOUT_MS);
    presence_testkit::ensure_topics(&c).await;

    let log = generate(&SimConfig::compressed(21, 2_000, 100, now_ms() - 3_600_000));
    let expected = oracle(&log, TIMEOUT_MS as i64);
    produce(&c, &log).await;
    let mut reader = StatusReader::new(&c);

    let mut p = watched_processor(&c, "a", &[]);
    let quarter = |n: usize| move |s: &[presence_core::records::FacilityStatus]| s.len() >= n;
    assert!(
        reader.read_until(Duration::from_secs(120), quarter(expected.len() / 4)),
        "no progress before the first fault: {} of {}",
        reader.seen.len(),
        expected.len()
    );
    // A broker dies under a running processor, comes back; the processor dies too.
    cluster.kill(1);
    assert!(
        reader.read_until(Duration::from_secs(120), quarter(expected.len() / 2)),
        "no progress with node 1 down: {} of {}",
        reader.seen.len(),
        expected.len()
    );
    cluster.restart(1);
    kill9(&mut p);
    let mut p = watched_processor(&c, "b", &[]);
    assert!(
        reader.read_until(Duration::from_secs(120), quarter(expected.len() * 3 / 4)),
        "no progress after the processor's restart: {} of {}",
        reader.seen.len(),
        expected.len()
    );
    // Another broker dies while the restored processor finishes.
    cluster.kill(2);
    assert!(
        reader.read_until(Duration::from_secs(180), |s| s.len() >= expected.len()),
        "output incomplete with node 2 down\n{}",
        diff(&expected, &as_expected(&reader.seen))
    );
    // Everything consumed, a clean stop, then the whole topic against the oracle: a
    // duplicate or an extra transition fails as surely as a missing one.
    wait_consumed_to_end(&c, Duration::from_secs(60));
    let status = terminate(&mut p);
    assert!(
        status.success(),
        "SIGTERM must stop the processor cleanly: {status:?}"
    );
    let got = as_expected(&statuses_to_end(&c));
    assert!(got == expected, "{}", diff(&expected, &got));
}
