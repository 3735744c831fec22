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
//! | `region:<region>` | pub/sub channel | each applied transition, as [`Transition`] JSON |

use serde::{Deserialize, Serialize};

use crate::records::{FacilityStatus, Status};

/// A transition as JSON: on a region channel, in the replay log and in SSE events. Field
/// names are the Avro record's, plus the region sequence that orders a region's events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Per region, +1 per transition applied to Redis; 0 in stored facility state, which is
    /// not an event. Gaps in it are how a stream notices a lost pub/sub message.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub region_seq: u64,
    pub facility_id: String,
    pub region_id: String,
    pub status: Status,
    pub open_sessions: i32,
    /// Event time of the transition, ms since the epoch.
    pub since: i64,
    /// Per facility, +1 per transition.
    pub seq: i64,
    /// Wall-clock ms when the processor emitted it.
    pub emitted_at: i64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl From<&FacilityStatus> for Transition {
    fn from(s: &FacilityStatus) -> Self {
        Transition {
            region_seq: 0,
            facility_id: s.facility_id.clone(),
            region_id: s.region_id.clone(),
            status: s.status,
            open_sessions: s.open_sessions,
            since: s.since,
            seq: s.seq,
            emitted_at: s.emitted_at,
        }
    }
}

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
        assert_eq!(k.region_of_channel(&k.region_channel("eu:west")), Some("eu:west"));
        assert_eq!(k.region_of_channel("other:region:x"), None);
    }

    #[test]
    fn transition_json_carries_region_seq_only_on_events() {
        let mut t = Transition {
            region_seq: 0,
            facility_id: "f".into(),
            region_id: "r".into(),
            status: Status::Online,
            open_sessions: 2,
            since: 1,
            seq: 3,
            emitted_at: 4,
        };
        let stored = serde_json::to_string(&t).unwrap();
        assert!(!stored.contains("region_seq"));
        assert!(stored.starts_with("{\"facility_id\""), "the notifier prepends region_seq to this: {stored}");
        t.region_seq = 9;
        let event: Transition = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(event, t);
    }
}
