//! The Schema Registry side of the `confluent` framing: the `[schema_registry]` settings, a
//! client of the Confluent Schema Registry API (Confluent's own, Apicurio's
//! `/apis/ccompat/v7`, Redpanda's), and the cache that turns registry ids into the schema
//! fingerprints [`crate::codec`] decodes by.
//!
//! Subjects follow the topic-name strategy (`<topic>-value`) and are registered by
//! `presence topics` with FULL_TRANSITIVE compatibility, every released schema version
//! oldest first ([`register_history`]). Writers look up the id of the current schema once at
//! start ([`header_for`]); readers resolve an id the first time they see it and keep it
//! ([`IdCache`]). Credentials never reach a log line or an error message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::{fingerprint_of, AvroRecord, Header, RegistryIds};
use crate::config::Secret;

/// How records on the public topics are framed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    /// Avro single-object encoding: decodable with the `.avsc` files alone, no registry.
    #[default]
    SingleObject,
    /// The Schema Registry wire format (magic byte 0, 4-byte schema id), for tools that
    /// expect it (Connect's AvroConverter, ksqlDB, Flink's `avro-confluent`, Console).
    Confluent,
}

/// `[schema_registry]`: the framing of `facility-status` and the registry behind the
/// `confluent` one.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistryConfig {
    /// How the processor writes `facility-status`: `single-object` (default) or
    /// `confluent`. Readers accept both whatever this says; a `confluent` record needs `url`.
    pub framing: Framing,
    /// Base URL of the Confluent-compatible API: Apicurio's
    /// `http://127.0.0.1:8081/apis/ccompat/v7` (the local stack's,
    /// `deploy/stack.sh registry-up`), Confluent's or Redpanda's root. Required with
    /// `framing = "confluent"`. Default none.
    pub url: String,
    /// HTTP basic authentication, both or neither. The password is best set in the
    /// environment (`PRESENCE_SCHEMA_REGISTRY__PASSWORD`).
    pub username: String,
    pub password: Secret,
    /// With an `https` URL: PEM file of the CA that signed the registry's certificate,
    /// trusted besides the system's roots. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How long one registry request may take. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        SchemaRegistryConfig {
            framing: Framing::SingleObject,
            url: String::new(),
            username: String::new(),
            password: Secret::default(),
            ca_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}

impl SchemaRegistryConfig {
    /// Every rule the typed fields cannot express, each with what to change.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.framing == Framing::Confluent && self.url.is_empty() {
            p.push("schema_registry.framing = \"confluent\" needs schema_registry.url (PRESENCE_SCHEMA_REGISTRY__URL), e.g. http://127.0.0.1:8081/apis/ccompat/v7 from `bash deploy/stack.sh registry-up`".into());
        }
        if !self.url.is_empty() {
            match url::Url::parse(&self.url) {
                Ok(u) if !matches!(u.scheme(), "http" | "https") => p.push(format!(
                    "schema_registry.url has scheme '{}': use http:// or https://",
                    u.scheme()
                )),
                Ok(u) if !u.username().is_empty() || u.password().is_some() => p.push(
                    "schema_registry.url carries credentials: move them to schema_registry.username and PRESENCE_SCHEMA_REGISTRY__PASSWORD, so that the URL can be logged".into(),
                ),
                Ok(u) if self.ca_file.is_some() && u.scheme() != "https" => p.push(
                    "schema_registry.ca_file is set but schema_registry.url is not https://: use an https URL or remove ca_file".into(),
                ),
                Ok(_) => {}
                Err(e) => p.push(format!(
                    "schema_registry.url '{}' is not a URL ({e}): write it as http://host:port/path",
                    self.url
                )),
            }
        }
        if self.username.is_empty() != self.password.expose().is_empty() {
            p.push("schema_registry.username and schema_registry.password (PRESENCE_SCHEMA_REGISTRY__PASSWORD) go together: set both or neither".into());
        }
        if self.timeout < Duration::from_millis(100) {
            p.push(format!(
                "schema_registry.timeout = {:?}: use at least 100ms (default 10s)",
                self.timeout
            ));
        }
        p.extend(crate::tls::file_problems(&[(
            "schema_registry.ca_file",
            self.ca_file.as_deref(),
            crate::tls::PemKind::Ca,
        )]));
        p
    }

    /// The settings with the password replaced, for printing.
    pub fn redacted(&self) -> SchemaRegistryConfig {
        let mut c = self.clone();
        if !c.password.expose().is_empty() {
            c.password = Secret::new("***");
        }
        c
    }
}

