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
use presence_core::{Config, Shutdown};

/// Runs the notifier until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let writer = redis_writer::RedisWriter::new(&config)?;
    let batching = Batching {
        max_records: config.notifier.batch_size,
        // Browsers wait on this: a batch forms only from what is already there.
        linger: std::time::Duration::from_millis(2),
    };
    let n = &config.notifier;
    let registry = presence_core::metrics::registry();
    let health = presence_core::telemetry::Health::new(&registry);
    downstream::serve(
        registry,
        health,
        &config,
        "notifier",
        &n.group_id,
        n.ops_listen,
        batching,
        writer,
        shutdown,
    )
    .await
}
