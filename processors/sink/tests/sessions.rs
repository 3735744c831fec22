//! Who is online, through the real broker and PostgreSQL: the sink follows the sessions
//! changelog (records as stage 1 writes them: opens, moves, tombstones) and the beats into
//! `open_sessions`, and a restart rebuilds the table from the compacted changelog, dropping
//! sessions whose tombstones it never saw.

use std::time::Duration;

use presence_core::codec::encode;
use presence_core::config::Config;
use presence_core::records::{Heartbeat, HeartbeatKind, SessionState};
use presence_core::{now_ms, Shutdown};
use presence_testkit::{eventually, isolated_config, spawn_process, TestTopics};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn session(id: &str, user: &str, facility: &str, at: i64) -> SessionState {
    SessionState {
        session_id: id.into(),
        user_id: user.into(),
        facility_id: facility.into(),
        region_id: "north".into(),
        last_seen: at,
        open_offset: 0,
    }
}

/// A changelog record on partition 0 (the key stands for stage 1's 16-byte hash); `None`
/// is a tombstone. And a beat, with `at` as its record timestamp (its event time).
struct Producer(FutureProducer, Config);

impl Producer {
    fn new(c: &Config) -> Producer {
        Producer(
            presence_core::kafka::idempotent_producer_config(&c.kafka, "test-producer")
                .create()
                .expect("producer"),
            c.clone(),
        )
    }

    async fn changelog(&self, key: u8, value: Option<&SessionState>) {
        self.record(&[key; 16], value.map(encode)).await
    }

    /// A quiet session's mark (its key: the session's and the tag byte) or its tombstone,
    /// as stage 1 writes them beside the session's record.
    async fn mark(&self, key: u8, value: Option<Vec<u8>>) {
        let mut key = [key; 17];
        key[16] = presence_core::records::SESSION_MARK_TAG;
        self.record(&key, value).await
    }

