//! Live region streams and reads, end to end from `facility-status` through the real
//! notifier, Redis, the sink and PostgreSQL to the gateway's HTTP answers.

mod support;

use std::time::Duration;

use futures::StreamExt;
use presence_core::config::Config;
use presence_core::delivery::RedisKeys;
use presence_core::Shutdown;
use presence_testkit::{
    eventually, isolated_config, produce, spawn_process, status_records, transition,
};
use serde_json::Value;

struct Pipeline {
    config: Config,
    base: String,
    http: reqwest::Client,
    shutdown: Shutdown,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn pipeline(replay_events: usize) -> Pipeline {
    let mut config = isolated_config();
    config.redis.replay_events = replay_events;
    presence_testkit::ensure_topics(&config).await;
    let shutdown = Shutdown::new();
    spawn_process("notifier", &shutdown, |s| {
        presence_notifier::run(config.clone(), s)
    });
    spawn_process("sink", &shutdown, |s| presence_sink::run(config.clone(), s));
    let base = support::start_gateway(&config, &shutdown).await;
    Pipeline {
        base,
        config,
        http: reqwest::Client::new(),
        shutdown,
    }
}

impl Pipeline {
    async fn send(&self, statuses: &[presence_core::records::FacilityStatus]) {
        produce(
            &self.config,
            &self.config.topics.facility_status,
            &status_records(statuses),
        )
        .await;
    }

    async fn region_seq(&self, region: &str, want: u64) {
        eventually(
            &format!("region {region} at sequence {want}"),
            Duration::from_secs(30),
            || async {
                let v = support::json_of(
                    self.http
                        .get(format!("{}/v1/regions/{region}/facilities", self.base)),
                )
                .await?;
                (v["region_seq"].as_u64() == Some(want)).then_some(())
            },
        )
        .await
    }

