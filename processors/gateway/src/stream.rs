//! Live region streams (Server-Sent Events) from the notifier's region channels.
//!
//! One Redis subscription per gateway feeds a broadcast channel per watched region; each
//! SSE client reads its region's channel. Redis pub/sub delivers at most once, so every
//! event carries its region sequence (`id:` in SSE) and both the hub and each client check
//! that it is exactly one more than the last: a gap is filled from the region's replay log
//! in Redis, or, when the log no longer reaches back, the client gets a fresh snapshot.
//! The hub also polls the sequences of watched regions, so a lost *last* message is noticed
//! within [`POLL`] rather than at the next transition.
//!
//! A region's channel exists while it has clients: the last one to leave drops it. A client
//! task ends as soon as its response is dropped (the connection closed), not when it next
//! has something to send; the keep-alive comment every `gateway.stream_keep_alive` makes a
//! write fail, and so the connection close, within two intervals of a client vanishing.
//!
//! Events: `snapshot` (the region's facilities; `id` = the region sequence it reflects) and
//! `transition` (one facility's change; `id` = its region sequence). A client that
//! reconnects with `Last-Event-ID` gets the transitions it missed, or a snapshot.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::StreamExt;
use presence_core::Shutdown;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::limits::Slot;
use crate::metrics::Metrics;
use crate::store::{Replay, Store};

/// How often the hub compares watched regions' sequences with what it has relayed.
pub const POLL: Duration = Duration::from_secs(1);
/// Events buffered per region for slow clients; one further behind is resynchronised.
const BUFFER: usize = 4096;

#[derive(Clone, Debug)]
pub enum HubEvent {
    Transition {
        region_seq: u64,
        json: Arc<str>,
    },
    /// The hub lost events it cannot recover: every client starts over from a snapshot.
    Resync,
}

struct Region {
    tx: broadcast::Sender<HubEvent>,
    /// The newest region sequence relayed; 0 until the first event or poll.
    last: u64,
}

#[derive(Clone)]
pub struct Hub {
    store: Store,
    regions: Arc<Mutex<HashMap<String, Region>>>,
    metrics: Metrics,
    /// Ends every stream, so that the server's graceful shutdown is not held open by them.
    shutdown: Shutdown,
    /// How often a quiet stream gets a keep-alive comment.
    keep_alive: Duration,
}

impl Hub {
    pub fn new(store: Store, metrics: Metrics, keep_alive: Duration, shutdown: Shutdown) -> Hub {
        Hub {
            store,
            regions: Arc::new(Mutex::new(HashMap::new())),
            metrics,
            shutdown,
            keep_alive,
        }
    }

    fn subscribe(&self, region: &str) -> Subscription {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        let rx = regions
            .entry(region.to_string())
            .or_insert_with(|| Region {
                tx: broadcast::channel(BUFFER).0,
                last: 0,
            })
            .tx
            .subscribe();
        self.metrics.stream_regions.set(regions.len() as i64);
        Subscription {
            hub: self.clone(),
            region: region.to_string(),
            rx: Some(rx),
        }
    }

