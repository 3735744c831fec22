//! The regions at a glance: for every region the caller may see, its ONLINE/OFFLINE counts
//! now (Redis, as the notifier keeps them) and its uptime over the last 24 h (PostgreSQL,
//! `region_uptime`), worst first; `GET /v1/overview` once, `GET /v1/overview/stream` live
//! over one connection whatever the number of regions.
//!
//! A [`Watcher`] asks Redis every [`TICK`] for all region sequences in one round trip and
//! reads again only the regions whose sequence moved, so a quiet page of 50 regions costs
//! one `MGET` a second. The 24 h uptimes are recomputed every [`UPTIME_EVERY`]: they move
//! slowly, and the query reads every facility's spans.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use presence_core::now_ms;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::Grant;
use crate::caller::visible;
use crate::history::percent;
use crate::limits::Slot;
use crate::state::App;

/// How often a live overview looks for changes.
pub const TICK: Duration = Duration::from_secs(1);
/// How often the 24 h uptimes are recomputed.
pub const UPTIME_EVERY: Duration = Duration::from_secs(60);

/// One region now.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct RegionSummary {
    pub region: String,
    pub online: usize,
    pub offline: usize,
    /// 100 × ONLINE / known time of all its facilities over the last 24 h; `null` when
    /// PostgreSQL has no history of it (or cannot answer now).
    pub uptime_24h_percent: Option<f64>,
    /// The region sequence the counts reflect.
    pub region_seq: u64,
}

impl RegionSummary {
    /// OFFLINE facilities as a share of all, 0 for a region without facilities.
    pub fn offline_share(&self) -> f64 {
        let all = self.online + self.offline;
        if all == 0 {
            0.0
        } else {
            self.offline as f64 / all as f64
        }
    }
}

/// `GET /v1/overview` and each `overview` event of the stream.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// Worst first: by share OFFLINE, then OFFLINE count, then name.
    pub regions: Vec<RegionSummary>,
    /// When the 24 h uptimes were computed, ms since the epoch; `null` if they could not be.
    pub uptime_at: Option<i64>,
}

/// Worst first: the larger share OFFLINE, then more OFFLINE, then by name.
pub fn worst_first(regions: &mut [RegionSummary]) {
    regions.sort_by(|a, b| {
        b.offline_share()
            .total_cmp(&a.offline_share())
            .then(b.offline.cmp(&a.offline))
            .then(a.region.cmp(&b.region))
    });
}

/// Retry delay of the 24 h uptimes after PostgreSQL failed to give them.
const UPTIME_RETRY: Duration = Duration::from_secs(10);

/// Every region's 24 h uptime, computed at most once per [`UPTIME_EVERY`] per gateway
/// whatever the number of viewers (the query reads every transition of the last day: about
/// 5 s for 50,000 facilities flapping hourly on a loaded 2-core machine), then filtered per
/// caller. Only the first computation is waited for; later ones run in the background while
/// every overview keeps the previous value, so a live overview never stalls on it.
#[derive(Default)]
pub struct UptimeCache {
    value: std::sync::Mutex<Option<Cached>>,
    computing: std::sync::Arc<tokio::sync::Mutex<()>>,
}

#[derive(Clone)]
struct Cached {
    at: Instant,
    /// When it was computed (ms since the epoch) and the percentages; `None` after a failure.
    value: Option<(i64, BTreeMap<String, f64>)>,
}

impl Cached {
    fn fresh(&self) -> bool {
        let every = if self.value.is_some() {
            UPTIME_EVERY
        } else {
            UPTIME_RETRY
        };
        self.at.elapsed() < every
    }
}

