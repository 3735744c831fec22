//! The `confluent` framing against a real schema registry: Apicurio Registry 2.4.2 through its
//! Confluent-compatible API (`bash deploy/stack.sh registry-up`, which `make stack` runs).
//! `presence topics` registers FULL_TRANSITIVE subjects, the processor reads heartbeats in
//! both framings and writes `facility-status` in the registry's, which the sink reads into
//! PostgreSQL and Confluent's own Python deserializer (the README's example consumer with
//! `--registry-url`) decodes. Every test deletes the subjects it registered.

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

#[path = "support/registry_proxy.rs"]
mod registry_proxy;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use presence_core::codec::AvroRecord;
use presence_core::codec::{confluent_id, decode_framed, encode, encode_with, Header, RegistryIds};
use presence_core::config::Config;
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind};
use presence_core::registry::{header_for, value_subject, Framing, IdCache, RegistryError};
use presence_core::{topics, Shutdown};
use presence_testkit::{python, read_to_end, read_to_end_until, repo_root};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn topics_registers_full_transitive_subjects_that_the_registry_enforces() {
    // One registering test at a time: Apicurio's in-memory storage can fail two concurrent
    // first registrations (a content-id clash), which `register` retries but need not meet.
    let _one = serial();
    let c = setup_confluent(90_000).await;
    let _cleanup = Subjects::new(&c);
    let first = topics::register_subjects(&c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.len(), 2, "{first:?}");
    let again = topics::register_subjects(&c).await.expect("second run");
    assert_eq!(first, again, "a second run changes nothing");

    let client = registry_client(&c);
    for topic in [&c.topics.heartbeats, &c.topics.facility_status] {
        let subject = value_subject(topic);
        assert_eq!(
            client.compatibility(&subject).await.expect("config"),
            Some("FULL_TRANSITIVE".to_string()),
            "{subject}"
        );
    }
    // A new field without a default breaks FULL_TRANSITIVE: old readers could read new data,
    // but new readers could not read old data. The registry refuses it.
    let breaking = Heartbeat::SCHEMA.replacen(
        r#""fields": ["#,
        r#""fields": [{"name": "tenant", "type": "string"},"#,
        1,
    );
    assert_ne!(
        breaking,
        Heartbeat::SCHEMA,
        "the test must change the schema"
    );
    match client
        .register(&value_subject(&c.topics.heartbeats), &breaking)
        .await
    {
        Err(RegistryError::Refused { status: 409, .. }) => {}
        other => panic!("an incompatible schema must be refused with 409, got {other:?}"),
    }
    // Writers find the id of the current schema.
    let header = header_for::<FacilityStatus>(&c.schema_registry, &c.topics.facility_status)
        .await
        .expect("registered");
    assert!(matches!(header, Header::Confluent { .. }), "{header:?}");

    // Without registration, a writer is told what to run.
    let mut unregistered = c.clone();
    unregistered.topics.facility_status = format!("{}-never-registered", c.topics.facility_status);
    let e = header_for::<FacilityStatus>(
        &unregistered.schema_registry,
        &unregistered.topics.facility_status,
    )
    .await
    .expect_err("not registered");
    let text = e.to_string();
    assert!(text.contains(&registry_url()), "names the registry: {text}");
    assert!(text.contains("presence topics"), "names the fix: {text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_registry_is_named_with_the_fix_and_no_password() {
    let mut c = Config::default();
    c.schema_registry.framing = Framing::Confluent;
    c.schema_registry.url = format!("http://127.0.0.1:{}/apis/ccompat/v7", free_port());
    c.schema_registry.username = "svc".into();
    c.schema_registry.password = presence_core::Secret::new("s3cret-pw");
    let e = header_for::<FacilityStatus>(&c.schema_registry, "facility-status")
        .await
        .expect_err("nothing listens there");
    let text = e.to_string();
    assert!(text.contains(&c.schema_registry.url), "{text}");
    assert!(text.contains("registry-up"), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");
    let shown = format!("{:?}", c.redacted());
    assert!(!shown.contains("s3cret-pw"), "{shown}");
}

fn free_port() -> u16 {
    presence_testkit::free_port()
}

/// Produces `(key, value, timestamp)` records to the heartbeats topic.
async fn produce_raw(c: &Config, records: &[(String, Vec<u8>, i64)]) {
    let producer: FutureProducer =
        presence_core::kafka::idempotent_producer_config(&c.kafka, "test-producer")
            .create()
            .expect("producer");
    for (key, value, ts) in records {
        producer
            .send(
                FutureRecord::to(&c.topics.heartbeats)
                    .key(key)
                    .payload(value)
                    .timestamp(*ts),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing: {e}"));
    }
}

fn beat(session: &str, facility: &str, kind: HeartbeatKind) -> Heartbeat {
    heartbeat(session, facility, kind)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_processor_reads_both_framings_and_confluents_deserializer_reads_its_output() {
    let _one = serial();
    let c = setup_confluent(90_000).await;
    let _cleanup = Subjects::new(&c);
    topics::register_subjects(&c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = registry_client(&c);
    let heartbeat_id = client
        .lookup(&value_subject(&c.topics.heartbeats), Heartbeat::SCHEMA)
        .await
        .expect("lookup")
        .expect("registered by presence topics");
    let confluent = Header::Confluent { id: heartbeat_id };

    let shutdown = Shutdown::new();
    let processor = processor_in_process(&c, &shutdown).await;
    let now = now_ms();
    let unknown_id = Header::Confluent { id: 0x7fff_fff0 };
    let end = |s, f| beat(s, f, HeartbeatKind::End);
    let open = |s, f| beat(s, f, HeartbeatKind::Beat);
    produce_raw(
        &c,
        &[
            (
                "a".into(),
                encode_with(&open("a", "CONFLUENT"), confluent),
                now,
            ),
            ("b".into(), encode(&open("b", "SINGLE")), now),
            // An id the registry never gave out: a dead letter, never a stall.
            (
                "x".into(),
                encode_with(&open("x", "NEVER"), unknown_id),
                now,
            ),
            (
                "a".into(),
                encode_with(&end("a", "CONFLUENT"), confluent),
                now + 1,
            ),
            ("b".into(), encode(&end("b", "SINGLE")), now + 1),
        ],
    )
    .await;
    let records = read_to_end_until(
        &c,
        &c.topics.facility_status,
        Duration::from_secs(60),
        |r| r.len() >= 4,
    );
    processor.stop(Duration::from_secs(30)).await;

    // Every transition in the registry's framing, with the id of the current schema.
    let status_id = client
        .lookup(
            &value_subject(&c.topics.facility_status),
            FacilityStatus::SCHEMA,
        )
        .await
        .expect("lookup")
        .expect("registered");
    let ids = IdCache::new(&c.schema_registry).expect("cache");
    let mut ours = BTreeSet::new();
    for m in &records {
        let value = m.payload().unwrap_or_default();
        assert_eq!(
            confluent_id(value),
            Some(status_id),
            "framing of {value:02x?}"
        );
        ids.ensure(value).await.expect("resolves");
        assert!(ids.fingerprint(status_id).is_some());
        let s: FacilityStatus = decode_framed(value, &ids).expect("decodes");
        assert_eq!(m.key(), Some(s.facility_id.as_bytes()));
        ours.insert((s.facility_id.clone(), s.status.as_str().to_string(), s.seq));
    }
    let expected: BTreeSet<(String, String, i64)> = [
        ("CONFLUENT", "ONLINE", 1),
        ("CONFLUENT", "OFFLINE", 2),
        ("SINGLE", "ONLINE", 1),
        ("SINGLE", "OFFLINE", 2),
    ]
    .into_iter()
    .map(|(f, s, n)| (f.to_string(), s.to_string(), n))
    .collect();
    assert_eq!(ours, expected);
    assert_eq!(records.len(), 4, "nothing else");

    let letters = read_to_end(&c, &c.topics.dead_letters, Duration::from_secs(30));
    let codes: Vec<String> = letters
        .iter()
        .map(|m| presence_testkit::header(m, "presence.error.code"))
        .collect();
    assert_eq!(codes, vec!["unresolved_schema_id"], "the unknown id only");

    // The sink reads the registry framing too: every transition lands in PostgreSQL.
    let sink_shutdown = Shutdown::new();
    let sc = c.clone();
    let sink =
        presence_testkit::spawn_process("sink", &sink_shutdown, move |s| presence_sink::run(sc, s));
    let (db, connection) = tokio_postgres::connect(c.database.url.expose(), tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL of the stack");
    tokio::spawn(connection);
    let schema = c.database.schema.clone();
    let stored: BTreeSet<(String, String, i64)> = presence_testkit::eventually(
        "the sink's four transitions in PostgreSQL",
        Duration::from_secs(60),
        || {
            let (db, schema) = (&db, &schema);
            async move {
                let rows = db
                    .query(
                        &format!(
                            "SELECT facility_id, status, seq FROM \"{schema}\".facility_transitions"
                        ),
                        &[],
                    )
                    .await
                    .ok()?;
                let set: BTreeSet<(String, String, i64)> = rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect();
                (set.len() >= 4).then_some(set)
            }
        },
    )
    .await;
    sink.stop(Duration::from_secs(30)).await;
    db.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .expect("drop the sink's schema");
    assert_eq!(stored, expected, "what the sink stored");

    // Confluent's AvroDeserializer with its SchemaRegistryClient, in the example consumer.
    let out = std::process::Command::new(python())
        .arg(repo_root().join("examples/python/consume_facility_status.py"))
        .args(["--bootstrap-servers", &c.kafka.brokers])
        .args(["--topic", &c.topics.facility_status])
        .args(["--registry-url", &registry_url()])
        .args(["--from-beginning", "--max-records", "4", "--timeout", "60"])
        .output()
        .expect("run the Python example (make stack installs its packages)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python consumer failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: BTreeSet<(String, String, i64)> = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (
                v["facility_id"].as_str().unwrap_or_default().to_string(),
                v["status"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(theirs, expected, "what confluent-kafka decoded");
}

/// A processor pinned to write `FacilityStatus` v1 (`PRESENCE_SCHEMA_WRITE_VERSIONS`, as in
/// a rolling upgrade) with the registry's framing: each record's id is v1's and its body is
/// v1's, so a reader that resolves the id (an old instance, any Confluent deserializer) reads
/// exactly what was written. Before, the pin was ignored with this framing: current bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_writer_frames_its_records_with_the_pinned_versions_id() {
    let _one = serial();
    let c = setup_confluent(90_000).await;
    let _cleanup = Subjects::new(&c);
    let _topics = Cleanup::new(&c);
    topics::register_subjects(&c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = registry_client(&c);
    let subject = value_subject(&c.topics.facility_status);
    let v1_text = FacilityStatus::HISTORY[0];
    let v1_id = client
        .lookup(&subject, v1_text)
        .await
        .expect("lookup")
        .expect("presence topics registers every released version");
    let current_id = client
        .lookup(&subject, FacilityStatus::SCHEMA)
        .await
        .expect("lookup")
        .expect("registered");
    assert_ne!(v1_id, current_id);
    let url = c.schema_registry.url.clone();
    let mut p = watched_processor(
        &c,
        "a",
        &[
            ("PRESENCE_SCHEMA_REGISTRY__URL", url.as_str()),
            ("PRESENCE_SCHEMA_REGISTRY__FRAMING", "confluent"),
            ("PRESENCE_SCHEMA_WRITE_VERSIONS", "FacilityStatus=1"),
        ],
    );
    let now = now_ms();
    produce_raw(
        &c,
        &[
            (
                "s".into(),
                encode(&beat("s", "PINNED", HeartbeatKind::Beat)),
                now,
            ),
            (
                "s".into(),
                encode(&beat("s", "PINNED", HeartbeatKind::End)),
                now + 1,
            ),
        ],
    )
    .await;
    let records = read_to_end_until(
        &c,
        &c.topics.facility_status,
        Duration::from_secs(60),
        |r| r.len() >= 2,
    );
    terminate(&mut p);
    let v1 = apache_avro::Schema::parse_str(v1_text).expect("v1 parses");
    for m in &records {
        let value = m.payload().unwrap_or_default();
        assert_eq!(confluent_id(value), Some(v1_id), "the pinned version's id");
        let mut body = &value[5..];
        apache_avro::from_avro_datum(&v1, &mut body, None).expect("a v1 body");
        assert!(body.is_empty(), "v1's body, nothing after it: {value:02x?}");
    }
    assert_eq!(records.len(), 2);
}

/// `presence topics` as the binary runs it, with `c`'s topics and these settings on top; its
/// exit status and everything it printed.
fn presence_topics(c: &Config, settings: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_presence"));
    cmd.arg("topics")
        .env_clear()
        .envs(env_of(c, "topics"))
        .env("PRESENCE_TELEMETRY__LOG_FILTER", "info")
        .envs(settings.iter().copied())
        .stdin(std::process::Stdio::null());
    let out = cmd.output().expect("run presence topics");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A registry reached over HTTPS with a CA of the test's own and basic authentication
/// required (a TLS and basic-auth front of the test's, `support/registry_proxy.rs`, before
/// the stack's registry): `presence topics` registers through it, the processor resolves a
/// heartbeat's id and frames its output through it, the notifier resolves that output's id
/// through it into Redis. A wrong password and a CA that did not sign the registry's
/// certificate each fail naming the setting to fix, and the password shows in no output.
#[tokio::test(flavor = "multi_thread")]
async fn a_registry_behind_tls_and_basic_auth_is_reached_with_the_ca_and_credentials_only() {
    let _one = serial();
    let certs = presence_testkit::TestCerts::new();
    let user = "presence-test";
    let password = presence_testkit::unique("pw");
    let proxy = registry_proxy::RegistryProxy::start(
        &certs.path("server.crt"),
        &certs.path("server.key"),
        user,
        &password,
        &registry_url(),
    );
    let mut c = setup_confluent(90_000).await;
    let _topics = Cleanup::new(&c).with_groups(std::slice::from_ref(&c.notifier.group_id));
    let _subjects = Subjects::new(&c);
    c.schema_registry.url = proxy.url();
    c.schema_registry.username = user.into();
    c.schema_registry.password = presence_core::Secret::new(password.clone());
    let ca = certs.path("ca.crt");
    c.schema_registry.ca_file = Some(ca.clone());
    assert_eq!(c.schema_registry.problems(), Vec::<String>::new());
    let ca_text = ca.display().to_string();
    let url = proxy.url();
    let secured = [
        ("PRESENCE_SCHEMA_REGISTRY__FRAMING", "confluent"),
        ("PRESENCE_SCHEMA_REGISTRY__URL", url.as_str()),
        ("PRESENCE_SCHEMA_REGISTRY__USERNAME", user),
        ("PRESENCE_SCHEMA_REGISTRY__PASSWORD", password.as_str()),
        ("PRESENCE_SCHEMA_REGISTRY__CA_FILE", ca_text.as_str()),
    ];

    // Registration through the front.
    let (ok, out) = presence_topics(&c, &secured);
    assert!(ok, "presence topics through TLS and basic auth:\n{out}");
    assert!(
        out.contains(&value_subject(&c.topics.facility_status)),
        "{out}"
    );
    assert!(
        !out.contains(&password),
        "the password in the output:\n{out}"
    );
    assert!(proxy.passed() > 0, "nothing went through the front");
    assert_eq!(proxy.refused(), 0);
    let client = registry_client(&c);
    let heartbeat_id = client
        .lookup(&value_subject(&c.topics.heartbeats), Heartbeat::SCHEMA)
        .await
        .expect("lookup through the front")
        .expect("registered by presence topics");
    let status_id = client
        .lookup(
            &value_subject(&c.topics.facility_status),
            FacilityStatus::SCHEMA,
        )
        .await
        .expect("lookup through the front")
        .expect("registered by presence topics");

    // The processor (the binary, logging at info) resolves the heartbeats' id and frames its
    // output with the registry's id, all through the front.
    let mut env: Vec<(&str, &str)> = secured.to_vec();
    env.push(("PRESENCE_TELEMETRY__LOG_FILTER", "info"));
    let mut p = watched_processor(&c, "a", &env);
    let confluent = Header::Confluent { id: heartbeat_id };
    let now = now_ms();
    produce_raw(
        &c,
        &[
            (
                "s".into(),
                encode_with(&beat("s", "SECURE", HeartbeatKind::Beat), confluent),
                now,
            ),
            (
                "s".into(),
                encode_with(&beat("s", "SECURE", HeartbeatKind::End), confluent),
                now + 1,
            ),
        ],
    )
    .await;
    let records = read_to_end_until(
        &c,
        &c.topics.facility_status,
        Duration::from_secs(60),
        |r| r.len() >= 2,
    );
    let log = p.log_tail(100_000);
    terminate(&mut p);
    assert_eq!(records.len(), 2);
    for m in &records {
        let value = m.payload().unwrap_or_default();
        assert_eq!(confluent_id(value), Some(status_id), "{value:02x?}");
    }
    assert!(
        !log.contains(&password),
        "the password in the processor's log:\n{log}"
    );

    // The notifier resolves the output's id through the front and writes Redis.
    let shutdown = Shutdown::new();
    let nc = c.clone();
    let notifier = presence_testkit::spawn_process("notifier", &shutdown, move |s| {
        presence_notifier::run(nc, s)
    });
    let keys = presence_core::delivery::RedisKeys::new(&c.redis.key_prefix);
    let redis = presence_core::delivery::redis_client(&c.redis)
        .expect("redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("the stack's Redis");
    let seq = presence_testkit::eventually(
        "facility SECURE at seq 2 in Redis",
        Duration::from_secs(60),
        || {
            let mut r = redis.clone();
            let key = keys.facility("SECURE");
            async move {
                use redis::AsyncCommands;
                let seq: Option<String> = r.hget(&key, "seq").await.ok()?;
                (seq.as_deref() == Some("2")).then_some(seq)
            }
        },
    )
    .await;
    notifier.stop(Duration::from_secs(30)).await;
    support::delete_redis_keys(&c).await;
    assert_eq!(seq.as_deref(), Some("2"));
    assert_eq!(proxy.refused(), 0, "every request carried the credentials");

    // A wrong password: refused, named with the setting to fix, no password shown.
    let wrong = presence_testkit::unique("wrong");
    let mut with_wrong: Vec<(&str, &str)> = secured.to_vec();
    with_wrong.push(("PRESENCE_SCHEMA_REGISTRY__PASSWORD", wrong.as_str()));
    let (ok, out) = presence_topics(&c, &with_wrong);
    assert!(!ok, "a wrong password must fail:\n{out}");
    assert!(
        out.contains("refused the credentials")
            && out.contains("schema_registry.username")
            && out.contains("PRESENCE_SCHEMA_REGISTRY__PASSWORD"),
        "names the setting:\n{out}"
    );
    assert!(!out.contains(&wrong) && !out.contains(&password), "{out}");
    assert!(proxy.refused() > 0);
    let mut bad = c.clone();
    bad.schema_registry.password = presence_core::Secret::new(wrong.clone());
    let ids = IdCache::new(&bad.schema_registry).expect("cache");
    let e = ids
        .ensure(&encode_with(
            &beat("s", "X", HeartbeatKind::Beat),
            confluent,
        ))
        .await
        .expect_err("a wrong password resolves nothing");
    assert!(
        matches!(e, RegistryError::Unauthorized { status: 401, .. }),
        "{e:?}"
    );

    // A CA that did not sign the registry's certificate: named with the setting to fix.
    let other = certs.path("other-ca.crt").display().to_string();
    let mut with_other_ca: Vec<(&str, &str)> = secured.to_vec();
    with_other_ca.push(("PRESENCE_SCHEMA_REGISTRY__CA_FILE", other.as_str()));
    let (ok, out) = presence_topics(&c, &with_other_ca);
    assert!(!ok, "an unknown CA must fail:\n{out}");
    assert!(
        out.contains("not trusted") && out.contains("schema_registry.ca_file"),
        "names the setting:\n{out}"
    );
    assert!(!out.contains(&password), "{out}");
    let mut untrusted = c.clone();
    untrusted.schema_registry.ca_file = Some(certs.path("other-ca.crt"));
    let e = header_for::<FacilityStatus>(&untrusted.schema_registry, &c.topics.facility_status)
        .await
        .expect_err("the processor's start-up lookup fails too");
    assert!(matches!(e, RegistryError::Untrusted { .. }), "{e:?}");
    assert!(!e.to_string().contains(&password), "{e}");
}
