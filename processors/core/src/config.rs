//! One typed configuration for every process.
//!
//! Sources, later ones winning: built-in defaults (the `Default` impls below, the only place
//! defaults live), then a TOML file (`--config FILE` or `PRESENCE_CONFIG`), then environment
//! variables (`KAFKA_BROKERS`, `REDIS_URL`, `DATABASE_URL`, `PRESENCE_<SECTION>__<KEY>` and
//! `KAFKA_PROPERTY_<NAME>` for librdkafka pass-through). Unknown keys are rejected, and every
//! invalid setting is reported at once, each with what to change.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A value that must never reach a log line: `Debug` and `Display` print a redacted form.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The real value, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// For URLs: the URL with its password replaced by `***`; anything else: `***`.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut url) if url.has_host() => {
                if url.password().is_some() {
                    let _ = url.set_password(Some("***"));
                }
                url.to_string()
            }
            _ => "***".to_string(),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.redacted())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub redis: RedisConfig,
    pub database: DatabaseConfig,
    pub processor: ProcessorConfig,
    pub gateway: GatewayConfig,
    pub notifier: NotifierConfig,
    pub sink: SinkConfig,
    pub telemetry: TelemetryConfig,
    /// `[schema_registry]`: see [`crate::registry::SchemaRegistryConfig`].
    pub schema_registry: crate::registry::SchemaRegistryConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list. Default `127.0.0.1:9092`, the local stack.
    pub brokers: String,
    /// Prefix of every client id, so broker logs and quotas can tell our clients apart.
    pub client_id: String,
    /// librdkafka settings passed through unchanged (SASL, TLS, tuning), e.g.
    /// `"security.protocol" = "SASL_SSL"`. Values are treated as secrets in logs.
    pub properties: BTreeMap<String, Secret>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "presence".into(),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub heartbeats: String,
    pub facility_status: String,
    pub dead_letters: String,
    /// Every internal topic (repartition, changelogs) starts with this, so operators can
    /// tell them apart. Default `presence.internal.`.
    pub internal_prefix: String,
    /// Default 12. More partitions allow more processor instances; changing it on a live
    /// topic moves sessions between partitions, so it is fixed once created.
    pub heartbeats_partitions: i32,
    /// How long raw heartbeats are kept. Default 24 h: enough to replay a day's outage.
    #[serde(with = "humantime_serde")]
    pub heartbeats_retention: Duration,
    /// Partitions of `facility-status` and of the facility-keyed internal topics. Default 6.
    pub facility_partitions: i32,
    /// Default 1, the local single node. Use 3 on a real cluster.
    pub replication_factor: i32,
    /// How long a dead letter is kept. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub dead_letters_retention: Duration,
    /// Longest time a record of a compacted topic stays in the active segment, uncompacted.
    /// Default 10 min, so compaction really happens on small topics.
    #[serde(with = "humantime_serde")]
    pub compacted_segment: Duration,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            heartbeats: "heartbeats".into(),
            facility_status: "facility-status".into(),
            dead_letters: "heartbeats.dlq".into(),
            internal_prefix: "presence.internal.".into(),
            heartbeats_partitions: 12,
            heartbeats_retention: Duration::from_secs(24 * 3600),
            facility_partitions: 6,
            replication_factor: 1,
            dead_letters_retention: Duration::from_secs(7 * 24 * 3600),
            compacted_segment: Duration::from_secs(600),
        }
    }
}

