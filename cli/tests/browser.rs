//! Headless Chromium (Debian's `chromium`, driven by playwright-core) against the real
//! gateway: a page posts beats with fetch() and an END with sendBeacon() on unload; the
//! dashboard turns a facility's tile ONLINE while it beats and OFFLINE after the timeout.

mod support;

use std::time::Duration;

use presence_core::Shutdown;
use presence_testkit::{browser_script, isolated_config, read_to_end_until, spawn_process, unique};
use rdkafka::message::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_beats_and_an_unload_beacon_arrive() {
    let mut config = isolated_config();
    config.gateway.cors_origins = vec!["*".into()];
    presence_testkit::ensure_topics(&config).await;
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
    presence_testkit::ensure_topics(&config).await;
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
    presence_testkit::check_processes();
    processor.stop(Duration::from_secs(30)).await;
    notifier.stop(Duration::from_secs(30)).await;
}

/// Seconds ONLINE and the number of OFFLINE spans of one facility within [d0, d1), from its
/// transitions as the processor wrote them (`facility-status`, read_committed), up to `now`:
/// computed here, independently of the SQL behind the console's uptime bar.
fn online_within(transitions: &[(i64, bool)], d0: i64, d1: i64, now: i64) -> (f64, usize) {
    let (mut online, mut outages) = (0i64, 0usize);
    for (i, (since, on)) in transitions.iter().enumerate() {
        let end = transitions.get(i + 1).map_or(now, |n| n.0).min(now);
        let (a, b) = ((*since).max(d0), end.min(d1));
        if b <= a {
            continue;
        }
        if *on {
            online += b - a;
        } else {
            outages += 1;
        }
    }
    (online as f64 / 1000.0, outages)
}

