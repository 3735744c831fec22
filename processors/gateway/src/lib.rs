//! `presence gateway`: the HTTP edge. Heartbeats come in and go to Kafka; transitions come
//! back out of Redis (live streams, current state) and PostgreSQL (history) to browsers.
//! It talks to the other processes only through Kafka, Redis and PostgreSQL.
//!
//! # Layout
//!
//! - [`ingest`]: the body of `POST /v1/heartbeats`, checked field by field (pure).
//! - [`auth`]: `none`, or tokens (HS256, or a JWKS) whose claims say who the caller is;
//!   stream tickets.
//! - [`publish`]: the Kafka edge (202 only after the broker's acknowledgement).
//! - [`store`] and [`history`]: the Redis and PostgreSQL read edges.
//! - [`stream`]: region channels to Server-Sent Events, with gap detection.
//! - [`http`]: routes and handlers, which read as the happy path; the dashboard page.
//! - [`caller`]: who is calling, as extractors (token, beacon token, stream ticket).
//! - [`error`]: every refusal: its status, problem body and metric.
//! - [`state`]: what the handlers share.
//! - [`query`]: query-string values.
//! - [`overview`]: every visible region's counts and 24 h uptime, once or live.
//! - [`openapi`]: the OpenAPI 3.1 document (`GET /openapi.json`), generated from the handlers.
//! - [`limits`]: the per-identity ingest rate and the stream caps (pure, time passed in).
//! - [`server`]: the public listener with its timeouts and connection cap.
//! - [`latency`]: the request-latency histogram, one layer around every route.
//! - [`metrics`]: every metric the gateway exports, served with `/readyz` on
//!   `gateway.ops_listen`, apart from the public port.

pub mod auth;
pub mod caller;
pub mod error;
pub mod history;
pub mod http;
pub mod ingest;
pub mod latency;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod overview;
pub mod publish;
pub mod query;
pub mod server;
pub mod state;
pub mod store;
pub mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use presence_core::delivery::{RedisKeys, Tables};
use presence_core::telemetry::{self, Health};
use presence_core::{Config, Shutdown};

/// A running gateway: where it listens, and its server task.
pub struct Running {
    /// The public port.
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub ops_addr: SocketAddr,
    pub server: tokio::task::JoinHandle<()>,
    publisher: Arc<publish::Publisher>,
}

impl Running {
    /// Waits for the server to stop (after `shutdown`), then for in-flight records.
    pub async fn wait(self) {
        let _ = self.server.await;
        let publisher = self.publisher;
        let _ = tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(10))).await;
    }
}

/// Starts the gateway on `config.gateway.listen` (port 0: any free port).
pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<Running> {
    let registry = presence_core::metrics::registry();
    let health = Health::new(&registry);
    let metrics = metrics::Metrics::new(&registry);
    let publisher =
        Arc::new(publish::Publisher::new(&config, metrics.clone()).context(
            "cannot create the Kafka producer; check kafka.brokers and kafka.properties",
        )?);
    publish::Publisher::spawn_probe(
        &publisher,
        health.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    );

    let keys = RedisKeys::new(&config.redis.key_prefix);
    let store = store::Store::new(&config.redis, keys).map_err(anyhow::Error::msg)?;
    let hub = stream::Hub::new(
        store.clone(),
        metrics.clone(),
        config.gateway.stream_keep_alive,
        shutdown.clone(),
    );
    hub.spawn();
    spawn_redis_probe(store.clone(), health.clone(), shutdown.clone());

    let history = history::HistoryReader::new(
        &config.database,
        Tables::new(&config.database.schema),
        config.gateway.history_pool_size,
        config.gateway.history_statement_timeout,
        metrics.clone(),
    );
    let (ops_addr, _ops) = telemetry::serve_ops(
        config.gateway.ops_listen,
        registry,
        health,
        shutdown.clone(),
    )
    .await
    .context("gateway.ops_listen")?;
    let state = http::App::new(
        &config,
        publisher.clone(),
        store,
        hub,
        history,
        metrics.clone(),
    )?;
    let router = latency::layer(
        http::router(state, &config.gateway),
        metrics.request_seconds.clone(),
    );
    let (addr, server) = server::serve(
        config.gateway.listen,
        router,
        server::Limits::of(&config.gateway),
        metrics,
        shutdown,
    )
    .await?;
    tracing::info!(%addr, %ops_addr, auth = ?config.gateway.auth, "gateway listening: POST /v1/heartbeats, GET /v1/regions/{{region}}/stream, dashboard at /; metrics and readiness on the ops address");
    Ok(Running {
        addr,
        ops_addr,
        server,
        publisher,
    })
}

/// Runs the gateway until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// Redis is watched but not part of readiness: heartbeats must keep flowing to Kafka while
/// Redis is down (streams and reads wait for it and say so);
/// `presence_dependency_up{dependency="redis"}` shows it.
fn spawn_redis_probe(store: store::Store, health: Health, shutdown: Shutdown) {
    let check = move || {
        let store = store.clone();
        async move {
            match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer to PING within 2 s".to_string()),
            }
        }
    };
    watch(
        Duration::from_secs(1),
        shutdown,
        check,
        move |result, changed| {
            health.observe("redis", result.is_ok());
            match result {
                Err(e) if changed => {
                    tracing::warn!(error = %e, "Redis is unreachable: streams and reads wait for it; heartbeats are not affected")
                }
                Ok(()) if changed => tracing::info!("Redis is reachable again"),
                _ => {}
            }
        },
    );
}

/// Asks `check` every `every` until `shutdown`. `report` gets each answer and whether it
/// differs from the one before (the first answer counts as a change when it is a failure),
/// so that a dependency's loss and return are logged once each.
fn watch<C, F>(
    every: Duration,
    shutdown: Shutdown,
    check: C,
    report: impl Fn(&Result<(), String>, bool) + Send + 'static,
) where
    C: Fn() -> F + Send + 'static,
    F: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        let mut was_up = true;
        loop {
            let result = check().await;
            report(&result, result.is_ok() != was_up);
            was_up = result.is_ok();
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait() => return,
            }
        }
    });
}
