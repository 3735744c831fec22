//! `presence topics` against the real broker, checked with Apache Kafka's own command-line
//! client (not this project's code).

use std::process::Command;

use presence_core::testkit::{isolated_config, kafka_libs};
use presence_core::topics::{ensure, specs, Outcome};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};

/// `kafka-topics.sh --describe` for one topic, run from the stack's jars.
fn describe_with_kafka_tools(brokers: &str, topic: &str) -> String {
    let libs = kafka_libs();
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg("-Dlog4j2.level=error")
        .args([
            "org.apache.kafka.tools.TopicCommand",
            "--bootstrap-server",
            brokers,
            "--describe",
            "--topic",
            topic,
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running Kafka's TopicCommand from {}: {e}; run make stack",
                libs.display()
            )
        });
    assert!(
        out.status.success(),
        "TopicCommand failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn creates_every_topic_then_changes_nothing() {
    let config = isolated_config();
    let first = ensure(&config).await.expect("first run");
    assert!(
        first.topics.iter().all(|(_, o)| *o == Outcome::Created),
        "{first}"
    );
    assert_eq!(first.topics.len(), specs(&config.topics).len());

    let second = ensure(&config).await.expect("second run");
    assert!(
        second.topics.iter().all(|(_, o)| *o == Outcome::Verified),
        "{second}"
    );

    let status = describe_with_kafka_tools(&config.kafka.brokers, &config.topics.facility_status);
    assert!(status.contains("cleanup.policy=compact"), "{status}");
    assert!(status.contains("min.cleanable.dirty.ratio=0.1"), "{status}");
    assert!(
        status.contains(&format!(
            "PartitionCount: {}",
            config.topics.facility_partitions
        )),
        "{status}"
    );
    let beats = describe_with_kafka_tools(&config.kafka.brokers, &config.topics.heartbeats);
    assert!(beats.contains("cleanup.policy=delete"), "{beats}");
    assert!(
        beats.contains(&format!(
            "PartitionCount: {}",
            config.topics.heartbeats_partitions
        )),
        "{beats}"
    );
    let changelog =
        describe_with_kafka_tools(&config.kafka.brokers, &config.topics.sessions_changelog());
    assert!(changelog.contains("cleanup.policy=compact"), "{changelog}");
}

#[tokio::test]
async fn a_status_topic_that_is_not_compacted_is_an_error_with_its_fix() {
    let config = isolated_config();
    let admin = presence_core::kafka::admin_client(&config.kafka).unwrap();
    let wrong = NewTopic::new(
        &config.topics.facility_status,
        1,
        TopicReplication::Fixed(1),
    )
    .set("cleanup.policy", "delete");
    let created = admin
        .create_topics([&wrong], &AdminOptions::new())
        .await
        .unwrap();
    assert!(created[0].is_ok(), "{created:?}");

    let report = ensure(&config).await.expect("runs");
    assert!(!report.is_ok());
    let (_, outcome) = report
        .topics
        .iter()
        .find(|(n, _)| n == &config.topics.facility_status)
        .unwrap();
    let Outcome::Wrong(problems) = outcome else {
        panic!("expected Wrong, got {outcome:?}")
    };
    assert!(
        problems
            .iter()
            .any(|p| p.contains("cleanup.policy=delete but must be compact")
                && p.contains("kafka-configs.sh")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("has 1 partitions")),
        "{problems:?}"
    );
    // The other topics are still created.
    assert!(
        report
            .topics
            .iter()
            .filter(|(_, o)| *o == Outcome::Created)
            .count()
            == report.topics.len() - 1,
        "{report}"
    );
}
