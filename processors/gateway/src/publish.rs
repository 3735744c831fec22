//! The Kafka edge: heartbeats to `heartbeats`, keyed by session id, stamped with the time
//! the gateway received them. A request is answered 202 only once the broker acknowledged
//! every one of its records (idempotent producer, acks=all).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use presence_core::codec::encode;
use presence_core::config::Config;
use presence_core::kafka::idempotent_producer_config;
use presence_core::records::Heartbeat;
use presence_core::telemetry::Health;
use presence_core::Shutdown;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::metrics::Metrics;

/// Why heartbeats were not accepted; each is a 503 with `Retry-After`.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the Kafka broker is unreachable: heartbeats cannot be stored now; retry later")]
    BrokerDown,
    #[error("the gateway's producer queue is full: retry later")]
    QueueFull,
    #[error("the broker did not acknowledge in time or refused the record ({0}); retry later")]
    NotAcknowledged(String),
}

impl PublishError {
    pub fn code(&self) -> &'static str {
        match self {
            PublishError::BrokerDown => "broker_down",
            PublishError::QueueFull => "queue_full",
            PublishError::NotAcknowledged(_) => "not_acknowledged",
        }
    }
}

pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    /// A request waits this long for its acknowledgements (`gateway.produce_timeout`).
    produce_timeout: Duration,
    metrics: Metrics,
    /// Set by the probe: while false, requests are refused at once instead of waiting for
    /// the produce timeout.
    broker_up: AtomicBool,
}

const COMPONENT: &str = "kafka";

/// How long the producer keeps a record before giving it up (`message.timeout.ms`), far
/// longer than a request waits (`gateway.produce_timeout`) on purpose: a record that times
/// out while in flight makes the idempotent producer bump its epoch, and what it then sends
/// again is no longer deduplicated by the broker, so a beat answered 202 could be written
/// twice (the chaos run saw 1–15 per run across broker failovers). The request gets its 503
/// at `produce_timeout`; its record may still be written later, once.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(300);

impl Publisher {
    pub fn new(config: &Config, metrics: Metrics) -> Result<Publisher, KafkaError> {
        let g = &config.gateway;
        let producer: FutureProducer = idempotent_producer_config(&config.kafka, "gateway")
            // A request waits for its batch; 1 ms lets concurrent requests share one.
            .set("linger.ms", "1")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT
                    .max(g.produce_timeout)
                    .as_millis()
                    .to_string(),
            )
            .set("queue.buffering.max.messages", g.max_in_flight.to_string())
            .create()?;
        Ok(Publisher {
            producer,
            topic: config.topics.heartbeats.clone(),
            produce_timeout: g.produce_timeout,
            metrics,
            broker_up: AtomicBool::new(false),
        })
    }

    /// Produces `beats` and waits for every acknowledgement.
    pub async fn publish(&self, beats: &[Heartbeat], received_ms: i64) -> Result<(), PublishError> {
        if !self.broker_up.load(Ordering::Relaxed) {
            return Err(PublishError::BrokerDown);
        }
        let started = Instant::now();
        let mut pending = Vec::with_capacity(beats.len());
        for beat in beats {
            let value = encode(beat);
            let record = FutureRecord::to(&self.topic)
                .key(beat.session_id.as_str())
                .payload(&value)
                .timestamp(received_ms);
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(PublishError::QueueFull)
                }
                Err((e, _)) => return Err(PublishError::NotAcknowledged(e.to_string())),
            }
        }
        self.metrics
            .producer_queue
            .set(i64::from(self.producer.in_flight_count()));
        let Ok(outcomes) = tokio::time::timeout(self.produce_timeout, join_all(pending)).await
        else {
            self.metrics
                .produce_seconds
                .observe(started.elapsed().as_secs_f64());
            return Err(PublishError::NotAcknowledged(format!(
                "no acknowledgement within gateway.produce_timeout = {:?}",
                self.produce_timeout
            )));
        };
        let mut failure = None;
        for outcome in outcomes {
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => failure = Some(e.to_string()),
                Err(_) => failure = Some("the producer was dropped".into()),
            }
        }
        self.metrics
            .produce_seconds
            .observe(started.elapsed().as_secs_f64());
        match failure {
            None => Ok(()),
            Some(e) => Err(PublishError::NotAcknowledged(e)),
        }
    }

    /// Asks the cluster for the topic's metadata every `every`; readiness and the fast-fail
    /// flag follow the answer, so the gateway recovers by itself when the broker returns.
    pub fn spawn_probe(me: &Arc<Self>, health: Health, every: Duration, shutdown: Shutdown) {
        health.register(COMPONENT);
        let probe = Arc::clone(me);
        let check = move || {
            let p = Arc::clone(&probe);
            async move {
                tokio::task::spawn_blocking(move || p.topic_is_reachable())
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
            }
        };
        let me = Arc::clone(me);
        crate::watch(every, shutdown, check, move |result, changed| {
            me.broker_up.store(result.is_ok(), Ordering::Relaxed);
            me.metrics
                .producer_queue
                .set(i64::from(me.producer.in_flight_count()));
            match result {
                Ok(()) => {
                    health.set_ready(COMPONENT);
                    if changed {
                        tracing::info!("Kafka is reachable again: accepting heartbeats");
                    }
                }
                Err(e) => {
                    if changed {
                        tracing::warn!(error = %e, "Kafka is unreachable: answering 503 to heartbeats until it is back");
                    }
                    health.set_unready(COMPONENT, e.clone());
                }
            }
        });
    }

    /// The heartbeats topic's metadata, within 2 s (blocking).
    fn topic_is_reachable(&self) -> Result<(), String> {
        let metadata = self
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        match metadata.topics().first() {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
            _ => Err(format!(
                "topic '{}' does not exist: run `presence topics`",
                self.topic
            )),
        }
    }

    /// Waits up to `timeout` for every acknowledged-to-be record to be delivered (SIGTERM).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "not every heartbeat was delivered before shutdown; their requests were answered 503");
        }
    }
}
