//! What every handler shares: the edges (Kafka, Redis, PostgreSQL, the stream hub), the
//! token verifier, the limits and the metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Claims, Verifier};
use crate::history::HistoryReader;
use crate::limits::{Limited, RateLimiter, StreamSlots};
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::store::Store;
use crate::stream::Hub;

#[derive(Clone)]
pub struct App(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    /// `None` with `gateway.auth = "none"`.
    pub verifier: Option<Verifier>,
    pub max_batch: usize,
    pub publisher: Arc<Publisher>,
    pub store: Store,
    pub hub: Hub,
    pub history: HistoryReader,
    pub metrics: Metrics,
    pub limiter: RateLimiter,
    pub slots: StreamSlots,
    pub body_read_timeout: Duration,
    pub history_max_range: Duration,
    /// The regions' 24 h uptime, shared by every overview.
    pub uptime: crate::overview::UptimeCache,
}

impl App {
    pub fn new(
        config: &presence_core::Config,
        publisher: Arc<Publisher>,
        store: Store,
        hub: Hub,
        history: HistoryReader,
        metrics: Metrics,
    ) -> anyhow::Result<App> {
        Ok(App(Arc::new(Inner {
            verifier: Verifier::from_config(&config.gateway)?,
            max_batch: config.gateway.max_batch,
            publisher,
            store,
            hub,
            history,
            metrics,
            limiter: RateLimiter::new(
                config.gateway.ingest_per_minute,
                config.gateway.ingest_burst,
                config.gateway.ingest_identities,
            ),
            slots: StreamSlots::new(
                config.gateway.max_streams,
                config.gateway.max_streams_per_identity,
            ),
            body_read_timeout: config.gateway.body_read_timeout,
            history_max_range: config.gateway.history_max_range,
            uptime: Default::default(),
        })))
    }

    /// Charges each identity its heartbeats: the token's subject, or, without tokens, each
    /// beat's user id.
    pub fn admit(
        &self,
        beats: &[presence_core::records::Heartbeat],
        claims: Option<&Claims>,
    ) -> Result<(), Limited> {
        let mut costs: BTreeMap<&str, u32> = BTreeMap::new();
        for b in beats {
            let who = claims.map_or(b.user_id.as_str(), |c| c.sub.as_str());
            *costs.entry(who).or_insert(0) += 1;
        }
        let costs: Vec<(&str, u32)> = costs.into_iter().collect();
        let result = self.0.limiter.admit(&costs, Instant::now());
        self.0
            .metrics
            .rate_identities
            .set(self.0.limiter.tracked() as i64);
        result
    }
}