    async fn record(&self, key: &[u8], payload: Option<Vec<u8>>) {
        let topic = self.1.topics.sessions_changelog();
        let mut record = FutureRecord::<[u8], Vec<u8>>::to(&topic)
            .key(key)
            .partition(0);
        if let Some(p) = &payload {
            record = record.payload(p);
        }
        self.0
            .send(record, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }

    async fn beat(&self, s: &SessionState, at: i64) {
        let beat = Heartbeat {
            session_id: s.session_id.clone(),
            user_id: s.user_id.clone(),
            facility_id: s.facility_id.clone(),
            region_id: s.region_id.clone(),
            kind: HeartbeatKind::Beat,
            client_sent_at: None,
            client_version: None,
        };
        let payload = encode(&beat);
        self.0
            .send(
                FutureRecord::to(&self.1.topics.heartbeats)
                    .key(&s.session_id)
                    .payload(&payload)
                    .timestamp(at),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing a beat: {e}"));
    }
}

/// (user, facility, opened_at ms, last_beat ms), by user.
async fn rows(c: &Config) -> Vec<(String, String, i64, i64)> {
    let Ok(db) = presence_core::delivery::connect_postgres(&c.database).await else {
        return Vec::new();
    };
    db.query(
        &format!(
            "SELECT user_id, facility_id, (extract(epoch FROM opened_at) * 1000)::bigint, (extract(epoch FROM last_beat) * 1000)::bigint FROM \"{}\".open_sessions ORDER BY user_id",
            c.database.schema
        ),
        &[],
    )
    .await
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
    .unwrap_or_default()
}

async fn wait_for(c: &Config, what: &str, want: impl Fn(&[(String, String, i64, i64)]) -> bool) {
    eventually(what, Duration::from_secs(60), || async {
        let r = rows(c).await;
        want(&r).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_sessions_follow_the_changelog_and_a_restart_rebuilds_them() {
    let mut config = isolated_config();
    config.sink.ops_listen = ([127, 0, 0, 1], presence_testkit::free_port()).into();
    let _topics = TestTopics::create(&config).await;
    let p = Producer::new(&config);
    let t0 = now_ms() - 60_000;
    let alice = session("s-a", "alice", "f1", t0);
    let bob = session("s-b", "bob", "f1", t0 + 1000);
    p.changelog(1, Some(&alice)).await;
    p.changelog(2, Some(&bob)).await;

    let sink = spawn_process("sink", &Shutdown::new(), |s| {
        presence_sink::run(config.clone(), s)
    });
    wait_for(&config, "alice and bob open", |r| r.len() == 2).await;
    let r = rows(&config).await;
    assert_eq!(
        r,
        vec![
            ("alice".into(), "f1".into(), t0, t0),
            ("bob".into(), "f1".into(), t0 + 1000, t0 + 1000)
        ]
    );

    // Bob beats; alice moves to f2 (a new record under her key); a beat of another
    // identity reusing alice's session id changes nothing of hers.
    p.beat(&bob, t0 + 30_000).await;
    p.beat(&session("s-a", "mallory", "f1", 0), t0 + 50_000)
        .await;
    p.changelog(1, Some(&session("s-a", "alice", "f2", t0 + 20_000)))
        .await;
    wait_for(&config, "bob's beat and alice's move", |r| {
        r.iter().any(|x| x.0 == "bob" && x.3 == t0 + 30_000) && r.iter().any(|x| x.1 == "f2")
    })
    .await;
    let r = rows(&config).await;
    assert_eq!(
        r[0],
        ("alice".into(), "f2".into(), t0 + 20_000, t0 + 20_000)
    );

    // Bob's mark (stage 1's note while he is quiet) and its tombstone are not sessions: no
    // row, no change counted (below), no warning about a record that does not decode.
    p.mark(2, Some(b"a mark".to_vec())).await;
    p.mark(2, None).await;
    // Bob closes: his row goes.
    p.changelog(2, None).await;
    wait_for(&config, "bob closed", |r| r.len() == 1).await;
    // The follower is a readiness component of its own, ready once rebuilt and written (the
    // page's other components, such as the Kafka connection, have their own pace).
    let body = reqwest::get(format!("http://{}/readyz", config.sink.ops_listen))
        .await
        .expect("readyz")
        .text()
        .await
        .unwrap_or_default();
    assert!(body.contains("open_sessions: ok"), "{body}");
    // Counted: 2 opens, a move and a close (not the mark and its tombstone); the two beats
    // read (mallory's included).
    let metrics = reqwest::get(format!("http://{}/metrics", config.sink.ops_listen))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let value = |name: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    assert_eq!(
        value("presence_sink_session_changes_total"),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        value("presence_sink_session_beats_total"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        value("presence_sink_open_sessions_rebuilt"),
        Some(2.0),
        "{metrics}"
    );
    sink.stop(Duration::from_secs(30)).await;

    // While the sink is down: alice closes, carol opens. A row the sink would never see a
    // tombstone for (its session closed long ago, the tombstone compacted away) is planted.
    p.changelog(1, None).await;
    let carol = session("s-c", "carol", "f3", t0 + 40_000);
    p.changelog(3, Some(&carol)).await;
    let db = presence_core::delivery::connect_postgres(&config.database)
        .await
        .expect("postgres");
    db.execute(
        &format!(
            "INSERT INTO \"{}\".open_sessions VALUES (5, '\\x00', 'ghost', 'ghost', 'f9', 'north', now(), now(), 0)",
            config.database.schema
        ),
        &[],
    )
    .await
    .expect("ghost row");
    let sink = spawn_process("sink", &Shutdown::new(), |s| {
        presence_sink::run(config.clone(), s)
    });
    wait_for(&config, "exactly carol after the rebuild", |r| {
        r.len() == 1 && r[0].0 == "carol"
    })
    .await;
    sink.stop(Duration::from_secs(30)).await;
    db.batch_execute(&format!(
        "DROP SCHEMA \"{}\" CASCADE",
        config.database.schema
    ))
    .await
    .expect("drop schema");
}
