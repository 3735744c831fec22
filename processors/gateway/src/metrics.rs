//! The gateway's metrics, in one place. Label values come from small fixed sets: a route
//! name and an outcome code, never an id or a message.

use presence_core::metrics::{counter, counter_vec, gauge, histogram, histogram_vec};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Requests by route and outcome (`accepted`, `invalid`, `token_expired`, `unavailable`...).
    pub requests: IntCounterVec,
    pub heartbeats_accepted: IntCounter,
    /// From handing a request's records to the producer to the broker's acknowledgement.
    pub produce_seconds: Histogram,
    /// Records handed to the producer and not acknowledged yet.
    pub producer_queue: IntGauge,
    pub stream_clients: IntGauge,
    /// Region channels open (one per region with at least one client).
    pub stream_regions: IntGauge,
    /// Streams refused by a cap, by `cap` (`identity`, `total`).
    pub streams_refused: IntCounterVec,
    /// Open TCP connections on the public port.
    pub connections: IntGauge,
    /// Connections closed at once because `gateway.max_connections` were open.
    pub connections_refused: IntCounter,
    /// Requests refused by the ingest rate limit, by `reason` (`rate`, `batch`, `full`).
    pub rate_limited: IntCounterVec,
    /// Identities whose ingest rate is being tracked.
    pub rate_identities: IntGauge,
    /// History queries sent to PostgreSQL (a refused request sends none).
    pub history_queries: IntCounter,
    pub stream_events: IntCounter,
    /// Streams that had to start over from a snapshot, by reason (`gap`, `lagged`, `redis`,
    /// `last_event_id_too_old`).
    pub stream_resyncs: IntCounterVec,
    pub redis_errors: IntCounter,
    /// Time from a request's arrival to its response's head, by route, method and status
    /// class; applied by [`crate::latency`] to every route.
    pub request_seconds: HistogramVec,
}

impl Metrics {
    pub fn new(r: &Registry) -> Metrics {
        Metrics {
            requests: counter_vec(
                r,
                "presence_gateway_requests_total",
                "HTTP requests by route and outcome",
                &["route", "outcome"],
            ),
            heartbeats_accepted: counter(
                r,
                "presence_gateway_heartbeats_accepted_total",
                "Heartbeats acknowledged by the broker and answered 202",
            ),
            produce_seconds: histogram(
                r,
                "presence_gateway_produce_seconds",
                "Time from producing a request's heartbeats to the broker's acknowledgement",
                &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            producer_queue: gauge(
                r,
                "presence_gateway_producer_queue",
                "Heartbeats handed to the Kafka producer and not acknowledged yet",
            ),
            stream_clients: gauge(
                r,
                "presence_gateway_stream_clients",
                "Open Server-Sent Events streams",
            ),
            stream_regions: gauge(
                r,
                "presence_gateway_stream_regions",
                "Region channels open: one per region with at least one stream",
            ),
            streams_refused: counter_vec(
                r,
                "presence_gateway_streams_refused_total",
                "Streams refused by a cap (identity: 429, total: 503)",
                &["cap"],
            ),
            connections: gauge(
                r,
                "presence_gateway_connections",
                "Open TCP connections on the public port",
            ),
            connections_refused: counter(
                r,
                "presence_gateway_connections_refused_total",
                "Connections closed at once because gateway.max_connections were open",
            ),
            rate_limited: counter_vec(
                r,
                "presence_gateway_rate_limited_total",
                "Heartbeat requests refused by the per-identity rate limit, by reason",
                &["reason"],
            ),
            rate_identities: gauge(
                r,
                "presence_gateway_rate_identities",
                "Identities whose heartbeat rate is being tracked",
            ),
            history_queries: counter(
                r,
                "presence_gateway_history_queries_total",
                "History reads sent to PostgreSQL",
            ),
            stream_events: counter(
                r,
                "presence_gateway_stream_events_total",
                "Transitions received from region channels",
            ),
            stream_resyncs: counter_vec(
                r,
                "presence_gateway_stream_resyncs_total",
                "Streams sent a fresh snapshot instead of the next event, by reason",
                &["reason"],
            ),
            redis_errors: counter(
                r,
                "presence_gateway_redis_errors_total",
                "Failed Redis calls (reads, subscription)",
            ),
            request_seconds: histogram_vec(
                r,
                "presence_gateway_request_duration_seconds",
                "Time from a request's arrival to its response's head (for a stream: until it opens), by route, method and status class",
                &["route", "method", "status"],
                &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
        }
    }
}
