//! The notifier against a Redis of its own that speaks TLS only and asks for client
//! certificates, on a CA this test makes: the notifier writes through `rediss://`, a second
//! TLS client reads what it wrote, and a wrong CA, a missing client certificate and plain
//! text are each refused.

use std::time::Duration;

use presence_core::config::RedisConfig;
use presence_core::delivery::{redis_client, RedisKeys};
use presence_core::{Secret, Shutdown};
use presence_testkit::{
    ensure_topics, eventually, isolated_config, produce, spawn_process, status_records, transition,
    PrivateService, TestCerts,
};
use redis::AsyncCommands;

async fn connect(r: &RedisConfig) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis_client(r).unwrap_or_else(|e| panic!("redis client: {e}"));
    tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .unwrap_or_else(|_| panic!("connecting to {} did not finish in 10 s", r.url))
    .map_err(presence_core::delivery::explain_redis_error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_writes_through_rediss_and_wrong_trust_is_refused() {
    let certs = TestCerts::new();
    let server = PrivateService::redis()
        .with_tls(&certs)
        .with_env("REDIS_TLS_AUTH_CLIENTS", "yes");
    server.start();

    let mut config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    config.redis.url = Secret::new(format!("rediss://127.0.0.1:{}", server.port()));
    config.redis.ca_file = Some(certs.path("ca.crt"));
    config.redis.client_cert_file = Some(certs.path("client.crt"));
    config.redis.client_key_file = Some(certs.path("client.key"));
    assert_eq!(config.problems(), Vec::<String>::new());
    ensure_topics(&config).await;
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&[
            transition("a", "north", 1, true),
            transition("a", "north", 2, false),
        ]),
    )
    .await;
    let shutdown = Shutdown::new();
    let c = config.clone();
    spawn_process("notifier", &shutdown, |s| presence_notifier::run(c, s));

    let keys = RedisKeys::new(&config.redis.key_prefix);
    let mut r = connect(&config.redis).await.expect("TLS with the right CA");
    let stored = eventually(
        "facility a at seq 2, read back over TLS",
        Duration::from_secs(30),
        || {
            let mut r = r.clone();
            let key = keys.facility("a");
            async move {
                let seq: Option<String> = r.hget(&key, "seq").await.ok()?;
                (seq.as_deref() == Some("2")).then_some(seq)
            }
        },
    )
    .await;
    assert_eq!(stored.as_deref(), Some("2"));
    let json: String = r.hget(keys.facility("a"), "json").await.expect("hget");
    assert!(json.contains("\"OFFLINE\""), "{json}");
    shutdown.trigger();

    // A CA that did not sign the server's certificate.
    let mut wrong_ca = config.redis.clone();
    wrong_ca.ca_file = Some(certs.path("other-ca.crt"));
    let e = connect(&wrong_ca).await.expect_err("server not trusted");
    assert!(e.to_string().contains("UnknownIssuer"), "wrong CA: {e}");

    // The server asks for a client certificate; none is given.
    let mut anonymous = config.redis.clone();
    anonymous.client_cert_file = None;
    anonymous.client_key_file = None;
    let e = connect(&anonymous)
        .await
        .expect_err("client certificate required");
    assert!(
        e.to_string().contains("CertificateRequired")
            && e.to_string().contains("set redis.client_cert_file"),
        "no client certificate: {e}"
    );

    // No plain-text listener.
    let mut plain = config.redis.clone();
    plain.url = Secret::new(format!("redis://127.0.0.1:{}", server.port()));
    plain.ca_file = None;
    plain.client_cert_file = None;
    plain.client_key_file = None;
    assert!(connect(&plain).await.is_err(), "plain text accepted");
}
