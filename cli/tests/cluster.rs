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

/// A test's own topics on `cluster`, replicated three times, with `adjust` applied to the
/// configuration first.
async fn replicated_topics(
    cluster: &Cluster,
    adjust: impl FnOnce(&mut presence_core::config::Config),
) -> presence_core::config::Config {
    let mut c = isolated_config();
    c.kafka.brokers = cluster.brokers();
    c.topics.replication_factor = 3;
    adjust(&mut c);
    presence_testkit::ensure_topics(&c).await;
    c
}

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
    let c = replicated_topics(&cluster, |c| {
        c.processor.session_timeout = Duration::from_millis(TIMEOUT_MS)
    })
    .await;

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

/// A producer as loadgen's (`idempotent_producer_config`, a 5 ms linger) for `c`'s
/// heartbeats topic, and each partition's leader: `(partition, leader node)`.
fn loadgen_producer(
    c: &presence_core::config::Config,
) -> (rdkafka::producer::FutureProducer, Vec<(i32, i32)>) {
    use rdkafka::producer::Producer;
    let producer: rdkafka::producer::FutureProducer =
        presence_core::kafka::idempotent_producer_config(&c.kafka, "test")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
    let leaders = producer
        .client()
        .fetch_metadata(Some(&c.topics.heartbeats), Duration::from_secs(15))
        .expect("metadata")
        .topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), p.leader()))
        .collect();
    (producer, leaders)
}

/// Sends one record to `partition` of `topic`; the task ends with whether it was delivered,
/// and when.
fn send_timed(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    partition: i32,
) -> tokio::task::JoinHandle<(bool, std::time::Instant)> {
    let delivery = producer
        .send_result(
            rdkafka::producer::FutureRecord::to(topic)
                .partition(partition)
                .key("k")
                .payload("v"),
        )
        .map_err(|(e, _)| e)
        .expect("queued");
    tokio::spawn(async move {
        (
            matches!(delivery.await, Ok(Ok(_))),
            std::time::Instant::now(),
        )
    })
}

/// The measurement behind `NodeOutage`: an idempotent producer as the gateway's and
/// loadgen's (`idempotent_producer_config`, loadgen's 5 ms linger) sends one record every
/// 10 ms round-robin to the heartbeats partitions, one led by each node; after 10 s the
/// leader of partition 0 is killed with -9 and stays down. Printed: per partition, the worst
/// delay between a record's send and its delivery from a second before the kill on. Measured
/// (session 19): 7.4–8.8 s on every partition, not only the dead leader's — a producer
/// stalls on all its partitions when one broker dies, so a stage-1 clock must hold on all of
/// them. Asserted: every record delivered, and the worst delay within the hold
/// (`NODE_LOSS_HOLD_MS`); a stall longer than that would let a clock pass held beats.
/// `cargo test -p presence --test cluster -- --ignored --nocapture producer_stalls`
#[ignore = "a measurement (about 2 minutes); run it by name"]
#[tokio::test(flavor = "multi_thread")]
async fn producer_stalls_on_every_partition_within_the_hold_when_one_broker_dies() {
    use std::collections::BTreeMap;
    use std::time::Instant;

    let _one = serial();
    let cluster = Cluster::start();
    let c = replicated_topics(&cluster, |_| {}).await;
    let topic = c.topics.heartbeats.clone();
    let (producer, leaders) = loadgen_producer(&c);
    let victim = leaders
        .iter()
        .find(|(p, _)| *p == 0)
        .expect("partition 0")
        .1;
    let start = Instant::now();
    let mut sent = Vec::new();
    let mut killed_at = None;
    let mut i = 0usize;
    while start.elapsed() < Duration::from_secs(50) {
        if killed_at.is_none() && start.elapsed() > Duration::from_secs(10) {
            cluster.kill(victim as u8);
            killed_at = Some(start.elapsed());
        }
        let p = leaders[i % leaders.len()].0;
        let at = start.elapsed();
        sent.push((p, at, send_timed(&producer, &topic, p)));
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = killed_at.expect("killed");
    let mut worst: BTreeMap<i32, f64> = BTreeMap::new();
    for (p, at, done) in sent {
        let (ok, when) = done.await.expect("delivery task");
        assert!(ok, "a record for partition {p} was not delivered");
        if at + Duration::from_secs(1) >= killed_at {
            let delay = (when - start).saturating_sub(at).as_secs_f64();
            let w = worst.entry(p).or_default();
            *w = w.max(delay);
        }
    }
    for (p, delay) in &worst {
        let leader = leaders.iter().find(|(q, _)| q == p).map_or(-1, |l| l.1);
        eprintln!(
            "partition {p}, leader node {leader}{}: worst delivery delay {delay:.1} s",
            if leader == victim { " (killed)" } else { "" }
        );
    }
    let hold = presence_core::kafka::NODE_LOSS_HOLD_MS as f64 / 1_000.0;
    for (p, delay) in worst {
        assert!(
            delay < hold,
            "partition {p}'s records waited {delay:.1} s, longer than the clocks' hold ({hold} s)"
        );
    }
}

/// A stage consumer's statistics, forwarded to a [`BrokerWatch`] as the processor's stage
/// context does, and each broker connection's state per statistics kept for the report.
struct WatchedStats {
    watch: presence_core::kafka::BrokerWatch,
    states: std::sync::Mutex<Vec<(i64, Connections)>>,
}

/// (broker connection name, librdkafka state) of one client's statistics.
type Connections = Vec<(String, String)>;

impl rdkafka::ClientContext for WatchedStats {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.watch.on_stats(&statistics);
        let states = statistics
            .brokers
            .values()
            .filter(|b| b.source != "internal")
            .map(|b| (b.name.clone(), b.state.clone()))
            .collect();
        self.states.lock().unwrap().push((now_ms(), states));
    }
}

