//! `POST /v1/heartbeats` against the real broker: what arrives, what is refused, tokens, and
//! a broker that goes away and comes back.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use presence_core::config::{AuthMode, Config};
use presence_core::{Secret, Shutdown};
use presence_testkit::{eventually, fastavro, hex, isolated_config, read_to_end, PrivateService};
use rdkafka::message::{Message, Timestamp};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-test-secret-test-secret-123";

struct Gateway {
    base: String,
    /// `/metrics` and `/readyz`, apart from the public port.
    ops: String,
    shutdown: Shutdown,
    /// Deleted when the test ends, also when it fails.
    _topics: presence_testkit::TestTopics,
    http: reqwest::Client,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn start(config: &Config) -> Gateway {
    let topics = presence_testkit::TestTopics::create(config).await;
    let shutdown = Shutdown::new();
    let running = presence_gateway::start(config.clone(), shutdown.clone())
        .await
        .expect("gateway starts");
    let g = Gateway {
        base: format!("http://{}", running.addr),
        ops: format!("http://{}", running.ops_addr),
        shutdown,
        http: reqwest::Client::new(),
        _topics: topics,
    };
    ready(&g, true).await;
    g
}

async fn ready(g: &Gateway, want: bool) {
    eventually(
        &format!("/readyz = {want}"),
        Duration::from_secs(30),
        || async {
            let r = g.http.get(format!("{}/readyz", g.ops)).send().await.ok()?;
            (r.status().is_success() == want).then_some(())
        },
    )
    .await
}

async fn post(
    g: &Gateway,
    content_type: &str,
    body: impl Into<reqwest::Body>,
    token: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = g
        .http
        .post(format!("{}/v1/heartbeats", g.base))
        .header("content-type", content_type)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, headers)
}

fn beat(session: &str, kind: &str) -> Value {
    json!({"session_id": session, "user_id": "u-1", "facility_id": "f-1", "region_id": "north", "kind": kind, "client_sent_at": 1_764_300_000_000i64})
}

