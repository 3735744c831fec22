//! What the tests share, and nothing a release build ships: a dev-dependency only.
//!
//! # Layout
//!
//! - Here: helpers for integration tests against the real local stack. Every test gets
//!   its own topics, consumer groups and database schema ([`isolated_config`],
//!   [`TestTopics`]), so tests never see each other; readers of a topic to its end
//!   offsets, producers, private brokers and servers ([`PrivateService`]), watched child
//!   processes. The stack itself comes from `deploy/stack.sh` (run by `make test`).
//! - [`sim`]: seeded heartbeat logs for the tests, made by loadgen's users
//!   (`presence_loadgen::users`, the one simulation of users) with no clock.
//! - [`oracle`]: the reference model that says which transitions a correct pipeline
//!   emits for a heartbeat log (a generated one, or loadgen's ground-truth file).

pub mod oracle;
pub mod sim;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use presence_core::config::Config;

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
        presence_core::kafka::consumer_config(&c.kafka, "test-reader", &unique("reader"))
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

/// The end of each partition of `topic` for a read_committed reader, `(partition, offset)`:
/// the last stable offset, the offset before which every transaction is decided. (librdkafka
/// answers `query_watermark_offsets` per the client's `isolation.level` since 1.8, so the
/// "high watermark" of a read_committed consumer is the LSO.)
pub fn end_offsets(c: &Config, topic: &str) -> Vec<(i32, i64)> {
    end_offsets_of(c, topic, "read_committed")
}

fn end_offsets_of(c: &Config, topic: &str, isolation: &str) -> Vec<(i32, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        presence_core::kafka::consumer_config(&c.kafka, "test-ends", &unique("ends"))
            .set("isolation.level", isolation)
            .create()
            .expect("test consumer");
    partitions_of(&consumer, topic)
        .into_iter()
        .map(|p| {
            // A broker that was just killed (tests that inject faults) makes a request fail
            // once while the client moves to another: retry within the deadline.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                match consumer.fetch_watermarks(topic, p, std::time::Duration::from_secs(15)) {
                    Ok((_, high)) => return (p, high),
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("end offset of {topic}/{p}: {e}; retrying");
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                    Err(e) => panic!("end offset of {topic}/{p}: {e}"),
                }
            }
        })
        .collect()
}

fn partitions_of(consumer: &impl rdkafka::consumer::Consumer, topic: &str) -> Vec<i32> {
    let md = consumer
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    assert!(
        !partitions.is_empty(),
        "topic {topic} has no partitions (not created?)"
    );
    partitions
}

/// The partitions of `topic`.
pub fn partitions(c: &Config, topic: &str) -> Vec<i32> {
    let consumer: rdkafka::consumer::BaseConsumer =
        presence_core::kafka::consumer_config(&c.kafka, "test-metadata", &unique("metadata"))
            .create()
            .expect("test consumer");
    partitions_of(&consumer, topic)
}

/// Every committed record of `topic` (read_committed): each partition from its beginning up
/// to its end offset as of this call (`end_offsets`), nothing beyond. Unlike `read_topic`
/// it does not stop at an expected count, so a duplicate or an extra record is in the
/// result. Call it once the writer is done (stopped, or its output waited for): records
/// committed after the call are not read. Panics if the end is not reached `within`, or if
/// a background process of this test fails meanwhile.
pub fn read_to_end(
    c: &Config,
    topic: &str,
    within: std::time::Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    read_to_end_of(c, topic, within, "read_committed")
}

/// The value of header `key` of `m` (a dead letter's `presence.error.code`, say); empty
/// if it has none.
pub fn header(m: &impl rdkafka::message::Message, key: &str) -> String {
    use rdkafka::message::Headers;
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == key))
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// `read_to_end` with read_uncommitted: the records of aborted transactions too (what a
/// crashed writer had written), up to the high watermarks.
pub fn read_to_end_uncommitted(
    c: &Config,
    topic: &str,
    within: std::time::Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    read_to_end_of(c, topic, within, "read_uncommitted")
}

