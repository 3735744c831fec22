//! The notifier against real Redis: newest state wins whatever the order, each transition
//! is published once on its region channel (heard by redis-cli, not our code), undecodable
//! records go to the dead-letter topic, and a Redis outage loses and doubles nothing.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use presence_core::config::Config;
use presence_core::delivery::RedisKeys;
use presence_core::Shutdown;
use presence_testkit::{
    check_processes, eventually, free_port, isolated_config, produce, read_to_end,
    read_to_end_until, status_records, transition, PrivateService, Process,
};
use rdkafka::message::{Headers, Message};
use redis::AsyncCommands;
use serde_json::Value;

use presence_testkit::{ensure_topics as setup, spawn_process};

/// The notifier as a task of the test: a failure fails the test's next wait; `stop` checks
/// that it shuts down cleanly.
fn start_notifier(config: &Config) -> Process {
    spawn_process("notifier", &Shutdown::new(), |s| {
        presence_notifier::run(config.clone(), s)
    })
}

/// `redis-cli SUBSCRIBE channel`: payloads arrive on the receiver once it is subscribed.
fn subscriber(url: &str, channel: &str) -> (Child, mpsc::Receiver<Value>) {
    let port = url
        .rsplit(':')
        .next()
        .unwrap_or("6379")
        .trim_end_matches('/')
        .to_string();
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port, "SUBSCRIBE", channel])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-cli (installed by make stack)");
    let stdout = child.stdout.take().expect("stdout");
    let (ready_tx, ready_rx) = mpsc::channel();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The confirmation ends with the subscription count.
            if line.trim() == "1" {
                let _ = ready_tx.send(());
            }
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v.is_object() && tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("redis-cli subscribed");
    (child, rx)
}

/// The next message redis-cli heard, within 30 s; fails at once if the notifier dies.
fn next_heard(heard: &mpsc::Receiver<Value>, what: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        check_processes();
        match heard.recv_timeout(Duration::from_millis(100)) {
            Ok(v) => return v,
            Err(mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {}
            Err(e) => panic!("{what}: nothing heard within 30 s ({e})"),
        }
    }
}

