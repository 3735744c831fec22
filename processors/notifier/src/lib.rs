//! `presence notifier`: `facility-status` to Redis, for browsers. Consumer group
//! `notifier.group_id`, independent of the sink, so a slow database never delays a browser.
//!
//! # Layout
//!
//! - [`redis_writer`]: the one Lua script that applies a batch atomically: a facility's
//!   state changes only if the transition's `seq` is newer than the stored one; then the
//!   region index, the region sequence and replay log, and a PUBLISH on the region channel.
//! - The consumer loop (batches, retries, commits after Redis took the batch) is
//!   `presence_core::downstream`, shared with the sink.

pub mod redis_writer;

use presence_core::downstream::{self, Batching};
use presence_core::telemetry::{serve_ops, Health};
use presence_core::{Config, Shutdown};
use prometheus::Registry;

/// Runs the notifier until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let registry = Registry::new();
    let health = Health::new(&registry);
    let metrics = downstream::Metrics::new(&registry, "notifier");
    let (addr, server) = serve_ops(config.notifier.ops_listen, registry, health.clone(), shutdown.clone()).await?;
    tracing::info!(%addr, "notifier metrics and health");
    let writer = redis_writer::RedisWriter::new(&config)?;
    let batching = Batching {
        max_records: config.notifier.batch_size,
        linger: std::time::Duration::from_millis(2),
    };
    let result = downstream::run(&config, "notifier", &config.notifier.group_id, batching, writer, metrics, health, shutdown.clone()).await;
    shutdown.trigger();
    let _ = server.await;
    result
}