/// Records in the topic right now, each counted (read to the end offsets, not the sum of
/// offsets, so that a record counts once however it was written).
fn records_in(c: &Config, topic: &str) -> usize {
    read_to_end(c, topic, Duration::from_secs(30)).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_beats_arrive_keyed_stamped_and_readable_by_python() {
    let config = isolated_config();
    let g = start(&config).await;
    let before = presence_core::now_ms();
    let (s1, b1, _) = post(
        &g,
        "application/json",
        beat("s-one", "BEAT").to_string(),
        None,
    )
    .await;
    assert_eq!((s1, b1["accepted"].as_u64()), (202, Some(1)), "{b1}");
    let batch = json!([beat("s-two", "BEAT"), beat("s-three", "BEAT")]);
    let (s2, b2, _) = post(&g, "application/json", batch.to_string(), None).await;
    assert_eq!((s2, b2["accepted"].as_u64()), (202, Some(2)), "{b2}");
    // What navigator.sendBeacon sends for a string body on page unload.
    let (s3, _, _) = post(
        &g,
        "text/plain;charset=UTF-8",
        beat("s-one", "END").to_string(),
        None,
    )
    .await;
    assert_eq!(s3, 202);
    let after = presence_core::now_ms();

    // Every 202 came after the broker's acknowledgement: the topic is complete now.
    let records = read_to_end(&config, &config.topics.heartbeats, Duration::from_secs(30));
    assert_eq!(records.len(), 4, "each accepted beat once, nothing else");
    let mut seen = Vec::new();
    for m in &records {
        let key = String::from_utf8_lossy(m.key().expect("keyed")).to_string();
        let Timestamp::CreateTime(ts) = m.timestamp() else {
            panic!(
                "record timestamp is the gateway's receive time, got {:?}",
                m.timestamp()
            )
        };
        assert!(
            (before..=after).contains(&ts),
            "timestamp {ts} outside [{before}, {after}]"
        );
        let decoded = fastavro(
            "decode",
            "heartbeat.avsc",
            &[json!({"hex": hex(m.payload().expect("value"))})],
        );
        assert_eq!(
            decoded[0]["session_id"].as_str(),
            Some(key.as_str()),
            "key = session id"
        );
        assert_eq!(decoded[0]["facility_id"], "f-1");
        assert_eq!(decoded[0]["client_sent_at"], 1_764_300_000_000i64);
        seen.push((
            key,
            decoded[0]["kind"].as_str().unwrap_or_default().to_string(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("s-one".into(), "BEAT".into()),
            ("s-one".into(), "END".into()),
            ("s-three".into(), "BEAT".into()),
            ("s-two".into(), "BEAT".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_message_and_produce_nothing() {
    let mut config = isolated_config();
    config.gateway.max_body_bytes = 4096;
    config.gateway.max_batch = 3;
    let g = start(&config).await;
    let long = "x".repeat(129);
    let cases: Vec<(&str, String, u16, &str, Option<&str>)> = vec![
        ("application/json", "{not json".into(), 400, "malformed_json", None),
        ("application/json", json!({"user_id": "u", "facility_id": "f", "region_id": "r"}).to_string(), 400, "invalid_field", Some("session_id")),
        ("application/json", json!({"session_id": "", "user_id": "u", "facility_id": "f", "region_id": "r"}).to_string(), 400, "invalid_field", Some("session_id")),
        ("application/json", json!({"session_id": "s", "user_id": long, "facility_id": "f", "region_id": "r"}).to_string(), 400, "invalid_field", Some("user_id")),
        ("application/json", json!({"session_id": "s", "user_id": "u", "facility_id": "f\u{1}", "region_id": "r"}).to_string(), 400, "invalid_field", Some("facility_id")),
        ("application/json", json!({"session_id": "s", "user_id": "u", "facility_id": "f", "region_id": "r", "kind": "PING"}).to_string(), 400, "invalid_field", Some("kind")),
        ("application/json", json!([beat("a", "BEAT"), {"session_id": "b"}]).to_string(), 400, "invalid_field", Some("[1].user_id")),
        ("application/json", json!([beat("a", "BEAT"), beat("b", "BEAT"), beat("c", "BEAT"), beat("d", "BEAT")]).to_string(), 413, "batch_too_large", None),
        ("application/json", format!("[{}]", vec![beat("a", "BEAT").to_string(); 40].join(",")), 413, "too_large", None),
        ("application/xml", beat("a", "BEAT").to_string(), 415, "unsupported_media_type", None),
    ];
    for (ct, body, status, code, field) in cases {
        let (got, answer, _) = post(&g, ct, body.clone(), None).await;
        assert_eq!(got, status, "{ct} {body:.80} -> {answer}");
        assert_eq!(answer["error"], code, "{answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
        if let Some(f) = field {
            assert_eq!(answer["field"], f, "{answer}");
            assert!(
                answer["rule"].as_str().is_some_and(|r| !r.is_empty()),
                "{answer}"
            );
        }
    }
    let r = g
        .http
        .get(format!("{}/v1/heartbeats", g.base))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST, OPTIONS");

    // One valid beat after all of them: the topic holds exactly that one.
    let (ok, _, _) = post(
        &g,
        "application/json",
        beat("sentinel", "BEAT").to_string(),
        None,
    )
    .await;
    assert_eq!(ok, 202);
    assert_eq!(
        records_in(&config, &config.topics.heartbeats),
        1,
        "nothing invalid reached Kafka"
    );
}

fn token(sub: &str, facility: &str, region: &str, exp_offset: i64, secret: &str) -> String {
    let exp = (presence_core::now_ms() / 1000 + exp_offset) as u64;
    support::hs256_token(secret, sub, facility, region, exp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_reports_for_which_facility() {
    let mut config = isolated_config();
    config.gateway.auth = AuthMode::Jwt;
    config.gateway.jwt_secret = Secret::new(SECRET);
    config.gateway.jwt_leeway = Duration::from_secs(2);
    let g = start(&config).await;
    let good = token("u-7", "f-7", "south", 300, SECRET);

    // Ids come from the token; the body only names the session.
    let (s, b, _) = post(
        &g,
        "application/json",
        json!({"session_id": "tok-1"}).to_string(),
        Some(&good),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let cases = [
        (
            "missing",
            None,
            json!({"session_id": "x"}),
            401,
            "token_missing",
        ),
        (
            "forged",
            Some(token(
                "u-7",
                "f-7",
                "south",
                300,
                "another-secret-another-secret-another",
            )),
            json!({"session_id": "x"}),
            401,
            "token_forged",
        ),
        (
            "expired",
            Some(token("u-7", "f-7", "south", -60, SECRET)),
            json!({"session_id": "x"}),
            401,
            "token_expired",
        ),
        (
            "other facility",
            Some(good.clone()),
            json!({"session_id": "x", "facility_id": "f-8"}),
            403,
            "claim_mismatch",
        ),
        (
            "other user",
            Some(good.clone()),
            json!({"session_id": "x", "user_id": "u-8"}),
            403,
            "claim_mismatch",
        ),
    ];
    for (what, t, body, status, code) in cases {
        let (got, answer, headers) =
            post(&g, "application/json", body.to_string(), t.as_deref()).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{what}: {answer}"
        );
        if status == 401 {
            assert_eq!(headers["www-authenticate"], "Bearer", "{what}");
        }
    }
    // sendBeacon cannot set headers: the token rides in the query string.
    let r = g
        .http
        .post(format!("{}/v1/heartbeats?access_token={good}", g.base))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(json!({"session_id": "tok-1", "kind": "END"}).to_string())
        .send()
        .await
        .expect("beacon");
    assert_eq!(r.status().as_u16(), 202);
    // A stream of a region the token does not grant, and of the one it does (a token in a
    // stream's URL is refused: EventSource uses a ticket, tests/auth.rs). Streams exist only
    // for regions the notifier has seen.
    let regions_key = presence_core::delivery::RedisKeys::new(&config.redis.key_prefix).regions();
    let mut redis = redis::Client::open(config.redis.url.expose())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: i64 = redis::AsyncCommands::sadd(&mut redis, &regions_key, "south")
        .await
        .expect("sadd");
    let r = g
        .http
        .get(format!("{}/v1/regions/north/stream", g.base))
        .bearer_auth(&good)
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 403);
    let r = g
        .http
        .get(format!(
            "{}/v1/regions/south/stream?access_token={good}",
            g.base
        ))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 401);
    let r = g
        .http
        .get(format!("{}/v1/regions/south/stream", g.base))
        .bearer_auth(&good)
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 200);
    let r = g
        .http
        .get(format!("{}/v1/regions/south/stream", g.base))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 401, "no token");
    let _: i64 = redis::AsyncCommands::del(&mut redis, &regions_key)
        .await
        .expect("del");

    let records = read_to_end(&config, &config.topics.heartbeats, Duration::from_secs(30));
    assert_eq!(
        records.len(),
        2,
        "only the two authorised beats were produced, once each"
    );
    for m in records {
        let h = presence_core::codec::decode::<presence_core::records::Heartbeat>(
            m.payload().unwrap_or_default(),
        )
        .expect("decodes");
        assert_eq!(
            (
                h.user_id.as_str(),
                h.facility_id.as_str(),
                h.region_id.as_str()
            ),
            ("u-7", "f-7", "south")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_is_503_with_retry_after_and_loses_nothing_acknowledged() {
    let kafka = PrivateService::kafka();
    kafka.start();
    let mut config = isolated_config();
    config.kafka.brokers = kafka.address();
    config.topics.heartbeats_partitions = 1;
    config.gateway.produce_timeout = Duration::from_secs(2);
    let g = start(&config).await;
    let mut acknowledged = BTreeSet::new();
    let mut n = 0;
    async fn send(g: &Gateway, n: &mut u32) -> (String, (u16, Value, reqwest::header::HeaderMap)) {
        *n += 1;
        let id = format!("s-{n}");
        let answer = post(g, "application/json", beat(&id, "BEAT").to_string(), None).await;
        (id, answer)
    }
    for _ in 0..5 {
        let (id, (s, b, _)) = send(&g, &mut n).await;
        assert_eq!(s, 202, "{b}");
        acknowledged.insert(id);
    }

    kafka.stop();
    // Until the gateway notices, a request may still be waiting for its acknowledgement;
    // from then on every answer is 503 with Retry-After, never a 202 without the broker.
    let mut refused = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while refused < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway still answered without 3 refusals 120 s after the broker stopped"
        );
        let (id, (s, b, headers)) = send(&g, &mut n).await;
        match s {
            503 => {
                refused += 1;
                assert!(headers.contains_key("retry-after"), "{b}");
                assert!(
                    b["message"].as_str().is_some_and(|m| m.contains("retry")),
                    "{b}"
                );
            }
            202 => {
                acknowledged.insert(id);
            }
            other => panic!("unexpected {other}: {b}"),
        }
    }
    ready(&g, false).await;

    kafka.start();
    ready(&g, true).await;
    for _ in 0..5 {
        let (id, (s, b, _)) = send(&g, &mut n).await;
        assert_eq!(s, 202, "after recovery: {b}");
        acknowledged.insert(id);
    }
    // Every answer is in, so the producer has nothing in flight: the topic is final.
    let records = read_to_end(&config, &config.topics.heartbeats, Duration::from_secs(30));
    let keys: Vec<String> = records
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).to_string())
        .collect();
    let stored: BTreeSet<String> = keys.iter().cloned().collect();
    assert_eq!(
        stored.len(),
        keys.len(),
        "each session id was sent once, so none may be stored twice: {keys:?}"
    );
    let lost: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but not in the topic: {lost:?}"
    );
    // A 503 may still have been stored (a late acknowledgement: the client retries), but
    // nothing that was never sent.
    let sent: BTreeSet<String> = (1..=n).map(|i| format!("s-{i}")).collect();
    let unknown: Vec<_> = stored.difference(&sent).collect();
    assert!(unknown.is_empty(), "stored but never sent: {unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_admits_the_configured_origins_only() {
    let mut config = isolated_config();
    config.gateway.cors_origins = vec!["https://app.example.com".into()];
    let g = start(&config).await;
    let preflight = |origin: &'static str| {
        g.http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/heartbeats", g.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com")
        .await
        .expect("preflight");
    assert_eq!(
        allowed
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap_or_default()),
        Some("https://app.example.com")
    );
    let methods = allowed
        .headers()
        .get("access-control-allow-methods")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    assert!(methods.contains("POST"), "{methods}");
    let refused = preflight("https://evil.example.net")
        .await
        .expect("preflight");
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "an origin not in gateway.cors_origins is not admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_is_503_and_every_202_is_in_the_topic() {
    let mut config = isolated_config();
    config.gateway.max_in_flight = 1;
    // 200 beats of one user at once: this test is about the queue, not the rate limit.
    config.gateway.ingest_burst = 1000;
    let g = start(&config).await;
    let requests = (0..200).map(|i| {
        post(
            &g,
            "application/json",
            beat(&format!("q-{i}"), "BEAT").to_string(),
            None,
        )
    });
    let answers = futures::future::join_all(requests).await;
    let mut accepted = 0;
    let mut refused = 0;
    for (status, body, headers) in answers {
        match status {
            202 => accepted += 1,
            503 => {
                refused += 1;
                assert_eq!(body["error"], "queue_full", "{body}");
                assert!(headers.contains_key("retry-after"));
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        refused > 0,
        "200 concurrent beats through a queue of 1 must meet a full queue"
    );
    assert!(accepted > 0);
    assert_eq!(
        records_in(&config, &config.topics.heartbeats),
        accepted,
        "every 202 is stored, nothing else"
    );
}
