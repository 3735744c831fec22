//! The gateway's Redis reads over TLS, against a TLS-only Redis of the test's own on a CA it
//! makes: a region snapshot through the store, a transition through the pub/sub connection
//! that feeds the streams, and a wrong CA refused with the setting to change.

use std::time::Duration;

use futures::StreamExt;
use presence_core::delivery::{redis_client, RedisKeys};
use presence_core::Secret;
use presence_gateway::store::Store;
use presence_testkit::{isolated_config, transition, PrivateService, TestCerts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reads_and_subscribes_through_rediss() {
    let certs = TestCerts::new();
    let server = PrivateService::redis().with_tls(&certs);
    server.start();
    let mut config = isolated_config();
    config.redis.url = Secret::new(format!("rediss://127.0.0.1:{}", server.port()));
    config.redis.ca_file = Some(certs.path("ca.crt"));
    assert_eq!(config.problems(), Vec::<String>::new());
    let keys = RedisKeys::new(&config.redis.key_prefix);

    // What the notifier would have written.
    let t = transition("a", "north", 1, true);
    let json = serde_json::to_string(&t).expect("json");
    let mut writer = redis_client(&config.redis)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("TLS connection");
    redis::pipe()
        .set(keys.region_seq("north"), 1)
        .hset(keys.region_facilities("north"), "a", &json)
        .exec_async(&mut writer)
        .await
        .expect("write");

    let store = Store::new(&config.redis, keys.clone()).expect("store");
    let snapshot = store.snapshot("north").await.expect("snapshot over TLS");
    assert_eq!((snapshot.region_seq, snapshot.online), (1, 1));
    assert_eq!(snapshot.facilities, vec![t]);

    let mut pubsub =
        tokio::time::timeout(Duration::from_secs(10), store.client().get_async_pubsub())
            .await
            .expect("pub/sub connects within 10 s")
            .expect("pub/sub over TLS");
    pubsub
        .psubscribe(keys.channel_pattern())
        .await
        .expect("psubscribe");
    let _: i64 = redis::cmd("PUBLISH")
        .arg(keys.region_channel("north"))
        .arg("hello")
        .query_async(&mut writer)
        .await
        .expect("publish");
    let message = tokio::time::timeout(Duration::from_secs(10), pubsub.on_message().next())
        .await
        .expect("a message within 10 s")
        .expect("subscription open");
    assert_eq!(message.get_channel_name(), keys.region_channel("north"));

    let mut wrong = config.redis.clone();
    wrong.ca_file = Some(certs.path("other-ca.crt"));
    let e = Store::new(&wrong, keys)
        .expect("store")
        .snapshot("north")
        .await
        .expect_err("a server the CA did not sign");
    assert!(e.to_string().contains("set redis.ca_file"), "{e}");
}
