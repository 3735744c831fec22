//! The processor's fatal-client paths, reached the way production reaches them: another
//! producer takes its transactional id (the broker fences the processor's producer, which
//! must be rebuilt and the stage rewound), and another consumer joins with its
//! `group.instance.id` (the broker fences the static member, whose consumer must be
//! rebuilt and its partitions restored). Each happens mid-replay; the output, read to the
//! end offsets, must still be exactly the oracle's, and the rebuild counter must show that
//! the path was taken.

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::{Duration, Instant};

use presence_core::config::Config;
use presence_core::kafka::{base_config, consumer_config};
use presence_testkit::oracle::{oracle, Expected};
use presence_testkit::sim::{generate, SimConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, Producer};
use support::*;

const TIMEOUT_MS: u64 = 3_005;

async fn case(seed: u64) -> (Config, Vec<Expected>) {
    let c = setup(TIMEOUT_MS).await;
    let log = generate(&SimConfig::compressed(
        seed,
        3_000,
        80,
        now_ms() - 6 * 3_600_000,
    ));
    let expected = oracle(&log, TIMEOUT_MS as i64);
    produce(&c, &log).await;
    (c, expected)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_fenced_by_its_transactional_id_is_rebuilt_and_nothing_changes() {
    let _one = serial();
    let seed = test_seed();
    let (c, expected) = case(seed).await;
    let _cleanup = Cleanup::new(&c);
    let reader = StatusReader::new(&c);
    let ops = presence_testkit::free_port();
    let listen = format!("127.0.0.1:{ops}");
    let p = watched_processor(
        &c,
        "a",
        &[
            ("PRESENCE_PROCESSOR__OPS_LISTEN", &listen),
            ("PRESENCE_PROCESSOR__COMMIT_INTERVAL", "20ms"),
        ],
    );
    // Steal as soon as stage 1 has committed its first heartbeats, while the backlog is
    // still being worked through: waiting for the first transition let a fast (quiet)
    // machine finish the whole output before the thief landed.
    wait_metric(
        ops,
        "presence_heartbeats_processed_total",
        "",
        Duration::from_secs(120),
        &format!("seed {seed}"),
    )
    .await;
    // Another producer initialises the processor's transactional ids: the broker bumps
    // their epochs, and the processor's producers are fenced at their next request.
    for stage in ["sessions", "facilities"] {
        let id = presence_processor::takeover::transactional_id(
            &format!("{}.{stage}", c.processor.group_id),
            "a",
        );
        let thief: BaseProducer = base_config(&c.kafka, "test-thief")
            .set("transactional.id", &id)
            .create()
            .expect("producer");
        thief
            .init_transactions(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("init_transactions({id}): {e}"));
    }
    check_committed_at_kill(&c, &expected, &format!("seed {seed}, fencing"));
    let n = wait_metric(
        ops,
        "presence_kafka_client_rebuilds_total",
        "client=\"producer\"",
        Duration::from_secs(60),
        &format!("seed {seed}"),
    )
    .await;
    eprintln!("seed {seed}: producer rebuilds {n}");
    finish(&c, &expected, reader, vec![p], &format!("seed {seed}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_member_fenced_by_its_instance_id_rejoins_and_nothing_changes() {
    let _one = serial();
    let seed = test_seed();
    let (c, expected) = case(seed).await;
    let _cleanup = Cleanup::new(&c);
    let mut reader = StatusReader::new(&c);
    let ops = presence_testkit::free_port();
    let listen = format!("127.0.0.1:{ops}");
    let p = watched_processor(
        &c,
        "a",
        &[
            ("PRESENCE_PROCESSOR__OPS_LISTEN", &listen),
            ("PRESENCE_PROCESSOR__COMMIT_INTERVAL", "20ms"),
        ],
    );
    assert!(
        reader.read_until(Duration::from_secs(120), |s| s.len() >= expected.len() / 5),
        "seed {seed}: a fifth of the output within 120 s"
    );
    // A consumer with the stage-1 member's group.instance.id joins its group: the broker
    // hands it the member's place and fences the processor's consumer.
    let group = format!("{}.sessions", c.processor.group_id);
    // The processor's own consumer settings (its assignment strategy above all: a member
    // with another one is refused by the group).
    let impostor: BaseConsumer = consumer_config(&c.kafka, "test-impostor", &group)
        .set("group.instance.id", "sessions.a")
        .set("session.timeout.ms", "10000")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    impostor
        .subscribe(&[&c.topics.heartbeats])
        .expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    while impostor.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
        presence_testkit::check_processes();
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the impostor got no partitions within 60 s"
        );
        let _ = impostor.poll(Duration::from_millis(100));
    }
    // Gone again without leaving (a static member's close does not leave the group): the
    // processor's rebuilt consumer takes the place back by fencing it in turn.
    drop(impostor);
    check_committed_at_kill(&c, &expected, &format!("seed {seed}, fencing"));
    let n = wait_metric(
        ops,
        "presence_kafka_client_rebuilds_total",
        "client=\"consumer\"",
        Duration::from_secs(60),
        &format!("seed {seed}"),
    )
    .await;
    eprintln!("seed {seed}: consumer rebuilds {n}");
    finish(&c, &expected, reader, vec![p], &format!("seed {seed}"));
}
