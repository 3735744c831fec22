//! Sessions belong to their identity, against the real broker and the real processor: a
//! producer with another user id that reuses a victim's session id can neither close nor
//! move the victim's session; it gets a session (and transitions) of its own. Directly on
//! Kafka, across an upgrade from the ownerless changelog, and through the gateway with
//! tokens.

// The serial() guard is held across awaits on purpose: it keeps heavy end-to-end tests from
// running at once, and no task of the test waits for it.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use presence_core::codec::{crc64_avro, decode, write_long, write_str, MARKER};
use presence_core::config::Config;
use presence_core::kafka::{admin_client, consumer_config, ADMIN_TIMEOUT};
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind, Status};
use presence_processor::records::SessionState;
use presence_processor::sessions::{key_bytes, legacy_session_key, session_key};
use presence_testkit::sim::SimRecord;
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
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
            client_version: None,
        },
    }
}

/// A committed record: partition, key, value.
type Record = (i32, Option<Vec<u8>>, Option<Vec<u8>>);

/// Every committed record of `topic`, read from the beginning to the end offsets of every
/// partition as they are now (not to an expected count, so extra records show).
fn read_to_end(c: &Config, topic: &str, partitions: i32) -> Vec<Record> {
    let mut cc = consumer_config(
        &c.kafka,
        "test-reader",
        &format!("{}-to-end", c.processor.group_id),
    );
    cc.set("enable.partition.eof", "true");
    let consumer: BaseConsumer = cc.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut at_end = std::collections::HashSet::new();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while at_end.len() < partitions as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "{topic} not read to its end within 30 s"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => seen.push((
                m.partition(),
                m.key().map(<[u8]>::to_vec),
                m.payload().map(<[u8]>::to_vec),
            )),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    seen
}

/// Every committed `facility-status` record, to the end offsets.
fn statuses(c: &Config) -> Vec<FacilityStatus> {
    read_to_end(c, &c.topics.facility_status, c.topics.facility_partitions)
        .into_iter()
        .map(|(_, _, v)| decode::<FacilityStatus>(&v.expect("value")).expect("decodes"))
        .collect()
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
    let seen = statuses(&c);
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
        of(&statuses(&c), "FV"),
        vec![(Status::Online, 1), (Status::Offline, 2)],
        "the victim's own END closes the victim's session, at its facility"
    );
    delete_topics(&c).await;
}

/// The Parsing Canonical Form of `schemas/history/session_state/v1.avsc` (the specification
/// drops `doc` and logical types), whose CRC-64-AVRO heads every v1 record.
const SESSION_STATE_V1_PCF: &str = r#"{"name":"dev.presence.internal.SessionState","type":"record","fields":[{"name":"session_id","type":"string"},{"name":"facility_id","type":"string"},{"name":"region_id","type":"string"},{"name":"last_seen","type":"long"},{"name":"open_offset","type":"long"}]}"#;

/// `state` as a processor from before session ownership wrote it: schema v1, no user id.
fn v1_bytes(state: &SessionState) -> Vec<u8> {
    let mut out = MARKER.to_vec();
    out.extend_from_slice(&crc64_avro(SESSION_STATE_V1_PCF.as_bytes()).to_le_bytes());
    write_str(&mut out, &state.session_id);
    write_str(&mut out, &state.facility_id);
    write_str(&mut out, &state.region_id);
    write_long(&mut out, state.last_seen);
    write_long(&mut out, state.open_offset);
    out
}

