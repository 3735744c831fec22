//! The Redis edge. Key layout: `presence_core::delivery`.

use presence_core::config::Config;
use presence_core::delivery::RedisKeys;
use presence_core::downstream::{Received, WriteError, Writer};
use presence_core::records::FacilityStatus;
use redis::aio::ConnectionManager;

/// Applies a batch in one atomic step. ARGV: key prefix, replay log size, then per
/// transition: facility id, region, seq, JSON. Returns how many were newer than the stored
/// state (the rest are replays or out of order, and change nothing).
///
/// Keys are built inside the script from the prefix, so this needs a standalone Redis (or a
/// single-slot setup), not Redis Cluster.
///
/// `<prefix>:notifier:epoch` marks a Redis that holds the notifier's state. Missing (a
/// fresh or wiped Redis), the script sets it, applies nothing and returns -1: the notifier
/// then re-reads `facility-status` from the beginning.
const APPLY: &str = r#"
local p = ARGV[1]
local keep = tonumber(ARGV[2])
if redis.call('SET', p .. ':notifier:epoch', redis.call('TIME')[1], 'NX') then
  return -1
end
local applied = 0
for i = 3, #ARGV, 4 do
  local fid, region, seq, json = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local fkey = p .. ':facility:' .. fid
  local stored = redis.call('HMGET', fkey, 'seq', 'region')
  if not stored[1] or tonumber(stored[1]) < seq then
    if stored[2] and stored[2] ~= region then
      redis.call('HDEL', p .. ':region:' .. stored[2] .. ':facilities', fid)
    end
    local rseq = redis.call('INCR', p .. ':region:' .. region .. ':seq')
    local msg = '{"region_seq":' .. rseq .. ',' .. string.sub(json, 2)
    redis.call('HSET', fkey, 'seq', seq, 'region', region, 'json', json)
    redis.call('HSET', p .. ':region:' .. region .. ':facilities', fid, json)
    redis.call('SADD', p .. ':regions', region)
    local log = p .. ':region:' .. region .. ':log'
    redis.call('ZADD', log, rseq, msg)
    redis.call('ZREMRANGEBYRANK', log, 0, -(keep + 1))
    redis.call('PUBLISH', p .. ':region:' .. region, msg)
    applied = applied + 1
  end
end
return applied
"#;

pub struct RedisWriter {
    client: redis::Client,
    connection: Option<ConnectionManager>,
    keys: RedisKeys,
    replay_events: usize,
    script: redis::Script,
}

impl RedisWriter {
    pub fn new(config: &Config) -> anyhow::Result<RedisWriter> {
        let client =
            presence_core::delivery::redis_client(&config.redis).map_err(anyhow::Error::msg)?;
        Ok(RedisWriter {
            client,
            connection: None,
            keys: RedisKeys::new(&config.redis.key_prefix),
            replay_events: config.redis.replay_events,
            script: redis::Script::new(APPLY),
        })
    }

    /// Applies `transitions`; returns how many changed a facility's state, or -1 when Redis
    /// held no notifier state (nothing applied; everything must be read again).
    pub async fn apply(&mut self, transitions: &[&FacilityStatus]) -> redis::RedisResult<i64> {
        let connection = match &mut self.connection {
            Some(c) => c,
            None => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(std::time::Duration::from_secs(2))
                    .set_response_timeout(std::time::Duration::from_secs(5))
                    // redis 0.32 waits 1 s, then 100x longer (up to 60 s, plus jitter) between
                    // attempts: a refused TLS handshake took minutes to report. At most 1 s apart.
                    .set_max_delay(1000);
                let c = ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(presence_core::delivery::explain_redis_error)?;
                self.connection.insert(c)
            }
        };
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(&self.keys.prefix).arg(self.replay_events);
        for t in transitions {
            let json = serde_json::to_string(t).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::TypeError,
                    "transition to JSON",
                    e.to_string(),
                ))
            })?;
            invocation
                .arg(&t.facility_id)
                .arg(&t.region_id)
                .arg(t.seq)
                .arg(json);
        }
        invocation.invoke_async(connection).await
    }
}

impl Writer for RedisWriter {
    const DEPENDENCY: &'static str = "redis";

    async fn write(&mut self, batch: &[Received]) -> Result<(), WriteError> {
        let transitions: Vec<&FacilityStatus> = batch.iter().map(|r| &r.status).collect();
        match self.apply(&transitions).await {
            Ok(-1) => Err(WriteError::Rewind(
                "Redis holds no notifier state (new, or restarted without persistence)".into(),
            )),
            Ok(_) => Ok(()),
            // A key of another type where the script expects its own (WRONGTYPE) fails the
            // same way for the same facility or region every time; anything else (a lost
            // connection, a timeout, a busy, loading or full server) is retried.
            Err(e) if e.code() == Some("WRONGTYPE") => Err(WriteError::Refused {
                code: "redis_wrong_type",
                message: e.to_string(),
            }),
            Err(e) => Err(WriteError::Retry(e.to_string())),
        }
    }
}
