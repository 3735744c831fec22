//! Sessions belong to their identity, against the real broker and the real processor: a
//! producer with another user id that reuses a victim's session id can neither close nor
//! move the victim's session; it gets a session (and transitions) of its own.

mod support;

use std::time::Duration;

use presence_core::config::Config;
use presence_core::kafka::{admin_client, consumer_config, ADMIN_TIMEOUT};
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind, Status};
use presence_core::sim::SimRecord;
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use support::*;

/// Long enough that the victim's session cannot time out during the test: every OFFLINE
/// seen is caused by a record.
const TIMEOUT_MS: u64 = 60_005;

fn record(user: &str, session: &str, facility: &str, kind: HeartbeatKind, ts: i64) -> SimRecord {
    SimRecord {
        ts,
        heartbeat: Heartbeat {
            session_id: session.into(),
            user_id: user.into(),
            facility_id: facility.into(),
            region_id: "r".into(),
            kind,
            client_sent_at: None,
        },
    }
}

/// Every committed `facility-status` record, read from the beginning to the end offsets of
/// every partition as they are now (not to an expected count, so extra records show).
fn read_to_end(c: &Config) -> Vec<FacilityStatus> {
    let mut cc = consumer_config(
        &c.kafka,
        "test-reader",
        &format!("{}-to-end", c.processor.group_id),
    );
    cc.set("enable.partition.eof", "true");
    let consumer: BaseConsumer = cc.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..c.topics.facility_partitions {
        tpl.add_partition_offset(&c.topics.facility_status, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut at_end = std::collections::HashSet::new();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while at_end.len() < c.topics.facility_partitions as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "facility-status not read to its end within 30 s"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let s = presence_core::codec::decode::<FacilityStatus>(m.payload().expect("value"))
                    .expect("decodes");
                seen.push(s);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading facility-status: {e}"),
            None => {}
        }
    }
    seen
}

/// A facility's transitions as (status, seq). Not `since`: live, the stream time runs on
/// the wall clock, so it is when the processor saw the record, not the record's timestamp.
fn of(seen: &[FacilityStatus], facility: &str) -> Vec<(Status, i64)> {
    seen.iter()
        .filter(|s| s.facility_id == facility)
        .map(|s| (s.status, s.seq))
        .collect()
}

/// The processor child, killed if the test fails before it is terminated.
struct Processor(std::process::Child);

impl Drop for Processor {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

async fn delete_topics(c: &Config) {
    let t = &c.topics;
    let names = [
        t.heartbeats.clone(),
        t.facility_status.clone(),
        t.dead_letters.clone(),
        t.session_transitions(),
        t.sessions_changelog(),
        t.facilities_changelog(),
    ];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let admin = admin_client(&c.kafka).expect("admin client");
    let _ = admin
        .delete_topics(
            &names,
            &AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)),
        )
        .await;
}

/// The victim's facility is ONLINE; an attacker (another user id) sends END and a beat
/// naming another facility with the victim's session id. The victim stays ONLINE with its
/// seq unchanged, the attacker's facility goes ONLINE and OFFLINE on the attacker's own
/// records, and the victim's own END still closes the victim's session where it was.
#[tokio::test(flavor = "multi_thread")]
async fn another_identity_cannot_end_or_move_a_session() {
    let _one = serial();
    let c = setup(TIMEOUT_MS).await;
    let mut reader = StatusReader::new(&c);
    let mut p = Processor(spawn_processor(&c, "a", &[]));
    let session = format!("victim-session-{}", now_ms());
    let opened = now_ms();
    produce(
        &c,
        &[record(
            "victim",
            &session,
            "FV",
            HeartbeatKind::Beat,
            opened,
        )],
    )
    .await;
    assert!(
        reader.read_until(Duration::from_secs(60), |s| !of(s, "FV").is_empty()),
        "the victim's facility goes ONLINE"
    );
    let t = now_ms();
    produce(
        &c,
        &[
            record("attacker", &session, "FV", HeartbeatKind::End, t),
            record("attacker", &session, "FA", HeartbeatKind::Beat, t + 1),
            record("attacker", &session, "FA", HeartbeatKind::End, t + 2),
        ],
    )
    .await;
    // The attacker's own END is its last record: once its facility is OFFLINE again, every
    // attacker record has been processed, and stage 2 releases transitions in event-time
    // order, so anything they did to the victim is committed by then too.
    assert!(
        reader.read_until(Duration::from_secs(60), |s| of(s, "FA").len() >= 2),
        "the attacker's facility goes ONLINE and OFFLINE: {:?}",
        reader.seen
    );
    let seen = read_to_end(&c);
    assert_eq!(
        of(&seen, "FV"),
        vec![(Status::Online, 1)],
        "the victim stays ONLINE, seq unchanged"
    );
    assert_eq!(
        of(&seen, "FA"),
        vec![(Status::Online, 1), (Status::Offline, 2)],
        "the attacker's session is its own"
    );
    produce(
        &c,
        &[record(
            "victim",
            &session,
            "FV",
            HeartbeatKind::End,
            now_ms(),
        )],
    )
    .await;
    assert!(reader.read_until(Duration::from_secs(60), |s| of(s, "FV").len() >= 2));
    terminate(&mut p.0);
    assert_eq!(
        of(&read_to_end(&c), "FV"),
        vec![(Status::Online, 1), (Status::Offline, 2)],
        "the victim's own END closes the victim's session, at its facility"
    );
    delete_topics(&c).await;
}