/// The upgrade: the sessions changelog holds the victim's open session as the processor of
/// before wrote it (schema v1, keyed by the session id alone). The new processor restores it
/// with the victim as owner (found in the re-read heartbeats): another user's END does
/// nothing, the victim's END closes it and tombstones the v1 record.
#[tokio::test(flavor = "multi_thread")]
async fn a_v1_changelog_restores_with_its_owner() {
    let _one = serial();
    let c = setup(TIMEOUT_MS).await;
    let changelog = c.topics.sessions_changelog();
    let parts = c.topics.heartbeats_partitions;
    let mut reader = StatusReader::new(&c);
    let mut p = Processor(spawn_processor(&c, "a", &[]));
    let session = format!("upgraded-session-{}", now_ms());
    produce(
        &c,
        &[record(
            "victim",
            &session,
            "FV",
            HeartbeatKind::Beat,
            now_ms(),
        )],
    )
    .await;
    assert!(reader.read_until(Duration::from_secs(60), |s| !of(s, "FV").is_empty()));
    produce(
        &c,
        &[record(
            "victim",
            &session,
            "FV",
            HeartbeatKind::Beat,
            now_ms(),
        )],
    )
    .await;
    terminate(&mut p.0);

    // Rewrite the changelog as the old processor would have left it.
    let owned = key_bytes(&session_key("victim", &session)).to_vec();
    let legacy = key_bytes(&legacy_session_key(&session)).to_vec();
    let (partition, state) = read_to_end(&c, &changelog, parts)
        .into_iter()
        .find_map(|(p, k, v)| {
            let v = v.filter(|_| k.as_deref() == Some(&owned[..]))?;
            Some((p, decode::<SessionState>(&v).expect("decodes")))
        })
        .expect("the victim's session in the changelog");
    assert_eq!(state.user_id, "victim");
    let old = v1_bytes(&state);
    assert_eq!(
        decode::<SessionState>(&old).expect("v1 decodes"),
        SessionState {
            user_id: String::new(),
            ..state.clone()
        }
    );
    let producer: FutureProducer =
        presence_core::kafka::idempotent_producer_config(&c.kafka, "test")
            .create()
            .expect("producer");
    for (key, value) in [(&owned, None), (&legacy, Some(&old))] {
        let mut r = FutureRecord::<Vec<u8>, Vec<u8>>::to(&changelog)
            .key(key)
            .partition(partition);
        if let Some(v) = value {
            r = r.payload(v);
        }
        producer
            .send(r, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("changelog write");
    }

    let mut p = Processor(spawn_processor(&c, "a", &[]));
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
    assert!(
        reader.read_until(Duration::from_secs(60), |s| of(s, "FA").len() >= 2),
        "the attacker's records are processed: {:?}",
        reader.seen
    );
    assert_eq!(
        of(&statuses(&c), "FV"),
        vec![(Status::Online, 1)],
        "the restored session survives another user's END"
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
    // Within far less than the timeout: the victim's END closed the restored session (had
    // its owner not been found, only the timeout would).
    assert!(
        reader.read_until(Duration::from_secs(30), |s| of(s, "FV").len() >= 2),
        "the victim's END closes the restored session: {:?}",
        reader.seen
    );
    terminate(&mut p.0);
    assert_eq!(
        of(&statuses(&c), "FV"),
        vec![(Status::Online, 1), (Status::Offline, 2)]
    );
    let mut compacted = std::collections::HashMap::new();
    for (_, k, v) in read_to_end(&c, &changelog, parts) {
        compacted.insert(k, v.is_some());
    }
    assert_eq!(
        compacted.get(&Some(legacy.clone())),
        Some(&false),
        "the v1 record is tombstoned"
    );
    assert!(
        compacted.values().all(|live| !live),
        "no session left in the changelog: {compacted:?}"
    );
    delete_topics(&c).await;
}

const SECRET: &str = "ownership-test-secret-ownership-test-secret";

/// An HS256 token for `sub` at `facility` in region `r`, valid for five minutes. Claims as
/// JSON, so the test does not depend on the gateway's claim type.
fn token(sub: &str, facility: &str) -> String {
    let claims = serde_json::json!({
        "sub": sub,
        "facility": facility,
        "region": "r",
        "exp": now_ms() / 1000 + 300,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

async fn post(base: &str, token: &str, body: serde_json::Value) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/heartbeats"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

/// The issue's attack, through the gateway with `auth = "jwt"`: a token for facility FA
/// posts END and BEAT with the session id of a user at FV. The gateway records them under
/// the attacker's `sub` (a body claiming the victim's user id is refused), so the victim
/// stays ONLINE with its seq unchanged and FA gets transitions of its own.
#[tokio::test(flavor = "multi_thread")]
async fn through_the_gateway_a_token_cannot_end_another_users_session() {
    let _one = serial();
    let mut c = setup(TIMEOUT_MS).await;
    c.gateway.auth = presence_core::config::AuthMode::Jwt;
    c.gateway.jwt_secret = presence_core::Secret::new(SECRET);
    let shutdown = presence_core::Shutdown::new();
    let base = start_gateway(&c, &shutdown).await;
    let mut reader = StatusReader::new(&c);
    let mut p = Processor(spawn_processor(&c, "a", &[]));
    let (victim, attacker) = (token("victim", "FV"), token("attacker", "FA"));
    let session = format!("victim-session-{}", now_ms());
    let beat = |kind: &str| serde_json::json!({"session_id": session, "kind": kind});
    assert_eq!(post(&base, &victim, beat("BEAT")).await, 202);
    assert!(
        reader.read_until(Duration::from_secs(60), |s| !of(s, "FV").is_empty()),
        "the victim's facility goes ONLINE"
    );
    let spoofed = serde_json::json!({
        "session_id": session, "user_id": "victim", "facility_id": "FV", "region_id": "r", "kind": "END",
    });
    assert_eq!(
        post(&base, &attacker, spoofed).await,
        403,
        "a body naming another user than the token's is refused"
    );
    for kind in ["END", "BEAT", "END"] {
        assert_eq!(post(&base, &attacker, beat(kind)).await, 202);
    }
    assert!(
        reader.read_until(Duration::from_secs(60), |s| of(s, "FA").len() >= 2),
        "the attacker's own session opens and closes at FA: {:?}",
        reader.seen
    );
    assert_eq!(
        of(&statuses(&c), "FV"),
        vec![(Status::Online, 1)],
        "the victim stays ONLINE, seq unchanged"
    );
    assert_eq!(
        of(&statuses(&c), "FA"),
        vec![(Status::Online, 1), (Status::Offline, 2)]
    );
    assert_eq!(post(&base, &victim, beat("END")).await, 202);
    assert!(
        reader.read_until(Duration::from_secs(30), |s| of(s, "FV").len() >= 2),
        "the victim's own END still closes the victim's session"
    );
    terminate(&mut p.0);
    shutdown.trigger();
    delete_topics(&c).await;
}
