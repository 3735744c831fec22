//! Logs, metrics and the ops endpoints every long-running process serves:
//! `/metrics` (Prometheus text), `/healthz` (the process is alive) and `/readyz` (every
//! dependency it needs answers; 503 with the reasons otherwise).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::config::{LogFormat, TelemetryConfig};
use crate::shutdown::Shutdown;

/// Installs the global `tracing` subscriber. Idempotent: a second call is ignored.
pub fn init_logging(c: &TelemetryConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&c.log_filter));
    use std::io::IsTerminal;
    // Colours only on a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match c.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Readiness of named dependencies (`kafka`, `redis`, ...). A process is ready when every
/// registered component is. Also exported as `presence_dependency_up{dependency}`.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Mutex<BTreeMap<&'static str, Result<(), String>>>>,
    gauge: IntGaugeVec,
}

impl Health {
    pub fn new(registry: &Registry) -> Health {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "presence_dependency_up",
                "1 while the dependency answers, 0 while it does not",
            ),
            &["dependency"],
        )
        .expect("static metric definition");
        // Registering twice in one registry is a programming error; ignore for idempotence.
        let _ = registry.register(Box::new(gauge.clone()));
        Health {
            inner: Arc::default(),
            gauge,
        }
    }

    /// Registers `component` as not ready yet.
    pub fn register(&self, component: &'static str) {
        self.set(component, Err("starting".into()));
    }

    pub fn set_ready(&self, component: &'static str) {
        self.set(component, Ok(()));
    }

    /// `reason` is shown on `/readyz`: name the dependency and what to check, never a secret.
    pub fn set_unready(&self, component: &'static str, reason: impl Into<String>) {
        self.set(component, Err(reason.into()));
    }

    fn set(&self, component: &'static str, state: Result<(), String>) {
        self.gauge
            .with_label_values(&[component])
            .set(state.is_ok() as i64);
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(component, state);
    }

    pub fn is_ready(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .all(Result::is_ok)
    }

    /// One line per component: `kafka: ok` or `kafka: <reason>`.
    pub fn describe(&self) -> String {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(k, v)| match v {
                Ok(()) => format!("{k}: ok\n"),
                Err(e) => format!("{k}: {e}\n"),
            })
            .collect()
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    health: Health,
}

/// The ops routes, to be served alone ([`serve_ops`]) or merged into a public router.
pub fn ops_router(registry: Registry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { registry, health })
}

async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&s.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            buf,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    let code = if s.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, s.health.describe())
}

/// Binds `addr` and serves the ops routes until `shutdown`. Returns the bound address (tests
/// bind port 0) and the server task.
pub async fn serve_ops(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve(addr, ops_router(registry, health), shutdown).await
}

/// Binds `addr` and serves `router` until `shutdown`, with a message that names the address
/// when it is taken.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr}: {e}; choose a free port in the configuration"),
        )
    })?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, %bound, "HTTP server stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_component_is() {
        let h = Health::new(&Registry::new());
        assert!(h.is_ready(), "no components: ready");
        h.register("kafka");
        h.register("redis");
        assert!(!h.is_ready());
        h.set_ready("kafka");
        assert!(!h.is_ready());
        h.set_ready("redis");
        assert!(h.is_ready());
        h.set_unready(
            "redis",
            "redis at redis://127.0.0.1:6379 refuses connections",
        );
        assert!(!h.is_ready());
        assert!(h.describe().contains("redis: redis at"));
    }
}
