//! The monitoring kit on a running pipeline: the real `presence` processor, notifier, sink
//! and gateway (child processes, topics and groups of their own), a load through the
//! gateway, and a real Prometheus (`deploy/stack.sh prometheus-up`, Debian's package, own
//! port and data directory) scraping them with the project's rules. Asserts that every
//! target is up, that every query of every panel of the Grafana dashboard
//! (`deploy/grafana/presence.json`) returns data, that `promtool check metrics` finds
//! nothing to say about any `/metrics`, and that every process exports `process_*`,
//! `presence_build_info` and the one dependency-health metric.

// The serial() guard is held across awaits on purpose: it keeps heavy end-to-end tests from
// running at once, and this test owns its runtime.
#![allow(clippy::await_holding_lock)]

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use presence_core::config::Config;
use presence_testkit::{
    check_processes, eventually, free_port, produce, repo_root, spawn_child, unique, ChildProcess,
    TestTopics,
};
use serde_json::Value;

const PROCESSES: [&str; 4] = ["processor", "notifier", "sink", "gateway"];

/// A Prometheus of this test's own, stopped (and its directory removed) on drop.
struct Prometheus {
    dir: std::path::PathBuf,
    port: u16,
}

impl Prometheus {
    fn start(targets: &[(&str, u16)]) -> Prometheus {
        let dir = std::env::temp_dir().join(unique("prometheus"));
        let port = free_port();
        let targets: Vec<String> = targets
            .iter()
            .map(|(name, port)| format!("{name}=127.0.0.1:{port}"))
            .collect();
        let prometheus = Prometheus { dir, port };
        let out = prometheus
            .stack("prometheus-up")
            .env("PROM_TARGETS", targets.join(" "))
            .env("PROM_SCRAPE_INTERVAL", "1s")
            .output()
            .expect("run deploy/stack.sh prometheus-up");
        assert!(
            out.status.success(),
            "deploy/stack.sh prometheus-up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        prometheus
    }

    fn stack(&self, command: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("deploy/stack.sh"))
            .arg(command)
            .env("PROM_DIR", &self.dir)
            .env("PROM_PORT", self.port.to_string())
            .stdin(Stdio::null());
        cmd
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let v = support::json_of(
            reqwest::Client::new()
                .get(format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
                .query(query),
        )
        .await?;
        (v["status"] == "success").then(|| v["data"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.stack("prometheus-down").output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deletes the test's topics and groups (its [`TestTopics`]), Redis keys and database
/// schema, also when it fails.
struct Cleanup {
    config: Config,
    _topics: TestTopics,
}

impl Cleanup {
    fn new(config: &Config) -> Cleanup {
        Cleanup {
            config: config.clone(),
            _topics: TestTopics::own(config),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let c = self.config.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok((db, conn)) =
                    tokio_postgres::connect(c.database.url.expose(), tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = db
                        .batch_execute(&format!(
                            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                            c.database.schema
                        ))
                        .await;
                }
                if let Ok(client) = redis::Client::open(c.redis.url.expose()) {
                    if let Ok(mut r) = client.get_multiplexed_async_connection().await {
                        let keys: Vec<String> = redis::cmd("KEYS")
                            .arg(format!("{}:*", c.redis.key_prefix))
                            .query_async(&mut r)
                            .await
                            .unwrap_or_default();
                        if !keys.is_empty() {
                            let _: redis::RedisResult<()> =
                                redis::cmd("DEL").arg(keys).query_async(&mut r).await;
                        }
                    }
                }
            })
        })
        .join();
    }
}

fn presence(c: &Config, args: &[&str], extra: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presence"));
    cmd.args(args)
        .env_clear()
        .envs(support::env_of(c, "monitoring-1"))
        .env("PRESENCE_REDIS__KEY_PREFIX", &c.redis.key_prefix)
        .env("PRESENCE_DATABASE__SCHEMA", &c.database.schema)
        .envs(extra.iter().cloned())
        .stdin(Stdio::null());
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// Every query of every panel of the dashboard.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo_root().join("deploy/grafana/presence.json");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr").to_string();
            queries.push((panel["title"].as_str().unwrap_or("?").to_string(), expr));
        }
    }
    queries
}

/// Whether an instant query's answer holds at least one finite sample.
fn has_data(data: &Value) -> bool {
    data["result"].as_array().is_some_and(|r| {
        r.iter().any(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        })
    })
}

