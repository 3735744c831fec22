//! Headless Chromium (Debian's `chromium`, driven by playwright-core) against the real
//! gateway: a page posts beats with fetch() and an END with sendBeacon() on unload; the
//! dashboard turns a facility's tile ONLINE while it beats and OFFLINE after the timeout.

mod support;

use std::time::Duration;

use presence_core::testkit::{
    browser_script, isolated_config, read_to_end_until, spawn_process, unique,
};
use presence_core::Shutdown;
use rdkafka::message::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_beats_and_an_unload_beacon_arrive() {
    let mut config = isolated_config();
    config.gateway.cors_origins = vec!["*".into()];
    presence_core::testkit::ensure_topics(&config).await;
    let shutdown = Shutdown::new();
    let base = support::start_gateway(&config, &shutdown).await;
    let session = unique("browser");
    let (b, s) = (base.clone(), session.clone());
    let result = tokio::task::spawn_blocking(move || browser_script("beacon.cjs", &[&b, &s]))
        .await
        .expect("join");
    assert_eq!(
        result["statuses"],
        serde_json::json!([202, 202]),
        "{result}"
    );

    // The beacon may land after the script returned: wait for three, then take everything
    // to the end offsets, so a fourth (a doubled beat) fails the comparison below.
    let records = read_to_end_until(
        &config,
        &config.topics.heartbeats,
        Duration::from_secs(30),
        |r| r.len() >= 3,
    );
    let mut kinds: Vec<String> = records
        .iter()
        .map(|m| {
            let h = presence_core::codec::decode::<presence_core::records::Heartbeat>(
                m.payload().unwrap_or_default(),
            )
            .expect("decodes");
            assert_eq!(h.session_id, session);
            h.kind.as_str().to_string()
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec!["BEAT", "BEAT", "END"],
        "two fetch beats and the unload beacon"
    );
    shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_tile_turns_online_with_beats_and_offline_after_the_timeout() {
    let mut config = isolated_config();
    config.processor.session_timeout = Duration::from_secs(3);
    presence_core::testkit::ensure_topics(&config).await;
    let shutdown = Shutdown::new();
    let processor = spawn_process("processor", &shutdown, |s| {
        presence_processor::run(config.clone(), s)
    });
    let notifier = spawn_process("notifier", &shutdown, |s| {
        presence_notifier::run(config.clone(), s)
    });
    let base = support::start_gateway(&config, &shutdown).await;
    let result = tokio::task::spawn_blocking(move || {
        browser_script("dashboard.cjs", &[&base, "browser-region", "clinic-7"])
    })
    .await
    .expect("join");
    let online_ms = result["online_ms"].as_u64().unwrap_or(u64::MAX);
    let offline_ms = result["offline_ms"].as_u64().unwrap_or(0);
    assert!(
        online_ms < 15_000,
        "tile ONLINE after {online_ms} ms: {result}"
    );
    // The last beat was at most 500 ms before the beats stopped; the timeout is 3 s.
    assert!(
        (2_000..15_000).contains(&offline_ms),
        "tile OFFLINE after {offline_ms} ms: {result}"
    );
    assert_eq!(result["online_count"], "1", "{result}");
    assert_eq!(result["offline_count"], "1", "{result}");
    assert_ne!(result["last_change"], "–", "{result}");
    presence_core::testkit::check_processes();
    processor.stop(Duration::from_secs(30)).await;
    notifier.stop(Duration::from_secs(30)).await;
}