/// The subject of a topic's values under the topic-name strategy.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// What went wrong talking to the registry; each message names the registry and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry at {url} is unreachable ({detail}); start it (bash deploy/stack.sh registry-up) or fix schema_registry.url (PRESENCE_SCHEMA_REGISTRY__URL)")]
    Unreachable { url: String, detail: String },
    #[error("schema registry at {url} refused the credentials (HTTP {status}) {what}; set schema_registry.username and PRESENCE_SCHEMA_REGISTRY__PASSWORD to an account allowed to do that")]
    Unauthorized {
        url: String,
        status: u16,
        what: String,
    },
    #[error("schema registry at {url}: {what} answered HTTP {status}: {body}")]
    Refused {
        url: String,
        what: String,
        status: u16,
        body: String,
    },
    #[error("schema registry at {url}: subject {subject} holds no version of schemas/{record}; register it with `presence topics` (with schema_registry.framing = \"confluent\")")]
    NotRegistered {
        url: String,
        subject: String,
        record: &'static str,
    },
    #[error("schema registry at {url}: schema id {id} does not exist; the producer registered it with another registry, or it was deleted")]
    UnknownId { url: String, id: u32 },
    #[error("schema registry at {url}: {what}: unexpected answer ({detail})")]
    BadAnswer {
        url: String,
        what: String,
        detail: String,
    },
    #[error("schema_registry.ca_file {path}: {detail}; set it to the PEM file of the CA that signed the registry's certificate")]
    Tls { path: String, detail: String },
    #[error("schema registry at {url}: its TLS certificate is not trusted ({detail}); set schema_registry.ca_file (PRESENCE_SCHEMA_REGISTRY__CA_FILE) to the PEM file of the CA that signed it, and check that schema_registry.url names a host the certificate is for")]
    Untrusted { url: String, detail: String },
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
/// Longest error body quoted in an error message.
const MAX_QUOTED_BODY: usize = 300;

/// A client of the Confluent Schema Registry API.
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
    auth: Option<(String, Secret)>,
}

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaAnswer {
    schema: String,
}

#[derive(Deserialize)]
struct ConfigAnswer {
    #[serde(rename = "compatibilityLevel", alias = "compatibility")]
    compatibility: String,
}

