//! What leaves the pipeline and is read back by the gateway: the Redis layout the notifier
//! writes, the JSON of a transition on a region channel, and the PostgreSQL tables the sink
//! writes. Writers and readers are different processes; this is the one place both look.
//!
//! Redis (standalone; all names start with `<prefix>:`, default `presence:`):
//!
//! | name | type | content |
//! |---|---|---|
//! | `facility:<id>` | hash | `seq`, `region`, `json` (the facility's newest transition) |
//! | `region:<region>:facilities` | hash | facility id → its newest transition (JSON) |
//! | `region:<region>:seq` | string | region sequence: +1 per applied transition |
//! | `region:<region>:log` | sorted set | the newest transitions by region sequence, for replay |
//! | `regions` | set | every region seen |
//! | `region:<region>` | pub/sub channel | each applied transition (JSON, below) |
//!
//! Stored values are a `FacilityStatus` as JSON (its serde form, field names as in the Avro
//! schema, `facility_id` first). Events on a channel, in the log and in SSE are the same
//! JSON with `region_seq` in front: `{"region_seq":7,"facility_id":...}`. The region
//! sequence grows by one per transition applied to a region, so a gap in it is how a stream
//! notices a lost pub/sub message.

/// Names of every Redis key and channel, under one prefix.
#[derive(Debug, Clone)]
pub struct RedisKeys {
    pub prefix: String,
}

impl RedisKeys {
    pub fn new(prefix: &str) -> Self {
        RedisKeys {
            prefix: prefix.to_string(),
        }
    }
    pub fn facility(&self, id: &str) -> String {
        format!("{}:facility:{id}", self.prefix)
    }
    pub fn region_facilities(&self, region: &str) -> String {
        format!("{}:region:{region}:facilities", self.prefix)
    }
    pub fn region_seq(&self, region: &str) -> String {
        format!("{}:region:{region}:seq", self.prefix)
    }
    pub fn region_log(&self, region: &str) -> String {
        format!("{}:region:{region}:log", self.prefix)
    }
    pub fn regions(&self) -> String {
        format!("{}:regions", self.prefix)
    }
    pub fn region_channel(&self, region: &str) -> String {
        format!("{}:region:{region}", self.prefix)
    }
    /// PSUBSCRIBE pattern matching every region channel.
    pub fn channel_pattern(&self) -> String {
        format!("{}:region:*", self.prefix)
    }
    /// The region a channel name belongs to.
    pub fn region_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":region:")
    }
}

/// A PostgreSQL client for the sink's tables: connected within 5 s, its connection driven
/// by a task of its own. The error names the database (password redacted) and what failed.
pub async fn connect_postgres(url: &crate::Secret) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_postgres::connect(url.expose(), tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| format!("connecting to PostgreSQL at {url} timed out after 5 s"))?
    .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// The sink's tables, schema-qualified. `schema` is validated as an identifier by the config.
#[derive(Debug, Clone)]
pub struct Tables {
    pub schema: String,
}

impl Tables {
    pub fn new(schema: &str) -> Self {
        Tables {
            schema: schema.to_string(),
        }
    }
    /// One row per facility: its newest transition.
    pub fn current(&self) -> String {
        format!("\"{}\".facility_status", self.schema)
    }
    /// Every transition once, keyed by (facility_id, seq).
    pub fn history(&self) -> String {
        format!("\"{}\".facility_transitions", self.schema)
    }
    /// `online_seconds(facility, from, to)`: seconds ONLINE within [from, to).
    pub fn online_seconds(&self) -> String {
        format!("\"{}\".online_seconds", self.schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip_to_their_region() {
        let k = RedisKeys::new("t1");
        assert_eq!(
            k.region_of_channel(&k.region_channel("eu:west")),
            Some("eu:west")
        );
        assert_eq!(k.region_of_channel("other:region:x"), None);
    }

    #[test]
    fn stored_json_starts_with_facility_id_so_the_notifier_can_prepend_region_seq() {
        let t = crate::records::FacilityStatus {
            facility_id: "f".into(),
            region_id: "r".into(),
            status: crate::records::Status::Online,
            open_sessions: 2,
            since: 1,
            seq: 3,
            emitted_at: 4,
        };
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.starts_with("{\"facility_id\":\"f\""), "{json}");
    }
}