/// The operator console (tests/browser/console.cjs) against the real pipeline: loadgen's
/// sessions (with their ground truth) and two facilities kept ONLINE by the test go through
/// the processor, the notifier and the sink. The regions view counts what the ground truth
/// says; the 90-day bar of a loadgen facility equals its transitions on `facility-status`;
/// "who is online" names the keeper; a keeper's END turns its page OFFLINE within a second.
/// Screenshots: target/console-screenshots/pipeline/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_follows_the_real_pipeline() {
    use presence_core::records::{FacilityStatus, Status};
    let mut config = isolated_config();
    config.processor.session_timeout = Duration::from_secs(3);
    let _topics = presence_testkit::TestTopics::create(&config).await;
    let shutdown = Shutdown::new();
    let processor = spawn_process("processor", &shutdown, |s| {
        presence_processor::run(config.clone(), s)
    });
    let notifier = spawn_process("notifier", &shutdown, |s| {
        presence_notifier::run(config.clone(), s)
    });
    let sink = spawn_process("sink", &shutdown, |s| presence_sink::run(config.clone(), s));
    let base = support::start_gateway(&config, &shutdown).await;
    // Every request here is short: one that hangs fails the test instead of holding it.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP client");

    // Loadgen: 12 facilities in 3 regions, short sessions, for 3 s, with its ground truth.
    let truth_path = std::env::temp_dir().join(unique("console-truth"));
    let options = presence_loadgen::Options {
        facilities: 12,
        regions: 3,
        users_per_facility: 3,
        beat_interval: Duration::from_millis(300),
        mean_session: Duration::from_secs(1),
        mean_offline: Duration::from_secs(1),
        seed: 14,
        duration: Some(Duration::from_secs(3)),
        ..presence_loadgen::Options::default()
    };
    // Two keepers beat facility-00000 and -00001 for the whole test.
    let keepers = ["facility-00000", "facility-00001"];
    let beat = {
        let (http, base) = (http.clone(), base.clone());
        move |facility: &str, kind: &str| {
            let i = &facility[facility.len() - 1..];
            let body = serde_json::json!({"session_id": format!("keep-{i}"), "user_id": format!("keeper-{i}"),
            "facility_id": facility, "region_id": presence_testkit::sim::region_of(i.parse().unwrap_or(0), 3), "kind": kind});
            let (http, url) = (http.clone(), format!("{base}/v1/heartbeats"));
            async move {
                http.post(url)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        }
    };
    let keeping = {
        let beat = beat.clone();
        let stop = Shutdown::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            while !s.is_triggered() {
                for k in keepers {
                    let _ = beat(k, "BEAT").await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        (stop, task)
    };
    let (c, o, t) = (config.clone(), options.clone(), truth_path.clone());
    let summary = tokio::task::spawn_blocking(move || {
        presence_loadgen::run(
            &c,
            &o,
            &presence_loadgen::Target::Kafka,
            Some(&t),
            &Shutdown::new(),
        )
    })
    .await
    .expect("join")
    .expect("loadgen");
    assert!(summary.sent > 0, "{summary}");
    let truth = presence_testkit::sim::read_truth(&truth_path).expect("truth");
    let _ = std::fs::remove_file(&truth_path);

    // Once every loadgen session has ended or timed out: the keepers' facilities ONLINE,
    // every other facility of the ground truth OFFLINE.
    let mut expected: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let facilities: std::collections::BTreeSet<(String, String)> = truth
        .iter()
        .map(|r| {
            (
                r.heartbeat.facility_id.clone(),
                r.heartbeat.region_id.clone(),
            )
        })
        .chain(keepers.iter().map(|k| {
            (
                k.to_string(),
                presence_testkit::sim::region_of(k[k.len() - 1..].parse().unwrap_or(0), 3),
            )
        }))
        .collect();
    for (f, region) in &facilities {
        let e = expected.entry(region.clone()).or_default();
        if keepers.contains(&f.as_str()) {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    let settled = presence_testkit::eventually(
        "the overview equals the ground truth",
        Duration::from_secs(60),
        || async {
            let v = support::json_of(http.get(format!("{base}/v1/overview"))).await?;
            let got = region_counts(v["regions"].as_array()?);
            (got == expected).then_some(v)
        },
    )
    .await;

    // The historic facility: a loadgen facility, OFFLINE now, its transitions from the topic.
    let historic = facilities
        .iter()
        .map(|(f, _)| f.clone())
        .find(|f| !keepers.contains(&f.as_str()))
        .expect("a loadgen facility");
    let historic_region = facilities
        .iter()
        .find(|(f, _)| *f == historic)
        .map(|(_, r)| r.clone())
        .unwrap_or_default();
    // The sink has written them all once the history answers with the topic's count.
    let records = presence_testkit::read_to_end(
        &config,
        &config.topics.facility_status,
        Duration::from_secs(30),
    );
    let mut transitions: Vec<(i64, i64, bool)> = records
        .iter()
        .filter_map(|m| {
            presence_core::codec::decode::<FacilityStatus>(m.payload().unwrap_or_default()).ok()
        })
        .filter(|s| s.facility_id == historic)
        .map(|s| (s.seq, s.since, s.status == Status::Online))
        .collect();
    transitions.sort();
    assert!(!transitions.is_empty(), "{historic} has transitions");
    presence_testkit::eventually(
        "the sink wrote the historic facility's history",
        Duration::from_secs(30),
        || async {
            let v = support::json_of(http.get(format!(
                "{base}/v1/facilities/{historic}/history?from={}&to={}",
                presence_core::now_ms() - 3_600_000,
                presence_core::now_ms() + 1000
            )))
            .await?;
            (v["transitions"].as_array()?.len() == transitions.len()).then_some(())
        },
    )
    .await;

    let shots = presence_testkit::repo_root().join("target/console-screenshots/pipeline");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let mut node = presence_testkit::BrowserScript::spawn(
        "console.cjs",
        &[
            base.as_str(),
            historic_region.as_str(),
            historic.as_str(),
            keepers[0],
            shots.to_str().expect("a UTF-8 path"),
            "no-restart",
        ],
    );
    assert_eq!(
        node.next_line().await,
        "READY",
        "console.cjs failed (its stderr is above)"
    );
    // The keeper of facility-00000 logs out: END closes its session at once.
    keeping.0.trigger();
    let _ = keeping.1.await;
    assert_eq!(beat(keepers[0], "END").await.ok(), Some(202));
    let ended_at = presence_core::now_ms();
    let out = node.next_line().await;
    let exit = node.wait().await;
    assert!(exit.success(), "console.cjs failed: {out}");
    let out: serde_json::Value = serde_json::from_str(&out).expect("the script's JSON");

    // Regions at a glance: the ground truth, worst first.
    let shown = region_counts(out["overview"].as_array().expect("overview"));
    assert_eq!(shown, expected, "{out}");
    assert_eq!(
        settled["regions"].as_array().map(Vec::len),
        Some(expected.len())
    );
    let (on, off) = expected[&historic_region];
    assert_eq!(
        (
            out["region"]["online"].as_u64(),
            out["region"]["offline"].as_u64()
        ),
        (Some(on), Some(off)),
        "{out}"
    );

    // The 90-day bar (Asia/Tokyo days) against the topic's transitions.
    let now = presence_core::now_ms();
    let (day, tokyo) = (86_400_000i64, 9 * 3_600_000i64);
    let today = (now + tokyo) - (now + tokyo).rem_euclid(day) - tokyo;
    let spans: Vec<(i64, bool)> = transitions.iter().map(|t| (t.1, t.2)).collect();
    let days = out["facility"]["days"].as_array().expect("days");
    assert_eq!(days.len(), 90);
    for (i, d) in days.iter().enumerate() {
        let d0 = today - (89 - i as i64) * day;
        let (online, outages) = online_within(&spans, d0, d0 + day, now);
        assert!(
            (d["online"].as_f64().unwrap_or(-1.0) - online).abs() < 0.001
                && d["outages"].as_u64() == Some(outages as u64),
            "day {i}: {d} vs the topic's {online} s online, {outages} outages"
        );
    }
    assert!(
        days[89]["online"].as_f64().unwrap_or(0.0) > 0.0,
        "{historic} was ONLINE today: {out}"
    );

    // Who is online, then OFFLINE within a second of the END.
    assert_eq!(
        out["watched_sessions"],
        serde_json::json!(["keeper-0"]),
        "{out}"
    );
    assert_eq!(out["watched_before"], "ONLINE");
    let seen = out["offline_seen_at"].as_i64().expect("seen");
    assert!(
        seen - ended_at < 1000,
        "OFFLINE on the page {} ms after the END was accepted",
        seen - ended_at
    );

    presence_testkit::check_processes();
    shutdown.trigger();
    for p in [processor, notifier, sink] {
        p.stop(Duration::from_secs(30)).await;
    }
    if let Ok(db) = presence_core::delivery::connect_postgres(&config.database).await {
        let _ = db
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                config.database.schema
            ))
            .await;
    }
}

/// (ONLINE, OFFLINE) by region, from rows `{"region", "online", "offline"}` (the overview's
/// answer, or what the page showed).
fn region_counts(rows: &[serde_json::Value]) -> std::collections::BTreeMap<String, (u64, u64)> {
    rows.iter()
        .map(|r| {
            (
                r["region"].as_str().unwrap_or("").to_string(),
                (
                    r["online"].as_u64().unwrap_or(0),
                    r["offline"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}
