//! Helpers for integration tests against the real local stack (feature `testkit`): every
//! test gets its own topics, consumer groups and database schema, so tests never see each
//! other. The stack itself comes from `deploy/stack.sh` (run by `make test`).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;

/// A name no other test (or earlier run) uses: `prefix-<pid>-<nanos>-<counter>`.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The process environment's config (so `KAFKA_BROKERS` etc. point at the stack) with
/// every topic, group and schema name made unique, and small partition counts.
pub fn isolated_config() -> Config {
    let mut c = Config::load(None)
        .unwrap_or_else(|e| panic!("test configuration: {e}"))
        .isolated(&unique("t"));
    c.topics.heartbeats_partitions = 3;
    c.topics.facility_partitions = 2;
    c
}

fn cache_dir() -> PathBuf {
    std::env::var_os("PRESENCE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/presence")
        })
}

/// Apache Kafka's jars (for its command-line tools, our external client).
pub fn kafka_libs() -> PathBuf {
    std::env::var_os("PRESENCE_TEST_KAFKA_LIBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("kafka-4.1.0/libs"))
}

/// The Python with fastavro installed by `deploy/stack.sh`.
pub fn python() -> PathBuf {
    std::env::var_os("PRESENCE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv/bin/python"))
}

/// The repository root, for scripts and schemas.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A free TCP port on 127.0.0.1 (bound once, then released for a service to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// A Kafka broker, Redis or PostgreSQL of one test's own, on its own ports and directory,
/// started and stopped by `deploy/stack.sh` — for tests that take a dependency away and
/// bring it back. Stopped and removed on drop.
pub struct PrivateService {
    kind: &'static str,
    env: Vec<(String, String)>,
    dir: PathBuf,
    port: u16,
}

impl PrivateService {
    fn new(kind: &'static str) -> PrivateService {
        let port = free_port();
        let id = unique(kind);
        // PostgreSQL runs as the postgres user, which cannot enter root's home.
        let dir = if kind == "pg" {
            PathBuf::from("/var/lib/presence").join(&id)
        } else {
            std::env::temp_dir().join(&id)
        };
        let mut env = vec![("PRESENCE_STACK_DIR".to_string(), dir.display().to_string())];
        match kind {
            "kafka" => {
                env.push(("KAFKA_PORT".into(), port.to_string()));
                env.push(("KAFKA_CONTROLLER_PORT".into(), free_port().to_string()));
            }
            "redis" => env.push(("REDIS_PORT".into(), port.to_string())),
            _ => {
                env.push(("PG_PORT".into(), port.to_string()));
                env.push(("PG_DATA".into(), dir.join("data").display().to_string()));
            }
        }
        PrivateService {
            kind,
            env,
            dir,
            port,
        }
    }

    pub fn kafka() -> PrivateService {
        Self::new("kafka")
    }
    pub fn redis() -> PrivateService {
        Self::new("redis")
    }
    pub fn postgres() -> PrivateService {
        Self::new("pg")
    }

    /// Where clients reach it: `127.0.0.1:port` for Kafka, a URL for the others.
    pub fn address(&self) -> String {
        match self.kind {
            "kafka" => format!("127.0.0.1:{}", self.port),
            "redis" => format!("redis://127.0.0.1:{}", self.port),
            _ => format!(
                "postgres://presence:presence@127.0.0.1:{}/presence",
                self.port
            ),
        }
    }