    async fn open(&self, region: &str, last_event_id: Option<u64>) -> Sse {
        let mut req = self
            .http
            .get(format!("{}/v1/regions/{region}/stream", self.base));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        let r = req.send().await.expect("stream");
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        Sse {
            body: Box::pin(r.bytes_stream()),
            buffer: String::new(),
        }
    }
}

/// A minimal Server-Sent Events reader: (event, id, data).
struct Sse {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Sse {
    /// The next event (keep-alive comments skipped), within 30 s.
    async fn next(&mut self) -> (String, u64, Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), 0, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().unwrap_or(0);
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event.is_empty() {
                    continue; // a keep-alive comment
                }
                return (
                    event,
                    id,
                    serde_json::from_str(&data).unwrap_or(Value::String(data)),
                );
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .expect("an event within 30 s")
                .expect("the stream stays open")
                .expect("stream bytes");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

fn facility_seq(v: &Value) -> (String, i64) {
    (
        v["facility_id"].as_str().unwrap_or_default().to_string(),
        v["seq"].as_i64().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_transitions_and_reconnect_misses_nothing() {
    let p = pipeline(1000).await;
    p.send(&[transition("a", "r1", 1, true)]).await;
    p.region_seq("r1", 1).await;

    let mut s = p.open("r1", None).await;
    let (event, id, snapshot) = s.next().await;
    assert_eq!((event.as_str(), id), ("snapshot", 1));
    assert_eq!(
        snapshot["facilities"]
            .as_array()
            .map(|f| f.iter().map(facility_seq).collect::<Vec<_>>()),
        Some(vec![("a".into(), 1)])
    );
    assert_eq!(
        (snapshot["online"].as_u64(), snapshot["offline"].as_u64()),
        (Some(1), Some(0))
    );

    p.send(&[
        transition("b", "r1", 1, true),
        transition("a", "r1", 2, false),
    ])
    .await;
    let (e2, id2, t2) = s.next().await;
    let (e3, id3, t3) = s.next().await;
    assert_eq!(
        (e2.as_str(), id2, facility_seq(&t2)),
        ("transition", 2, ("b".into(), 1))
    );
    assert_eq!(
        (e3.as_str(), id3, facility_seq(&t3)),
        ("transition", 3, ("a".into(), 2))
    );
    drop(s);

    // Missed while disconnected, then asked for with Last-Event-ID: exactly those.
    p.send(&[
        transition("a", "r1", 3, true),
        transition("b", "r1", 2, false),
    ])
    .await;
    p.region_seq("r1", 5).await;
    let mut again = p.open("r1", Some(3)).await;
    let (e4, id4, t4) = again.next().await;
    let (e5, id5, t5) = again.next().await;
    assert_eq!(
        (e4.as_str(), id4, facility_seq(&t4)),
        ("transition", 4, ("a".into(), 3))
    );
    assert_eq!(
        (e5.as_str(), id5, facility_seq(&t5)),
        ("transition", 5, ("b".into(), 2))
    );
    p.send(&[transition("c", "r1", 1, true)]).await;
    let (e6, id6, _) = again.next().await;
    assert_eq!(
        (e6.as_str(), id6),
        ("transition", 6),
        "live after the catch-up"
    );

    // Reads.
    let f: Value = p
        .http
        .get(format!("{}/v1/facilities/a", p.base))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (f["status"].as_str(), f["seq"].as_i64()),
        (Some("ONLINE"), Some(3))
    );
    let missing = p
        .http
        .get(format!("{}/v1/facilities/nope", p.base))
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status().as_u16(), 404);
    let regions: Value = p
        .http
        .get(format!("{}/v1/regions", p.base))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(regions["regions"], serde_json::json!(["r1"]));
    // History from the sink's tables: a was ONLINE minute 1-2 and from minute 3 on.
    let start = 1_764_201_600_000i64;
    let history = eventually(
        "history of a in PostgreSQL",
        Duration::from_secs(30),
        || async {
            let v = support::json_of(p.http.get(format!(
                "{}/v1/facilities/a/history?from={}&to={}",
                p.base,
                start,
                start + 300_000
            )))
            .await?;
            (v["transitions"].as_array()?.len() == 3).then_some(v)
        },
    )
    .await;
    assert_eq!(history["online_seconds"].as_f64(), Some(180.0), "{history}");
    let bad = p
        .http
        .get(format!("{}/v1/facilities/a/history?from=yesterday", p.base))
        .send()
        .await
        .expect("get");
    assert_eq!(bad.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_far_behind_gets_a_snapshot_and_a_lost_message_is_recovered() {
    let p = pipeline(2).await;
    let batch: Vec<_> = (1..=5)
        .map(|i| transition(&format!("f{i}"), "r2", 1, true))
        .collect();
    p.send(&batch).await;
    p.region_seq("r2", 5).await;
    // The log keeps 2 events: id 1 is too old to replay.
    let mut s = p.open("r2", Some(1)).await;
    let (event, id, snapshot) = s.next().await;
    assert_eq!((event.as_str(), id), ("snapshot", 5));
    assert_eq!(snapshot["facilities"].as_array().map(Vec::len), Some(5));

    // A transition that reaches Redis but whose PUBLISH is lost (what pub/sub may do):
    // the gateway notices the region sequence moved and fills the gap from the log.
    let keys = RedisKeys::new(&p.config.redis.key_prefix);
    let mut r = redis::Client::open(p.config.redis.url.expose())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut lost = serde_json::to_value(transition("f1", "r2", 2, false)).expect("json");
    lost["region_seq"] = 6.into();
    let json = lost.to_string();
    let _: () = redis::pipe()
        .atomic()
        .set(keys.region_seq("r2"), 6)
        .zadd(keys.region_log("r2"), &json, 6)
        .query_async(&mut r)
        .await
        .expect("write without publish");
    let (event, id, t) = s.next().await;
    assert_eq!(
        (event.as_str(), id, facility_seq(&t)),
        ("transition", 6, ("f1".into(), 2))
    );

    // Redis lost its data and the notifier rebuilt the region: its sequence starts again
    // lower. The stream notices within a poll and starts over from a snapshot.
    let _: () = redis::cmd("SET")
        .arg(keys.region_seq("r2"))
        .arg(2)
        .query_async(&mut r)
        .await
        .expect("set");
    let (event, id, _) = s.next().await;
    assert_eq!((event.as_str(), id), ("snapshot", 2));
}
