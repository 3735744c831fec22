//! The console's read endpoints (issue #14) against real Redis and PostgreSQL: the sink's
//! tables and SQL functions (its migrations, applied to this test's schema) hold a history
//! written here, Redis holds what the notifier would; every answer is compared with an
//! oracle computed here from the same transitions.

mod support;

use std::time::Duration;

use futures::StreamExt;
use presence_core::config::{AuthMode, Config};
use presence_core::delivery::RedisKeys;
use presence_core::records::{FacilityStatus, Status};
use presence_core::{now_ms, Secret, Shutdown};
use presence_testkit::isolated_config;
use serde_json::Value;

const SECRET: &str = "console-secret-console-secret-console";
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

/// The sink's migrations, as it applies them (unqualified names land in the schema).
const MIGRATIONS: [&str; 5] = [
    include_str!("../../sink/migrations/0001_status_and_history.sql"),
    include_str!("../../sink/migrations/0002_console.sql"),
    include_str!("../../sink/migrations/0003_status_fillfactor.sql"),
    include_str!("../../sink/migrations/0004_facility_id_collate_c.sql"),
    include_str!("../../sink/migrations/0005_history_one_index.sql"),
];

/// A transition: facility, region, since (ms), ONLINE?
type T = (&'static str, &'static str, i64, bool);

/// Seconds ONLINE, seconds known and the OFFLINE spans of `facility` within [d0, d1),
/// clipped to `now`: the oracle for `facility_days` and the windows.
fn oracle(history: &[T], facility: &str, d0: i64, d1: i64, now: i64) -> (f64, f64, Vec<[i64; 2]>) {
    let mine: Vec<&T> = history.iter().filter(|t| t.0 == facility).collect();
    let (mut online, mut known, mut outages) = (0i64, 0i64, Vec::new());
    for (i, t) in mine.iter().enumerate() {
        let end = mine.get(i + 1).map_or(now, |n| n.2).min(now);
        let (a, b) = (t.2.max(d0), end.min(d1));
        if b <= a {
            continue;
        }
        known += b - a;
        if t.3 {
            online += b - a;
        } else {
            outages.push([a, b]);
        }
    }
    (online as f64 / 1000.0, known as f64 / 1000.0, outages)
}

fn status(t: &T, seq: i64) -> FacilityStatus {
    FacilityStatus {
        facility_id: t.0.into(),
        region_id: t.1.into(),
        status: if t.3 { Status::Online } else { Status::Offline },
        open_sessions: i32::from(t.3),
        since: t.2,
        seq,
        emitted_at: t.2,
        previous_since: None,
    }
}

fn token(sub: &str, region: &str) -> String {
    let exp = (now_ms() / 1000) as u64 + 600;
    support::hs256_token(SECRET, sub, &format!("f-{sub}"), region, exp)
}

struct World {
    config: Config,
    db: tokio_postgres::Client,
    redis: redis::aio::MultiplexedConnection,
    keys: RedisKeys,
}

