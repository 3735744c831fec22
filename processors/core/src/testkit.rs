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
    let mut c = Config::load(None).unwrap_or_else(|e| panic!("test configuration: {e}"));
    let id = unique("t");
    c.topics.heartbeats = format!("{id}-heartbeats");
    c.topics.facility_status = format!("{id}-facility-status");
    c.topics.dead_letters = format!("{id}-heartbeats.dlq");
    c.topics.internal_prefix = format!("{id}.internal.");
    c.topics.heartbeats_partitions = 3;
    c.topics.facility_partitions = 2;
    c.processor.group_id = format!("{id}-processor");
    c.notifier.group_id = format!("{id}-notifier");
    c.sink.group_id = format!("{id}-sink");
    c.database.schema = id.replace('-', "_");
    c.redis.key_prefix = id.clone();
    for addr in [
        &mut c.gateway.listen,
        &mut c.processor.ops_listen,
        &mut c.notifier.ops_listen,
        &mut c.sink.ops_listen,
    ] {
        addr.set_port(0);
    }
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