impl TopicsConfig {
    /// Session transitions re-keyed by facility: stage 1 writes, stage 2 reads.
    pub fn session_transitions(&self) -> String {
        format!("{}session-transitions", self.internal_prefix)
    }
    /// Stage 1 state (open sessions), compacted, keyed by session id.
    pub fn sessions_changelog(&self) -> String {
        format!("{}sessions-changelog", self.internal_prefix)
    }
    /// Stage 2 state (open-session counts, last status, seq), compacted, keyed by facility.
    pub fn facilities_changelog(&self) -> String {
        format!("{}facilities-changelog", self.internal_prefix)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Default `redis://127.0.0.1:6379`.
    pub url: Secret,
    /// Every key and channel starts with `<key_prefix>:` (README, "Redis"). Default `presence`.
    pub key_prefix: String,
    /// Transitions kept per region for SSE clients that reconnect with `Last-Event-ID`;
    /// a client further behind gets a fresh snapshot. Default 1000.
    pub replay_events: usize,
    /// With a `rediss://` URL: PEM file of the CA that signed the server's certificate.
    /// Unset: the system's trusted roots. The host in the URL must be in the certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// With a `rediss://` URL, for servers that ask for client certificates
    /// (`tls-auth-clients yes`): PEM certificate and its private key, both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: Secret::new("redis://127.0.0.1:6379"),
            key_prefix: "presence".into(),
            replay_events: 1000,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Default the local stack's `postgres://presence:presence@127.0.0.1:5432/presence`.
    pub url: Secret,
    /// Schema that holds the sink's tables. Default `presence`.
    pub schema: String,
    /// PEM file of the CA that signed the server's certificate (libpq's `sslrootcert`, which
    /// the URL may carry instead). With it, `sslmode` defaults to `verify-full`; without,
    /// to `prefer` (`presence_core::tls` has what each mode checks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// For servers that ask for client certificates: PEM certificate and its private key
    /// (libpq's `sslcert`/`sslkey`), both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: Secret::new("postgres://presence:presence@127.0.0.1:5432/presence"),
            schema: "presence".into(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// Sessions close this long after their last beat. Default 90 s, three missed beats.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// OFFLINE is held back this long and dropped if a session reopens meanwhile.
    /// Default 0 (off).
    #[serde(with = "humantime_serde")]
    pub flap_hold: Duration,
    /// How often the open transaction is committed. Default 100 ms: the latency floor.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Consumer group prefix shared by all processor instances: stage 1 joins
    /// `<group_id>.sessions`, stage 2 `<group_id>.facilities`. Default `presence-processor`.
    pub group_id: String,
    /// Names this instance's transactional producers (`<group_id>.<stage>.<instance_id>`):
    /// a restarted instance with the same id aborts its predecessor's open transaction at
    /// once. Unique per running instance. Default: the host name.
    pub instance_id: String,
    /// A heartbeat stamped further ahead of the processor's clock than this goes to the
    /// dead-letter topic, so one bad clock cannot expire a partition's sessions. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// How far behind the wall clock a caught-up partition's expiry clock runs, so that a
    /// beat still on its way (stamped by its producer, not yet fetched: producer linger,
    /// the broker's append, the fetch; on a loaded host, scheduling) counts at its own
    /// time. A session's first beat that arrives later than this opens at the clock's
    /// time instead, which can flap its facility if another session closed in between.
    /// It delays offline detection by as much. Default 100ms: tens of times the in-flight
    /// time on an idle host, and within the second of the deadline that DESIGN.md promises.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Stage 2 applies session events in time order once every heartbeats partition's
    /// watermark has passed them; while one stands still (its stage-1 owner is slow or gone),
    /// each facilities partition keeps at most this many events in memory (about 100 bytes
    /// each) and reads the rest again from Kafka later. Default 500000.
    pub max_buffered_events: usize,
    /// Stage 2 keeps every facility's last `seq` so that its next transition is `seq + 1`.
    /// A facility OFFLINE with no open session and no flap hold pending whose last change is
    /// older than this (in event time, the partition's watermark) moves from memory to a
    /// store on disk under `state_dir`; an event for it brings it back, `seq` and all.
    /// Default 24h; `"off"` (or 0) keeps every facility in memory.
    #[serde(with = "retention_serde")]
    pub facility_retention: Duration,
    /// Stage-1 partitions restored at once when this instance is given several (its start, a
    /// takeover, a rewind after an abort). Each one restoring adds up to about 30 MiB while
    /// it runs (the re-read beats it holds ahead of its changelog, two restore consumers'
    /// queues). Default 0: two per core, at most 4.
    pub restore_concurrency: usize,
    /// When the processor stops cleanly (SIGTERM), stage 1 writes each partition's open
    /// sessions to `<state_dir>/<group_id>.<instance>/sessions-<partition>.snapshot` (28 bytes
    /// a session), and the next start of the same instance loads a partition from its file
    /// instead of reading its changelog, if the partition is still at the committed point
    /// the file was written at (a warm restart). Default true; false writes and reads none.
    pub shutdown_snapshots: bool,
    /// Where stage 2 keeps those facilities: one file per partition in
    /// `<state_dir>/<group_id>.<instance>/`, a cache of the facilities changelog (emptied
    /// and rebuilt when the partition is assigned, deleted when it goes), created at start;
    /// and where stage 1 keeps its shutdown snapshots (`shutdown_snapshots`).
    /// Needs a writable local disk. Default `<system temp dir>/presence-state`.
    pub state_dir: PathBuf,
    /// Where `/metrics`, `/healthz` and `/readyz` are served. Default 127.0.0.1:9101.
    pub ops_listen: SocketAddr,
}

/// `processor.facility_retention`: a duration (`24h`, `90m`) or `off`; `0` is off too.
mod retention_serde {
    use std::time::Duration;

    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.is_zero() {
            s.serialize_str("off")
        } else {
            s.serialize_str(&humantime::format_duration(*d).to_string())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"24h\", or \"off\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                match v.trim() {
                    "off" | "0" => Ok(Duration::ZERO),
                    t => humantime::parse_duration(t).map_err(|e| {
                        E::custom(format!(
                            "processor.facility_retention = '{v}' is not a duration ({e}): use e.g. \"24h\", or \"off\""
                        ))
                    }),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                if v == 0 {
                    Ok(Duration::ZERO)
                } else {
                    Err(E::custom(format!(
                        "processor.facility_retention = {v} has no unit: use e.g. \"24h\", or \"off\""
                    )))
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                self.visit_i64(v.min(i64::MAX as u64) as i64)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            session_timeout: Duration::from_secs(90),
            flap_hold: Duration::ZERO,
            commit_interval: Duration::from_millis(100),
            group_id: "presence-processor".into(),
            instance_id: String::new(),
            max_clock_skew: Duration::from_secs(60),
            allowed_lateness: Duration::from_millis(100),
            max_buffered_events: 500_000,
            facility_retention: Duration::from_secs(24 * 3600),
            restore_concurrency: 0,
            shutdown_snapshots: true,
            state_dir: std::env::temp_dir().join("presence-state"),
            ops_listen: ([127, 0, 0, 1], 9101).into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The public HTTP port (heartbeats, streams, reads, dashboard, `/healthz`). Default
    /// 127.0.0.1:8080. Anywhere but loopback it needs `auth` other than `none`, or
    /// `allow_anonymous = true`.
    pub listen: SocketAddr,
    /// `none` (local use: ids come from the body) or `jwt` (tokens whose claims say who the
    /// caller is: HS256 with `jwt_secret`, or an identity provider's via `jwks_*` below).
    /// Default `none`.
    pub auth: AuthMode,
    /// The HS256 key tokens are signed with, at least 32 bytes. With `auth = "jwt"`, this or
    /// a JWKS (`jwks_file`/`jwks_url`) is required.
    pub jwt_secret: Secret,
    /// Clock skew tolerated on a token's `exp`/`nbf`. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// Browser origins that may call the API (`https://app.example.com`), comma-separated in
    /// the environment; `*` allows any. Default: none (same-origin only).
    #[serde(deserialize_with = "list_or_csv")]
    pub cors_origins: Vec<String>,
    /// Largest request body. Default 256 KiB.
    pub max_body_bytes: usize,
    /// Most heartbeats in one batch request. Default 500.
    pub max_batch: usize,
    /// How long a request waits for the broker's acknowledgement before it is answered 503.
    /// Default 5 s.
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// Records the producer may hold unacknowledged; beyond that requests get 503.
    /// Default 200000.
    pub max_in_flight: usize,

    // Identity providers and stream tickets (with `auth = "jwt"`). Empty strings are "not set".
    /// A JWKS file (`{"keys": [...]}`) of the identity provider's public keys: RS256, ES256
    /// and EdDSA tokens name theirs by `kid`. Re-read like a URL (below). Default none.
    pub jwks_file: String,
    /// The identity provider's JWKS URL (`https://idp.example.com/.well-known/jwks.json`),
    /// fetched on the first token and cached. Only https. Default none.
    pub jwks_url: String,
    /// A PEM file of CA certificates trusted for `jwks_url` besides the system's (a private
    /// identity provider). Default none.
    pub jwks_ca_file: String,
    /// Keys are fetched again when a token names an unknown `kid`, at most once per this
    /// interval (an attacker's made-up kids cannot hammer the provider). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_min: Duration,
    /// Cached keys older than this are fetched again, so a withdrawn key stops working
    /// without a new kid appearing. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub jwks_max_age: Duration,
    /// The `iss` every token must carry. Default none (not checked).
    pub jwt_issuer: String,
    /// The `aud` every token must carry (one of them, when `aud` is a list). Default none.
    pub jwt_audience: String,
    /// Longest token lifetime accepted: `exp - iat`, or `exp - now` without `iat`; a token
    /// valid longer is refused, so a leaked one is not good for months. 0 = no limit.
    /// Default 24 h.
    #[serde(with = "humantime_serde")]
    pub jwt_max_lifetime: Duration,
    /// How long a stream ticket (`POST /v1/stream-tickets`) may be used to open a stream.
    /// The stream itself lasts until the token behind the ticket expires. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub stream_ticket_ttl: Duration,
    /// The key stream tickets are signed with, at least 32 bytes. Default: random at each
    /// start, which is right for one gateway; set the same value on gateways that share a
    /// load balancer, so a ticket from one opens a stream on another.
    pub ticket_secret: Secret,

    // --- Exposure and resource bounds of the public listener (issue #10, item 5). What
    // each defends: README, "Security". Checked in `gateway_bounds_problems`.
    /// `auth = "none"` on a non-loopback `listen` is refused unless this is true: anyone who
    /// can reach the port could then report presence for any facility and watch any region.
    /// Default false.
    pub allow_anonymous: bool,
    /// Where `/metrics` and `/readyz` (and `/healthz`) are served, apart from the public
    /// port so that internals are not published with it. Default 127.0.0.1:9104.
    pub ops_listen: SocketAddr,
    /// A client must send a request's whole header within this, counted from when the
    /// connection opened or its previous response ended; else the connection is closed
    /// (slowloris). So a keep-alive connection idle this long between requests is closed
    /// too. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no bytes moving in either direction for this long is closed, even
    /// in the middle of a response: a stream whose client stopped reading (its socket
    /// buffers full), a response that cannot be written. Longer than `produce_timeout` and
    /// `stream_keep_alive`, so that neither a request waiting for the broker nor a quiet
    /// stream counts as idle. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest request line plus headers; a connection's read buffer never grows beyond
    /// it, so `max_connections` of them bound the memory slow senders can pin. Browsers send
    /// a few KiB. Default 64 KiB.
    pub max_header_bytes: usize,
    /// A request body must arrive whole within this (408 otherwise). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Open TCP connections; more are closed at once and counted. Each costs a task and
    /// buffers (a few KiB). Default 20000.
    pub max_connections: usize,
    /// A comment line sent on every quiet stream this often, so that a gone client is
    /// noticed by a failing write within about two intervals and its stream freed.
    /// Default 15 s.
    #[serde(with = "humantime_serde")]
    pub stream_keep_alive: Duration,
    /// Open streams in total; beyond it 503 with Retry-After. Default 10000.
    pub max_streams: usize,
    /// Open streams per token subject; beyond it 429 with Retry-After. A dashboard opens one
    /// per region it shows, a few tabs a few more. Not applied with `auth = "none"`, where
    /// there is no identity. Default 16.
    pub max_streams_per_identity: usize,
    /// Heartbeats per minute one identity (the token's subject; with `auth = "none"`, the
    /// body's user id) may send on average; beyond it 429 with Retry-After. A browser beats
    /// twice a minute; a user with a dozen tabs stays far below. Default 120.
    pub ingest_per_minute: u32,
    /// Heartbeats one identity may send at once before `ingest_per_minute` applies (a batch, tabs
    /// opened together, a reconnect). Default 30.
    pub ingest_burst: u32,
    /// Identities whose rate is tracked at once; an identity idle long enough to have a full
    /// burst again is forgotten. Beyond it new identities get 503 (the table is full, memory
    /// stays bounded). Default 200000.
    pub ingest_identities: usize,
    /// Widest `from`..`to` a history request may ask for; wider is a 400 naming `to`.
    /// Default 31 days.
    #[serde(with = "humantime_serde")]
    pub history_max_range: Duration,
    /// PostgreSQL cancels a history query running longer than this (`statement_timeout`),
    /// so that one expensive range cannot hold a connection. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub history_statement_timeout: Duration,
    /// PostgreSQL connections for history reads; a request waits up to
    /// `history_statement_timeout` for one, then 503. Default 4.
    pub history_pool_size: usize,
    // --- end of bounds
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: ([127, 0, 0, 1], 8080).into(),
            auth: AuthMode::None,
            jwt_secret: Secret::default(),
            jwt_leeway: Duration::from_secs(5),
            cors_origins: Vec::new(),
            max_body_bytes: 256 * 1024,
            max_batch: 500,
            produce_timeout: Duration::from_secs(5),
            max_in_flight: 200_000,

            jwks_file: String::new(),
            jwks_url: String::new(),
            jwks_ca_file: String::new(),
            jwks_refresh_min: Duration::from_secs(30),
            jwks_max_age: Duration::from_secs(600),
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            jwt_max_lifetime: Duration::from_secs(24 * 3600),
            stream_ticket_ttl: Duration::from_secs(60),
            ticket_secret: Secret::default(),
            // --- bounds
            allow_anonymous: false,
            ops_listen: ([127, 0, 0, 1], 9104).into(),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            body_read_timeout: Duration::from_secs(10),
            max_connections: 20_000,
            stream_keep_alive: Duration::from_secs(15),
            max_streams: 10_000,
            max_streams_per_identity: 16,
            ingest_per_minute: 120,
            ingest_burst: 30,
            ingest_identities: 200_000,
            history_max_range: Duration::from_secs(31 * 24 * 3600),
            history_statement_timeout: Duration::from_secs(5),
            history_pool_size: 4,
            // --- end of bounds
        }
    }
}

impl GatewayConfig {
    /// The rules of the gateway's exposure and resource bounds.
    fn bounds_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.auth == AuthMode::None && !self.listen.ip().is_loopback() && !self.allow_anonymous {
            p.push(format!(
                "gateway.listen = {} is not a loopback address and gateway.auth = \"none\": anyone who reaches it could report presence for any facility and watch every region. Set gateway.auth = \"jwt\" with gateway.jwt_secret, or listen on 127.0.0.1, or set gateway.allow_anonymous = true (PRESENCE_GATEWAY__ALLOW_ANONYMOUS=true) to accept that",
                self.listen
            ));
        }
        if self.ops_listen.port() != 0 && self.ops_listen == self.listen {
            p.push(format!(
                "gateway.ops_listen and gateway.listen are both {}: metrics and readiness need a port of their own (default 127.0.0.1:9104)",
                self.listen
            ));
        }
        for (key, d, min, max) in [
            (
                "gateway.header_read_timeout",
                self.header_read_timeout,
                1,
                300,
            ),
            ("gateway.idle_timeout", self.idle_timeout, 1, 3600),
            ("gateway.body_read_timeout", self.body_read_timeout, 1, 300),
            ("gateway.stream_keep_alive", self.stream_keep_alive, 1, 300),
            (
                "gateway.history_statement_timeout",
                self.history_statement_timeout,
                1,
                600,
            ),
        ] {
            if d < Duration::from_secs(min) || d > Duration::from_secs(max) {
                p.push(format!("{key} = {d:?}: use {min}s to {max}s"));
            }
        }
        if self.idle_timeout <= self.produce_timeout || self.idle_timeout <= self.stream_keep_alive
        {
            p.push(format!(
                "gateway.idle_timeout = {:?} must be longer than gateway.produce_timeout ({:?}) and gateway.stream_keep_alive ({:?}), or waiting requests and quiet streams are cut",
                self.idle_timeout, self.produce_timeout, self.stream_keep_alive
            ));
        }
        if self.history_max_range < Duration::from_secs(60) {
            p.push(format!(
                "gateway.history_max_range = {:?}: use at least 1m (default 31days)",
                self.history_max_range
            ));
        }
        if !(8192..=1024 * 1024).contains(&self.max_header_bytes) {
            p.push(format!(
                "gateway.max_header_bytes = {}: use 8192 to 1048576 (default 65536)",
                self.max_header_bytes
            ));
        }
        for (key, n, max) in [
            ("gateway.max_connections", self.max_connections, 10_000_000),
            ("gateway.max_streams", self.max_streams, 10_000_000),
            (
                "gateway.max_streams_per_identity",
                self.max_streams_per_identity,
                100_000,
            ),
            (
                "gateway.ingest_identities",
                self.ingest_identities,
                100_000_000,
            ),
            ("gateway.history_pool_size", self.history_pool_size, 256),
            (
                "gateway.ingest_burst",
                self.ingest_burst as usize,
                1_000_000,
            ),
            (
                "gateway.ingest_per_minute",
                self.ingest_per_minute as usize,
                60_000_000,
            ),
        ] {
            if n == 0 || n > max {
                p.push(format!("{key} = {n}: use 1 to {max}"));
            }
        }
        p
    }

    /// The rules of the identity block (tokens, JWKS, tickets).
    fn identity_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let secret = self.jwt_secret.expose();
        let jwks = !self.jwks_file.is_empty() || !self.jwks_url.is_empty();
        if self.auth == AuthMode::Jwt && secret.is_empty() && !jwks {
            p.push("gateway.auth = \"jwt\" needs a key: gateway.jwt_secret (PRESENCE_GATEWAY__JWT_SECRET, HS256, at least 32 bytes: `openssl rand -base64 48`) and/or gateway.jwks_file or gateway.jwks_url (the identity provider's public keys)".into());
        }
        if !secret.is_empty() && secret.len() < 32 {
            p.push("gateway.jwt_secret is shorter than 32 bytes: generate one with `openssl rand -base64 48`".into());
        }
        if self.auth == AuthMode::None && (jwks || !secret.is_empty()) {
            p.push("gateway.jwt_secret/jwks_file/jwks_url are set but gateway.auth = \"none\": set gateway.auth = \"jwt\" or remove them".into());
        }
        if !self.jwks_file.is_empty() && !self.jwks_url.is_empty() {
            p.push("gateway.jwks_file and gateway.jwks_url are both set: keep one".into());
        }
        if !self.jwks_url.is_empty() {
            match url::Url::parse(&self.jwks_url) {
                Ok(u) if u.scheme() == "https" && u.has_host() => {}
                _ => p.push(format!("gateway.jwks_url '{}' is not an https URL: the keys that vouch for every token must not travel in clear", self.jwks_url)),
            }
        }
        if !self.jwks_ca_file.is_empty() && self.jwks_url.is_empty() {
            p.push(
                "gateway.jwks_ca_file is set without gateway.jwks_url: remove it or set the URL"
                    .into(),
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.jwks_refresh_min) {
            p.push(format!(
                "gateway.jwks_refresh_min = {:?}: use 1s to 1h (default 30s)",
                self.jwks_refresh_min
            ));
        }
        if self.jwks_max_age < self.jwks_refresh_min {
            p.push(format!("gateway.jwks_max_age = {:?} is below gateway.jwks_refresh_min: use at least that (default 10m)", self.jwks_max_age));
        }
        if !self.jwt_max_lifetime.is_zero() && self.jwt_max_lifetime < Duration::from_secs(60) {
            p.push(format!(
                "gateway.jwt_max_lifetime = {:?}: use at least 1m, or 0 for no limit (default 24h)",
                self.jwt_max_lifetime
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.stream_ticket_ttl) {
            p.push(format!(
                "gateway.stream_ticket_ttl = {:?}: use 1s to 10m (default 60s)",
                self.stream_ticket_ttl
            ));
        }
        let ticket = self.ticket_secret.expose();
        if !ticket.is_empty() && ticket.len() < 32 {
            p.push("gateway.ticket_secret is shorter than 32 bytes: generate one with `openssl rand -base64 48`, or leave it empty for a random key per start".into());
        }
        p
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    None,
    Jwt,
}

/// A list from TOML, or a comma-separated string from the environment.
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::Csv(s) => s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect(),
    })
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifierConfig {
    /// Default `presence-notifier`.
    pub group_id: String,
    /// Default 127.0.0.1:9102.
    pub ops_listen: SocketAddr,
    /// Transitions applied to Redis in one pipeline. Default 500.
    pub batch_size: usize,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            group_id: "presence-notifier".into(),
            ops_listen: ([127, 0, 0, 1], 9102).into(),
            batch_size: 500,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Default `presence-sink`.
    pub group_id: String,
    /// Default 127.0.0.1:9103.
    pub ops_listen: SocketAddr,
    /// Transitions written to PostgreSQL in one batch (a transaction per connection).
    /// Default 20,000: under a backlog, fewer WAL flushes and statements per transition, and
    /// a facility's several transitions in one batch move its current row once. 5,000 wrote
    /// 77 k/s and 20,000 94 k/s under `presence bench sink`; 50,000 no faster than 20,000,
    /// with more memory (README, Benchmarks).
    pub batch_size: usize,
    /// How long a partial batch may wait for more transitions. Default 50 ms.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            group_id: "presence-sink".into(),
            ops_listen: ([127, 0, 0, 1], 9103).into(),
            batch_size: 20_000,
            batch_linger: Duration::from_millis(50),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` for people, `json` for log pipelines. Default `text`.
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info,presence_processor=debug`. Default `info`.
    pub log_filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Text,
            log_filter: "info".into(),
        }
    }
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config or PRESENCE_CONFIG")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// librdkafka settings that presence sets itself; setting them by pass-through would break a
/// guarantee (exactly-once, ordering) or conflict with a typed setting.
const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "set kafka.brokers or KAFKA_BROKERS instead",
    ),
    (
        "metadata.broker.list",
        "set kafka.brokers or KAFKA_BROKERS instead",
    ),
    ("client.id", "set kafka.client_id instead"),
    ("group.id", "set <process>.group_id instead"),
    (
        "transactional.id",
        "presence derives transactional ids itself",
    ),
    (
        "enable.idempotence",
        "presence always enables idempotence where it produces",
    ),
    (
        "enable.auto.commit",
        "presence commits offsets itself, after the work is durable",
    ),
    ("enable.auto.offset.store", "presence stores offsets itself"),
    ("isolation.level", "presence always reads read_committed"),
    ("acks", "presence always produces with acks=all"),
];