impl World {
    async fn new() -> World {
        let config = isolated_config();
        let db = presence_core::delivery::connect_postgres(&config.database)
            .await
            .expect("postgres");
        let schema = &config.database.schema;
        let mut sql = format!("CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";");
        for m in MIGRATIONS {
            sql.push_str(m);
        }
        db.batch_execute(&sql).await.expect("migrations");
        let redis = redis::Client::open(config.redis.url.expose())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let keys = RedisKeys::new(&config.redis.key_prefix);
        World {
            config,
            db,
            redis,
            keys,
        }
    }

    /// The history in PostgreSQL (as the sink writes it) and each facility's newest
    /// transition in Redis (as the notifier does).
    async fn write(&mut self, history: &[T]) {
        let schema = self.config.database.schema.clone();
        let mut newest: std::collections::BTreeMap<&str, (i64, &T)> = Default::default();
        for (i, t) in history.iter().enumerate() {
            let seq = history[..i].iter().filter(|o| o.0 == t.0).count() as i64 + 1;
            self.db
                .execute(
                    &format!("INSERT INTO \"{schema}\".facility_transitions VALUES ($1, $2, $3, $4, $5, to_timestamp($6::bigint / 1000.0), now(), 0, $2)"),
                    &[&t.0, &seq, &t.1, &(if t.3 { "ONLINE" } else { "OFFLINE" }), &i32::from(t.3), &t.2],
                )
                .await
                .expect("history row");
            newest.insert(t.0, (seq, t));
        }
        for (seq, t) in newest.values() {
            self.db
                .execute(
                    &format!("INSERT INTO \"{schema}\".facility_status VALUES ($1, $2, $3, $4, to_timestamp($5::bigint / 1000.0), $6, now())"),
                    &[&t.0, &t.1, &(if t.3 { "ONLINE" } else { "OFFLINE" }), &i32::from(t.3), &t.2, seq],
                )
                .await
                .expect("status row");
            self.set_now(&status(t, *seq)).await;
        }
    }

    /// A facility's newest transition in Redis as the notifier writes it: the facility, the
    /// region's hash, the region sequence, the replay log and the region channel.
    async fn set_now(&mut self, s: &FacilityStatus) {
        let json = serde_json::to_string(s).expect("json");
        let region_seq: u64 =
            redis::AsyncCommands::incr(&mut self.redis, self.keys.region_seq(&s.region_id), 1)
                .await
                .expect("incr");
        let message = format!("{{\"region_seq\":{region_seq},{}", &json[1..]);
        let _: () = redis::pipe()
            .atomic()
            .sadd(self.keys.regions(), &s.region_id)
            .hset(self.keys.facility(&s.facility_id), "json", &json)
            .hset(
                self.keys.region_facilities(&s.region_id),
                &s.facility_id,
                &json,
            )
            .zadd(self.keys.region_log(&s.region_id), &message, region_seq)
            .publish(self.keys.region_channel(&s.region_id), &message)
            .query_async(&mut self.redis)
            .await
            .expect("redis");
    }

    async fn clean(&mut self) {
        let keys: Vec<String> =
            redis::AsyncCommands::keys(&mut self.redis, format!("{}:*", self.keys.prefix))
                .await
                .unwrap_or_default();
        for k in keys {
            let _: Result<i64, _> = redis::AsyncCommands::del(&mut self.redis, k).await;
        }
        let _ = self
            .db
            .batch_execute(&format!(
                "DROP SCHEMA \"{}\" CASCADE",
                self.config.database.schema
            ))
            .await;
    }
}

async fn gateway(config: &Config, shutdown: &Shutdown) -> String {
    let running = presence_gateway::start(config.clone(), shutdown.clone())
        .await
        .expect("gateway starts");
    format!("http://{}", running.addr)
}

async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("get");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uptime_sessions_and_overview_match_the_history() {
    let mut w = World::new().await;
    let now = now_ms();
    let midnight = now - now.rem_euclid(DAY);
    // f1 (north): ONLINE three days ago, a 90 min outage two days ago, a 30 min outage
    // across yesterday's end; f2 (north) OFFLINE for ten days; f3 (south) ONLINE.
    let history: Vec<T> = vec![
        ("f1", "north", midnight - 3 * DAY, true),
        ("f2", "north", midnight - 10 * DAY, false),
        ("f3", "south", midnight - 10 * DAY, true),
        ("f1", "north", midnight - 2 * DAY + 6 * HOUR, false),
        ("f1", "north", midnight - 2 * DAY + 15 * HOUR / 2, true),
        ("f1", "north", midnight - DAY + 23 * HOUR, false),
        ("f1", "north", midnight - HOUR / 2, true),
    ];
    w.write(&history).await;
    let shutdown = Shutdown::new();
    let base = gateway(&w.config, &shutdown).await;

    // Five calendar days in UTC, today included.
    let (code, up) = get(
        &format!("{base}/v1/facilities/f1/uptime?days=5&tz=UTC"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{up}");
    let asked_at = now_ms();
    let days = up["days"].as_array().expect("days");
    assert_eq!(days.len(), 5, "{up}");
    for (i, day) in days.iter().enumerate() {
        let d0 = midnight - (4 - i as i64) * DAY;
        let (online, known, outages) = oracle(&history, "f1", d0, d0 + DAY, asked_at);
        let got = (
            day["online_seconds"].as_f64().unwrap_or(-1.0),
            day["known_seconds"].as_f64().unwrap_or(-1.0),
        );
        // Today ends at the query's now(), a moment before asked_at.
        let slack = if i == 4 { 5.0 } else { 0.001 };
        assert!(
            (got.0 - online).abs() <= slack && (got.1 - known).abs() <= slack,
            "day {i}: {day} vs oracle online {online} known {known}"
        );
        if i < 4 {
            assert_eq!(
                day["outages"],
                serde_json::to_value(&outages).expect("json"),
                "day {i}"
            );
        }
    }
    assert_eq!(
        days[0]["known_seconds"].as_f64(),
        Some(0.0),
        "before f1's first transition nothing is known"
    );
    assert_eq!(days[2]["outages"].as_array().map(Vec::len), Some(1));
    // Windows: 24 h, 7 d, 30 d, against the oracle.
    let windows = up["windows"].as_array().expect("windows");
    for (w_json, length) in windows.iter().zip([DAY, 7 * DAY, 30 * DAY]) {
        let (online, known, _) = oracle(&history, "f1", asked_at - length, asked_at, asked_at);
        let percent = w_json["uptime_percent"].as_f64().expect("percent");
        assert!(
            (percent - 100.0 * online / known).abs() < 0.01,
            "{w_json} vs {}",
            100.0 * online / known
        );
    }
    // The viewer's time zone cuts the days elsewhere; a made-up one is refused.
    let (code, berlin) = get(
        &format!("{base}/v1/facilities/f1/uptime?days=3&tz=Europe/Berlin"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{berlin}");
    assert_eq!(berlin["days"].as_array().map(Vec::len), Some(3));
    // Berlin is UTC+1 in winter: yesterday's 23:00-23:30 UTC outage is today's 00:00-00:30
    // there (until Berlin's day turns, at 23:00 UTC).
    if now < midnight + 23 * HOUR {
        let outages = |i: usize| berlin["days"][i]["outages"].clone();
        assert_eq!(outages(1), serde_json::json!([]), "{berlin}");
        assert_eq!(
            outages(2),
            serde_json::json!([[midnight - HOUR, midnight - HOUR / 2]]),
            "{berlin}"
        );
    }
    for bad in ["tz=Mars/Base", "tz=a%20b", "days=0", "days=400", "days=x"] {
        let (code, body) = get(&format!("{base}/v1/facilities/f1/uptime?{bad}"), None).await;
        assert_eq!(
            (code, body["error"].as_str()),
            (400, Some("invalid_field")),
            "{bad}: {body}"
        );
    }

    // Who is online: rows as the sink keeps them.
    let schema = &w.config.database.schema;
    for (key, user, facility, region, since) in [
        (1u8, "u-1", "f1", "north", midnight - HOUR),
        (2, "u-2", "f1", "north", midnight - HOUR / 2),
        (3, "u-3", "f3", "south", midnight - HOUR),
    ] {
        w.db.execute(
            &format!("INSERT INTO \"{schema}\".open_sessions VALUES (0, $1, $2, $3, $4, $5, to_timestamp($6::bigint / 1000.0), to_timestamp($7::bigint / 1000.0), 0)"),
            &[&vec![key; 16], &format!("s-{key}"), &user, &facility, &region, &since, &(now - 1000)],
        )
        .await
        .expect("session row");
    }
    let (code, sessions) = get(&format!("{base}/v1/facilities/f1/sessions"), None).await;
    assert_eq!(code, 200, "{sessions}");
    assert_eq!(
        sessions["sessions"],
        serde_json::json!([
            {"user_id": "u-1", "since": midnight - HOUR, "last_beat": now - 1000},
            {"user_id": "u-2", "since": midnight - HOUR / 2, "last_beat": now - 1000},
        ])
    );
    assert_eq!(sessions["truncated"], false);

    // The regions at a glance: north has one of two OFFLINE, so it comes first.
    let (code, overview) = get(&format!("{base}/v1/overview"), None).await;
    assert_eq!(code, 200, "{overview}");
    let at = overview["uptime_at"].as_i64().expect("uptime computed");
    let regions = overview["regions"].as_array().expect("regions");
    let names: Vec<&str> = regions
        .iter()
        .filter_map(|r| r["region"].as_str())
        .collect();
    assert_eq!(names, ["north", "south"]);
    assert_eq!(
        (
            regions[0]["online"].as_u64(),
            regions[0]["offline"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let (mut online, mut known) = (0.0, 0.0);
    for f in ["f1", "f2"] {
        let (o, k, _) = oracle(&history, f, at - DAY, at, at);
        online += o;
        known += k;
    }
    let north = regions[0]["uptime_24h_percent"]
        .as_f64()
        .expect("north uptime");
    assert!(
        (north - 100.0 * online / known).abs() < 0.01,
        "{north} vs {}",
        100.0 * online / known
    );
    assert_eq!(regions[1]["uptime_24h_percent"].as_f64(), Some(100.0));

    // Live over one connection: f3 going OFFLINE moves south's counts.
    let mut stream = reqwest::Client::new()
        .get(format!("{base}/v1/overview/stream"))
        .send()
        .await
        .expect("stream")
        .bytes_stream();
    let mut text = String::new();
    let mut next_overview = async |text: &mut String| -> Value {
        loop {
            if let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    if event.contains("event: overview") {
                        return serde_json::from_str(data).expect("overview json");
                    }
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("an event within 5 s")
                .expect("stream open")
                .expect("bytes");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    let first = next_overview(&mut text).await;
    assert_eq!(first["regions"], overview["regions"]);
    let mut off = status(&("f3", "south", now_ms(), false), 2);
    off.open_sessions = 0;
    w.set_now(&off).await;
    let changed = next_overview(&mut text).await;
    let south = changed["regions"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["region"] == "south").cloned())
        .expect("south");
    assert_eq!(
        (south["online"].as_u64(), south["offline"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(
        changed["regions"][0]["region"], "south",
        "all OFFLINE is the worst"
    );
    shutdown.trigger();

    // With tokens: a caller granted south sees south only, and not north's sessions.
    let mut config = w.config.clone();
    config.gateway.auth = AuthMode::Jwt;
    config.gateway.jwt_secret = Secret::new(SECRET);
    let shutdown = Shutdown::new();
    let base = gateway(&config, &shutdown).await;
    let south_token = token("op", "south");
    let (code, body) = get(
        &format!("{base}/v1/facilities/f1/sessions"),
        Some(&south_token),
    )
    .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (403, Some("region_not_granted")),
        "{body}"
    );
    let (code, body) = get(
        &format!("{base}/v1/facilities/f1/uptime"),
        Some(&south_token),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = get(
        &format!("{base}/v1/facilities/f3/sessions"),
        Some(&south_token),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["sessions"][0]["user_id"], "u-3");
    let (code, body) = get(&format!("{base}/v1/facilities/f1/sessions"), None).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = get(&format!("{base}/v1/overview"), Some(&south_token)).await;
    assert_eq!(code, 200, "{body}");
    let names: Vec<&str> = body["regions"]
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["region"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["south"]);
    // The overview stream takes a ticket (EventSource sends no header) for every granted
    // region, and never a token in the URL.
    let ticket: Value = reqwest::Client::new()
        .post(format!("{base}/v1/stream-tickets"))
        .bearer_auth(&south_token)
        .send()
        .await
        .expect("ticket")
        .json()
        .await
        .expect("json");
    let ticket = ticket["ticket"].as_str().expect("ticket").to_string();
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/overview/stream?ticket={ticket}"))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 200);
    let r = reqwest::Client::new()
        .get(format!(
            "{base}/v1/overview/stream?access_token={south_token}"
        ))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status().as_u16(), 401);
    shutdown.trigger();
    w.clean().await;
}

/// The console in headless Chromium (tests/browser/console.cjs) over the same kind of world,
/// bigger: 1,000 facilities in one region (paged), 50 regions. What each view shows is
/// compared with the ground truth written here; the 90-day bar with the oracle in the
/// viewer's time zone (Asia/Tokyo, UTC+9 all year); a facility turned OFFLINE in Redis must
/// turn so on the page within a second. Screenshots: target/console-screenshots/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium_shows_the_truth() {
    let mut w = World::new().await;
    let now = now_ms();
    let midnight = now - now.rem_euclid(DAY);
    let mut history: Vec<T> = vec![
        ("f1", "north", midnight - 40 * DAY, true),
        ("f1", "north", midnight - 20 * DAY + 3 * HOUR, false),
        ("f1", "north", midnight - 20 * DAY + 9 * HOUR, true),
        ("f1", "north", midnight - 2 * DAY + 6 * HOUR, false),
        ("f1", "north", midnight - 2 * DAY + 15 * HOUR / 2, true),
        ("f3", "south", midnight - 10 * DAY, true),
    ];
    // Generated facilities: ids and regions must be 'static for T; leaked once per test run.
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    for i in 0..1000 {
        history.push((
            leak(format!("n-{i:04}")),
            "north",
            midnight - 5 * DAY,
            i % 3 != 0,
        ));
    }
    for r in 0..48 {
        for i in 0..(r % 5 + 2) {
            history.push((
                leak(format!("r{r}-{i}")),
                leak(format!("region-{r:02}")),
                midnight - DAY,
                i >= r % 5,
            ));
        }
    }
    w.write(&history).await;
    let schema = w.config.database.schema.clone();
    for (key, user) in [(1u8, "alice"), (2, "bob")] {
        w.db.execute(
            &format!("INSERT INTO \"{schema}\".open_sessions VALUES (0, $1, $2, $3, 'f1', 'north', to_timestamp($4::bigint / 1000.0), to_timestamp($4::bigint / 1000.0), 0)"),
            &[&vec![key; 16], &format!("s-{key}"), &user, &(now - i64::from(key) * 60_000)],
        )
        .await
        .expect("session row");
    }
    // A fixed port, so that the gateway can be restarted under the page.
    w.config.gateway.listen = ([127, 0, 0, 1], presence_testkit::free_port()).into();
    let mut shutdown = Shutdown::new();
    let mut running = presence_gateway::start(w.config.clone(), shutdown.clone())
        .await
        .expect("gateway starts");
    let base = format!("http://{}", running.addr);

    // Ground truth: each region's facilities by their newest transition.
    let mut newest: std::collections::BTreeMap<&str, &T> = Default::default();
    for t in &history {
        newest.insert(t.0, t);
    }
    let mut truth: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    for t in newest.values() {
        let e = truth.entry(t.1).or_default();
        if t.3 {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    let shots = presence_testkit::repo_root().join("target/console-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let mut node = presence_testkit::BrowserScript::spawn(
        "console.cjs",
        &[
            base.as_str(),
            "north",
            "f1",
            "f3",
            shots.to_str().expect("a UTF-8 path"),
        ],
    );
    assert_eq!(
        node.next_line().await,
        "RESTART",
        "console.cjs failed (its stderr is above)"
    );
    shutdown.trigger();
    running.wait().await;
    shutdown = Shutdown::new();
    running = presence_gateway::start(w.config.clone(), shutdown.clone())
        .await
        .expect("gateway starts again on its port");
    assert_eq!(
        node.next_line().await,
        "READY",
        "console.cjs failed (its stderr is above)"
    );
    let turned_off_at = now_ms();
    w.set_now(&status(&("f3", "south", turned_off_at, false), 2))
        .await;
    let out = node.next_line().await;
    let status_code = node.wait().await;
    assert!(status_code.success(), "console.cjs failed: {out:?}");
    let out: Value = serde_json::from_str(&out).expect("the script's JSON");

    // Regions at a glance: every region with its true counts, worst first.
    let overview = out["overview"].as_array().expect("overview");
    assert_eq!(overview.len(), truth.len(), "{out}");
    for r in overview {
        let name = r["region"].as_str().unwrap_or("");
        let (on, off) = truth[name];
        assert_eq!(
            (r["online"].as_u64(), r["offline"].as_u64()),
            (Some(on), Some(off)),
            "{name}"
        );
    }
    let shares: Vec<f64> = overview
        .iter()
        .map(|r| {
            let (on, off) = (
                r["online"].as_f64().unwrap_or(0.0),
                r["offline"].as_f64().unwrap_or(0.0),
            );
            off / (on + off)
        })
        .collect();
    assert!(
        shares.windows(2).all(|p| p[0] >= p[1]),
        "worst first: {shares:?}"
    );
    assert_eq!(out["tz"], "times in Asia/Tokyo");
    assert_eq!(
        out["keyboard_opened"], overview[0]["region"],
        "Enter on the focused region opens it"
    );

    // The region: true counts, one page of 200 tiles, search finds one.
    let (on, off) = truth["north"];
    assert_eq!(
        (
            out["region"]["online"].as_u64(),
            out["region"]["offline"].as_u64()
        ),
        (Some(on), Some(off)),
        "{out}"
    );
    assert_eq!(out["region"]["tiles_on_page"], 200);
    assert_eq!(out["region"]["pager"], format!("1–200 of {}", on + off));
    assert_eq!(out["region"]["search"], serde_json::json!(["f1"]));
    assert!(
        out["region"]["back"]
            .as_str()
            .unwrap_or("")
            .starts_with("live"),
        "{out}"
    );

    // The facility: the 90-day bar equals the oracle in Tokyo's days.
    let tokyo = 9 * HOUR;
    let today = (now + tokyo) - (now + tokyo).rem_euclid(DAY) - tokyo;
    let days = out["facility"]["days"].as_array().expect("days");
    assert_eq!(days.len(), 90);
    let asked_at = now_ms();
    for (i, d) in days.iter().enumerate() {
        let d0 = today - (89 - i as i64) * DAY;
        let (online, known, outages) = oracle(&history, "f1", d0, d0 + DAY, asked_at);
        let slack = if i == 89 { 120.0 } else { 0.001 };
        assert!(
            (d["online"].as_f64().unwrap_or(-1.0) - online).abs() <= slack
                && (d["known"].as_f64().unwrap_or(-1.0) - known).abs() <= slack
                && d["outages"].as_u64() == Some(outages.len() as u64),
            "day {i} {d} vs oracle online {online} known {known} outages {}",
            outages.len()
        );
    }
    let with_outage = days.iter().filter(|d| d["outages"] == 1).count();
    assert_eq!(with_outage, 2, "two outage days within 90 days");
    assert!(
        out["facility"]["hover"]
            .as_str()
            .unwrap_or("")
            .contains("outage"),
        "{out}"
    );
    assert_eq!(
        out["facility"]["sessions"],
        serde_json::json!(["bob", "alice"])
    );
    assert_eq!(out["facility"]["status"], "ONLINE");
    assert!(
        out["facility"]["transitions_7d"].as_u64().unwrap_or(0) >= 2,
        "{out}"
    );

    // OFFLINE within a second of the change reaching Redis.
    assert_eq!(out["watched_before"], "ONLINE");
    let seen = out["offline_seen_at"].as_i64().expect("seen");
    assert!(
        seen - turned_off_at < 1000,
        "OFFLINE on the page after {} ms",
        seen - turned_off_at
    );
    for shot in [
        "1-regions",
        "2-region",
        "3-region-reconnecting",
        "4-facility",
        "5-facility-offline",
    ] {
        assert!(shots.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
    assert!(
        out["region"]["dropped"]
            .as_str()
            .unwrap_or("")
            .contains("reconnect"),
        "{out}"
    );
    shutdown.trigger();
    running.wait().await;
    w.clean().await;
}
