//! What every presence process shares, and nothing that belongs to one of them.
//!
//! # Layout
//!
//! - [`allocator`]: glibc malloc bounds for long-running processes (arenas, mmap threshold).
//! - [`config`]: the one typed configuration (defaults, file, environment), validated at once.
//! - [`codec`]: Avro single-object encoding with a hand-written fast path per record type;
//!   [`records`]: the public records (`Heartbeat`, `FacilityStatus`).
//! - [`registry`]: the Schema Registry behind the `confluent` framing (settings, client,
//!   subject registration, the id cache readers resolve with).
//! - [`kafka`]: client builders (idempotent producer, read-committed consumer, admin).
//!   [`kafka_memory`]: the processor's memory budget for its clients' buffers.
//! - [`delivery`]: the Redis layout and transition JSON the notifier writes and the gateway
//!   reads, and the names of the sink's tables.
//! - [`downstream`]: the batch consumer loop of `facility-status` that the notifier and the
//!   sink share (commit only after the store took the batch; retry with backoff).
//! - [`tls`]: TLS to Redis and PostgreSQL (rustls): libpq's `sslmode`, CA and client
//!   certificates, the handshake tokio-postgres runs.
//! - [`topics`]: provisioning and verification of every topic (`presence topics`).
//! - [`telemetry`]: logging, health, `/metrics` `/healthz` `/readyz`.
//! - [`metrics`]: how every metric is registered (one way), the `process_*` metrics and
//!   `presence_build_info`, and the consumer-lag gauge.
//! - [`shutdown`]: one token tripped by SIGTERM that every task watches.
//!
//! Data never flows through this crate: processors use it to talk to Kafka, never to each
//! other.

pub mod allocator;
pub mod codec;
pub mod config;
pub mod delivery;
pub mod downstream;
pub mod kafka;
pub mod kafka_memory;
pub mod metrics;
pub mod records;
pub mod registry;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod topics;

pub use config::{Config, Secret};
pub use shutdown::Shutdown;

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