impl rdkafka::consumer::ConsumerContext for WatchedStats {}

/// One broker killed with -9, restarted, and killed again, as seed 11 of the long chaos run
/// did to broker 3 (t+650 kill, t+685 stop for 15 s, t+723 kill): after each loss a stage
/// consumer's broker watch must hold the clocks. librdkafka forgets a broker the cluster's
/// metadata stops listing and learns it again only from the next metadata it fetches (every
/// five minutes by default), so without `topic.metadata.refresh.interval.ms` in
/// `stage_consumer_config` the consumer never reconnects to the broker that came back and
/// its next loss shows nowhere: this test then fails waiting for the connection (seen
/// here, after 60 s), and seed 11's second run missed a short OFFLINE.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_lost_again_after_coming_back_holds_the_clocks() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    let _one = serial();
    let cluster = Cluster::start();
    let c = replicated_topics(&cluster, |_| {}).await;
    let registry = prometheus::Registry::new();
    let health = presence_core::telemetry::Health::new(&registry);
    let watch =
        presence_core::kafka::BrokerWatch::new(&health, "experiment.kafka", &c.kafka.brokers);
    let context = WatchedStats {
        watch: watch.clone(),
        states: Default::default(),
    };
    let group = presence_testkit::unique("experiment");
    let consumer: Arc<BaseConsumer<WatchedStats>> = Arc::new(
        presence_core::kafka::stage_consumer_config(&c.kafka, "experiment", &group, &group)
            .create_with_context(context)
            .expect("consumer"),
    );
    consumer
        .subscribe(&[&c.topics.heartbeats])
        .expect("subscribe");
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (consumer, stop) = (consumer.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = consumer.poll(Duration::from_millis(100));
            }
        })
    };
    let node = 3u8;
    let name = format!("127.0.0.1:{}/{node}", cluster.port(node));
    let state_of = |name: &str| -> Option<String> {
        let states = consumer.context().states.lock().unwrap();
        let (_, last) = states.last()?;
        last.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone())
    };
    let held = || watch.wall_clock_limit(now_ms()) < now_ms();
    let wait = |what: &str, within: Duration, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            if start.elapsed() > within {
                let states = consumer.context().states.lock().unwrap();
                let now = now_ms();
                panic!(
                    "{what}: not within {within:?}; clock limit {} ms behind; last statistics:\n{:#?}",
                    now - watch.wall_clock_limit(now),
                    &states[states.len().saturating_sub(3)..]
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    };
    let up_and_free = |what: &str| {
        // Reconnecting and the settle after it took 19–41 s on this machine: a slower one
        // gets room, and without the metadata refresh it never happens.
        wait(what, Duration::from_secs(120), &|| {
            state_of(&name).as_deref() == Some("UP") && !held()
        })
    };
    up_and_free("the connection to the node up at the start");
    let mut report = Vec::new();
    for kill in 1..=2 {
        cluster.kill(node);
        let took = wait(
            &format!("kill {kill} of node {node}: the clocks held"),
            Duration::from_secs(10),
            &held,
        );
        report.push(format!("kill {kill}: held after {took:?}"));
        if kill == 2 {
            break;
        }
        wait(
            &format!("kill {kill}: the node's connection down"),
            Duration::from_secs(30),
            &|| state_of(&name).as_deref() != Some("UP"),
        );
        cluster.restart(node);
        let back = up_and_free(&format!(
            "kill {kill}: the consumer connected to node {node} again and its clocks free"
        ));
        report.push(format!("kill {kill}: back and free after {back:?}"));
    }
    stop.store(true, Ordering::Relaxed);
    poller.join().expect("poller");
    for line in &report {
        eprintln!("{line}");
    }
}