    /// What ends every stream (the server's shutdown).
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// How often a quiet stream gets a keep-alive comment (`gateway.stream_keep_alive`).
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive
    }

    /// Region channels open now (one per region with at least one client).
    pub fn regions_open(&self) -> usize {
        self.regions.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Relays `events` (region sequence, JSON) of `region` in order, skipping what was
    /// relayed already. Returns the sequence after which a gap starts, if any.
    fn relay(&self, region: &str, events: Vec<(u64, Arc<str>)>) -> Option<u64> {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        let r = regions.get_mut(region)?;
        for (seq, json) in events {
            if seq <= r.last {
                continue;
            }
            if r.last != 0 && seq != r.last + 1 {
                return Some(r.last);
            }
            r.last = seq;
            let _ = r.tx.send(HubEvent::Transition {
                region_seq: seq,
                json,
            });
        }
        None
    }

    /// Fills the gap after `after` from the replay log, or tells every client to resync.
    async fn fill(&self, region: &str, after: u64) {
        match self.store.replay(region, after).await {
            Ok(Replay::Complete(events)) => {
                let events = events.into_iter().map(|(s, j)| (s, Arc::from(j))).collect();
                if self.relay(region, events).is_none() {
                    return;
                }
            }
            Ok(Replay::TooOld) => {}
            Err(e) => {
                self.metrics.redis_errors.inc();
                tracing::warn!(region, error = %e, "cannot read the region's replay log; clients will resync");
            }
        }
        self.resync(region, "gap");
    }

    /// Every client of `region` starts over from a snapshot.
    fn resync(&self, region: &str, reason: &str) {
        self.metrics
            .stream_resyncs
            .with_label_values(&[reason])
            .inc();
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = regions.get_mut(region) {
            r.last = 0;
            let _ = r.tx.send(HubEvent::Resync);
        }
    }

    fn watched(&self) -> Vec<(String, u64)> {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        // Regions nobody watches any more are forgotten (their last client's drop does it
        // too; this catches any race).
        regions.retain(|_, r| r.tx.receiver_count() > 0);
        self.metrics.stream_regions.set(regions.len() as i64);
        regions.iter().map(|(k, r)| (k.clone(), r.last)).collect()
    }

    fn on_message(&self, channel: &str, payload: String) -> Option<(String, u64)> {
        let region = self.store.keys.region_of_channel(channel)?.to_string();
        let seq = serde_json::from_str::<SeqOnly>(&payload).ok()?.region_seq;
        self.metrics.stream_events.inc();
        self.relay(&region, vec![(seq, Arc::from(payload))])
            .map(|after| (region, after))
    }

    /// Subscribes to every region channel until `shutdown`, reconnecting with backoff; after
    /// a reconnect every watched region is caught up from its log.
    pub fn spawn(&self) {
        let hub = self.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match hub.listen(&shutdown).await {
                    Ok(()) => return,
                    Err(e) => {
                        hub.metrics.redis_errors.inc();
                        tracing::warn!(error = %e, retry_in = ?backoff, "region channel subscription lost; reconnecting (streams catch up from the replay log)");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn listen(&self, shutdown: &Shutdown) -> redis::RedisResult<()> {
        let mut pubsub = self
            .store
            .client()
            .get_async_pubsub()
            .await
            .map_err(presence_core::delivery::explain_redis_error)?;
        pubsub.psubscribe(self.store.keys.channel_pattern()).await?;
        let mut messages = pubsub.on_message();
        // Whatever happened while we were not subscribed.
        self.poll_watched().await;
        let mut poll = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else {
                        return Err(redis::RedisError::from((redis::ErrorKind::IoError, "subscription closed")));
                    };
                    let Ok(payload) = m.get_payload::<String>() else { continue };
                    if let Some((region, after)) = self.on_message(m.get_channel_name(), payload) {
                        self.fill(&region, after).await;
                    }
                }
                _ = poll.tick() => self.poll_watched().await,
                _ = shutdown.wait() => return Ok(()),
            }
        }
    }

    async fn poll_watched(&self) {
        for (region, last) in self.watched() {
            // 0: no client has told us where it stands yet; nothing to compare with.
            if last == 0 {
                continue;
            }
            match self.store.region_seq(&region).await {
                Ok(current) if current > last => self.fill(&region, last).await,
                // The sequence went back: Redis lost its data and the notifier rebuilt it.
                Ok(current) if current < last => self.resync(&region, "reset"),
                Ok(_) => {}
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    tracing::warn!(region, error = %e, "cannot read the region sequence");
                    return;
                }
            }
        }
    }

    /// A client is at `seq`: the hub starts relaying (and polling) from there if it had
    /// no position for the region yet.
    fn seen(&self, region: &str, seq: u64) {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = regions.get_mut(region) {
            if r.last == 0 {
                r.last = seq;
            }
        }
    }

    /// An SSE response for `region`, starting after `last_event_id` when the log allows.
    /// `slot` is the stream's place under the caps, given back when the stream ends.
    pub fn stream(
        &self,
        region: String,
        last_event_id: Option<u64>,
        slot: Slot,
    ) -> impl axum::response::IntoResponse {
        let (tx, rx) = mpsc::channel(64);
        let client = Client {
            hub: self.clone(),
            region,
            tx,
            last: 0,
            _slot: slot,
        };
        tokio::spawn(client.run(last_event_id));
        Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(self.keep_alive))
    }
}

/// One client's feed of its region's channel; the channel is dropped with its last one.
struct Subscription {
    hub: Hub,
    region: String,
    rx: Option<broadcast::Receiver<HubEvent>>,
}

impl Subscription {
    async fn recv(&mut self) -> Result<HubEvent, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut regions = self.hub.regions.lock().unwrap_or_else(|p| p.into_inner());
        // Under the lock, so that no subscriber comes between the drop and the check.
        drop(self.rx.take());
        if regions
            .get(&self.region)
            .is_some_and(|r| r.tx.receiver_count() == 0)
        {
            regions.remove(&self.region);
        }
        self.hub.metrics.stream_regions.set(regions.len() as i64);
    }
}

