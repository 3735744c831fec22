//! The Redis edge of the read side: what the notifier wrote (layout in
//! `presence_core::delivery`). Reads only; the gateway never writes to Redis.

use presence_core::delivery::RedisKeys;
use presence_core::records::FacilityStatus;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult};

/// A region as of one region sequence: every facility's newest transition.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Snapshot {
    pub region: String,
    pub region_seq: u64,
    pub online: usize,
    pub offline: usize,
    #[schema(value_type = Vec<crate::openapi::FacilityStatus>)]
    pub facilities: Vec<FacilityStatus>,
}

/// Events after a region sequence, when the replay log still holds all of them.
pub enum Replay {
    /// Every event after the asked-for sequence, in order (maybe none).
    Complete(Vec<(u64, String)>),
    /// The log no longer reaches back that far, or the sequence is from another life of
    /// Redis: the caller must start over from a snapshot.
    TooOld,
}

/// Connects on first use and reconnects by itself (the connection manager), so that the
/// gateway starts and takes heartbeats while Redis is down.
#[derive(Clone)]
pub struct Store {
    pub keys: RedisKeys,
    client: redis::Client,
    redis: std::sync::Arc<tokio::sync::Mutex<Option<ConnectionManager>>>,
}

/// Reads the sequence and the facilities in one atomic step, so that the snapshot is
/// exactly the state after `region_seq` and no event is both in it and after it.
const SNAPSHOT: &str = r"
return {redis.call('GET', KEYS[1]) or '0', redis.call('HVALS', KEYS[2])}
";

impl Store {
    pub fn new(
        redis: &presence_core::config::RedisConfig,
        keys: RedisKeys,
    ) -> Result<Store, String> {
        Ok(Store {
            keys,
            client: presence_core::delivery::redis_client(redis)?,
            redis: Default::default(),
        })
    }

    /// The client (with its TLS settings), for connections of another kind (pub/sub).
    pub fn client(&self) -> redis::Client {
        self.client.clone()
    }

    async fn conn(&self) -> RedisResult<ConnectionManager> {
        let mut guard = self.redis.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_secs(2))
            .set_response_timeout(std::time::Duration::from_secs(5))
            // redis 0.32 waits 1 s, then 100x longer (up to 60 s, plus jitter) between
            // attempts: a refused TLS handshake took minutes to report. At most 1 s apart.
            .set_max_delay(1000)
            .set_number_of_retries(2);
        let c = ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(presence_core::delivery::explain_redis_error)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    pub async fn snapshot(&self, region: &str) -> RedisResult<Snapshot> {
        let mut c = self.conn().await?;
        let (seq, values): (String, Vec<String>) = redis::Script::new(SNAPSHOT)
            .key(self.keys.region_seq(region))
            .key(self.keys.region_facilities(region))
            .invoke_async(&mut c)
            .await?;
        let mut facilities: Vec<FacilityStatus> = values
            .iter()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        facilities.sort_by(|a, b| a.facility_id.cmp(&b.facility_id));
        let online = facilities
            .iter()
            .filter(|f| f.status == presence_core::records::Status::Online)
            .count();
        Ok(Snapshot {
            region: region.to_string(),
            region_seq: seq.parse().unwrap_or(0),
            online,
            offline: facilities.len() - online,
            facilities,
        })
    }

    pub async fn region_seq(&self, region: &str) -> RedisResult<u64> {
        let mut c = self.conn().await?;
        let seq: Option<u64> = c.get(self.keys.region_seq(region)).await?;
        Ok(seq.unwrap_or(0))
    }

    /// The events after `after` up to the current sequence, if the log still has them all.
    pub async fn replay(&self, region: &str, after: u64) -> RedisResult<Replay> {
        let mut c = self.conn().await?;
        let (current, entries): (Option<u64>, Vec<(String, f64)>) = redis::pipe()
            .atomic()
            .get(self.keys.region_seq(region))
            .zrangebyscore_withscores(self.keys.region_log(region), format!("({after}"), "+inf")
            .query_async(&mut c)
            .await?;
        let current = current.unwrap_or(0);
        if after > current {
            return Ok(Replay::TooOld);
        }
        let events: Vec<(u64, String)> = entries.into_iter().map(|(m, s)| (s as u64, m)).collect();
        let contiguous = events
            .iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == after + 1 + i as u64);
        let reaches_now = events.last().map_or(after, |(s, _)| *s) == current;
        Ok(if contiguous && reaches_now {
            Replay::Complete(events)
        } else {
            Replay::TooOld
        })
    }

    pub async fn facility(&self, id: &str) -> RedisResult<Option<FacilityStatus>> {
        let mut c = self.conn().await?;
        let json: Option<String> = c.hget(self.keys.facility(id), "json").await?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    pub async fn regions(&self) -> RedisResult<Vec<String>> {
        let mut c = self.conn().await?;
        let mut r: Vec<String> = c.smembers(self.keys.regions()).await?;
        r.sort();
        Ok(r)
    }

    /// The region sequences of `regions`, in order (0 for a region never seen); one round
    /// trip, so that a watcher of many regions notices which moved.
    pub async fn region_seqs(&self, regions: &[String]) -> RedisResult<Vec<u64>> {
        if regions.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let keys: Vec<String> = regions.iter().map(|r| self.keys.region_seq(r)).collect();
        let seqs: Vec<Option<u64>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        Ok(seqs.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Whether the notifier has seen a transition of `region` (`<prefix>:regions`).
    pub async fn region_exists(&self, region: &str) -> RedisResult<bool> {
        let mut c = self.conn().await?;
        c.sismember(self.keys.regions(), region).await
    }

    pub async fn ping(&self) -> RedisResult<()> {
        let mut c = self.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(|_| ())
    }
}