impl RegistryClient {
    /// A client for `config.url`; `None` when no registry is configured.
    pub fn new(config: &SchemaRegistryConfig) -> Result<Option<RegistryClient>, RegistryError> {
        if config.url.is_empty() {
            return Ok(None);
        }
        let base = config.url.trim_end_matches('/').to_string();
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout);
        if let Some(path) = &config.ca_file {
            let tls = |detail: String| RegistryError::Tls {
                path: path.display().to_string(),
                detail,
            };
            let pem = std::fs::read(path).map_err(|e| tls(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| tls(e.to_string()))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| RegistryError::Unreachable {
            url: base.clone(),
            detail: e.to_string(),
        })?;
        let auth = (!config.username.is_empty())
            .then(|| (config.username.clone(), config.password.clone()));
        Ok(Some(RegistryClient { base, http, auth }))
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// One request; `Ok(None)` for 404, so callers can tell "absent" from a failure.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        what: &str,
    ) -> Result<Option<T>, RegistryError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, Some(password.expose()));
        }
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(body.to_string());
        }
        let resp = req.send().await.map_err(|e| self.send_error(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.send_error(e))?;
        match status.as_u16() {
            200..=299 => {
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| RegistryError::BadAnswer {
                        url: self.base.clone(),
                        what: what.to_string(),
                        detail: e.to_string(),
                    })
            }
            404 => Ok(None),
            s @ (401 | 403) => Err(RegistryError::Unauthorized {
                url: self.base.clone(),
                status: s,
                what: what.to_string(),
            }),
            s => Err(RegistryError::Refused {
                url: self.base.clone(),
                what: what.to_string(),
                status: s,
                body: text.chars().take(MAX_QUOTED_BODY).collect(),
            }),
        }
    }

    /// A request that got no answer, with the causes that say why (reqwest's own message is
    /// only "error sending request"): a certificate the client does not trust names
    /// `schema_registry.ca_file`, anything else the URL. The causes come from the connection
    /// (DNS, TCP, TLS), never from the request, so they hold no credentials.
    fn send_error(&self, e: reqwest::Error) -> RegistryError {
        let e = e.without_url();
        let mut detail = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            let text = c.to_string();
            if !detail.contains(&text) {
                detail = format!("{detail}: {text}");
            }
            cause = c.source();
        }
        let lower = detail.to_ascii_lowercase();
        if self.base.starts_with("https://")
            && (lower.contains("certificate") || lower.contains("unknown ca"))
        {
            RegistryError::Untrusted {
                url: self.base.clone(),
                detail,
            }
        } else {
            RegistryError::Unreachable {
                url: self.base.clone(),
                detail,
            }
        }
    }

    /// Registers `schema` under `subject` (a schema already there keeps its id).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let what = format!("registering a schema under subject {subject}");
        let mut attempt = 0;
        let answer: Option<IdAnswer> = loop {
            let result = self
                .call(
                    reqwest::Method::POST,
                    &format!("/subjects/{subject}/versions"),
                    Some(serde_json::json!({ "schema": schema })),
                    &what,
                )
                .await;
            match result {
                // Registering is idempotent, so a failure of the registry itself is worth
                // another try; so is Apicurio 2.4's "artifact already exists", its answer to
                // a registration that races the subject's creation (asked again, it adds the
                // version). Other 4xx (an incompatible schema: 409) are final.
                Err(RegistryError::Refused {
                    status, ref body, ..
                }) if (status >= 500 || (status == 409 && body.contains("already exists")))
                    && attempt < 5 =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                other => break other?,
            }
        };
        answer.map(|a| a.id).ok_or(RegistryError::BadAnswer {
            url: self.base.clone(),
            what,
            detail: "404".into(),
        })
    }

    /// The id of `schema` under `subject`, `None` if it is not registered there.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, RegistryError> {
        let answer: Option<IdAnswer> = self
            .call(
                reqwest::Method::POST,
                &format!("/subjects/{subject}"),
                Some(serde_json::json!({ "schema": schema })),
                &format!("looking up a schema under subject {subject}"),
            )
            .await?;
        Ok(answer.map(|a| a.id))
    }

    /// The schema registered under `id`, `None` if there is none.
    pub async fn schema(&self, id: u32) -> Result<Option<String>, RegistryError> {
        let answer: Option<SchemaAnswer> = self
            .call(
                reqwest::Method::GET,
                &format!("/schemas/ids/{id}"),
                None,
                &format!("reading schema id {id}"),
            )
            .await?;
        Ok(answer.map(|a| a.schema))
    }

    /// Sets the compatibility level of `subject` (e.g. `FULL_TRANSITIVE`).
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), RegistryError> {
        let _: Option<serde_json::Value> = self
            .call(
                reqwest::Method::PUT,
                &format!("/config/{subject}"),
                Some(serde_json::json!({ "compatibility": level })),
                &format!("setting the compatibility of subject {subject}"),
            )
            .await?;
        Ok(())
    }

    /// The compatibility level set on `subject` itself, `None` if it has none of its own.
    pub async fn compatibility(&self, subject: &str) -> Result<Option<String>, RegistryError> {
        let answer: Option<ConfigAnswer> = self
            .call(
                reqwest::Method::GET,
                &format!("/config/{subject}"),
                None,
                &format!("reading the compatibility of subject {subject}"),
            )
            .await?;
        Ok(answer.map(|a| a.compatibility))
    }

    /// Deletes `subject` and its versions for good (soft, then permanent). For tests and
    /// clean-ups; an absent subject is not an error.
    pub async fn delete_subject(&self, subject: &str) -> Result<(), RegistryError> {
        for query in ["", "?permanent=true"] {
            let _: Option<serde_json::Value> = self
                .call(
                    reqwest::Method::DELETE,
                    &format!("/subjects/{subject}{query}"),
                    None,
                    &format!("deleting subject {subject}"),
                )
                .await?;
        }
        Ok(())
    }
}

