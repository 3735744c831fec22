//! The gateway as a separate process under attack (issue #10, items 2 and 5): its memory is
//! measured from outside (`/proc/<pid>/status`), its metrics on its ops port, and its
//! refusal to start exposed without authentication from its exit status. The in-process
//! probes (timeouts, caps, rate limit, history) are in `processors/gateway/tests/attacks.rs`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use presence_core::config::Config;
use presence_core::delivery::RedisKeys;
use presence_testkit::{eventually, free_port, isolated_config};

/// A `presence gateway` child process; SIGTERM and reaped on drop.
struct GatewayProcess {
    child: Child,
    base: String,
    ops: String,
    http: reqwest::Client,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway_command(c: &Config, listen: &str, ops: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presence"));
    cmd.arg("gateway")
        .env("KAFKA_BROKERS", &c.kafka.brokers)
        .env("REDIS_URL", c.redis.url.expose())
        .env("PRESENCE_REDIS__KEY_PREFIX", &c.redis.key_prefix)
        .env("PRESENCE_TOPICS__HEARTBEATS", &c.topics.heartbeats)
        .env("PRESENCE_GATEWAY__LISTEN", listen)
        .env("PRESENCE_GATEWAY__OPS_LISTEN", ops)
        .env("PRESENCE_TELEMETRY__LOG_FILTER", "warn")
        .env_remove("PRESENCE_GATEWAY__AUTH")
        .env_remove("PRESENCE_GATEWAY__ALLOW_ANONYMOUS")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

async fn start(c: &Config) -> GatewayProcess {
    let (port, ops_port) = (free_port(), free_port());
    let child = gateway_command(
        c,
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{ops_port}"),
    )
    .stderr(Stdio::inherit())
    .spawn()
    .expect("spawn presence gateway");
    let g = GatewayProcess {
        child,
        base: format!("http://127.0.0.1:{port}"),
        ops: format!("http://127.0.0.1:{ops_port}"),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("http client"),
    };
    eventually(
        "the gateway answers /healthz",
        Duration::from_secs(30),
        || async {
            let r = g
                .http
                .get(format!("{}/healthz", g.base))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    g
}

impl GatewayProcess {
    /// Resident memory in MiB.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status");
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS");
        kib / 1024.0
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.ops))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits until no stream and no region channel is left.
    async fn streams_freed(&self, within: Duration) -> Duration {
        let started = Instant::now();
        eventually("every stream and region channel freed", within, || async {
            let clients = self.metric("presence_gateway_stream_clients").await?;
            let regions = self.metric("presence_gateway_stream_regions").await?;
            (clients == 0.0 && regions == 0.0).then_some(())
        })
        .await;
        started.elapsed()
    }

    /// `n` streams of `region`, at most 250 connecting at once, each leaving 0.2 s after
    /// its response started; how many were answered 200.
    async fn streams_that_leave(&self, region: &str, n: usize) -> usize {
        let gate = Arc::new(tokio::sync::Semaphore::new(250));
        let url = format!("{}/v1/regions/{region}/stream", self.base);
        let tasks = (0..n).map(|_| {
            let (http, url, gate) = (self.http.clone(), url.clone(), Arc::clone(&gate));
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.ok()?;
                let r = http.get(url).send().await.ok()?;
                let ok = r.status() == 200;
                // The attack: stay 0.2 s, then vanish without a word.
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(r);
                Some(ok)
            })
        });
        futures::future::join_all(tasks)
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(Some(true))))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_streams_that_disconnect_give_their_memory_back() {
    let c = isolated_config();
    let keys = RedisKeys::new(&c.redis.key_prefix);
    let mut redis = redis::Client::open(c.redis.url.expose())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: i64 = redis::AsyncCommands::sadd(&mut redis, keys.regions(), "north")
        .await
        .expect("sadd");
    let g = start(&c).await;

    // Warm up (allocator arenas, Redis connection), then the baseline.
    assert_eq!(g.streams_that_leave("north", 20).await, 20);
    g.streams_freed(Duration::from_secs(60)).await;
    let baseline = g.rss_mib();

    // Made-up regions: 404, nothing allocated.
    let made_up: Vec<Option<u16>> = futures::stream::iter((0..2000).map(|i| {
        let (http, url) = (
            g.http.clone(),
            format!("{}/v1/regions/made-up-{i}/stream", g.base),
        );
        async move { http.get(url).send().await.map(|r| r.status().as_u16()).ok() }
    }))
    .buffer_unordered(200)
    .collect()
    .await;
    assert!(
        made_up.iter().all(|s| *s == Some(404)),
        "every made-up region is 404"
    );
    assert_eq!(g.metric("presence_gateway_stream_regions").await, Some(0.0));

    // The attack of issue #10: 2,000 streams that disconnect after 0.2 s.
    let answered = g.streams_that_leave("north", 2000).await;
    assert_eq!(answered, 2000, "every stream of a real region is served");
    let peak = g.rss_mib();
    let freed_in = g.streams_freed(Duration::from_secs(60)).await;
    // RSS back near the baseline within a minute (before the fix: 20 MB -> 493 MB).
    let limit = baseline + 48.0;
    let started = Instant::now();
    let after = eventually(
        "RSS back near the baseline",
        Duration::from_secs(60),
        || async {
            let rss = g.rss_mib();
            (rss <= limit).then_some(rss)
        },
    )
    .await;
    eprintln!(
        "gateway RSS: baseline {baseline:.1} MiB, after 2000 streams {peak:.1} MiB, {after:.1} MiB {:.1} s later; streams freed {freed_in:?} after the last client left",
        started.elapsed().as_secs_f64()
    );
    let _: Result<i64, _> = redis::AsyncCommands::del(&mut redis, keys.regions()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_gateway_refuses_a_public_address_unless_told_so() {
    let c = isolated_config();
    let port = free_port();
    let ops = format!("127.0.0.1:{}", free_port());
    let mut child = gateway_command(&c, &format!("0.0.0.0:{port}"), &ops)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn presence gateway");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a gateway on 0.0.0.0 with auth = none is still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert!(!status.success(), "refused start-up exits non-zero");
    assert!(
        stderr.contains("gateway.allow_anonymous = true") && stderr.contains("gateway.auth"),
        "the refusal says what to set: {stderr}"
    );
    // Told explicitly, it starts.
    let mut allowed = gateway_command(&c, &format!("0.0.0.0:{port}"), &ops);
    let child = allowed
        .env("PRESENCE_GATEWAY__ALLOW_ANONYMOUS", "true")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn presence gateway");
    let g = GatewayProcess {
        child,
        base: format!("http://127.0.0.1:{port}"),
        ops: format!("http://{ops}"),
        http: reqwest::Client::new(),
    };
    eventually(
        "allowed anonymous gateway answers",
        Duration::from_secs(30),
        || async {
            let r = g
                .http
                .get(format!("{}/healthz", g.base))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    let public_metrics = g
        .http
        .get(format!("{}/metrics", g.base))
        .send()
        .await
        .expect("public /metrics");
    assert_eq!(
        public_metrics.status().as_u16(),
        404,
        "/metrics is not public"
    );
    assert!(g.metric("presence_gateway_connections").await.is_some());
}