impl Config {
    /// Defaults, then `path` (if any), then the process environment; validated.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(path, &vars)
    }

    /// As [`Config::load`], with the environment passed in (tests).
    pub fn load_from(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut doc = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    ConfigError::Invalid(vec![format!(
                        "{}: not valid TOML: {}",
                        p.display(),
                        e.message()
                    )])
                })?
            }
            None => toml::Table::new(),
        };
        let mut errors = Vec::new();
        apply_env(&mut doc, env, &mut errors);
        let config: Config = match toml::Value::Table(doc).try_into() {
            Ok(c) => c,
            Err(e) => {
                errors.push(describe_toml_error(&e));
                return Err(ConfigError::Invalid(errors));
            }
        };
        errors.extend(config.problems());
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The config with every topic, consumer group, Redis key prefix and database schema
    /// renamed under `id`, and every listener on port 0: a pipeline of its own beside any
    /// other on the same cluster (tests, benchmarks).
    pub fn isolated(&self, id: &str) -> Config {
        let mut c = self.clone();
        c.topics.heartbeats = format!("{id}-heartbeats");
        c.topics.facility_status = format!("{id}-facility-status");
        c.topics.dead_letters = format!("{id}-heartbeats.dlq");
        c.topics.internal_prefix = format!("{id}.internal.");
        c.processor.group_id = format!("{id}-processor");
        c.notifier.group_id = format!("{id}-notifier");
        c.sink.group_id = format!("{id}-sink");
        c.database.schema = id.replace(['-', '.'], "_").to_ascii_lowercase();
        c.redis.key_prefix = id.to_string();
        for addr in [
            &mut c.gateway.listen,
            &mut c.gateway.ops_listen,
            &mut c.processor.ops_listen,
            &mut c.notifier.ops_listen,
            &mut c.sink.ops_listen,
        ] {
            addr.set_port(0);
        }
        c
    }

    /// The config with every secret replaced by its redacted form, for printing
    /// (`presence check-config`): URL passwords, Kafka properties, the token key.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.redis.url = Secret::new(c.redis.url.redacted());
        c.database.url = Secret::new(c.database.url.redacted());
        for v in c.kafka.properties.values_mut() {
            *v = Secret::new("***");
        }
        if !c.gateway.jwt_secret.expose().is_empty() {
            c.gateway.jwt_secret = Secret::new("***");
        }
        if !c.gateway.ticket_secret.expose().is_empty() {
            c.gateway.ticket_secret = Secret::new("***");
        }
        c.schema_registry = c.schema_registry.redacted();
        c
    }

    /// Every rule the typed fields cannot express; empty when the config is usable. Each
    /// section checks its own fields ([`KafkaConfig::problems`] and the others); what spans
    /// sections (consumer groups, ports) is checked here.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.kafka.problems();
        p.extend(self.redis.problems());
        p.extend(self.database.problems());
        p.extend(self.topics.problems());
        p.extend(self.processor.problems());
        p.extend(self.gateway.problems());
        p.extend(self.notifier.problems());
        p.extend(self.sink.problems());
        p.extend(self.telemetry.problems());
        p.extend(self.schema_registry.problems());
        p.extend(self.cross_section_problems());
        p
    }

    /// Rules between sections: the two delivery groups, and one port per listener.
    fn cross_section_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.notifier.group_id == self.sink.group_id {
            p.push("notifier.group_id and sink.group_id are equal: they must be two groups so that a slow database never delays browsers".into());
        }
        let mut ports: BTreeMap<SocketAddr, &str> = BTreeMap::new();
        for (key, addr) in [
            ("gateway.listen", self.gateway.listen),
            ("gateway.ops_listen", self.gateway.ops_listen),
            ("processor.ops_listen", self.processor.ops_listen),
            ("notifier.ops_listen", self.notifier.ops_listen),
            ("sink.ops_listen", self.sink.ops_listen),
        ] {
            if addr.port() == 0 {
                continue;
            }
            if let Some(other) = ports.insert(addr, key) {
                p.push(format!(
                    "{key} and {other} are both {addr}: give each process its own port"
                ));
            }
        }
        p
    }
}