/// Registers every released version of `T` (oldest first, so the registry checks each
/// against the ones before it) under `subject` with FULL_TRANSITIVE compatibility. Returns
/// the id of the current schema. Running it again changes nothing.
pub async fn register_history<T: AvroRecord>(
    client: &RegistryClient,
    subject: &str,
) -> Result<u32, RegistryError> {
    let mut versions = T::HISTORY.iter();
    // The first version creates the subject; a subject must exist before its config can be
    // set on some registries (Apicurio), and one version is compatible with anything.
    let mut id = match versions.next() {
        Some(first) => client.register(subject, first).await?,
        None => client.register(subject, T::SCHEMA).await?,
    };
    client.set_compatibility(subject, "FULL_TRANSITIVE").await?;
    for text in versions {
        id = client.register(subject, text).await?;
    }
    if T::HISTORY.last() != Some(&T::SCHEMA) {
        id = client.register(subject, T::SCHEMA).await?;
    }
    Ok(id)
}

/// How a writer of `T` on `topic` frames its records: single-object, or the registry id of
/// the schema it writes (current, or pinned) under `<topic>-value` (which `presence topics`
/// registered with every released version).
pub async fn header_for<T: AvroRecord + 'static>(
    config: &SchemaRegistryConfig,
    topic: &str,
) -> Result<Header, RegistryError> {
    if config.framing == Framing::SingleObject {
        return Ok(Header::SingleObject);
    }
    let Some(client) = RegistryClient::new(config)? else {
        // Config validation requires a URL with the confluent framing.
        return Ok(Header::SingleObject);
    };
    let subject = value_subject(topic);
    // The schema this process writes: a pinned older version's id when
    // PRESENCE_SCHEMA_WRITE_VERSIONS names `T`, so the id always describes the bytes.
    let written = crate::codec::codec::<T>().written_schema();
    match client.lookup(&subject, written).await? {
        Some(id) => Ok(Header::Confluent { id }),
        None => Err(RegistryError::NotRegistered {
            url: client.base.clone(),
            subject,
            record: T::NAME,
        }),
    }
}

/// Registry ids seen so far and the fingerprints of their schemas. Cheap to read (one read
/// lock); an id is fetched from the registry once, the first time a record carries it. Ids
/// the registry does not know are remembered too, so that a stream of records with a bogus
/// id costs one request, not one each.
pub struct IdCache {
    client: Option<RegistryClient>,
    resolved: RwLock<HashMap<u32, Option<u64>>>,
}

impl RegistryIds for IdCache {
    fn fingerprint(&self, id: u32) -> Option<u64> {
        self.resolved
            .read()
            .ok()
            .and_then(|m| m.get(&id).copied().flatten())
    }
}

impl IdCache {
    pub fn new(config: &SchemaRegistryConfig) -> Result<IdCache, RegistryError> {
        Ok(IdCache {
            client: RegistryClient::new(config)?,
            resolved: RwLock::new(HashMap::new()),
        })
    }

    /// A cache that resolves nothing (no registry configured).
    pub fn none() -> IdCache {
        IdCache {
            client: None,
            resolved: RwLock::new(HashMap::new()),
        }
    }

    fn known(&self, id: u32) -> bool {
        self.resolved.read().is_ok_and(|m| m.contains_key(&id))
    }

    fn remember(&self, id: u32, fingerprint: Option<u64>) {
        if let Ok(mut m) = self.resolved.write() {
            m.insert(id, fingerprint);
        }
    }

    /// Makes sure the registry id of `bytes` (if it is in the `confluent` framing) is
    /// resolved. Without a registry, or for a single-object record, does nothing: the codec
    /// then reports what is missing.
    pub async fn ensure(&self, bytes: &[u8]) -> Result<(), RegistryError> {
        let (Some(id), Some(client)) = (crate::codec::confluent_id(bytes), &self.client) else {
            return Ok(());
        };
        if self.known(id) {
            return Ok(());
        }
        let fingerprint = match client.schema(id).await? {
            Some(text) => match apache_avro::Schema::parse_str(&text) {
                Ok(schema) => Some(fingerprint_of(&schema)),
                Err(e) => {
                    tracing::warn!(id, registry = %client.base, error = %e, "schema registry holds a schema that is not Avro under this id");
                    None
                }
            },
            None => {
                tracing::warn!(id, registry = %client.base, "schema id unknown to the registry");
                None
            }
        };
        self.remember(id, fingerprint);
        Ok(())
    }

