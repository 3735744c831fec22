//! A transition PostgreSQL refuses for what it holds (a `since` beyond any timestamp) is
//! not retried forever: after a few refusals it goes to the dead-letter topic with the
//! processor's headers and a metric, and the records behind it on its partition apply.

use std::time::{Duration, Instant};

use presence_core::config::Config;
use presence_core::delivery::Tables;
use presence_core::kafka::consumer_config;
use presence_core::Shutdown;
use presence_testkit::{
    ensure_topics, eventually, free_port, isolated_config, produce, spawn_process, status_records,
    transition,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_postgres::NoTls;

async fn rows(config: &Config, sql: &str) -> Option<Vec<(String, i64)>> {
    let (client, connection) = tokio_postgres::connect(config.database.url.expose(), NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let rows = client.query(sql, &[]).await.ok()?;
    Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transition_is_dead_lettered_and_the_partition_flows_on() {
    let mut config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    // One partition: the good records sit behind the poison one.
    config.topics.facility_partitions = 1;
    config.sink.ops_listen = ([127, 0, 0, 1], free_port()).into();
    ensure_topics(&config).await;
    let t = Tables::new(&config.database.schema);
    let mut poison = transition("b", "north", 1, true);
    // Far beyond PostgreSQL's timestamp range: SQLSTATE 22008 on every attempt.
    poison.since = i64::MAX / 4;
    let statuses = vec![
        transition("a", "north", 1, true),
        poison,
        transition("a", "north", 2, false),
        transition("c", "north", 1, true),
    ];
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&statuses),
    )
    .await;
    let shutdown = Shutdown::new();
    spawn_process("sink", &shutdown, |s| presence_sink::run(config.clone(), s));

    let current = format!(
        "SELECT facility_id, seq FROM {} ORDER BY facility_id",
        t.current()
    );
    let got = eventually(
        "the transitions behind the refused one written",
        Duration::from_secs(60),
        || async {
            rows(&config, &current)
                .await
                .filter(|r| r.len() == 2 && r[0].1 == 2)
        },
    )
    .await;
    assert_eq!(got, vec![("a".to_string(), 2), ("c".to_string(), 1)]);
    let history = rows(
        &config,
        &format!(
            "SELECT facility_id, seq FROM {} ORDER BY facility_id, seq",
            t.history()
        ),
    )
    .await;
    assert_eq!(
        history,
        Some(vec![
            ("a".to_string(), 1),
            ("a".to_string(), 2),
            ("c".to_string(), 1)
        ])
    );

    // The dead letter: original key and bytes, the processor's header names.
    let dlq: BaseConsumer = consumer_config(&config.kafka, "test-dlq", "unused")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    let md = dlq
        .fetch_metadata(Some(&config.topics.dead_letters), Duration::from_secs(10))
        .expect("metadata");
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(&config.topics.dead_letters, p.id(), Offset::Beginning)
            .expect("partition");
    }
    dlq.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(30);
    let letter = loop {
        assert!(Instant::now() < deadline, "no dead letter within 30 s");
        if let Some(Ok(m)) = dlq.poll(Duration::from_millis(100)) {
            break m.detach();
        }
    };
    let header = |k: &str| {
        letter.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    assert_eq!(letter.key(), Some(&b"b"[..]));
    assert_eq!(
        letter.payload(),
        Some(&status_records(&statuses[1..2])[0].1[..]),
        "original bytes"
    );
    assert_eq!(
        header("presence.error.code").as_deref(),
        Some("postgres_data_exception")
    );
    assert!(
        header("presence.error.message").is_some_and(|m| m.contains("out of range")),
        "{:?}",
        header("presence.error.message")
    );
    assert_eq!(
        header("presence.source.topic").as_deref(),
        Some(config.topics.facility_status.as_str())
    );
    assert_eq!(header("presence.source.partition").as_deref(), Some("0"));
    assert_eq!(header("presence.source.offset").as_deref(), Some("1"));

    let metrics = reqwest::get(format!("http://{}/metrics", config.sink.ops_listen))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics
            .contains("presence_sink_dead_letters_total{error_code=\"postgres_data_exception\"} 1"),
        "{metrics}"
    );
    shutdown.trigger();
}
