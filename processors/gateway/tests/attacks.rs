//! The gateway as an attacker meets it (issue #10, items 2 and 5), in process, against the
//! real broker, Redis and PostgreSQL: each probe asserts the safe outcome. The same gateway
//! as a separate process (RSS, start-up refusal) is in `cli/tests/gateway_attacks.rs`.

mod support;

use futures::StreamExt;
use std::time::{Duration, Instant};

use presence_core::config::{AuthMode, Config};
use presence_core::delivery::RedisKeys;
use presence_core::{Secret, Shutdown};
use presence_testkit::{eventually, isolated_config, transition};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "attack-secret-attack-secret-attack-secret";

struct Gateway {
    base: String,
    addr: std::net::SocketAddr,
    ops: String,
    http: reqwest::Client,
    shutdown: Shutdown,
    /// Deleted when the test ends, also when it fails.
    _topics: presence_testkit::TestTopics,
    redis: redis::aio::MultiplexedConnection,
    keys: RedisKeys,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

impl Gateway {
    async fn start(config: &Config) -> Gateway {
        let topics = presence_testkit::TestTopics::create(config).await;
        let shutdown = Shutdown::new();
        let running = presence_gateway::start(config.clone(), shutdown.clone())
            .await
            .expect("gateway starts");
        let redis = redis::Client::open(config.redis.url.expose())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        Gateway {
            base: format!("http://{}", running.addr),
            addr: running.addr,
            ops: format!("http://{}", running.ops_addr),
            http: reqwest::Client::new(),
            shutdown,
            _topics: topics,
            redis,
            keys: RedisKeys::new(&config.redis.key_prefix),
        }
    }

    /// A region the notifier has seen (what `presence:regions` holds).
    async fn add_region(&mut self, region: &str) {
        let _: i64 = redis::AsyncCommands::sadd(&mut self.redis, self.keys.regions(), region)
            .await
            .expect("sadd");
    }

    /// A facility's newest transition, as the notifier stores it.
    async fn add_facility(&mut self, facility: &str, region: &str) {
        let json = serde_json::to_string(&transition(facility, region, 1, true)).expect("json");
        let _: i64 =
            redis::AsyncCommands::hset(&mut self.redis, self.keys.facility(facility), "json", json)
                .await
                .expect("hset");
    }

    /// Deletes every key this test wrote.
    async fn clean(&mut self) {
        let keys: Vec<String> =
            redis::AsyncCommands::keys(&mut self.redis, format!("{}*", self.keys.regions()))
                .await
                .unwrap_or_default();
        let facilities: Vec<String> =
            redis::AsyncCommands::keys(&mut self.redis, self.keys.facility("*"))
                .await
                .unwrap_or_default();
        for k in keys.into_iter().chain(facilities) {
            let _: Result<i64, _> = redis::AsyncCommands::del(&mut self.redis, k).await;
        }
    }

    /// One gauge or counter from `/metrics` on the ops port (summed over labels).
    async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.ops))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn token(sub: &str, region: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 600;
    support::hs256_token(SECRET, sub, &format!("f-{sub}"), region, exp)
}

fn jwt_config() -> Config {
    let mut c = isolated_config();
    c.gateway.auth = AuthMode::Jwt;
    c.gateway.jwt_secret = Secret::new(SECRET);
    c
}

