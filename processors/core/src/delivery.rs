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
/// by a task of its own, over TLS as `sslmode` and `[database]` ask (`crate::tls`). The error
/// names the database (password redacted), what failed and what to change.
pub async fn connect_postgres(
    db: &crate::config::DatabaseConfig,
) -> Result<tokio_postgres::Client, String> {
    let settings = crate::tls::postgres_settings(db).map_err(|p| p.join("; "))?;
    let url = &db.url;
    let mut config: tokio_postgres::Config = settings
        .url
        .expose()
        .parse()
        .map_err(|e| format!("database.url {url} is not usable ({e}): set DATABASE_URL to postgres://user:password@host:port/database"))?;
    let tls = crate::tls::PostgresTls::new(&settings)?;
    tls.apply(&mut config);
    let mode = tls.mode().as_str();
    let (client, connection) =
        tokio::time::timeout(std::time::Duration::from_secs(5), config.connect(tls))
            .await
            .map_err(|_| format!("connecting to PostgreSQL at {url} timed out after 5 s"))?
            .map_err(|e| {
                let e = with_causes(&e);
                // tokio-postgres' words for a server that answered TLS with "no".
                let hint = if e.contains("does not support TLS") {
                    ": the server does not offer TLS and sslmode asks for it; turn ssl on in the server, or use sslmode=prefer"
                } else if e.contains("requires a valid client certificate") {
                    ": set database.client_cert_file and database.client_key_file to a certificate the server's CA signed"
                } else {
                    ""
                };
                format!("cannot connect to PostgreSQL at {url} (sslmode={mode}): {e}{hint}")
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// An error and its causes, `outer: inner: ...`: tokio-postgres prints only an error's kind
/// ("error performing TLS handshake") and keeps the reason in its source.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// A Redis client for `[redis]`: with a `rediss://` URL, TLS (rustls) against `ca_file` or
/// the system's roots, with the client certificate when one is configured. Connects on use.
pub fn redis_client(r: &crate::config::RedisConfig) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo;
    let url = &r.url;
    let info = url.expose().into_connection_info().map_err(|e| {
        format!("redis.url {url} is not usable ({e}): set REDIS_URL to redis://host:port, or rediss://host:port for TLS")
    })?;
    if !matches!(info.addr, redis::ConnectionAddr::TcpTls { .. }) {
        return redis::Client::open(info).map_err(|e| format!("redis.url {url}: {e}"));
    }
    // The redis crate builds its rustls config with the process-wide provider.
    crate::tls::provider();
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            format!(
                "{key} '{}' cannot be read ({e}): set it to a PEM file this process can read",
                path.display()
            )
        })
    };
    let root_cert = match &r.ca_file {
        Some(p) => Some(read("redis.ca_file", p)?),
        None => None,
    };
    let client_tls = match (&r.client_cert_file, &r.client_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.client_cert_file", cert)?,
            client_key: read("redis.client_key_file", key)?,
        }),
        _ => None,
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| format!("redis TLS settings for {url}: {e}: check redis.ca_file, redis.client_cert_file and redis.client_key_file"))
}

/// A Redis connection error with the setting to change, when it is a TLS one: the redis
/// crate reports rustls' reason ("invalid peer certificate: UnknownIssuer") and no more.
pub fn explain_redis_error(e: redis::RedisError) -> redis::RedisError {
    let text = e.to_string();
    let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "the server's certificate is not signed by the CA in redis.ca_file (unset: the system's roots); set redis.ca_file to the CA that signed it"
    } else if text.contains("NotValidForName") {
        "the server's certificate is not issued for the host in redis.url; connect by a name the certificate lists"
    } else if text.contains("CertificateRequired") {
        "the server asks for a client certificate; set redis.client_cert_file and redis.client_key_file"
    } else {
        return e;
    };
    redis::RedisError::from((
        e.kind(),
        "TLS handshake with Redis failed",
        format!("{text}: {hint}"),
    ))
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
            previous_since: None,
        };
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.starts_with("{\"facility_id\":\"f\""), "{json}");
    }
}