    fn stack(&self, verb: &str) {
        let script = repo_root().join("deploy/stack.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(format!("{}-{verb}", self.kind))
            .envs(self.env.iter().cloned())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "stack.sh {}-{verb} failed:\n{}{}",
            self.kind,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it and returns once it answers.
    pub fn start(&self) {
        self.stack("up");
    }

    /// Stops it and returns once it is gone.
    pub fn stop(&self) {
        self.stack("down");
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `deploy/stack.sh` setting for this instance, e.g. `REDIS_TLS_AUTH_CLIENTS`.
    pub fn with_env(mut self, key: &str, value: impl ToString) -> PrivateService {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// TLS only, with `certs`' server pair (Redis: `REDIS_TLS_*`, PostgreSQL: `PG_TLS_*`).
    pub fn with_tls(self, certs: &TestCerts) -> PrivateService {
        let prefix = match self.kind {
            "redis" => "REDIS",
            "pg" => "PG",
            other => panic!("no TLS option for a private {other}"),
        };
        let s = self
            .with_env(
                &format!("{prefix}_TLS_CERT"),
                certs.path("server.crt").display(),
            )
            .with_env(
                &format!("{prefix}_TLS_KEY"),
                certs.path("server.key").display(),
            );
        if prefix == "REDIS" {
            s.with_env("REDIS_TLS_CA", certs.path("ca.crt").display())
        } else {
            s
        }
    }
}

/// A throw-away CA and certificates in a temp dir of one test's own, made by
/// `deploy/stack.sh tls-certs` (openssl), removed on drop: `ca.crt`, `server.crt`/`.key`
/// (127.0.0.1 and localhost), `client.crt`/`.key`, and `other-ca.crt`, which signed none.
pub struct TestCerts {
    dir: PathBuf,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        let dir = std::env::temp_dir().join(unique("certs"));
        let script = repo_root().join("deploy/stack.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg("tls-certs")
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "stack.sh tls-certs failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestCerts { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for PrivateService {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `tests/python/avro_cross.py <mode> schemas/<schema>` (fastavro, given only the
/// `.avsc`) over JSON lines: `encode` turns records into `{"hex": ...}`, `decode` the reverse.
pub fn fastavro(mode: &str, schema: &str, lines: &[serde_json::Value]) -> Vec<serde_json::Value> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let root = repo_root();
    let mut child = Command::new(python())
        .arg(root.join("tests/python/avro_cross.py"))
        .arg(mode)
        .arg(root.join("schemas").join(schema))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run make stack (it installs fastavro)",
                python().display()
            )
        });
    let mut stdin = child.stdin.take().expect("piped stdin");
    for l in lines {
        writeln!(stdin, "{l}").expect("write to avro_cross.py");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("avro_cross.py output");
    assert!(
        out.status.success(),
        "avro_cross.py {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("avro_cross.py prints JSON lines"))
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every record of `topic` (read_committed), from the beginning, until `want` have been
/// read or `within` has passed.
pub fn read_topic(
    c: &Config,
    topic: &str,
    want: usize,
    within: std::time::Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        crate::kafka::consumer_config(&c.kafka, "test-reader", &unique("reader"))
            .create()
            .expect("test consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = std::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

/// Polls `check` every 50 ms until it gives `Some`, or panics after `within` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Produces `(key, value)` records to `topic` in order and waits for every acknowledgement.
pub async fn produce(c: &Config, topic: &str, records: &[(String, Vec<u8>)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        crate::kafka::idempotent_producer_config(&c.kafka, "test-producer")
            .create()
            .expect("test producer");
    for (key, value) in records {
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(value),
                std::time::Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }
}

/// `facility-status` records as the processor writes them (key = facility id).
pub fn status_records(statuses: &[crate::records::FacilityStatus]) -> Vec<(String, Vec<u8>)> {
    statuses
        .iter()
        .map(|s| (s.facility_id.clone(), crate::codec::encode(s)))
        .collect()
}

/// A transition for tests: `since` is `seq` minutes after 2026-11-27T00:00Z unless given.
pub fn transition(
    facility: &str,
    region: &str,
    seq: i64,
    online: bool,
) -> crate::records::FacilityStatus {
    crate::records::FacilityStatus {
        facility_id: facility.into(),
        region_id: region.into(),
        status: if online {
            crate::records::Status::Online
        } else {
            crate::records::Status::Offline
        },
        open_sessions: i32::from(online),
        since: 1_764_201_600_000 + seq * 60_000,
        seq,
        emitted_at: crate::now_ms(),
    }
}

/// Where `deploy/stack.sh` installed playwright-core (for the browser tests' NODE_PATH).
pub fn node_modules() -> PathBuf {
    std::env::var_os("PRESENCE_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("node/node_modules"))
}

/// Runs `node tests/browser/<script> <args>` with playwright-core on its path; returns
/// the JSON it prints.
pub fn browser_script(script: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("node")
        .arg(repo_root().join("tests/browser").join(script))
        .args(args)
        .env("NODE_PATH", node_modules())
        .output()
        .unwrap_or_else(|e| panic!("cannot run node: {e}; install Node.js"));
    assert!(
        out.status.success(),
        "{script} failed (is chromium installed? make stack installs it):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {stdout}"))
}

/// Creates `c`'s topics and panics with the report if any is wrong.
pub async fn ensure_topics(c: &Config) {
    let report = crate::topics::ensure(c).await.expect("topics");
    assert!(report.is_ok(), "{report}");
}

/// Runs a process's `run(config, shutdown)` as a task of this test, until `shutdown`;
/// a process that fails panics the task with its error.
pub fn spawn_process<Fut>(
    what: &'static str,
    shutdown: &crate::Shutdown,
    run: impl FnOnce(crate::Shutdown) -> Fut,
) where
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let task = run(shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = task.await {
            panic!("{what} failed: {e:#}");
        }
    });
}