impl UptimeCache {
    fn current(&self) -> Option<Cached> {
        self.value.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn store(&self, c: Cached) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    /// When the uptimes were computed and each region's, or `None` while PostgreSQL cannot
    /// give them.
    pub async fn get(&self, app: &App) -> Option<(i64, BTreeMap<String, f64>)> {
        match self.current() {
            None => {
                let _computing = self.computing.lock().await;
                if self.current().is_none() {
                    self.store(compute(app).await);
                }
            }
            Some(c) if !c.fresh() => {
                if let Ok(computing) = self.computing.clone().try_lock_owned() {
                    let app = app.clone();
                    tokio::spawn(async move {
                        let c = compute(&app).await;
                        app.0.uptime.store(c);
                        drop(computing);
                    });
                }
            }
            Some(_) => {}
        }
        self.current().and_then(|c| c.value)
    }
}

async fn compute(app: &App) -> Cached {
    let now = now_ms();
    let result = match app.0.store.regions().await {
        Ok(regions) => app
            .0
            .history
            .region_uptime(&regions, now - 86_400_000)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let value = match result {
        Ok(rows) => Some((
            now,
            rows.into_iter()
                .filter_map(|r| Some((r.region, percent(r.online_seconds, r.known_seconds)?)))
                .collect(),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "cannot compute the regions' 24 h uptime; the overview shows counts only until PostgreSQL answers (asked again in 10 s)");
            None
        }
    };
    Cached {
        at: Instant::now(),
        value,
    }
}

/// The overview of one caller, kept current by [`Watcher::refresh`].
pub struct Watcher {
    grant: Option<Grant>,
    regions: BTreeMap<String, RegionSummary>,
    uptime: BTreeMap<String, f64>,
    uptime_at: Option<i64>,
}

impl Watcher {
    pub fn new(grant: Option<Grant>) -> Watcher {
        Watcher {
            grant,
            regions: BTreeMap::new(),
            uptime: BTreeMap::new(),
            uptime_at: None,
        }
    }

    /// Reads what moved; true when the overview differs from the one before.
    pub async fn refresh(&mut self, app: &App) -> redis::RedisResult<bool> {
        let store = &app.0.store;
        let before = self.overview();
        let names = visible(self.grant.as_ref(), store.regions().await?);
        let seqs = store.region_seqs(&names).await?;
        self.regions.retain(|r, _| names.contains(r));
        for (name, seq) in names.iter().zip(seqs) {
            if self.regions.get(name).is_some_and(|r| r.region_seq == seq) {
                continue;
            }
            let s = store.snapshot(name).await?;
            self.regions.insert(
                name.clone(),
                RegionSummary {
                    region: name.clone(),
                    online: s.online,
                    offline: s.offline,
                    uptime_24h_percent: None,
                    region_seq: s.region_seq,
                },
            );
        }
        match app.0.uptime.get(app).await {
            Some((at, uptime)) => {
                self.uptime = uptime;
                self.uptime_at = Some(at);
            }
            None => {
                self.uptime.clear();
                self.uptime_at = None;
            }
        }
        Ok(self.overview() != before)
    }

    pub fn overview(&self) -> Overview {
        let mut regions: Vec<RegionSummary> = self
            .regions
            .values()
            .map(|r| RegionSummary {
                uptime_24h_percent: self.uptime.get(&r.region).copied(),
                ..r.clone()
            })
            .collect();
        worst_first(&mut regions);
        Overview {
            regions,
            uptime_at: self.uptime_at,
        }
    }
}

/// The live overview: an `overview` event now and on every change; `unavailable` while
/// Redis cannot answer. `slot` is held while the stream is open.
pub fn stream(app: App, grant: Option<Grant>, slot: Slot) -> impl axum::response::IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(8);
    let keep_alive = app.0.hub.keep_alive();
    tokio::spawn(async move {
        let _slot = slot;
        let shutdown = app.0.hub.shutdown();
        let metrics = app.0.metrics.clone();
        metrics.stream_clients.inc();
        let mut watcher = Watcher::new(grant);
        let mut first = true;
        loop {
            let event = match watcher.refresh(&app).await {
                Ok(changed) if changed || first => {
                    first = false;
                    let data = serde_json::to_string(&watcher.overview()).unwrap_or_default();
                    Some(Event::default().event("overview").data(data))
                }
                Ok(_) => None,
                Err(e) => {
                    metrics.redis_errors.inc();
                    tracing::warn!(error = %e, "cannot read the regions from Redis; the overview stream waits");
                    Some(
                        Event::default()
                            .event("unavailable")
                            .data("Redis is unreachable; the overview resumes by itself"),
                    )
                }
            };
            if let Some(event) = event {
                if tx.send(Ok(event)).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = tx.closed() => break,
                _ = shutdown.wait() => break,
            }
        }
        metrics.stream_clients.dec();
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(keep_alive))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str, online: usize, offline: usize) -> RegionSummary {
        RegionSummary {
            region: name.into(),
            online,
            offline,
            uptime_24h_percent: None,
            region_seq: 1,
        }
    }

    #[test]
    fn the_region_hurting_most_comes_first() {
        let mut r = vec![
            region("calm", 10, 0),
            region("half", 5, 5),
            region("empty", 0, 0),
            region("big-half", 50, 50),
            region("worst", 1, 9),
        ];
        worst_first(&mut r);
        let names: Vec<&str> = r.iter().map(|r| r.region.as_str()).collect();
        assert_eq!(names, ["worst", "big-half", "half", "calm", "empty"]);
    }
}
