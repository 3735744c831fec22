//! Logs, metrics and the ops endpoints every long-running process serves:
//! `/metrics` (Prometheus text), `/healthz` (the process is alive: every loop that reports
//! a [`Pulse`] made progress recently; 503 naming the stuck ones otherwise, so that a
//! supervisor restarts the process) and `/readyz` (every dependency it needs answers; 503
//! with the reasons otherwise).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, IntGaugeVec, Registry, TextEncoder};

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

/// Readiness of named components (`kafka`, `redis`, `sessions`, `sessions.kafka`...). A
/// process is ready when every registered component is.
///
/// The one dependency-health metric, `presence_dependency_up{dependency}` (`kafka`, `redis`,
/// `postgres`), follows the components named after a dependency (`kafka`, or
/// `<anything>.kafka`: 1 while every one of them is ready) and the dependencies a process
/// watches without gating readiness on them ([`Health::observe`]: the gateway's Redis).
///
/// Liveness of named loops: each one holds a [`Pulse`] and beats it as it goes round; the
/// process is live while every pulse beat within its stall limit.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Mutex<BTreeMap<&'static str, Result<(), String>>>>,
    /// Dependencies watched outside readiness, and whether each answers.
    observed: Arc<Mutex<BTreeMap<&'static str, bool>>>,
    gauge: IntGaugeVec,
    pulses: Arc<Mutex<BTreeMap<&'static str, Arc<Pulse>>>>,
}

/// Progress of one loop, for `/healthz`. A loop beats it every time round (and while it
/// retries something that is down: waiting for a dependency is not being stuck); a loop
/// blocked for longer than `stall` — a call that never returns, a deadlock — fails
/// liveness. Around a step with a progress check of its own (a restore gives up after a
/// minute without records) the loop [`Pulse::hold`]s it instead.
pub struct Pulse {
    epoch: Instant,
    /// Milliseconds since `epoch` at the last beat.
    last: AtomicU64,
    held: AtomicBool,
    stall: Duration,
}

impl Pulse {
    fn new(stall: Duration) -> Pulse {
        Pulse {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            held: AtomicBool::new(false),
            stall,
        }
    }

    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    fn beat_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Suspends the stall check until the returned guard drops (which beats).
    pub fn hold(&self) -> PulseHold<'_> {
        self.held.store(true, Ordering::Relaxed);
        PulseHold(self)
    }

    /// How long since the last beat at `now`, when that is past the stall limit.
    fn stalled_for(&self, now: Instant) -> Option<Duration> {
        if self.held.load(Ordering::Relaxed) {
            return None;
        }
        let last = self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed));
        let quiet = now.saturating_duration_since(last);
        (quiet > self.stall).then_some(quiet)
    }
}

/// See [`Pulse::hold`].
pub struct PulseHold<'a>(&'a Pulse);

impl Drop for PulseHold<'_> {
    fn drop(&mut self) {
        self.0.beat();
        self.0.held.store(false, Ordering::Relaxed);
    }
}

impl Health {
    pub fn new(registry: &Registry) -> Health {
        let gauge = crate::metrics::gauge_vec(
            registry,
            "presence_dependency_up",
            "1 while the dependency (kafka, redis, postgres) answers, 0 while it does not",
            &["dependency"],
        );
        Health {
            inner: Arc::default(),
            observed: Arc::default(),
            gauge,
            pulses: Arc::default(),
        }
    }

