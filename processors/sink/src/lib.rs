//! `presence sink`: `facility-status` to PostgreSQL. Consumer group `sink.group_id`,
//! independent of the notifier.
//!
//! # Layout
//!
//! - [`migrations`]: versioned SQL in `migrations/`, applied in order at start-up under an
//!   advisory lock, each once (table `schema_migrations`).
//! - [`postgres_writer`]: one transaction per batch: history rows `ON CONFLICT DO NOTHING`
//!   and a current-status upsert that only moves forward in `seq`, each one multi-row
//!   statement over arrays.
//! - The consumer loop (batches, retries, commits after PostgreSQL took the batch) is
//!   `presence_core::downstream`, shared with the notifier.

pub mod migrations;
pub mod postgres_writer;

use presence_core::downstream::{self, Batching};
use presence_core::telemetry::{serve_ops, Health};
use presence_core::{Config, Shutdown};
use prometheus::Registry;

/// Runs the sink until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let registry = Registry::new();
    let health = Health::new(&registry);
    let metrics = downstream::Metrics::new(&registry, "sink");
    let (addr, server) = serve_ops(config.sink.ops_listen, registry, health.clone(), shutdown.clone()).await?;
    tracing::info!(%addr, "sink metrics and health");
    let writer = postgres_writer::PostgresWriter::new(&config);
    let batching = Batching {
        max_records: config.sink.batch_size,
        linger: config.sink.batch_linger,
    };
    let result = downstream::run(&config, "sink", &config.sink.group_id, batching, writer, metrics, health, shutdown.clone()).await;
    shutdown.trigger();
    let _ = server.await;
    result
}