/// `key = n` must be 1 to `max`.
fn count_problems(p: &mut Vec<String>, counts: &[(&str, usize, usize)]) {
    for &(key, n, max) in counts {
        if n == 0 || n > max {
            p.push(format!("{key} = {n}: use 1 to {max}"));
        }
    }
}

/// `name` (its key and value for the message) must be a URL with one of `schemes`.
fn url_problems(p: &mut Vec<String>, name: &str, url: &Secret, schemes: &[&str]) {
    match url::Url::parse(url.expose()) {
        Ok(u) if schemes.contains(&u.scheme()) => {}
        Ok(u) => p.push(format!(
            "{name} has scheme '{}': use {}://",
            u.scheme(),
            schemes[0]
        )),
        Err(e) => p.push(format!(
            "{name} '{}' is not a URL ({e}): use {}://host:port",
            url.redacted(),
            schemes[0]
        )),
    }
}

impl KafkaConfig {
    /// Asks librdkafka whether it knows every pass-through property and accepts its value,
    /// without connecting. The message names the key but never the value (it may be a
    /// password). Here rather than in `kafka`, which builds on this module, so that the two
    /// do not import each other.
    pub fn check_properties(&self) -> Result<(), String> {
        let mut c = rdkafka::config::ClientConfig::new();
        for (key, value) in &self.properties {
            c.set(key, value.expose());
        }
        match c.create_native_config() {
            Ok(_) => Ok(()),
            Err(rdkafka::error::KafkaError::ClientConfig(_, desc, key, _value)) => Err(format!(
                "kafka.properties.\"{key}\" is rejected by librdkafka ({desc}); see librdkafka's CONFIGURATION.md for valid keys and values"
            )),
            Err(e) => Err(format!(
                "kafka.properties are rejected by librdkafka: {}",
                e.rdkafka_error_code().map(|c| c.to_string()).unwrap_or_default()
            )),
        }
    }