async fn redis(config: &Config) -> redis::aio::MultiplexedConnection {
    redis::Client::open(config.redis.url.expose())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_state_wins_in_any_order_and_each_transition_is_published_once() {
    let config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    setup(&config).await;
    let keys = RedisKeys::new(&config.redis.key_prefix);
    let (mut cli, heard) = subscriber(config.redis.url.expose(), &keys.region_channel("north"));

    let statuses = vec![
        transition("a", "north", 1, true),
        transition("a", "north", 2, false),
        transition("b", "north", 2, false), // newer first...
        transition("b", "north", 1, true),  // ...then older: ignored
        transition("a", "north", 3, true),
        transition("a", "north", 2, false), // a replay: ignored
        transition("a", "north", 4, false),
    ];
    let mut records = status_records(&statuses);
    records.insert(3, ("c".into(), b"not avro".to_vec()));
    produce(&config, &config.topics.facility_status, &records).await;
    let notifier = start_notifier(&config);

    let mut published = Vec::new();
    while published.len() < 5 {
        let v = next_heard(&heard, "a transition on the region channel");
        published.push(v);
    }
    let mut by_facility: Vec<(String, i64)> = published
        .iter()
        .map(|v| {
            (
                v["facility_id"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    by_facility.sort();
    assert_eq!(
        by_facility,
        vec![
            ("a".into(), 1),
            ("a".into(), 2),
            ("a".into(), 3),
            ("a".into(), 4),
            ("b".into(), 2)
        ]
    );
    let region_seqs: Vec<u64> = published
        .iter()
        .map(|v| v["region_seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        region_seqs,
        vec![1, 2, 3, 4, 5],
        "region sequence orders the channel"
    );

    let mut r = redis(&config).await;
    let a: Option<String> = r.hget(keys.facility("a"), "seq").await.expect("hget");
    let b: Option<String> = r.hget(keys.facility("b"), "seq").await.expect("hget");
    assert_eq!((a.as_deref(), b.as_deref()), (Some("4"), Some("2")));
    let index: std::collections::HashMap<String, String> = r
        .hgetall(keys.region_facilities("north"))
        .await
        .expect("hgetall");
    assert_eq!(index.len(), 2);
    assert!(
        index["a"].contains("\"OFFLINE\"") && index["a"].contains("\"seq\":4"),
        "{}",
        index["a"]
    );
    let regions: Vec<String> = r.smembers(keys.regions()).await.expect("smembers");
    assert_eq!(regions, vec!["north".to_string()]);

    let dead = read_to_end_until(
        &config,
        &config.topics.dead_letters,
        Duration::from_secs(30),
        |d| !d.is_empty(),
    );
    assert_eq!(
        dead.len(),
        1,
        "one dead letter for the one bad record (more: a batch read again, say after the rewind of a fresh Redis, dead-lettered it again)"
    );
    assert_eq!(dead[0].payload(), Some(&b"not avro"[..]));
    let headers = dead[0].headers().expect("headers");
    let code = headers
        .iter()
        .find(|h| h.key == "presence.error.code")
        .and_then(|h| h.value)
        .expect("error code header");
    assert_eq!(code, b"too_short");
    // Nothing more was published than the five: one more transition of a and of b comes
    // after everything else in their partitions, so the next two messages must be those.
    let after = [
        transition("a", "north", 5, true),
        transition("b", "north", 3, true),
    ];
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&after),
    )
    .await;
    let mut next: Vec<(String, i64)> = (0..2)
        .map(|_| next_heard(&heard, "the two later transitions"))
        .map(|v| {
            (
                v["facility_id"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    next.sort();
    assert_eq!(
        next,
        vec![("a".into(), 5), ("b".into(), 3)],
        "a replay or an older transition was published"
    );
    notifier.stop(Duration::from_secs(30)).await;
    // Stopped after everything was consumed: the dead letter is still the only one.
    let dead = read_to_end(
        &config,
        &config.topics.dead_letters,
        Duration::from_secs(30),
    );
    assert_eq!(dead.len(), 1, "the bad record was dead-lettered once");
    let _ = cli.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_pauses_and_resumes_with_nothing_lost_or_doubled() {
    let private = PrivateService::redis();
    private.start();
    let mut config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    config.redis.url = presence_core::Secret::new(private.address());
    config.notifier.ops_listen = ([127, 0, 0, 1], free_port()).into();
    setup(&config).await;
    let keys = RedisKeys::new(&config.redis.key_prefix);
    let facilities: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let first: Vec<_> = facilities
        .iter()
        .map(|f| transition(f, "east", 1, true))
        .collect();
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&first),
    )
    .await;
    let notifier = start_notifier(&config);
    let readyz = format!("http://{}/readyz", config.notifier.ops_listen);
    let http = reqwest::Client::new();

    let seq_of = |config: Config, key: String| async move {
        let mut r = redis(&config).await;
        let seq: Option<u64> = r.get(key).await.ok()?;
        seq
    };
    eventually(
        "20 transitions in Redis",
        Duration::from_secs(30),
        || async {
            (seq_of(config.clone(), keys.region_seq("east")).await == Some(20)).then_some(())
        },
    )
    .await;

    private.stop();
    let second: Vec<_> = facilities
        .iter()
        .map(|f| transition(f, "east", 2, false))
        .collect();
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&second),
    )
    .await;
    eventually(
        "notifier unready while Redis is down",
        Duration::from_secs(30),
        || async {
            let r = http.get(&readyz).send().await.ok()?;
            (r.status().as_u16() == 503).then_some(())
        },
    )
    .await;

    private.start();
    eventually(
        "the 20 newer transitions applied after Redis returned",
        Duration::from_secs(60),
        || async {
            (seq_of(config.clone(), keys.region_seq("east")).await == Some(40)).then_some(())
        },
    )
    .await;
    eventually("notifier ready again", Duration::from_secs(30), || async {
        let r = http.get(&readyz).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let mut r = redis(&config).await;
    let log: Vec<String> = r.zrange(keys.region_log("east"), 0, -1).await.expect("log");
    assert_eq!(log.len(), 40, "each transition applied exactly once");
    for f in &facilities {
        let seq: Option<String> = r.hget(keys.facility(f), "seq").await.expect("hget");
        assert_eq!(seq.as_deref(), Some("2"), "{f}");
    }
    notifier.stop(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_redis_is_rebuilt_from_the_compacted_topic() {
    let config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    setup(&config).await;
    let keys = RedisKeys::new(&config.redis.key_prefix);
    let first: Vec<_> = (0..30)
        .map(|i| transition(&format!("f{i}"), "west", 1 + i % 3, true))
        .collect();
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&first),
    )
    .await;
    let notifier = start_notifier(&config);
    let count = |config: Config, key: String| async move {
        let mut r = redis(&config).await;
        let n: usize = r.hlen(key).await.ok()?;
        Some(n)
    };
    eventually(
        "30 facilities in Redis",
        Duration::from_secs(30),
        || async {
            (count(config.clone(), keys.region_facilities("west")).await == Some(30)).then_some(())
        },
    )
    .await;

    // Everything of this notifier's prefix disappears, as after a restart without persistence.
    let mut r = redis(&config).await;
    let all: Vec<String> = r
        .keys(format!("{}:*", config.redis.key_prefix))
        .await
        .expect("keys");
    let _: () = r.del(all).await.expect("del");
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&[transition("f-new", "west", 1, true)]),
    )
    .await;
    eventually(
        "all 31 facilities back after the rewind",
        Duration::from_secs(30),
        || async {
            (count(config.clone(), keys.region_facilities("west")).await == Some(31)).then_some(())
        },
    )
    .await;
    let seq: Option<String> = r.hget(keys.facility("f2"), "seq").await.expect("hget");
    assert_eq!(
        seq.as_deref(),
        Some("3"),
        "the newest transition of f2 is back"
    );
    notifier.stop(Duration::from_secs(30)).await;
}