fn read_to_end_of(
    c: &Config,
    topic: &str,
    within: std::time::Duration,
    isolation: &str,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let mut ends: std::collections::BTreeMap<i32, i64> = end_offsets_of(c, topic, isolation)
        .into_iter()
        .filter(|&(_, end)| end > 0)
        .collect();
    let mut reader =
        presence_core::kafka::consumer_config(&c.kafka, "test-reader", &unique("reader"));
    // End of partition is how a read ends on a partition whose last offsets are a
    // transaction marker or aborted records, which no message stands for.
    reader
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation);
    let consumer: BaseConsumer = reader.create().expect("test consumer");
    let mut tpl = TopicPartitionList::new();
    for &p in ends.keys() {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap_or_else(|e| panic!("assign {topic}/{p}: {e}"));
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = std::time::Instant::now() + within;
    let mut out = Vec::new();
    while !ends.is_empty() {
        check_processes();
        assert!(
            std::time::Instant::now() < deadline,
            "read_to_end({topic}): partitions {ends:?} (partition: end offset) not read to the end within {within:?}"
        );
        match consumer.poll(std::time::Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let p = m.partition();
                if let Some(&end) = ends.get(&p) {
                    if m.offset() < end {
                        out.push(m.detach());
                    }
                    if m.offset() + 1 >= end {
                        ends.remove(&p);
                    }
                }
            }
            // Everything before the broker's end offset of that fetch has been delivered,
            // and that end is at least the one read above (it never goes back).
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ends.remove(&p);
            }
            Some(Err(e)) => eprintln!("read_to_end({topic}): {e} (retrying)"),
            None => {}
        }
    }
    out
}

/// `read_to_end`, again every 100 ms until `done` holds for what it read (a writer still at
/// work has finished), at most `within`; returns that read, every record to the end offsets.
/// Panics with what was read if `done` never held.
pub fn read_to_end_until(
    c: &Config,
    topic: &str,
    within: std::time::Duration,
    mut done: impl FnMut(&[rdkafka::message::OwnedMessage]) -> bool,
) -> Vec<rdkafka::message::OwnedMessage> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let records = read_to_end(c, topic, within);
        if done(&records) {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "read_to_end_until({topic}): still not done after {within:?} with {} records",
            records.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The offsets `group` has committed on `topic`, `(partition, offset)`; -1001 (invalid)
/// where it has committed none.
pub fn committed_offsets(c: &Config, group: &str, topic: &str) -> Vec<(i32, i64)> {
    committed_with_metadata(c, group, topic)
        .into_iter()
        .map(|(p, offset, _)| (p, offset))
        .collect()
}

/// [`committed_offsets`] with each offset's metadata (a stage's checkpoint): per partition
/// `(partition, offset, metadata)`, -1001 (librdkafka's "invalid") where none is committed.
pub fn committed_with_metadata(c: &Config, group: &str, topic: &str) -> Vec<(i32, i64, String)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::TopicPartitionList;
    // A client of the group that never joins it: it only fetches the group's offsets.
    let consumer: BaseConsumer =
        presence_core::kafka::consumer_config(&c.kafka, "test-offsets", group)
            .create()
            .expect("test consumer");
    let mut tpl = TopicPartitionList::new();
    for p in partitions_of(&consumer, topic) {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, std::time::Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("committed offsets of {group} on {topic}: {e}"));
    committed
        .elements_for_topic(topic)
        .iter()
        .map(|e| {
            (
                e.partition(),
                e.offset().to_raw().unwrap_or(-1001),
                e.metadata().to_string(),
            )
        })
        .collect()
}

/// Whether `group` has committed the end offset of every partition of `topic`: it has
/// consumed everything in it.
pub fn consumed_to_end(c: &Config, group: &str, topic: &str) -> bool {
    let ends = end_offsets(c, topic);
    let committed: std::collections::BTreeMap<i32, i64> =
        committed_offsets(c, group, topic).into_iter().collect();
    ends.iter()
        .all(|(p, end)| *end == 0 || committed.get(p).is_some_and(|&at| at >= *end))
}