    /// Brokers as host:port, and pass-through properties that do not fight ours.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            p.push("kafka.brokers is empty: set KAFKA_BROKERS to host:port[,host:port]".into());
        }
        for broker in self
            .brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
        {
            let ok = broker
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                p.push(format!("kafka.brokers entry '{broker}' is not host:port: write it as e.g. 127.0.0.1:9092"));
            }
        }
        for (key, why) in MANAGED_KAFKA_PROPERTIES {
            if self.properties.contains_key(*key) {
                p.push(format!(
                    "kafka.properties.\"{key}\" cannot be passed through: {why}"
                ));
            }
        }
        if let Err(e) = self.check_properties() {
            p.push(e);
        }
        p
    }
}

impl RedisConfig {
    /// The URL, TLS settings and files, the replay log's size and the key prefix.
    pub fn problems(&self) -> Vec<String> {
        use crate::tls::{file_problems, PemKind};
        let mut p = Vec::new();
        url_problems(
            &mut p,
            "redis.url (REDIS_URL)",
            &self.url,
            &["redis", "rediss"],
        );
        p.extend(crate::tls::redis_problems(self));
        p.extend(file_problems(&[
            ("redis.ca_file", self.ca_file.as_deref(), PemKind::Ca),
            (
                "redis.client_cert_file",
                self.client_cert_file.as_deref(),
                PemKind::Certificate,
            ),
            (
                "redis.client_key_file",
                self.client_key_file.as_deref(),
                PemKind::Key,
            ),
        ]));
        count_problems(
            &mut p,
            &[("redis.replay_events", self.replay_events, 1_000_000)],
        );
        let prefix = &self.key_prefix;
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            p.push(format!("redis.key_prefix '{prefix}' must be non-empty and use a-z, A-Z, 0-9, '-', '_' and '.'"));
        }
        p
    }
}

impl DatabaseConfig {
    /// The URL, TLS settings (`sslmode` and the files) and the schema name.
    pub fn problems(&self) -> Vec<String> {
        use crate::tls::{file_problems, PemKind};
        let mut p = Vec::new();
        url_problems(
            &mut p,
            "database.url (DATABASE_URL)",
            &self.url,
            &["postgres", "postgresql"],
        );
        match crate::tls::postgres_settings(self) {
            Ok(s) => p.extend(file_problems(&[
                (
                    "database.ca_file (sslrootcert)",
                    s.ca_file.as_deref(),
                    PemKind::Ca,
                ),
                (
                    "database.client_cert_file (sslcert)",
                    s.client_cert_file.as_deref(),
                    PemKind::Certificate,
                ),
                (
                    "database.client_key_file (sslkey)",
                    s.client_key_file.as_deref(),
                    PemKind::Key,
                ),
            ])),
            Err(e) => p.extend(e),
        }
        if !is_identifier(&self.schema) {
            p.push(format!(
                "database.schema '{}' must be a lowercase SQL identifier (a-z, 0-9, _; not starting with a digit)",
                self.schema
            ));
        }
        p
    }
}

impl TopicsConfig {
    /// Names Kafka accepts and that do not collide, partitions, replication, retention.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (key, name) in [
            ("topics.heartbeats", &self.heartbeats),
            ("topics.facility_status", &self.facility_status),
            ("topics.dead_letters", &self.dead_letters),
        ] {
            if let Some(why) = invalid_topic_name(name) {
                p.push(format!("{key} '{name}' {why}"));
            }
            if name.starts_with(&self.internal_prefix) {
                p.push(format!(
                    "{key} '{name}' starts with the internal prefix '{}': choose another name",
                    self.internal_prefix
                ));
            }
        }
        if let Some(why) = invalid_topic_name(&format!("{}x", self.internal_prefix)) {
            p.push(format!(
                "topics.internal_prefix '{}' {why}",
                self.internal_prefix
            ));
        }
        if self.heartbeats == self.facility_status
            || self.heartbeats == self.dead_letters
            || self.facility_status == self.dead_letters
        {
            p.push("topics.heartbeats, topics.facility_status and topics.dead_letters must be three different topics".into());
        }
        for (key, n) in [
            ("topics.heartbeats_partitions", self.heartbeats_partitions),
            ("topics.facility_partitions", self.facility_partitions),
        ] {
            if !(1..=10_000).contains(&n) {
                p.push(format!(
                    "{key} = {n}: use a partition count from 1 to 10000"
                ));
            }
        }
        if !(1..=16).contains(&self.replication_factor) {
            p.push(format!(
                "topics.replication_factor = {}: use 1 (local) or 3 (a real cluster)",
                self.replication_factor
            ));
        }
        for (key, d) in [
            ("topics.heartbeats_retention", self.heartbeats_retention),
            ("topics.dead_letters_retention", self.dead_letters_retention),
            ("topics.compacted_segment", self.compacted_segment),
        ] {
            if d < Duration::from_secs(1) {
                p.push(format!("{key} = {d:?}: use at least 1s"));
            }
        }
        p
    }
}

