//! The sink against real PostgreSQL: newest state wins whatever the order, history holds
//! each transition once, "how long was X online" is one query, and an outage of the
//! database loses and doubles nothing.

mod common;
use common::*;

use std::time::Duration;

use presence_core::config::Config;
use presence_core::delivery::Tables;
use presence_core::{Secret, Shutdown};
use presence_testkit::{
    eventually, free_port, isolated_config, produce, produce_status_markers, status_records,
    transition, PrivateService, Process,
};

use presence_testkit::{ensure_topics as setup, spawn_process};

/// The sink as a task of the test: a failure fails the test's next wait; `stop` checks that
/// it shuts down cleanly.
fn start_sink(config: &Config) -> Process {
    spawn_process("sink", &Shutdown::new(), |s| {
        presence_sink::run(config.clone(), s)
    })
}

async fn count(config: &Config, sql: String) -> Option<i64> {
    db(config)
        .await?
        .query_one(&sql, &[])
        .await
        .ok()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_state_wins_history_has_each_transition_once_and_online_time_adds_up() {
    let config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    setup(&config).await;
    let t = Tables::new(&config.database.schema);
    // a: ONLINE 1 min, OFFLINE 2 min, ONLINE 3 min, OFFLINE 4 min (since = seq minutes).
    let statuses = vec![
        transition("a", "north", 1, true),
        transition("a", "north", 2, false),
        transition("b", "north", 2, false),
        transition("b", "north", 1, true),
        transition("a", "north", 3, true),
        transition("a", "north", 2, false),
        transition("a", "north", 4, false),
        transition("a", "north", 1, true),
    ];
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&statuses),
    )
    .await;
    let sink = start_sink(&config);
    eventually(
        "six distinct transitions in the history",
        Duration::from_secs(30),
        || async {
            (count(&config, format!("SELECT count(*) FROM {}", t.history())).await == Some(6))
                .then_some(())
        },
    )
    .await;
    let client = db(&config).await.expect("db");
    let rows = client
        .query(
            &format!(
                "SELECT facility_id, seq, status FROM {} ORDER BY facility_id",
                t.current()
            ),
            &[],
        )
        .await
        .expect("current");
    let current: Vec<(String, i64, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        current,
        vec![
            ("a".into(), 4, "OFFLINE".into()),
            ("b".into(), 2, "OFFLINE".into())
        ]
    );

    // Replays of everything add nothing.
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&statuses),
    )
    .await;
    // A marker after the replay on every partition: once all are written, the sink has
    // been through every replayed record, wherever its key put it.
    let partitions = produce_status_markers(&config, "north").await;
    eventually(
        "a marker of every partition after the replay",
        Duration::from_secs(30),
        || async {
            (count(
                &config,
                format!(
                    "SELECT count(*) FROM {} WHERE facility_id LIKE 'z-%'",
                    t.history()
                ),
            )
            .await
                == Some(partitions.len() as i64))
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        count(&config, format!("SELECT count(*) FROM {}", t.history())).await,
        Some(6 + partitions.len() as i64),
        "the replayed transitions added nothing"
    );

    // Online from minute 1 to 2 and from 3 to 4: 120 s within the first five minutes.
    let start = 1_764_201_600_000i64;
    let seconds: f64 = client
        .query_one(
            &format!("SELECT {}('a', to_timestamp($1::bigint / 1000.0), to_timestamp($2::bigint / 1000.0))", t.online_seconds()),
            &[&start, &(start + 300_000)],
        )
        .await
        .expect("online_seconds")
        .get(0);
    assert_eq!(seconds, 120.0);
    let versions = count(
        &config,
        format!(
            "SELECT count(*) FROM \"{}\".schema_migrations",
            config.database.schema
        ),
    )
    .await;
    assert_eq!(
        versions,
        Some(presence_sink::migrations::MIGRATIONS.len() as i64)
    );
    sink.stop(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_pauses_and_resumes_with_nothing_lost_or_doubled() {
    let private = PrivateService::postgres();
    private.start();
    let mut config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    config.database.url = Secret::new(private.address());
    config.sink.ops_listen = ([127, 0, 0, 1], free_port()).into();
    setup(&config).await;
    let t = Tables::new(&config.database.schema);
    let facilities: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let first: Vec<_> = facilities
        .iter()
        .map(|f| transition(f, "east", 1, true))
        .collect();
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&first),
    )
    .await;
    let sink = start_sink(&config);
    let history = format!("SELECT count(*) FROM {}", t.history());
    eventually(
        "50 transitions written",
        Duration::from_secs(30),
        || async { (count(&config, history.clone()).await == Some(50)).then_some(()) },
    )
    .await;

    private.stop();
    let second: Vec<_> = facilities
        .iter()
        .map(|f| transition(f, "east", 2, false))
        .collect();
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&second),
    )
    .await;
    let readyz = format!("http://{}/readyz", config.sink.ops_listen);
    let http = reqwest::Client::new();
    eventually(
        "sink unready while PostgreSQL is down",
        Duration::from_secs(30),
        || async {
            let r = http.get(&readyz).send().await.ok()?;
            (r.status().as_u16() == 503).then_some(())
        },
    )
    .await;

    private.start();
    eventually(
        "the 50 newer transitions written after PostgreSQL returned",
        Duration::from_secs(60),
        || async { (count(&config, history.clone()).await == Some(100)).then_some(()) },
    )
    .await;
    eventually("sink ready again", Duration::from_secs(30), || async {
        let r = http.get(&readyz).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let offline = count(
        &config,
        format!(
            "SELECT count(*) FROM {} WHERE seq = 2 AND status = 'OFFLINE'",
            t.current()
        ),
    )
    .await;
    assert_eq!(offline, Some(50));
    sink.stop(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_database_is_rebuilt_from_the_compacted_topic() {
    let config = isolated_config();
    let _topics = presence_testkit::TestTopics::own(&config);
    setup(&config).await;
    let t = Tables::new(&config.database.schema);
    let first: Vec<_> = (0..30)
        .map(|i| transition(&format!("f{i}"), "west", 1, true))
        .collect();
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&first),
    )
    .await;
    let sink = start_sink(&config);
    let current = format!("SELECT count(*) FROM {}", t.current());
    eventually("30 facilities written", Duration::from_secs(30), || async {
        (count(&config, current.clone()).await == Some(30)).then_some(())
    })
    .await;
    let client = db(&config).await.expect("db");
    client
        .batch_execute(&format!(
            "DROP SCHEMA \"{}\" CASCADE",
            config.database.schema
        ))
        .await
        .expect("drop");
    produce(
        &config,
        &config.topics.facility_status,
        &status_records(&[transition("f-new", "west", 1, true)]),
    )
    .await;
    eventually(
        "all 31 facilities back after the rewind",
        Duration::from_secs(60),
        || async { (count(&config, current.clone()).await == Some(31)).then_some(()) },
    )
    .await;
    sink.stop(Duration::from_secs(30)).await;
}