    /// Registers loop `name` for liveness: `/healthz` fails once the returned pulse has not
    /// beaten for `stall`.
    pub fn pulse(&self, name: &'static str, stall: Duration) -> Arc<Pulse> {
        let pulse = Arc::new(Pulse::new(stall));
        pulse.beat();
        self.pulses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, pulse.clone());
        pulse
    }

    /// The loops stuck at `now`, one line each (empty when live).
    fn stuck_at(&self, now: Instant) -> String {
        let pulses = self.pulses.lock().unwrap_or_else(|p| p.into_inner());
        pulses
            .iter()
            .filter_map(|(name, p)| {
                p.stalled_for(now).map(|quiet| {
                    format!(
                        "{name}: no progress for {} s (limit {} s); the loop is stuck, restart the process\n",
                        quiet.as_secs(),
                        p.stall.as_secs()
                    )
                })
            })
            .collect()
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

    /// Dependency `dependency` (`redis`) answers or not, without a say in readiness: the
    /// gateway takes heartbeats while Redis is down.
    pub fn observe(&self, dependency: &'static str, up: bool) {
        self.observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dependency, up);
        self.update_dependency(dependency);
    }

    fn set(&self, component: &'static str, state: Result<(), String>) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(component, state);
        if let Some(dependency) = dependency_of(component) {
            self.update_dependency(dependency);
        }
    }

    fn update_dependency(&self, dependency: &str) {
        let components_up = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(c, _)| dependency_of(c) == Some(dependency))
            .all(|(_, s)| s.is_ok());
        let observed_up = self
            .observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(dependency)
            .copied()
            .unwrap_or(true);
        self.gauge
            .with_label_values(&[dependency])
            .set(i64::from(components_up && observed_up));
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

/// The dependencies `presence_dependency_up` reports.
pub const DEPENDENCIES: [&str; 3] = ["kafka", "redis", "postgres"];

/// The dependency a readiness component stands for: `kafka` and `sessions.kafka` are Kafka;
/// `sessions` (a stage restoring) is no dependency.
fn dependency_of(component: &str) -> Option<&'static str> {
    let last = component.rsplit('.').next().unwrap_or(component);
    DEPENDENCIES.into_iter().find(|d| *d == last)
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
        .route("/healthz", get(healthz))
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

async fn healthz(State(s): State<OpsState>) -> impl IntoResponse {
    let stuck = s.health.stuck_at(Instant::now());
    if stuck.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, stuck)
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

    #[test]
    fn one_dependency_gauge_follows_every_component_of_that_dependency() {
        use prometheus::Encoder;
        let registry = Registry::new();
        let h = Health::new(&registry);
        let text = || {
            let mut buf = Vec::new();
            TextEncoder::new()
                .encode(&registry.gather(), &mut buf)
                .unwrap();
            String::from_utf8(buf).unwrap()
        };
        h.set_ready("sessions.kafka");
        h.set_ready("facilities.kafka");
        h.register("sessions");
        assert!(text().contains("presence_dependency_up{dependency=\"kafka\"} 1"));
        assert!(!text().contains("dependency=\"sessions"), "{}", text());
        h.set_unready("facilities.kafka", "no broker");
        assert!(text().contains("presence_dependency_up{dependency=\"kafka\"} 0"));
        h.set_ready("facilities.kafka");
        h.set_ready("sessions");
        h.observe("redis", false);
        assert!(text().contains("presence_dependency_up{dependency=\"redis\"} 0"));
        assert!(
            h.is_ready(),
            "an observed dependency has no say in readiness"
        );
        h.observe("redis", true);
        assert!(text().contains("presence_dependency_up{dependency=\"redis\"} 1"));
        assert!(text().contains("presence_dependency_up{dependency=\"kafka\"} 1"));
    }

    #[test]
    fn live_while_every_pulse_beats_within_its_limit() {
        let h = Health::new(&Registry::new());
        let sessions = h.pulse("sessions", Duration::from_secs(60));
        let facilities = h.pulse("facilities", Duration::from_secs(60));
        let t0 = Instant::now();
        sessions.beat_at(t0);
        facilities.beat_at(t0);
        assert_eq!(h.stuck_at(t0 + Duration::from_secs(59)), "");
        facilities.beat_at(t0 + Duration::from_secs(50));
        let stuck = h.stuck_at(t0 + Duration::from_secs(61));
        assert!(
            stuck.starts_with("sessions: no progress for 61 s"),
            "{stuck}"
        );
        assert!(!stuck.contains("facilities"), "{stuck}");
        {
            let _restoring = sessions.hold();
            assert_eq!(h.stuck_at(t0 + Duration::from_secs(100)), "", "held");
        }
        // Released with a beat: the limit counts from the end of the hold.
        assert_eq!(h.stuck_at(Instant::now() + Duration::from_secs(59)), "");
    }
}