impl ProcessorConfig {
    /// Session timing, the commit interval, the group and the instance id.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.session_timeout < Duration::from_millis(500) {
            p.push(format!(
                "processor.session_timeout = {:?}: use at least 500ms (default 90s)",
                self.session_timeout
            ));
        }
        if self.flap_hold >= self.session_timeout && !self.flap_hold.is_zero() {
            p.push(format!(
                "processor.flap_hold = {:?} is not shorter than processor.session_timeout = {:?}: a hold that long hides real outages; use 0 (off) or less than the timeout",
                self.flap_hold, self.session_timeout
            ));
        }
        // Against a valid timeout only: a timeout that is itself wrong is reported above.
        if self.session_timeout >= Duration::from_millis(500)
            && self.allowed_lateness * 2 > self.session_timeout
        {
            p.push(format!(
                "processor.allowed_lateness = {:?} is more than half of processor.session_timeout = {:?}: offline detection would wait longer than sessions last; use 100ms (default) to a few seconds",
                self.allowed_lateness, self.session_timeout
            ));
        }
        if self.commit_interval < Duration::from_millis(10)
            || self.commit_interval > Duration::from_secs(10)
        {
            p.push(format!(
                "processor.commit_interval = {:?}: use 10ms to 10s (default 100ms)",
                self.commit_interval
            ));
        }
        if self.max_buffered_events < 100 {
            p.push(format!(
                "processor.max_buffered_events = {}: use at least 100 (default 500000); below that stage 2 reads its input again too often",
                self.max_buffered_events
            ));
        }
        if self.restore_concurrency > 64 {
            p.push(format!(
                "processor.restore_concurrency = {}: use 0 (default: two per core, at most 4) to 64",
                self.restore_concurrency
            ));
        }
        if !self.facility_retention.is_zero() {
            if self.facility_retention < Duration::from_millis(1) {
                p.push(format!(
                    "processor.facility_retention = {:?}: use at least 1ms, or \"off\" (default 24h)",
                    self.facility_retention
                ));
            }
            if self.state_dir.as_os_str().is_empty() {
                p.push("processor.state_dir is empty: name a writable local directory for stage 2's quiet facilities, or set processor.facility_retention = \"off\"".into());
            }
        }
        if self.max_clock_skew < Duration::from_secs(1) {
            p.push(format!(
                "processor.max_clock_skew = {:?}: use at least 1s (default 60s)",
                self.max_clock_skew
            ));
        }
        if !self
            .instance_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            p.push(format!(
                "processor.instance_id '{}' may only contain a-z, A-Z, 0-9, '-', '_' and '.'",
                self.instance_id
            ));
        }
        group_problems(&mut p, "processor.group_id", &self.group_id);
        p
    }
}

/// A consumer group must have a name.
fn group_problems(p: &mut Vec<String>, key: &str, group: &str) {
    if group.trim().is_empty() {
        p.push(format!("{key} is empty: name the consumer group"));
    }
}

impl NotifierConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        group_problems(&mut p, "notifier.group_id", &self.group_id);
        count_problems(&mut p, &[("notifier.batch_size", self.batch_size, 100_000)]);
        p
    }
}

impl SinkConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        group_problems(&mut p, "sink.group_id", &self.group_id);
        count_problems(&mut p, &[("sink.batch_size", self.batch_size, 100_000)]);
        p
    }
}

impl TelemetryConfig {
    pub fn problems(&self) -> Vec<String> {
        match tracing_subscriber::EnvFilter::try_new(&self.log_filter) {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!("telemetry.log_filter '{}' is not a valid filter ({e}): e.g. 'info' or 'info,presence_processor=debug'", self.log_filter)],
        }
    }
}

impl GatewayConfig {
    /// Identity (tokens, JWKS, tickets), request limits, exposure and resource bounds.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.identity_problems();
        if self.jwt_leeway > Duration::from_secs(300) {
            p.push(format!(
                "gateway.jwt_leeway = {:?}: tokens are short-lived, use at most 5m (default 5s)",
                self.jwt_leeway
            ));
        }
        for origin in &self.cors_origins {
            let ok = origin == "*"
                || url::Url::parse(origin)
                    .is_ok_and(|u| u.has_host() && u.path() == "/" && !origin.ends_with('/'));
            if !ok {
                p.push(format!("gateway.cors_origins entry '{origin}' is not an origin: write scheme://host[:port] without a path, or *"));
            }
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body_bytes) {
            p.push(format!(
                "gateway.max_body_bytes = {}: use 1024 to 67108864 (default 262144)",
                self.max_body_bytes
            ));
        }
        count_problems(
            &mut p,
            &[
                ("gateway.max_batch", self.max_batch, 100_000),
                ("gateway.max_in_flight", self.max_in_flight, 10_000_000),
            ],
        );
        if self.produce_timeout < Duration::from_millis(100) {
            p.push(format!(
                "gateway.produce_timeout = {:?}: use at least 100ms (default 5s)",
                self.produce_timeout
            ));
        }
        p.extend(self.bounds_problems());
        p
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Kafka's own rule for topic names.
fn invalid_topic_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty: name the topic")
    } else if name.len() > 249 {
        Some("is longer than 249 characters")
    } else if name == "." || name == ".." {
        Some("is not a valid topic name")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        Some("has characters Kafka does not allow: use a-z, A-Z, 0-9, '.', '_' and '-'")
    } else {
        None
    }
}

/// The file's sections, for recognising misspelt environment overrides.
const SECTIONS: &[&str] = &[
    "kafka",
    "topics",
    "redis",
    "database",
    "processor",
    "gateway",
    "notifier",
    "sink",
    "telemetry",
    "schema_registry",
];

/// Environment overrides. The three well-known names, `KAFKA_PROPERTY_<NAME>` (underscores
/// become dots: `KAFKA_PROPERTY_SASL_MECHANISM` is `sasl.mechanism`) and the generic
/// `PRESENCE_<SECTION>__<KEY>` (`PRESENCE_PROCESSOR__SESSION_TIMEOUT=5s`).
fn apply_env(doc: &mut toml::Table, env: &[(String, String)], errors: &mut Vec<String>) {
    fn set(doc: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
        let entry = doc
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = entry {
            t.insert(key.to_string(), value);
        }
    }
    // The type of each setting, read off the defaults: an override is parsed as what its
    // field takes, so `PRESENCE_PROCESSOR__INSTANCE_ID=7` stays a string.
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    for (name, value) in env {
        match name.as_str() {
            "KAFKA_BROKERS" => set(doc, "kafka", "brokers", toml::Value::String(value.clone())),
            "REDIS_URL" => set(doc, "redis", "url", toml::Value::String(value.clone())),
            "DATABASE_URL" => set(doc, "database", "url", toml::Value::String(value.clone())),
            "PRESENCE_CONFIG" => {}
            _ => {
                if let Some(prop) = name.strip_prefix("KAFKA_PROPERTY_") {
                    let key = prop.to_ascii_lowercase().replace('_', ".");
                    let kafka = doc
                        .entry("kafka".to_string())
                        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    if let toml::Value::Table(k) = kafka {
                        let props = k
                            .entry("properties".to_string())
                            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                        if let toml::Value::Table(pt) = props {
                            pt.insert(key, toml::Value::String(value.clone()));
                        }
                    }
                } else if let Some(rest) = name.strip_prefix("PRESENCE_") {
                    match rest.split_once("__") {
                        Some((section, key)) => {
                            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
                            match env_value(&defaults, &section, &key, value) {
                                Ok(v) => set(doc, &section, &key, v),
                                Err(expected) => errors.push(format!(
                                    "environment variable {name}={value:?}: {section}.{key} takes {expected}; fix the value or unset the variable"
                                )),
                            }
                        }
                        // PRESENCE_PROCESSOR_SESSION_TIMEOUT: meant as a setting, one underscore short.
                        None if SECTIONS.iter().any(|s| rest.to_ascii_lowercase().starts_with(&format!("{s}_"))) => errors.push(format!(
                            "environment variable {name} names a setting with one underscore between section and key; write PRESENCE_<SECTION>__<KEY>, e.g. PRESENCE_PROCESSOR__SESSION_TIMEOUT=5s"
                        )),
                        // Other PRESENCE_* variables (PRESENCE_CONFIG, tooling) are not settings.
                        None => {}
                    }
                }
            }
        }
    }
}

