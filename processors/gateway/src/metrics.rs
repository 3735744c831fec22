//! The gateway's metrics, in one place. Label values come from small fixed sets: a route
//! name and an outcome code, never an id or a message.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
    /// 1 while Redis answers PING.
    pub redis_up: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("metric definitions are static and valid")
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let m = Metrics {
            requests: must(IntCounterVec::new(
                Opts::new(
                    "presence_gateway_requests_total",
                    "HTTP requests by route and outcome",
                ),
                &["route", "outcome"],
            )),
            heartbeats_accepted: must(IntCounter::new(
                "presence_gateway_heartbeats_accepted_total",
                "Heartbeats acknowledged by the broker and answered 202",
            )),
            produce_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    "presence_gateway_produce_seconds",
                    "Time from producing a request's heartbeats to the broker's acknowledgement",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )),
            producer_queue: must(IntGauge::new(
                "presence_gateway_producer_queue",
                "Heartbeats handed to the Kafka producer and not acknowledged yet",
            )),
            stream_clients: must(IntGauge::new(
                "presence_gateway_stream_clients",
                "Open Server-Sent Events streams",
            )),
            stream_regions: must(IntGauge::new(
                "presence_gateway_stream_regions",
                "Region channels open: one per region with at least one stream",
            )),
            streams_refused: must(IntCounterVec::new(
                Opts::new(
                    "presence_gateway_streams_refused_total",
                    "Streams refused by a cap (identity: 429, total: 503)",
                ),
                &["cap"],
            )),
            connections: must(IntGauge::new(
                "presence_gateway_connections",
                "Open TCP connections on the public port",
            )),
            connections_refused: must(IntCounter::new(
                "presence_gateway_connections_refused_total",
                "Connections closed at once because gateway.max_connections were open",
            )),
            rate_limited: must(IntCounterVec::new(
                Opts::new(
                    "presence_gateway_rate_limited_total",
                    "Heartbeat requests refused by the per-identity rate limit, by reason",
                ),
                &["reason"],
            )),
            rate_identities: must(IntGauge::new(
                "presence_gateway_rate_identities",
                "Identities whose heartbeat rate is being tracked",
            )),
            history_queries: must(IntCounter::new(
                "presence_gateway_history_queries_total",
                "History reads sent to PostgreSQL",
            )),
            stream_events: must(IntCounter::new(
                "presence_gateway_stream_events_total",
                "Transitions received from region channels",
            )),
            stream_resyncs: must(IntCounterVec::new(
                Opts::new(
                    "presence_gateway_stream_resyncs_total",
                    "Streams sent a fresh snapshot instead of the next event, by reason",
                ),
                &["reason"],
            )),
            redis_errors: must(IntCounter::new(
                "presence_gateway_redis_errors_total",
                "Failed Redis calls (reads, subscription)",
            )),
            redis_up: must(IntGauge::new(
                "presence_gateway_redis_up",
                "1 while Redis answers PING",
            )),
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.heartbeats_accepted.clone()),
            Box::new(m.produce_seconds.clone()),
            Box::new(m.producer_queue.clone()),
            Box::new(m.stream_clients.clone()),
            Box::new(m.stream_regions.clone()),
            Box::new(m.streams_refused.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(m.rate_limited.clone()),
            Box::new(m.rate_identities.clone()),
            Box::new(m.history_queries.clone()),
            Box::new(m.stream_events.clone()),
            Box::new(m.stream_resyncs.clone()),
            Box::new(m.redis_errors.clone()),
            Box::new(m.redis_up.clone()),
        ] {
            must(registry.register(c));
        }
        m
    }
}