    /// [`IdCache::ensure`] from synchronous code on a blocking thread (the processor's
    /// stages): runs the lookup on the current tokio runtime, or on a small one of its own.
    /// Only the first record with a new id waits.
    pub fn ensure_blocking(&self, bytes: &[u8]) -> Result<(), RegistryError> {
        match crate::codec::confluent_id(bytes) {
            Some(id) if self.client.is_some() && !self.known(id) => {}
            _ => return Ok(()),
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.block_on(self.ensure(bytes)),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| RegistryError::Unreachable {
                    url: self
                        .client
                        .as_ref()
                        .map(|c| c.base.clone())
                        .unwrap_or_default(),
                    detail: format!("cannot start a runtime for the lookup: {e}"),
                })?
                .block_on(self.ensure(bytes)),
        }
    }

    /// Resolves the ids of every released version of `T` under `subject` ahead of the first
    /// record, so that the hot path never waits for them. A failure only costs a lookup
    /// later.
    pub async fn prewarm<T: AvroRecord>(&self, subject: &str) {
        let Some(client) = &self.client else { return };
        for text in T::HISTORY.iter().chain([&T::SCHEMA]) {
            match client.lookup(subject, text).await {
                Ok(Some(id)) => {
                    if let Ok(schema) = apache_avro::Schema::parse_str(text) {
                        self.remember(id, Some(fingerprint_of(&schema)));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(subject, error = %e, "could not look up schema ids ahead of the first record; they are resolved when they arrive");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> SchemaRegistryConfig {
        let mut c = SchemaRegistryConfig::default();
        for (k, v) in pairs {
            match *k {
                "framing" => {
                    c.framing = if *v == "confluent" {
                        Framing::Confluent
                    } else {
                        Framing::SingleObject
                    }
                }
                "url" => c.url = v.to_string(),
                "username" => c.username = v.to_string(),
                "password" => c.password = Secret::new(*v),
                "ca_file" => c.ca_file = Some(v.into()),
                _ => unreachable!("test key {k}"),
            }
        }
        c
    }

    #[test]
    fn the_default_needs_no_registry() {
        assert!(SchemaRegistryConfig::default().problems().is_empty());
    }

    #[test]
    fn each_wrong_setting_is_named_with_its_fix() {
        let p = config(&[("framing", "confluent")]).problems();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("needs schema_registry.url"), "{}", p[0]);
        let p = config(&[("url", "ftp://r:1")]).problems();
        assert!(p[0].contains("use http:// or https://"), "{p:?}");
        let p = config(&[("url", "http://me:hunter2@r:1")]).problems();
        assert!(p[0].contains("carries credentials"), "{p:?}");
        assert!(!p[0].contains("hunter2"), "the password never shows: {p:?}");
        let p = config(&[("url", "http://r:1"), ("username", "u")]).problems();
        assert!(p[0].contains("set both or neither"), "{p:?}");
        let p = config(&[("url", "http://r:1"), ("ca_file", "/nonexistent.pem")]).problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|m| m.contains("not https://")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("does not exist")), "{p:?}");
        let ok = config(&[
            ("framing", "confluent"),
            ("url", "https://r:1/apis/ccompat/v7"),
            ("username", "u"),
            ("password", "p"),
        ]);
        assert!(ok.problems().is_empty(), "{:?}", ok.problems());
        assert!(!format!("{:?}", ok.redacted()).contains("\"p\""));
    }

    #[test]
    fn a_cache_without_registry_resolves_nothing_and_never_fails() {
        let cache = IdCache::none();
        let bytes = [0u8, 0, 0, 0, 7, 1, 2];
        assert_eq!(crate::codec::confluent_id(&bytes), Some(7));
        assert!(cache.ensure_blocking(&bytes).is_ok());
        assert_eq!(cache.fingerprint(7), None);
    }
}