/// An environment string as the TOML value of the field it sets, whose type the default
/// value tells: `PRESENCE_TOPICS__HEARTBEATS_PARTITIONS=24` fills an integer field,
/// `PRESENCE_REDIS__KEY_PREFIX=2024` a string one. A key without a default (an unset
/// optional, or a misspelling that deserialisation reports by name) stays a string.
/// `Err` names the type the field takes.
fn env_value(
    defaults: &toml::Table,
    section: &str,
    key: &str,
    value: &str,
) -> Result<toml::Value, &'static str> {
    let default = defaults
        .get(section)
        .and_then(toml::Value::as_table)
        .and_then(|t| t.get(key));
    match default {
        Some(toml::Value::Integer(_)) => value
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| "a whole number"),
        Some(toml::Value::Float(_)) => value
            .trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| "a number"),
        Some(toml::Value::Boolean(_)) => match value.trim() {
            "true" => Ok(toml::Value::Boolean(true)),
            "false" => Ok(toml::Value::Boolean(false)),
            _ => Err("true or false"),
        },
        _ => Ok(toml::Value::String(value.to_string())),
    }
}

fn describe_toml_error(e: &toml::de::Error) -> String {
    format!(
        "{}: check the key's spelling and type against the README's configuration table",
        e.message().trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn problems_of(pairs: &[(&str, &str)]) -> Vec<String> {
        match Config::load_from(None, &env(pairs)) {
            Ok(_) => vec![],
            Err(ConfigError::Invalid(p)) => p,
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn printing_the_config_shows_no_secret() {
        let c = Config::load_from(
            None,
            &env(&[
                ("REDIS_URL", "redis://:redis-pw-1@host:6379"),
                ("DATABASE_URL", "postgres://u:pg-pw-2@host/db"),
                ("KAFKA_PROPERTY_SASL_PASSWORD", "kafka-pw-3"),
                ("PRESENCE_GATEWAY__AUTH", "jwt"),
                (
                    "PRESENCE_GATEWAY__JWT_SECRET",
                    "jwt-key-4-jwt-key-4-jwt-key-4-jwt-key-4",
                ),
            ]),
        )
        .expect("valid");
        let shown = toml::to_string_pretty(&c.redacted()).unwrap();
        for secret in ["redis-pw-1", "pg-pw-2", "kafka-pw-3", "jwt-key-4"] {
            assert!(!shown.contains(secret), "{secret} printed:\n{shown}");
        }
        assert!(shown.contains("postgres://u:***@host/db"), "{shown}");
    }

    #[test]
    fn gateway_settings_are_checked() {
        let p = problems_of(&[
            ("PRESENCE_GATEWAY__AUTH", "jwt"),
            ("PRESENCE_GATEWAY__JWT_SECRET", "short"),
            (
                "PRESENCE_GATEWAY__CORS_ORIGINS",
                "https://ok.example.com, https://bad.example.com/path",
            ),
            ("PRESENCE_GATEWAY__MAX_BATCH", "0"),
        ]);
        assert!(
            p.iter()
                .any(|e| e.contains("jwt_secret") && e.contains("32 bytes")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|e| e.contains("bad.example.com/path")),
            "{p:?}"
        );
        assert!(
            !p.iter().any(|e| e.contains("'https://ok.example.com'")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|e| e.contains("gateway.max_batch = 0")),
            "{p:?}"
        );
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn identity_settings_are_checked() {
        let p = problems_of(&[
            ("PRESENCE_GATEWAY__AUTH", "jwt"),
            ("PRESENCE_GATEWAY__JWKS_FILE", "/etc/presence/jwks.json"),
            ("PRESENCE_GATEWAY__JWKS_URL", "http://idp.example.com/jwks"),
            ("PRESENCE_GATEWAY__JWKS_REFRESH_MIN", "0s"),
            ("PRESENCE_GATEWAY__STREAM_TICKET_TTL", "1h"),
            ("PRESENCE_GATEWAY__TICKET_SECRET", "short"),
        ]);
        for wanted in [
            "both set",
            "not an https URL",
            "jwks_refresh_min = 0ns",
            "stream_ticket_ttl = 3600s",
            "ticket_secret is shorter",
        ] {
            assert!(p.iter().any(|e| e.contains(wanted)), "{wanted}: {p:?}");
        }
        assert_eq!(p.len(), 5, "{p:?}");
        // A JWKS alone is a key; no key at all is not.
        assert!(problems_of(&[
            ("PRESENCE_GATEWAY__AUTH", "jwt"),
            ("PRESENCE_GATEWAY__JWKS_URL", "https://idp.example.com/jwks"),
        ])
        .is_empty());
        let p = problems_of(&[("PRESENCE_GATEWAY__AUTH", "jwt")]);
        assert!(p.iter().any(|e| e.contains("needs a key")), "{p:?}");
    }

    #[test]
    fn an_anonymous_gateway_off_loopback_is_refused_unless_allowed() {
        let p = problems_of(&[("PRESENCE_GATEWAY__LISTEN", "0.0.0.0:8080")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("gateway.allow_anonymous = true") && p[0].contains("0.0.0.0:8080"),
            "{p:?}"
        );
        assert!(problems_of(&[
            ("PRESENCE_GATEWAY__LISTEN", "0.0.0.0:8080"),
            ("PRESENCE_GATEWAY__ALLOW_ANONYMOUS", "true"),
        ])
        .is_empty());
        assert!(problems_of(&[
            ("PRESENCE_GATEWAY__LISTEN", "[::]:8080"),
            ("PRESENCE_GATEWAY__AUTH", "jwt"),
            (
                "PRESENCE_GATEWAY__JWT_SECRET",
                "0123456789abcdef0123456789abcdef"
            ),
        ])
        .is_empty());
        assert!(problems_of(&[("PRESENCE_GATEWAY__LISTEN", "[::1]:8080")]).is_empty());
    }

    #[test]
    fn gateway_bounds_are_checked() {
        let p = problems_of(&[
            ("PRESENCE_GATEWAY__OPS_LISTEN", "127.0.0.1:8080"),
            ("PRESENCE_GATEWAY__MAX_STREAMS", "0"),
            ("PRESENCE_GATEWAY__IDLE_TIMEOUT", "3s"),
            ("PRESENCE_GATEWAY__HISTORY_MAX_RANGE", "1s"),
        ]);
        assert!(p.iter().any(|e| e.contains("port of their own")), "{p:?}");
        assert!(
            p.iter().any(|e| e.contains("gateway.max_streams = 0")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|e| e.contains("idle_timeout") && e.contains("produce_timeout")),
            "{p:?}"
        );
        assert!(p.iter().any(|e| e.contains("history_max_range")), "{p:?}");
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_from(None, &[]).expect("defaults must validate");
        assert_eq!(c.processor.session_timeout, Duration::from_secs(90));
        assert_eq!(c.topics.heartbeats_partitions, 12);
        assert_eq!(
            c.topics.session_transitions(),
            "presence.internal.session-transitions"
        );
    }

    #[test]
    fn environment_overrides_file() {
        let dir = std::env::temp_dir().join(format!("presence-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[kafka]\nbrokers = \"file:1\"\n[processor]\nsession_timeout = \"30s\"\n",
        )
        .unwrap();
        let c = Config::load_from(
            Some(&path),
            &env(&[
                ("KAFKA_BROKERS", "env:2"),
                ("PRESENCE_TOPICS__HEARTBEATS_PARTITIONS", "24"),
                ("KAFKA_PROPERTY_SECURITY_PROTOCOL", "ssl"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "env:2");
        assert_eq!(c.processor.session_timeout, Duration::from_secs(30));
        assert_eq!(c.topics.heartbeats_partitions, 24);
        assert_eq!(c.kafka.properties["security.protocol"].expose(), "ssl");
    }

    #[test]
    fn facility_retention_is_a_duration_or_off() {
        let c = Config::load_from(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.processor.facility_retention,
            Duration::from_secs(24 * 3600)
        );
        assert!(c.processor.state_dir.ends_with("presence-state"));
        for (value, want) in [
            ("off", Duration::ZERO),
            ("0", Duration::ZERO),
            ("90m", Duration::from_secs(5400)),
            ("1ms", Duration::from_millis(1)),
        ] {
            let c = Config::load_from(
                None,
                &env(&[("PRESENCE_PROCESSOR__FACILITY_RETENTION", value)]),
            )
            .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(c.processor.facility_retention, want, "{value}");
        }
        // The printed config reads back (`presence check-config`).
        let mut c = Config::default();
        c.processor.facility_retention = Duration::ZERO;
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("facility_retention = \"off\""), "{text}");
        let p = problems_of(&[("PRESENCE_PROCESSOR__FACILITY_RETENTION", "soon")]);
        assert!(p.iter().any(|m| m.contains("facility_retention")), "{p:?}");
        let p = problems_of(&[
            ("PRESENCE_PROCESSOR__FACILITY_RETENTION", "1us"),
            ("PRESENCE_PROCESSOR__STATE_DIR", ""),
        ]);
        assert!(
            p.iter()
                .any(|m| m.contains("processor.facility_retention") && m.contains("1ms")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("processor.state_dir")), "{p:?}");
    }

    #[test]
    fn environment_values_take_the_type_of_their_field() {
        let c = Config::load_from(
            None,
            &env(&[
                ("PRESENCE_PROCESSOR__INSTANCE_ID", "7"),
                ("PRESENCE_REDIS__KEY_PREFIX", "2024"),
                ("PRESENCE_TOPICS__HEARTBEATS_PARTITIONS", " 24"),
                ("PRESENCE_TELEMETRY__LOG_FORMAT", "json"),
            ]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.processor.instance_id, "7");
        assert_eq!(c.redis.key_prefix, "2024");
        assert_eq!(c.topics.heartbeats_partitions, 24);
        let p = problems_of(&[("PRESENCE_TOPICS__HEARTBEATS_PARTITIONS", "many")]);
        assert!(
            p.iter()
                .any(|m| m.contains("PRESENCE_TOPICS__HEARTBEATS_PARTITIONS")
                    && m.contains("a whole number")),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let p = problems_of(&[("PRESENCE_PROCESSOR__SESION_TIMEOUT", "5s")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("sesion_timeout"), "{p:?}");
    }

    #[test]
    fn a_setting_with_one_underscore_is_an_error_but_other_presence_variables_are_not() {
        let p = problems_of(&[
            ("PRESENCE_PROCESSOR_SESSION_TIMEOUT", "5s"),
            ("PRESENCE_TEST_PYTHON", "/usr/bin/python3"),
        ]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("PRESENCE_PROCESSOR_SESSION_TIMEOUT")
                && p[0].contains("PRESENCE_<SECTION>__<KEY>"),
            "{p:?}"
        );
    }

    #[test]
    fn restore_concurrency_is_read_from_the_environment_and_bounded() {
        assert!(problems_of(&[("PRESENCE_PROCESSOR__RESTORE_CONCURRENCY", "8")]).is_empty());
        let p = problems_of(&[("PRESENCE_PROCESSOR__RESTORE_CONCURRENCY", "65")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("processor.restore_concurrency = 65"), "{p:?}");
    }

    #[test]
    fn shutdown_snapshots_are_on_unless_turned_off() {
        let on = Config::load_from(None, &env(&[("KAFKA_BROKERS", "b:9092")])).unwrap();
        assert!(on.processor.shutdown_snapshots);
        let off = Config::load_from(
            None,
            &env(&[("PRESENCE_PROCESSOR__SHUTDOWN_SNAPSHOTS", "false")]),
        )
        .unwrap();
        assert!(!off.processor.shutdown_snapshots);
    }

    #[test]
    fn an_allowed_lateness_over_half_the_timeout_is_refused() {
        let p = problems_of(&[
            ("PRESENCE_PROCESSOR__SESSION_TIMEOUT", "3s"),
            ("PRESENCE_PROCESSOR__ALLOWED_LATENESS", "2s"),
        ]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("processor.allowed_lateness"), "{p:?}");
        assert!(problems_of(&[
            ("PRESENCE_PROCESSOR__SESSION_TIMEOUT", "3s"),
            ("PRESENCE_PROCESSOR__ALLOWED_LATENESS", "1s"),
        ])
        .is_empty());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let p = problems_of(&[
            ("KAFKA_BROKERS", "nohostport"),
            ("REDIS_URL", "http://x"),
            ("PRESENCE_PROCESSOR__SESSION_TIMEOUT", "10ms"),
            ("KAFKA_PROPERTY_ENABLE_AUTO_COMMIT", "true"),
        ]);
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p
            .iter()
            .any(|m| m.contains("nohostport") && m.contains("127.0.0.1:9092")));
        assert!(p
            .iter()
            .any(|m| m.contains("redis.url") && m.contains("redis://")));
        assert!(p.iter().any(|m| m.contains("session_timeout")));
        assert!(p
            .iter()
            .any(|m| m.contains("enable.auto.commit") && m.contains("commits offsets itself")));
    }

    #[test]
    fn unknown_librdkafka_property_is_rejected() {
        let p = problems_of(&[("KAFKA_PROPERTY_SASL_MECHANISMZ", "PLAIN")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("sasl.mechanismz"), "{p:?}");
    }

    #[test]
    fn conflicting_settings_are_rejected() {
        let p = problems_of(&[("PRESENCE_SINK__GROUP_ID", "presence-notifier")]);
        assert!(p.iter().any(|m| m.contains("two groups")), "{p:?}");
        let p = problems_of(&[("PRESENCE_SINK__OPS_LISTEN", "127.0.0.1:9102")]);
        assert!(p.iter().any(|m| m.contains("own port")), "{p:?}");
    }

    #[test]
    fn a_missing_certificate_file_is_a_start_up_error_naming_the_key_and_the_fix() {
        let p = problems_of(&[
            ("REDIS_URL", "rediss://:redis-pw@cache.example.com:6380"),
            ("PRESENCE_REDIS__CA_FILE", "/nonexistent/redis-ca.pem"),
            (
                "DATABASE_URL",
                "postgres://u:pg-pw@db.example.com/presence?sslmode=verify-full",
            ),
            ("PRESENCE_DATABASE__CA_FILE", "/nonexistent/pg-ca.pem"),
        ]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("redis.ca_file '/nonexistent/redis-ca.pem' does not exist: set it to the PEM file of the CA"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with(
                "database.ca_file (sslrootcert) '/nonexistent/pg-ca.pem' does not exist"
            ),
            "{p:?}"
        );
        assert!(!p.iter().any(|m| m.contains("-pw")), "{p:?}");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("postgres://user:hunter2@db:5432/presence");
        let shown = format!("{s} {s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user:***@db"), "{shown}");
        let c =
            Config::load_from(None, &env(&[("KAFKA_PROPERTY_SASL_PASSWORD", "hunter2")])).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