#[derive(serde::Deserialize)]
struct SeqOnly {
    region_seq: u64,
}

/// One SSE connection.
struct Client {
    hub: Hub,
    region: String,
    tx: mpsc::Sender<Result<Event, Infallible>>,
    last: u64,
    /// Held while the stream is open.
    _slot: Slot,
}

/// The client went away.
struct Gone;

impl Client {
    async fn run(mut self, last_event_id: Option<u64>) {
        let metrics = self.hub.metrics.clone();
        let shutdown = self.hub.shutdown.clone();
        let response = self.tx.clone();
        metrics.stream_clients.inc();
        tokio::select! {
            _ = self.serve(last_event_id) => {}
            // The response was dropped: the connection is gone. Without this the task would
            // wait for the region's next event, possibly forever.
            _ = response.closed() => {}
            // Dropping the sender ends the response; EventSource reconnects elsewhere.
            _ = shutdown.wait() => {}
        }
        metrics.stream_clients.dec();
    }

    async fn serve(&mut self, last_event_id: Option<u64>) -> Result<(), Gone> {
        // Subscribe before reading Redis, so nothing falls between the read and the feed.
        let mut rx = self.hub.subscribe(&self.region);
        match last_event_id {
            Some(id) if self.catch_up(id).await? => {}
            Some(_) => self.resync("last_event_id_too_old").await?,
            None => self.snapshot().await?,
        }
        loop {
            match rx.recv().await {
                Ok(HubEvent::Transition { region_seq, json }) => {
                    // Missed some: the log tells them, or a snapshot replaces them.
                    if region_seq > self.last + 1 && !self.catch_up(self.last).await? {
                        self.resync("gap").await?;
                    } else if region_seq == self.last + 1 {
                        self.send_transition(region_seq, &json).await?;
                    }
                }
                // The hub counted this one.
                Ok(HubEvent::Resync) => self.snapshot().await?,
                Err(broadcast::error::RecvError::Lagged(_)) => self.resync("lagged").await?,
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }

    /// A snapshot instead of the next event, counted by `reason`.
    async fn resync(&mut self, reason: &str) -> Result<(), Gone> {
        self.hub
            .metrics
            .stream_resyncs
            .with_label_values(&[reason])
            .inc();
        self.snapshot().await
    }

    /// Sends what the log holds after `after`. False when it cannot be told exactly.
    async fn catch_up(&mut self, after: u64) -> Result<bool, Gone> {
        match self.hub.store.replay(&self.region, after).await {
            Ok(Replay::Complete(events)) => {
                self.last = after;
                for (seq, json) in events {
                    self.send_transition(seq, &json).await?;
                }
                self.hub.seen(&self.region, self.last);
                Ok(true)
            }
            Ok(Replay::TooOld) => Ok(false),
            Err(e) => {
                self.hub.metrics.redis_errors.inc();
                tracing::warn!(region = %self.region, error = %e, "cannot read the replay log");
                Ok(false)
            }
        }
    }

    async fn snapshot(&mut self) -> Result<(), Gone> {
        let mut backoff = Duration::from_millis(100);
        let snapshot = loop {
            match self.hub.store.snapshot(&self.region).await {
                Ok(s) => break s,
                Err(e) => {
                    self.hub.metrics.redis_errors.inc();
                    tracing::warn!(region = %self.region, error = %e, "cannot read the region snapshot from Redis; retrying");
                    let retry = Event::default()
                        .event("unavailable")
                        .data("Redis is unreachable; the stream resumes by itself");
                    self.send(retry).await?;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        self.last = snapshot.region_seq;
        self.hub.seen(&self.region, snapshot.region_seq);
        let data = serde_json::to_string(&snapshot).unwrap_or_default();
        self.send(
            Event::default()
                .event("snapshot")
                .id(snapshot.region_seq.to_string())
                .data(data),
        )
        .await
    }

    async fn send_transition(&mut self, seq: u64, json: &str) -> Result<(), Gone> {
        self.last = seq;
        self.send(
            Event::default()
                .event("transition")
                .id(seq.to_string())
                .data(json),
        )
        .await
    }

    async fn send(&self, event: Event) -> Result<(), Gone> {
        self.tx.send(Ok(event)).await.map_err(|_| Gone)
    }
}
