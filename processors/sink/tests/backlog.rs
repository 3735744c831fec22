//! A backlog through the whole sink (Kafka, the consumer loop, the writer): every facility's
//! transitions out of order across many batches, all of them twice, and a record PostgreSQL
//! refuses among them. The tables end as if each transition had been written once in
//! order, and the refused record, alone, goes to the dead-letter topic.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::time::Duration;

use presence_core::config::Config;
use presence_core::delivery::Tables;
use presence_core::records::FacilityStatus;
use presence_core::Shutdown;
use presence_testkit::{
    ensure_topics, free_port, isolated_config, produce_status_markers, spawn_process,
    status_records, transition, TestTopics,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// All of `statuses` to `facility-status`, sent at once (the producer keeps their order
/// per partition) and each acknowledged.
async fn produce_all(config: &Config, statuses: &[FacilityStatus]) {
    let producer: FutureProducer =
        presence_core::kafka::idempotent_producer_config(&config.kafka, "test-producer")
            .create()
            .expect("test producer");
    let records = status_records(statuses);
    let sends = records.iter().map(|(key, value)| {
        producer.send(
            FutureRecord::to(&config.topics.facility_status)
                .key(key)
                .payload(value),
            Duration::from_secs(30),
        )
    });
    for sent in futures::future::join_all(sends).await {
        if let Err((e, _)) = sent {
            panic!("producing the backlog: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shuffled_replayed_backlog_with_a_refused_record_ends_as_each_transition_once() {
    let mut config = isolated_config();
    let _topics = TestTopics::own(&config);
    config.sink.ops_listen = ([127, 0, 0, 1], free_port()).into();
    // Small batches: the backlog goes through many, and the refused record's batch is
    // split while the others are written whole.
    config.sink.batch_size = 500;
    ensure_topics(&config).await;
    let tables = Tables::new(&config.database.schema);

    // 300 facilities x seqs 1..=8, shuffled, so a facility's seqs come out of order within
    // and across batches; then all of it again.
    let mut statuses: Vec<FacilityStatus> = (0..300)
        .flat_map(|f| (1..=8).map(move |s| transition(&format!("f{f:03}"), "west", s, s % 2 == 1)))
        .collect();
    statuses.shuffle(&mut rand::rngs::StdRng::seed_from_u64(13));
    let mut poison = transition("f007", "west", 9, true);
    // Beyond PostgreSQL's timestamp range: refused (SQLSTATE 22008) on every attempt.
    poison.since = i64::MAX / 4;
    let mut backlog = statuses.clone();
    backlog.insert(1234, poison);
    backlog.extend(statuses.iter().cloned());
    produce_all(&config, &backlog).await;
    // A marker after the backlog on every partition: once all are written, the sink has
    // been through every record before them.
    let partitions = produce_status_markers(&config, "west").await;

    let shutdown = Shutdown::new();
    let sink = spawn_process("sink", &shutdown, |s| presence_sink::run(config.clone(), s));
    wait_for_markers(&config, &tables, partitions.len()).await;

    let client = db(&config).await.expect("db");
    let history: Vec<(String, i64)> = history_pairs(&client, &tables).await;
    assert_eq!(history.len(), 300 * 8, "each transition once");
    assert_eq!(history, pairs_of(&statuses));
    let current: BTreeMap<String, (i64, String)> = client
        .query(
            &format!(
                "SELECT facility_id, seq, status FROM {} WHERE facility_id LIKE 'f%'",
                tables.current()
            ),
            &[],
        )
        .await
        .expect("current")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(current.len(), 300);
    assert!(
        current.values().all(|v| *v == (8, "OFFLINE".to_string())),
        "every facility at its newest seq, the refused seq 9 of f007 not among them: {:?}",
        current.get("f007")
    );

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
    sink.stop(Duration::from_secs(30)).await;
    client
        .batch_execute(&format!(
            "DROP SCHEMA \"{}\" CASCADE",
            config.database.schema
        ))
        .await
        .expect("drop the test's schema");
}
