//! A notifier killed with -9 sends no LeaveGroup: its partitions stay its own until its group
//! session expires. The next notifier must have them within seconds (the downstream
//! consumers' `session.timeout.ms`, 10 s), not after librdkafka's default 45 s, which left a
//! region's browsers without transitions for 45.7 s in a chaos run. The sink shares the
//! consumer (`kafka::downstream_consumer_config`).

mod support;

use std::time::{Duration, Instant};

use presence_core::config::Config;
use presence_core::delivery::RedisKeys;
use presence_testkit::{eventually, produce, spawn_child, status_records, transition};
use redis::AsyncCommands;

/// The real `presence notifier` on `c`'s topics, Redis prefix and group.
fn notifier_command(c: &Config) -> std::process::Command {
    support::presence_command(
        "notifier",
        c,
        "-",
        &[
            ("REDIS_URL", c.redis.url.expose()),
            ("PRESENCE_REDIS__KEY_PREFIX", &c.redis.key_prefix),
            ("PRESENCE_NOTIFIER__OPS_LISTEN", "127.0.0.1:0"),
        ],
    )
}

/// Whether Redis holds `facility`'s state at `seq`.
async fn holds(c: &Config, facility: &str, seq: u64) -> bool {
    let Ok(client) = presence_core::delivery::redis_client(&c.redis) else {
        return false;
    };
    let Ok(mut r) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let keys = RedisKeys::new(&c.redis.key_prefix);
    let got: Option<String> = r.hget(keys.facility(facility), "seq").await.ok().flatten();
    got == Some(seq.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_killed_with_9_hands_its_partitions_on_within_seconds() {
    let config = presence_testkit::isolated_config();
    let _topics = presence_testkit::TestTopics::create(&config).await;
    // Produces a transition of `facility` and waits (at most `within`) until Redis holds it.
    let written = |facility: &'static str, within: Duration| {
        let config = config.clone();
        async move {
            produce(
                &config,
                &config.topics.facility_status,
                &status_records(&[transition(facility, "west", 1, true)]),
            )
            .await;
            eventually(&format!("a notifier writes {facility}"), within, || async {
                holds(&config, facility, 1).await.then_some(())
            })
            .await
        }
    };

    // The first notifier owns every partition once it has written a transition.
    let mut first = spawn_child("notifier-first", notifier_command(&config));
    written("f-before", Duration::from_secs(60)).await;

    // kill -9, and a new notifier at once, as a supervisor restarts it.
    first.kill9();
    let killed = Instant::now();
    let mut second = spawn_child("notifier-second", notifier_command(&config));
    written("f-after", Duration::from_secs(90)).await;
    let took = killed.elapsed();
    eprintln!("the second notifier wrote its first transition {took:?} after the kill");
    // 10 s for the dead member's session, then a rebalance, a fetch and a write; the
    // default session (45 s) cannot pass.
    assert!(
        took < Duration::from_secs(25),
        "the new notifier wrote a transition {took:?} after its predecessor was killed: the dead member kept its partitions until its session expired (the downstream consumers' session.timeout.ms)"
    );
    // A clean stop leaves the group (the test's groups are deleted when it ends).
    assert!(second.terminate(Duration::from_secs(30)).success());
    support::delete_redis_keys(&config).await;
}
