//! `presence loadgen` through the gateway and straight to Kafka: every heartbeat it counts
//! as sent is in the topic, and the ground-truth file holds exactly those, with the event
//! times the processor will see (Kafka mode).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use presence_core::config::Config;
use presence_core::Shutdown;
use presence_loadgen::{Options, Target};
use presence_testkit::sim::read_truth;
use presence_testkit::{isolated_config, read_to_end, unique};
use rdkafka::message::Message;

fn options() -> Options {
    Options {
        facilities: 20,
        regions: 3,
        users_per_facility: 5,
        beat_interval: Duration::from_millis(200),
        mean_session: Duration::from_secs(2),
        mean_offline: Duration::from_secs(1),
        seed: 11,
        duration: Some(Duration::from_secs(3)),
        ..Options::default()
    }
}

async fn setup() -> Config {
    let config = isolated_config();
    presence_testkit::ensure_topics(&config).await;
    config
}

/// (session id, kind) → count, from the topic and from the truth file.
fn compare(config: &Config, truth: &std::path::Path, sent: u64, exact_times: bool) {
    // loadgen has returned: everything it sent is acknowledged, so the end offsets are final.
    let records = read_to_end(config, &config.topics.heartbeats, Duration::from_secs(60));
    assert_eq!(
        records.len() as u64,
        sent,
        "every heartbeat counted as sent is in the topic, once"
    );
    let truth = read_truth(truth).expect("truth file");
    assert_eq!(
        truth.len() as u64,
        sent,
        "the truth file has each sent heartbeat"
    );
    let mut in_topic: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut topic_times: Vec<i64> = Vec::new();
    for m in &records {
        let h = presence_core::codec::decode::<presence_core::records::Heartbeat>(
            m.payload().unwrap_or_default(),
        )
        .expect("decodes");
        *in_topic
            .entry((h.session_id, h.kind.as_str().to_string()))
            .or_default() += 1;
        topic_times.push(m.timestamp().to_millis().unwrap_or(0));
    }
    let mut in_truth: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in &truth {
        *in_truth
            .entry((
                r.heartbeat.session_id.clone(),
                r.heartbeat.kind.as_str().to_string(),
            ))
            .or_default() += 1;
    }
    assert_eq!(in_topic, in_truth);
    if exact_times {
        let mut truth_times: Vec<i64> = truth.iter().map(|r| r.ts).collect();
        topic_times.sort_unstable();
        truth_times.sort_unstable();
        assert_eq!(
            topic_times, truth_times,
            "Kafka mode: record timestamps are the truth's event times"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_gateway_every_accepted_beat_arrives_and_is_in_the_truth() {
    let config = setup().await;
    let shutdown = Shutdown::new();
    let base = support::start_gateway(&config, &shutdown).await;
    let truth = std::env::temp_dir().join(unique("truth"));
    let (c, t, stop) = (config.clone(), truth.clone(), Shutdown::new());
    let target = Target::Http {
        base,
        batch: 1,
        concurrency: 8,
    };
    let summary = tokio::task::spawn_blocking(move || {
        presence_loadgen::run(&c, &options(), &target, Some(&t), &stop)
    })
    .await
    .expect("join")
    .expect("loadgen");
    assert_eq!(summary.failed, 0, "{summary}");
    assert!(
        summary.sent > 100 && summary.logins > 50 && summary.logouts > 0 && summary.vanished > 0,
        "{summary}"
    );
    compare(&config, &truth, summary.sent, false);
    shutdown.trigger();
    let _ = std::fs::remove_file(truth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn straight_to_kafka_the_truth_has_the_record_timestamps() {
    let config = setup().await;
    let truth = std::env::temp_dir().join(unique("truth"));
    let (c, t, stop) = (config.clone(), truth.clone(), Shutdown::new());
    let summary = tokio::task::spawn_blocking(move || {
        presence_loadgen::run(&c, &options(), &Target::Kafka, Some(&t), &stop)
    })
    .await
    .expect("join")
    .expect("loadgen");
    assert_eq!(summary.failed, 0, "{summary}");
    compare(&config, &truth, summary.sent, true);
    let _ = std::fs::remove_file(truth);
}

/// The truth file is the processor's oracle: live users from loadgen (logins, END, silent
/// vanishing, moves), then the real processor over what they sent, give exactly the
/// transitions that `oracle::oracle` computes from the truth file. (The processor reads the
/// run afterwards, as after a restart: read live, a beat that reaches it after its clock
/// passed the beat's timestamp counts at the clock's time, which no oracle of timestamps
/// can predict to the millisecond.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_truth_file_predicts_the_processors_output() {
    // Odd: no expiry falls on a beat's (even) instant, see loadgen's Truth.
    const TIMEOUT_MS: u64 = 1_001;
    let config = support::setup(TIMEOUT_MS).await;
    let truth = std::env::temp_dir().join(unique("truth"));
    let (c, t, stop) = (config.clone(), truth.clone(), Shutdown::new());
    let options = Options {
        duration: Some(Duration::from_secs(5)),
        move_probability: 0.3,
        ..options()
    };
    let summary = tokio::task::spawn_blocking(move || {
        presence_loadgen::run(&c, &options, &Target::Kafka, Some(&t), &stop)
    })
    .await
    .expect("join")
    .expect("loadgen");
    assert_eq!(summary.failed, 0, "{summary}");
    assert!(
        summary.logouts > 0 && summary.vanished > 0 && summary.moves > 0,
        "{summary}"
    );
    let expected =
        presence_testkit::oracle::oracle(&read_truth(&truth).expect("truth"), TIMEOUT_MS as i64);
    assert!(
        expected.len() > 20,
        "a run with churn: {} transitions",
        expected.len()
    );

    let mut processor = support::watched_processor(&config, "a", &[]);
    let mut reader = support::StatusReader::new(&config);
    let done = reader.read_until(Duration::from_secs(60), |s| s.len() >= expected.len());
    assert!(
        done,
        "{}",
        support::diff(&expected, &support::as_expected(&reader.seen))
    );
    // Everything consumed and the processor stopped: the whole output, read to the end
    // offsets, is the oracle's, with no duplicate or extra.
    support::wait_consumed_to_end(&config, Duration::from_secs(60));
    support::terminate(&mut processor);
    let got = support::as_expected(&support::statuses_to_end(&config));
    assert!(got == expected, "{}", support::diff(&expected, &got));
    let _ = std::fs::remove_file(truth);
}
