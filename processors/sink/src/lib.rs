//! `presence sink`: `facility-status` to PostgreSQL. Consumer group `sink.group_id`,
//! independent of the notifier.
//!
//! # Layout
//!
//! - [`migrations`]: versioned SQL in `migrations/`, applied in order at start-up under an
//!   advisory lock, each once (table `schema_migrations`).
//! - [`postgres_writer`]: a batch split by facility over a few connections; on each, one
//!   prepared statement over arrays, one transaction: history rows inserted (a replay, which
//!   fails on the history's key, is written again with `ON CONFLICT DO NOTHING`) and a
//!   current-status upsert that only moves forward in `seq`.
//! - The consumer loop (batches, the next one read while the current one is written,
//!   retries, commits after PostgreSQL took the batch) is `presence_core::downstream`,
//!   shared with the notifier.
//! - [`sessions`]: who is online, `open_sessions`, from the processor's sessions changelog
//!   and the newest beats, beside the transitions loop.

pub mod migrations;
pub mod postgres_writer;
pub mod sessions;

use presence_core::downstream::{self, Batching};
use presence_core::{Config, Shutdown};

/// Runs the sink until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let writer = postgres_writer::PostgresWriter::new(&config);
    let s = &config.sink;
    let batching = Batching {
        max_records: s.batch_size,
        linger: s.batch_linger,
    };
    // Who is online, beside the transitions; its failure stops the sink (non-zero exit).
    let registry = presence_core::metrics::registry();
    let health = presence_core::telemetry::Health::new(&registry);
    let follower = {
        let (config, shutdown, health) = (config.clone(), shutdown.clone(), health.clone());
        let metrics = sessions::Metrics::new(&registry);
        tokio::spawn(async move {
            let result = sessions::follow(config, metrics, health, shutdown.clone()).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "the open-sessions follower stopped; stopping the sink");
                shutdown.trigger();
            }
            result
        })
    };
    let served = downstream::serve(
        registry,
        health,
        &config,
        "sink",
        &s.group_id,
        s.ops_listen,
        batching,
        writer,
        shutdown.clone(),
    )
    .await;
    shutdown.trigger();
    let followed = follower
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the open-sessions follower panicked: {e}")));
    served.and(followed)
}