#[tokio::test]
async fn every_target_is_up_and_every_dashboard_panel_has_data() {
    let _serial = support::serial();
    // A session timeout of a few seconds, so that silent sessions expire within the test
    // (offline-detection delay).
    let config = support::setup(4005).await;
    let _cleanup = Cleanup::new(&config);
    let ports: Vec<(&str, u16)> = PROCESSES.iter().map(|p| (*p, free_port())).collect();
    let public = free_port();
    let mut children: Vec<ChildProcess> = Vec::new();
    for (process, port) in &ports {
        let mut extra = vec![(
            format!("PRESENCE_{}__OPS_LISTEN", process.to_uppercase()),
            format!("127.0.0.1:{port}"),
        )];
        if *process == "gateway" {
            extra.push((
                "PRESENCE_GATEWAY__LISTEN".into(),
                format!("127.0.0.1:{public}"),
            ));
        }
        children.push(spawn_child(process, presence(&config, &[process], &extra)));
    }
    let http = reqwest::Client::new();
    for (process, port) in &ports {
        support::ready(
            process,
            &format!("127.0.0.1:{port}"),
            Duration::from_secs(60),
        )
        .await;
    }
    // Users that log in, beat every second and leave (with END or silently) through the
    // gateway; and one undecodable record, for the dead-letter panel.
    let loadgen = spawn_child(
        "loadgen",
        presence(
            &config,
            &[
                "loadgen",
                "--target",
                &format!("http://127.0.0.1:{public}"),
                "--facilities",
                "6",
                "--users-per-facility",
                "3",
                "--beat-seconds",
                "1",
                "--mean-session-seconds",
                "4",
                "--mean-offline-seconds",
                "3",
                "--duration-seconds",
                "300",
            ],
            &[],
        ),
    );
    produce(
        &config,
        &config.topics.heartbeats,
        &[("not-avro".to_string(), b"\x00garbage".to_vec())],
    )
    .await;
    let prometheus = Prometheus::start(&ports);

    let targets = eventually(
        "Prometheus scrapes all four processes",
        Duration::from_secs(60),
        || async {
            let data = prometheus.api("targets", &[]).await?;
            let active = data["activeTargets"].as_array()?.clone();
            (active.len() == PROCESSES.len() && active.iter().all(|t| t["health"] == "up"))
                .then_some(active)
        },
    )
    .await;
    let jobs: Vec<&str> = targets
        .iter()
        .filter_map(|t| t["labels"]["job"].as_str())
        .collect();
    for process in PROCESSES {
        assert!(
            jobs.contains(&format!("presence-{process}").as_str()),
            "{jobs:?}"
        );
    }

    // Every panel's every query returns data once the load has flowed for a while: rates
    // and quantiles need a few scrapes, the offline-detection delay an expired session.
    let queries = dashboard_queries();
    assert!(queries.len() >= 13, "{queries:?}");
    let mut missing = queries.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    while !missing.is_empty() {
        let mut still = Vec::new();
        for (title, expr) in missing {
            match prometheus.api("query", &[("query", &expr)]).await {
                Some(data) if has_data(&data) => {}
                _ => still.push((title, expr)),
            }
        }
        missing = still;
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dashboard panels without data after 150 s: {missing:#?}"
        );
        check_processes();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // The rules load and evaluate: the recording rule of lag has every stage (rules are
    // evaluated every 15 s; a stage's lag shows once its consumer has fetched).
    eventually(
        "presence:consumer_lag:sum for sessions, facilities, notifier and sink",
        Duration::from_secs(90),
        || async {
            let lag = prometheus
                .api("query", &[("query", "presence:consumer_lag:sum")])
                .await?;
            let stages: Vec<&str> = lag["result"]
                .as_array()?
                .iter()
                .filter_map(|s| s["metric"]["stage"].as_str())
                .collect();
            ["sessions", "facilities", "notifier", "sink"]
                .iter()
                .all(|s| stages.contains(s))
                .then_some(())
        },
    )
    .await;

    // promtool lints every /metrics; every process exports the common metrics.
    for (process, port) in &ports {
        let text = http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text");
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (deploy/stack.sh prometheus-up installs it)");
        {
            use std::io::Write;
            let mut stdin = promtool.stdin.take().expect("stdin");
            stdin.write_all(text.as_bytes()).expect("write");
        }
        let out = promtool.wait_with_output().expect("promtool");
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics on the {process}'s /metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
            "presence_allocator_allocated_bytes ",
            "presence_allocator_trims_total ",
            "presence_build_info{commit=\"",
            "presence_dependency_up{dependency=\"kafka\"} 1",
        ] {
            assert!(text.contains(name), "{process}: no {name}");
        }
        for line in text
            .lines()
            .filter(|l| l.starts_with("presence_dependency_up{"))
        {
            assert!(
                ["kafka", "redis", "postgres"]
                    .iter()
                    .any(|d| line.contains(&format!("dependency=\"{d}\""))),
                "{process}: a dependency label that names no dependency: {line}"
            );
        }
        assert!(
            !text.contains("_redis_up") && !text.contains("_dependency_up{dependency=\"sessions"),
            "{process}: an old dependency metric is still exported"
        );
    }
    // The load stops first (killed: it has no state); then each process must stop cleanly.
    drop(loadgen);
    for child in &mut children {
        child.terminate(Duration::from_secs(30));
    }
    // Nothing in this run is an error an operator must act on (the undecodable record is a
    // dead letter, reported as a warning): an ERROR line here is noise that would hide real
    // ones. The sink's sessions follower logged every end of partition it reached at ERROR
    // (rdkafka's default context), one a partition per fetch that caught up.
    for ((process, _), child) in ports.iter().zip(&children) {
        let errors = child.error_lines();
        assert!(
            errors.is_empty(),
            "the {process} logged {} lines at ERROR during a fault-free run, first:\n{}",
            errors.len(),
            errors
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