/// Polls `check` every 50 ms until it gives `Some`, or panics after `within` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        check_processes();
        // A check that never answers (a request to a server that accepted and went quiet)
        // ends at the deadline too, not just between checks.
        if let Ok(Some(v)) = tokio::time::timeout_at(deadline, check()).await {
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
    produce_to(c, topic, None, records).await
}

/// Produces `(key, value)` records to one partition of `topic` (say, a marker on each
/// partition) and waits for every acknowledgement.
pub async fn produce_to_partition(
    c: &Config,
    topic: &str,
    partition: i32,
    records: &[(String, Vec<u8>)],
) {
    produce_to(c, topic, Some(partition), records).await
}

/// Produces to `partition` of `topic`, or to the key's partition.
async fn produce_to(
    c: &Config,
    topic: &str,
    partition: Option<i32>,
    records: &[(String, Vec<u8>)],
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        presence_core::kafka::idempotent_producer_config(&c.kafka, "test-producer")
            .create()
            .expect("test producer");
    for (key, value) in records {
        let mut record = FutureRecord::to(topic).key(key).payload(value);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        producer
            .send(record, std::time::Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic} (partition {partition:?}): {e}"));
    }
}

/// A marker transition (facility `z-<partition>`, `region`) on every partition of
/// `facility-status`, after what was produced before: a consumer that has applied every
/// marker has been through everything ahead of them. Returns the partitions.
pub async fn produce_status_markers(c: &Config, region: &str) -> Vec<i32> {
    let partitions = partitions(c, &c.topics.facility_status);
    for &p in &partitions {
        let marker = transition(&format!("z-{p}"), region, 1, true);
        produce_to_partition(c, &c.topics.facility_status, p, &status_records(&[marker])).await;
    }
    partitions
}

/// `facility-status` records as the processor writes them (key = facility id).
pub fn status_records(
    statuses: &[presence_core::records::FacilityStatus],
) -> Vec<(String, Vec<u8>)> {
    statuses
        .iter()
        .map(|s| (s.facility_id.clone(), presence_core::codec::encode(s)))
        .collect()
}

