//! What every presence process shares, and nothing that belongs to one of them.
//!
//! # Layout
//!
//! - [`config`]: the one typed configuration (defaults, file, environment), validated at once.
//! - [`codec`]: Avro single-object encoding with a hand-written fast path per record type;
//!   [`records`]: the public records (`Heartbeat`, `FacilityStatus`).
//! - [`kafka`]: client builders (idempotent producer, read-committed consumer, admin).
//! - [`topics`]: provisioning and verification of every topic (`presence topics`).
//! - [`telemetry`]: logging, Prometheus metrics, `/metrics` `/healthz` `/readyz`.
//! - [`sim`]: the seeded simulation of users (load generator) and its reference model.
//! - [`shutdown`]: one token tripped by SIGTERM that every task watches.
//!
//! Data never flows through this crate: processors use it to talk to Kafka, never to each
//! other.

pub mod codec;
pub mod config;
pub mod kafka;
pub mod records;
pub mod shutdown;
pub mod sim;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod topics;

pub use config::{Config, Secret};
pub use shutdown::Shutdown;