/// Reads from `stream` until the server closes it; the time it took, or `None` if it was
/// still open after `within`.
async fn closed_within(mut stream: TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + within),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_within_the_header_timeout() {
    let mut config = isolated_config();
    config.gateway.header_read_timeout = Duration::from_secs(2);
    let g = Gateway::start(&config).await;
    let mut open = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(g.addr).await.expect("connect");
        // Half a request line, then nothing.
        s.write_all(b"GET /v1/regions HTT").await.expect("write");
        open.push(s);
    }
    eventually("300 connections open", Duration::from_secs(10), || async {
        (g.metric("presence_gateway_connections").await >= 300.0).then_some(())
    })
    .await;
    let waits = futures::future::join_all(
        open.into_iter()
            .map(|s| closed_within(s, Duration::from_secs(6))),
    )
    .await;
    let still_open = waits.iter().filter(|w| w.is_none()).count();
    assert_eq!(
        still_open, 0,
        "connections still open 6 s after a 2 s header timeout"
    );
    let slowest = waits.iter().flatten().max().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(6),
        "slowest close {slowest:?}"
    );
    eventually("no connection left", Duration::from_secs(10), || async {
        (g.metric("presence_gateway_connections").await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_and_a_body_that_never_ends_are_cut() {
    let mut config = isolated_config();
    config.gateway.produce_timeout = Duration::from_secs(1);
    config.gateway.stream_keep_alive = Duration::from_secs(1);
    config.gateway.idle_timeout = Duration::from_secs(2);
    config.gateway.header_read_timeout = Duration::from_secs(30);
    config.gateway.body_read_timeout = Duration::from_secs(1);
    let g = Gateway::start(&config).await;

    // A keep-alive connection that asks once and then says nothing: closed after the idle
    // timeout, although the header timeout (30 s) is far away.
    let mut s = TcpStream::connect(g.addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 64];
    let n = s.read(&mut first).await.expect("response");
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &first[..n]);
    let idle = closed_within(s, Duration::from_secs(10)).await;
    assert!(
        idle.is_some_and(|d| d < Duration::from_secs(5)),
        "idle connection closed after {idle:?}; the idle timeout is 2 s"
    );

    // A body announced as 100 bytes of which 10 arrive: 408 after the body timeout.
    let mut s = TcpStream::connect(g.addr).await.expect("connect");
    s.write_all(b"POST /v1/heartbeats HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"session_")
        .await
        .expect("write");
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_read_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_disconnect_are_freed_and_unknown_regions_cost_nothing() {
    let mut config = isolated_config();
    config.gateway.stream_keep_alive = Duration::from_secs(1);
    let mut g = Gateway::start(&config).await;
    g.add_region("north").await;

    // A made-up region: 404, and no channel is made for it.
    for i in 0..50 {
        let r = g
            .http
            .get(format!("{}/v1/regions/made-up-{i}/stream", g.base))
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status().as_u16(), 404);
    }
    assert_eq!(g.metric("presence_gateway_stream_regions").await, 0.0);
    assert_eq!(g.metric("presence_gateway_stream_clients").await, 0.0);

    // 300 streams that read their snapshot and go away (opened 25 at a time, so that a busy
    // two-core machine does not turn the opening itself into the test).
    let opened: Vec<_> = futures::stream::iter((0..300).map(|_| async {
        let http = reqwest::Client::new();
        let mut r = http
            .get(format!("{}/v1/regions/north/stream", g.base))
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        // The snapshot arrives, then the client leaves.
        tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .ok()?
            .ok()??;
        Some(r)
    }))
    .buffer_unordered(25)
    .collect()
    .await;
    assert_eq!(opened.iter().filter(|o| o.is_some()).count(), 300);
    assert!(g.metric("presence_gateway_stream_clients").await >= 300.0);
    assert_eq!(g.metric("presence_gateway_stream_regions").await, 1.0);
    drop(opened);
    let started = Instant::now();
    eventually(
        "every stream and region channel freed",
        Duration::from_secs(10),
        || async {
            (g.metric("presence_gateway_stream_clients").await == 0.0
                && g.metric("presence_gateway_stream_regions").await == 0.0)
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "300 streams freed {:?} after their clients left",
        started.elapsed()
    );
    g.clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_caps_per_identity_and_in_total_answer_with_retry_after() {
    let mut config = jwt_config();
    config.gateway.max_streams_per_identity = 2;
    config.gateway.max_streams = 3;
    let mut g = Gateway::start(&config).await;
    g.add_region("north").await;
    let open = |who: &'static str| {
        let (http, url) = (
            g.http.clone(),
            format!("{}/v1/regions/north/stream", g.base),
        );
        async move {
            http.get(url)
                .bearer_auth(token(who, "north"))
                .send()
                .await
                .expect("stream")
        }
    };
    let a1 = open("alice").await;
    let a2 = open("alice").await;
    assert_eq!((a1.status().as_u16(), a2.status().as_u16()), (200, 200));
    let a3 = open("alice").await;
    assert_eq!(a3.status().as_u16(), 429, "a third stream of one identity");
    assert!(a3.headers().contains_key("retry-after"));
    let b1 = open("bob").await;
    assert_eq!(b1.status().as_u16(), 200);
    let c1 = open("carol").await;
    assert_eq!(c1.status().as_u16(), 503, "a fourth stream in total");
    assert!(c1.headers().contains_key("retry-after"));
    assert_eq!(
        g.metric("presence_gateway_streams_refused_total").await,
        2.0
    );
    // Alice closes one: her slot (and the total's) comes back.
    drop(a1);
    eventually("alice's slot back", Duration::from_secs(10), || async {
        (open("carol").await.status() == 200).then_some(())
    })
    .await;
    g.clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_flood_from_one_identity_is_429_while_another_is_served() {
    let mut config = jwt_config();
    config.gateway.ingest_burst = 5;
    config.gateway.ingest_per_minute = 60;
    let g = Gateway::start(&config).await;
    eventually("ready", Duration::from_secs(30), || async {
        let r = g.http.get(format!("{}/readyz", g.ops)).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let post = |who: &'static str, i: usize| {
        let (http, url) = (g.http.clone(), format!("{}/v1/heartbeats", g.base));
        async move {
            http.post(url)
                .bearer_auth(token(who, "north"))
                .header("content-type", "application/json")
                .body(json!({"session_id": format!("s-{who}-{i}"), "kind": if i.is_multiple_of(2) { "BEAT" } else { "END" }}).to_string())
                .send()
                .await
                .expect("post")
        }
    };
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..20 {
        let r = post("mallory", i).await;
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
        }
        statuses.push(r.status().as_u16());
    }
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        (5..=7).contains(&accepted),
        "a burst of 5 then 1/s: {statuses:?}"
    );
    assert_eq!(accepted + limited, 20, "{statuses:?}");
    assert!(
        retry_after.is_some_and(|s| s >= 1),
        "Retry-After {retry_after:?}"
    );
    // Another identity is not affected by mallory's flood.
    assert_eq!(post("alice", 0).await.status().as_u16(), 202);
    assert!(g.metric("presence_gateway_rate_limited_total").await >= limited as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_authorised_and_bounded_before_postgres_is_asked() {
    let mut config = jwt_config();
    config.gateway.history_max_range = Duration::from_secs(7 * 24 * 3600);
    let mut g = Gateway::start(&config).await;
    g.add_facility("f-south", "south").await;
    g.add_facility("f-north", "north").await;
    let north = token("nina", "north");
    let get = |facility: &str, query: &str| {
        g.http
            .get(format!(
                "{}/v1/facilities/{facility}/history?{query}",
                g.base
            ))
            .bearer_auth(&north)
            .send()
    };

    // Wider than the maximum: 400 naming `to`.
    let r = get("f-north", "from=0&to=864000000")
        .await
        .expect("history");
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["field"], "to", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("history_max_range"),
        "{body}"
    );
    // A facility of a region the token does not grant: 403, PostgreSQL never asked.
    let r = get("f-south", "").await.expect("history");
    assert_eq!(r.status().as_u16(), 403);
    // One the gateway has never seen: 404, not asked either.
    let r = get("f-nowhere", "").await.expect("history");
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        g.metric("presence_gateway_history_queries_total").await,
        0.0,
        "refused history requests must not query PostgreSQL"
    );
    // The control: a granted facility is queried (this test's schema has no tables: 503).
    let r = get("f-north", "").await.expect("history");
    assert!([200, 503].contains(&r.status().as_u16()), "{}", r.status());
    assert_eq!(
        g.metric("presence_gateway_history_queries_total").await,
        1.0
    );
    g.clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_are_not_on_the_public_port() {
    let config = isolated_config();
    let g = Gateway::start(&config).await;
    for path in ["/metrics", "/readyz"] {
        let r = g
            .http
            .get(format!("{}{path}", g.base))
            .send()
            .await
            .expect("public");
        assert_eq!(r.status().as_u16(), 404, "{path} on the public port");
    }
    let r = g
        .http
        .get(format!("{}/healthz", g.base))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status().as_u16(), 200);
    let r = g
        .http
        .get(format!("{}/metrics", g.ops))
        .send()
        .await
        .expect("ops");
    assert!(r
        .text()
        .await
        .unwrap_or_default()
        .contains("presence_gateway_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_header_is_refused_while_a_large_body_still_passes() {
    let mut config = isolated_config();
    config.gateway.max_batch = 2000;
    config.gateway.ingest_burst = 2000;
    let g = Gateway::start(&config).await;
    eventually("ready", Duration::from_secs(30), || async {
        let r = g.http.get(format!("{}/readyz", g.ops)).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    // 100 KiB of cookie, over the 64 KiB default: refused, the connection closed.
    let r = g
        .http
        .get(format!("{}/healthz", g.base))
        .header("cookie", "c=".to_string() + &"x".repeat(100 * 1024))
        .send()
        .await;
    assert!(
        r.as_ref().map_or(true, |r| r.status().as_u16() == 431),
        "a 100 KiB header: {:?}",
        r.map(|r| r.status())
    );
    // A body far larger than the header cap (about 180 KiB) is read in chunks and accepted.
    let beats: Vec<_> = (0..1800)
        .map(|i| json!({"session_id": format!("big-{i:06}-padding-padding"), "user_id": format!("u-{i}"), "facility_id": "f-1", "region_id": "north"}))
        .collect();
    let body = serde_json::Value::Array(beats).to_string();
    assert!(body.len() > 2 * 64 * 1024, "{}", body.len());
    let r = g
        .http
        .post(format!("{}/v1/heartbeats", g.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_query_slower_than_the_statement_timeout_is_cancelled() {
    let mut config = isolated_config();
    config.gateway.history_statement_timeout = Duration::from_secs(1);
    config.gateway.history_pool_size = 1;
    // This test's schema, with the sink's table and an `online_seconds` that takes 30 s.
    let schema = &config.database.schema;
    let db = presence_core::delivery::connect_postgres(&config.database)
        .await
        .expect("postgres");
    db.batch_execute(&format!(
        "CREATE SCHEMA \"{schema}\";
         CREATE TABLE \"{schema}\".facility_transitions (facility_id text, seq bigint, region_id text, status text, open_sessions integer, since timestamptz, emitted_at timestamptz);
         CREATE FUNCTION \"{schema}\".online_seconds(text, timestamptz, timestamptz) RETURNS double precision
           LANGUAGE sql AS 'SELECT 0::double precision FROM pg_sleep(30)';"
    ))
    .await
    .expect("schema");
    let g = Gateway::start(&config).await;
    let ask = || {
        let (http, url) = (
            g.http.clone(),
            format!("{}/v1/facilities/f-1/history", g.base),
        );
        async move {
            let started = Instant::now();
            let r = http.get(url).send().await.expect("history");
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body, started.elapsed())
        }
    };
    // Two at once through a pool of one: the first is cancelled after 1 s, the second
    // waits at most 1 s for the connection (then runs into the same timeout, or is refused).
    let (first, second) = tokio::join!(ask(), ask());
    for (status, body, took) in [first, second] {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "history_too_slow", "{body}");
        assert!(took < Duration::from_secs(5), "answered after {took:?}");
    }
    assert!(g.metric("presence_gateway_history_queries_total").await >= 1.0);
    db.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .expect("drop schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let mut config = isolated_config();
    config.gateway.max_connections = 5;
    let g = Gateway::start(&config).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(g.addr).await.expect("connect"));
    }
    eventually("5 connections open", Duration::from_secs(10), || async {
        (g.metric("presence_gateway_connections").await == 5.0).then_some(())
    })
    .await;
    // The sixth is accepted and closed without an answer, and counted.
    let mut sixth = TcpStream::connect(g.addr).await.expect("connect");
    let _ = sixth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let closed = closed_within(sixth, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "a connection over the cap stays open");
    assert_eq!(
        g.metric("presence_gateway_connections_refused_total").await,
        1.0
    );
    // One slot freed: a new connection is served again.
    drop(held.pop());
    eventually(
        "a freed slot serves again",
        Duration::from_secs(10),
        || async {
            let mut s = TcpStream::connect(g.addr).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer))
                .await
                .ok()?
                .ok()?;
            answer.starts_with(b"HTTP/1.1 200").then_some(())
        },
    )
    .await;
}

/// The bounds must not cut an honest client: a quiet stream outlives the header and idle
/// timeouts, kept alive by its comments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_outlives_the_header_and_idle_timeouts() {
    let mut config = isolated_config();
    config.gateway.header_read_timeout = Duration::from_secs(1);
    config.gateway.produce_timeout = Duration::from_secs(1);
    config.gateway.stream_keep_alive = Duration::from_secs(1);
    config.gateway.idle_timeout = Duration::from_secs(2);
    let mut g = Gateway::start(&config).await;
    g.add_region("quiet").await;
    let mut r = g
        .http
        .get(format!("{}/v1/regions/quiet/stream", g.base))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 200);
    let until = Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(3), r.chunk()).await {
            Ok(Ok(Some(bytes))) => text.push_str(&String::from_utf8_lossy(&bytes)),
            other => panic!("the stream ended or stalled: {other:?}; got {text:?}"),
        }
    }
    assert!(text.contains("event: snapshot"), "{text}");
    let comments = text.lines().filter(|l| l.starts_with(':')).count();
    assert!(
        comments >= 3,
        "{comments} keep-alive comments in 5 s: {text:?}"
    );
    drop(r);
    g.clean().await;
}