/// A transition for tests: `since` is `seq` minutes after 2026-11-27T00:00Z unless given.
pub fn transition(
    facility: &str,
    region: &str,
    seq: i64,
    online: bool,
) -> presence_core::records::FacilityStatus {
    presence_core::records::FacilityStatus {
        facility_id: facility.into(),
        region_id: region.into(),
        status: if online {
            presence_core::records::Status::Online
        } else {
            presence_core::records::Status::Offline
        },
        open_sessions: i32::from(online),
        since: 1_764_201_600_000 + seq * 60_000,
        seq,
        emitted_at: presence_core::now_ms(),
        previous_since: None,
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

/// `node tests/browser/<script> <args>` with playwright-core on its path, running beside the
/// test: the script prints a line whenever the test is to act (`READY`, `RESTART`, then its
/// JSON), read with [`BrowserScript::next_line`].
pub struct BrowserScript {
    script: String,
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl BrowserScript {
    /// Starts `script` with `args`.
    pub fn spawn(script: &str, args: &[&str]) -> BrowserScript {
        let mut child = std::process::Command::new("node")
            .arg(repo_root().join("tests/browser").join(script))
            .args(args)
            .env("NODE_PATH", node_modules())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect(
                "node runs (install Node.js; make stack installs playwright-core and chromium)",
            );
        let stdout = child.stdout.take().expect("stdout");
        let (lines_tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        BrowserScript {
            script: script.to_string(),
            child,
            lines,
        }
    }

    /// The script's next line (empty once it has exited); panics after 180 s of silence.
    pub async fn next_line(&mut self) -> String {
        tokio::time::timeout(std::time::Duration::from_secs(180), self.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("{} says something within 180 s", self.script))
            .unwrap_or_default()
    }

    /// Waits for the script to exit; kills it and panics if it has not within 60 s (a
    /// browser that never closes would otherwise hold the test, and CI, forever).
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("node's exit status") {
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("{} did not exit within 60 s of its last line", self.script);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A test that fails half-way kills its script (and with it the browser, whose pipe closes)
/// instead of leaving it running for the rest of the test run.
impl Drop for BrowserScript {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Creates `c`'s topics and panics with the report if any is wrong.
pub async fn ensure_topics(c: &Config) {
    let report = presence_core::topics::ensure(c).await.expect("topics");
    assert!(report.is_ok(), "{report}");
}

/// A test's topics and consumer groups, deleted when it is dropped, also when the test
/// fails (the drop runs while a panic unwinds), so that a developer's broker does not
/// collect them. Hold it for the whole test, declared before anything that consumes, so
/// that it is dropped last: a group is deleted only once its members have left.
#[must_use = "the topics are deleted when this is dropped"]
pub struct TestTopics(Names);

/// What a [`TestTopics`] deletes.
struct Names {
    kafka: presence_core::config::KafkaConfig,
    topics: Vec<String>,
    groups: Vec<String>,
}

impl TestTopics {
    /// Creates `c`'s topics (as [`ensure_topics`]) and owns them and `c`'s consumer groups.
    pub async fn create(c: &Config) -> TestTopics {
        ensure_topics(c).await;
        TestTopics::own(c)
    }

    /// Owns `c`'s topics and groups without creating anything (a process under test
    /// creates them).
    pub fn own(c: &Config) -> TestTopics {
        TestTopics(Names {
            kafka: c.kafka.clone(),
            topics: presence_core::topics::specs(&c.topics, c.processor.session_timeout)
                .into_iter()
                .map(|s| s.name)
                .collect(),
            groups: vec![
                c.processor.group_id.clone(),
                c.notifier.group_id.clone(),
                c.sink.group_id.clone(),
            ],
        })
    }

    /// Deletes the topics and groups now (they are deleted again, harmlessly, on drop).
    pub fn delete(&self) -> Vec<String> {
        self.0.delete()
    }
}

impl Names {
    /// Deletes the groups (retrying for 10 s while members are still leaving), then the
    /// topics. Returns what could not be deleted; a name that never existed is not an error.
    pub fn delete(&self) -> Vec<String> {
        use rdkafka::admin::AdminOptions;
        use rdkafka::types::RDKafkaErrorCode;
        let admin = match presence_core::kafka::admin_client(&self.kafka) {
            Ok(a) => a,
            Err(e) => return vec![format!("admin client: {e}")],
        };
        let opts = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10)));
        let mut left = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut groups: Vec<&str> = self.groups.iter().map(String::as_str).collect();
        while !groups.is_empty() {
            let results = match futures::executor::block_on(admin.delete_groups(&groups, &opts)) {
                Ok(r) => r,
                Err(e) => {
                    left.push(format!("groups {groups:?}: {e}"));
                    break;
                }
            };
            let mut busy = Vec::new();
            for r in results {
                match r {
                    Ok(_) => {}
                    Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                    Err((g, RDKafkaErrorCode::NonEmptyGroup))
                        if std::time::Instant::now() < deadline =>
                    {
                        if let Some(g) = groups.iter().find(|x| **x == g) {
                            busy.push(*g);
                        }
                    }
                    Err((g, code)) => left.push(format!("group {g}: {code}")),
                }
            }
            groups = busy;
            if !groups.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        match futures::executor::block_on(admin.delete_topics(&topics, &opts)) {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                        Err((t, code)) => left.push(format!("topic {t}: {code}")),
                    }
                }
            }
            Err(e) => left.push(format!("topics {topics:?}: {e}")),
        }
        left
    }
}

impl Drop for TestTopics {
    fn drop(&mut self) {
        // On a thread of its own: the admin calls block, and a drop may run inside a runtime.
        let names = Names {
            kafka: self.0.kafka.clone(),
            topics: std::mem::take(&mut self.0.topics),
            groups: std::mem::take(&mut self.0.groups),
        };
        let left = std::thread::spawn(move || names.delete())
            .join()
            .unwrap_or_default();
        if !left.is_empty() {
            eprintln!(
                "[testkit] left behind (delete by hand): {}",
                left.join("; ")
            );
        }
    }
}

/// Background processes of tests, by the thread of the test that started them, so that any
/// wait of that test (`eventually`, `read_to_end`, `check_processes`) fails at once when one
/// of them dies, with what it said, instead of timing out later on a generic message.
struct Watched {
    what: String,
    kind: WatchedKind,
}

enum WatchedKind {
    /// An in-process task: its failure, once it has failed.
    Task(std::sync::Arc<std::sync::Mutex<Option<String>>>),
    /// A child process, until the test ends it on purpose.
    Child(std::sync::Arc<ChildState>),
}

struct ChildState {
    child: std::sync::Mutex<std::process::Child>,
    log: PathBuf,
    /// Set once the test kills or stops it: an exit is expected from then on.
    ended: std::sync::atomic::AtomicBool,
}

static WATCHED: std::sync::Mutex<Vec<(std::thread::ThreadId, Watched)>> =
    std::sync::Mutex::new(Vec::new());

fn watch(what: String, kind: WatchedKind) {
    let mut w = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    w.push((std::thread::current().id(), Watched { what, kind }));
}

/// The last `n` lines of a log file.
fn tail(log: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Panics if a background process this test started (`spawn_process`, `spawn_child`) has
/// failed or exited without being told to, naming it with its error or exit status and the
/// end of its log. Every wait in this module calls it; call it in waits of your own.
pub fn check_processes() {
    let me = std::thread::current().id();
    let mut problems = Vec::new();
    {
        let mut w = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|(thread, watched)| {
            if *thread != me {
                return true;
            }
            match &watched.kind {
                WatchedKind::Task(failure) => {
                    if let Some(f) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        problems.push(format!("{}: {f}", watched.what));
                        return false;
                    }
                    true
                }
                WatchedKind::Child(state) => {
                    if state.ended.load(std::sync::atomic::Ordering::SeqCst) {
                        return false;
                    }
                    let exited = state
                        .child
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .try_wait();
                    match exited {
                        Ok(None) => true,
                        Ok(Some(status)) => {
                            problems.push(format!(
                                "{} exited unexpectedly ({status}); last lines of {}:\n{}",
                                watched.what,
                                state.log.display(),
                                tail(&state.log, 40)
                            ));
                            false
                        }
                        Err(e) => {
                            problems.push(format!("{}: cannot poll its status: {e}", watched.what));
                            false
                        }
                    }
                }
            }
        });
    }
    if !problems.is_empty() && !std::thread::panicking() {
        panic!("a background process failed:\n{}", problems.join("\n"));
    }
}

/// A process's `run(config, shutdown)` running as a task of this test. If it returns an
/// error, panics, or returns before its shutdown was triggered, the test's next wait fails
/// with that (see `check_processes`). Dropping the handle leaves it running; `stop` ends it
/// and checks that it ended cleanly.
pub struct Process {
    what: &'static str,
    shutdown: presence_core::Shutdown,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Process {
    /// Triggers its shutdown (shared with whatever else was started with it) and waits,
    /// at most `within`, for it to return; panics unless it returned `Ok`.
    pub async fn stop(self, within: std::time::Duration) {
        self.shutdown.trigger();
        match tokio::time::timeout(within, self.task).await {
            Err(_) => panic!(
                "{} did not stop within {within:?} of its shutdown",
                self.what
            ),
            Ok(Err(e)) => panic!("{} watcher: {e}", self.what),
            Ok(Ok(Err(failure))) => panic!("{}: {failure}", self.what),
            Ok(Ok(Ok(()))) => {}
        }
    }

    /// Whether it is still running (it has not returned or failed).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

/// Runs a process's `run(config, shutdown)` as a task of this test, until `shutdown`. A
/// failure (an error, a panic, or a return before `shutdown`) fails the test's next wait.
pub fn spawn_process<Fut>(
    what: &'static str,
    shutdown: &presence_core::Shutdown,
    run: impl FnOnce(presence_core::Shutdown) -> Fut,
) -> Process
where
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let failure = std::sync::Arc::new(std::sync::Mutex::new(None));
    watch(what.to_string(), WatchedKind::Task(failure.clone()));
    // Its own task, so that a panic inside it is caught by the join below.
    let inner = tokio::spawn(run(shutdown.clone()));
    let s = shutdown.clone();
    let task = tokio::spawn(async move {
        let outcome = match inner.await {
            Ok(Ok(())) if s.is_triggered() => Ok(()),
            Ok(Ok(())) => Err("returned before its shutdown was triggered".to_string()),
            Ok(Err(e)) => Err(format!("failed: {e:#}")),
            Err(e) => Err(format!("panicked: {e}")),
        };
        if let Err(f) = &outcome {
            eprintln!("{what} {f}");
            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.clone());
        }
        outcome
    });
    Process {
        what,
        shutdown: shutdown.clone(),
        task,
    }
}

/// A child process of this test (a real binary), its stdout and stderr in a log file.
/// Exiting without being told to fails the test's next wait (see `check_processes`) with its
/// status and the end of its log. Killed (-9) on drop if still running.
pub struct ChildProcess {
    what: String,
    state: std::sync::Arc<ChildState>,
}

/// Starts `cmd` as a watched child process named `what`.
pub fn spawn_child(what: &str, mut cmd: std::process::Command) -> ChildProcess {
    let log = std::env::temp_dir().join(format!("{}.log", unique(what)));
    let file = std::fs::File::create(&log)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let err = file
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot reopen {}: {e}", log.display()));
    let child = cmd
        .stdout(file)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let state = std::sync::Arc::new(ChildState {
        child: std::sync::Mutex::new(child),
        log,
        ended: std::sync::atomic::AtomicBool::new(false),
    });
    watch(what.to_string(), WatchedKind::Child(state.clone()));
    ChildProcess {
        what: what.to_string(),
        state,
    }
}

impl ChildProcess {
    fn child(&self) -> std::sync::MutexGuard<'_, std::process::Child> {
        self.state.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> u32 {
        self.child().id()
    }

    /// Sends it `sig` (`STOP`, `CONT`, …) with kill(1); panics if that fails.
    pub fn signal(&self, sig: &str) {
        let sent = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.id().to_string())
            .status();
        assert!(
            sent.as_ref().is_ok_and(|s| s.success()),
            "kill -{sig} {} ({}): {sent:?}",
            self.id(),
            self.what
        );
    }

    /// The last `n` lines it wrote.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.state.log, n)
    }

    /// The lines it has written so far at ERROR level.
    pub fn error_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.state.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .map(str::to_string)
            .collect()
    }

    /// kill -9, and waits for it to be gone. Panics if it had already exited (a crash the
    /// test did not ask for).
    pub fn kill9(&mut self) {
        if self.state.ended.load(std::sync::atomic::Ordering::SeqCst) {
            return; // already killed or stopped on purpose
        }
        check_processes();
        self.state
            .ended
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut child = self.child();
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{} had already exited ({status}) when it was to be killed:\n{}",
                self.what,
                tail(&self.state.log, 40)
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits at most `within` for it to exit on its own (a crash it was told to make);
    /// panics, after kill -9, if it is still running then.
    pub fn wait_exit(&mut self, within: std::time::Duration) -> std::process::ExitStatus {
        self.state
            .ended
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + within;
        loop {
            let exited = self.child().try_wait();
            match exited {
                Ok(Some(status)) => return status,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => {
                    let mut child = self.child();
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{} did not exit within {within:?} ({other:?}):\n{}",
                        self.what,
                        tail(&self.state.log, 40)
                    );
                }
            }
        }
    }

    /// SIGTERM, then waits at most `within` for it to exit, and panics unless it exited
    /// with status 0 (a clean shutdown).
    pub fn terminate(&mut self, within: std::time::Duration) -> std::process::ExitStatus {
        check_processes();
        self.signal("TERM");
        let status = self.wait_exit(within);
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM, expected 0:\n{}",
            self.what,
            tail(&self.state.log, 40)
        );
        status
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.state
            .ended
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut child = self.child();
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(child);
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.state.log);
        } else {
            eprintln!("{} log kept: {}", self.what, self.state.log.display());
        }
    }
}
