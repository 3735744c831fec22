//! `presence topics` against the real broker, checked with Apache Kafka's own command-line
//! client (not this project's code).

use std::process::Command;

use presence_core::topics::{ensure, specs, Outcome};
use presence_testkit::{isolated_config, kafka_libs, TestTopics};
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
    assert_eq!(
        first.topics.len(),
        specs(&config.topics, config.processor.session_timeout).len()
    );

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

/// Topics made by someone else with a longer retention and other tuning are accepted with
/// warnings (the second run too: nothing is altered); a retention shorter than the processor
/// needs is refused with its fix.
#[tokio::test]
async fn longer_retention_and_other_tuning_are_accepted_too_short_a_retention_is_refused() {
    let config = isolated_config();
    let _topics = TestTopics::own(&config);
    let t = &config.topics;
    let admin = presence_core::kafka::admin_client(&config.kafka).unwrap();
    let week = (7 * 24 * 3600 * 1000u64).to_string();
    let too_short = (config.processor.session_timeout.as_millis() as u64).to_string();
    let transitions = t.session_transitions();
    let made = [
        NewTopic::new(
            &t.heartbeats,
            t.heartbeats_partitions,
            TopicReplication::Fixed(1),
        )
        .set("cleanup.policy", "delete")
        .set("retention.ms", &week),
        NewTopic::new(
            &t.facility_status,
            t.facility_partitions,
            TopicReplication::Fixed(1),
        )
        .set("cleanup.policy", "compact")
        .set("segment.ms", "3600000"),
        NewTopic::new(
            &transitions,
            t.facility_partitions,
            TopicReplication::Fixed(1),
        )
        .set("cleanup.policy", "delete")
        .set("retention.ms", &too_short),
    ];
    let created = admin
        .create_topics(made.iter(), &AdminOptions::new())
        .await
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");

    for run in ["first", "second"] {
        let report = ensure(&config).await.expect("runs");
        let outcome = |topic: &str| {
            report
                .topics
                .iter()
                .find(|(n, _)| n == topic)
                .map(|(_, o)| o.clone())
                .unwrap()
        };
        let Outcome::Accepted(w) = outcome(&t.heartbeats) else {
            panic!("{run}: heartbeats with a week of retention: {report}")
        };
        assert!(
            w.len() == 1 && w[0].starts_with(&format!("retention.ms is {week} ms")),
            "{run}: {w:?}"
        );
        let Outcome::Accepted(w) = outcome(&t.facility_status) else {
            panic!("{run}: facility-status with another segment.ms: {report}")
        };
        assert!(
            w.iter().any(|w| w.starts_with("segment.ms=3600000")),
            "{run}: {w:?}"
        );
        let Outcome::Wrong(p) = outcome(&t.session_transitions()) else {
            panic!("{run}: session transitions kept shorter than needed: {report}")
        };
        assert!(
            p.len() == 1 && p[0].contains("shorter than") && p[0].contains("kafka-configs.sh"),
            "{run}: {p:?}"
        );
        assert!(!report.is_ok(), "{run}: {report}");
        assert!(
            report.to_string().contains("          ! retention.ms is"),
            "{report}"
        );
    }
    // Nothing was altered behind the operator's back.
    let beats = describe_with_kafka_tools(&config.kafka.brokers, &t.heartbeats);
    assert!(beats.contains(&format!("retention.ms={week}")), "{beats}");
}
