//! Topic provisioning (`presence topics`): creates what is missing, verifies what exists,
//! and reports a topic with the wrong settings as an error that says how to fix it. Running
//! it twice changes nothing.

use std::fmt;

use rdkafka::admin::{AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{Config, TopicsConfig};
use crate::kafka::{admin_client, ADMIN_TIMEOUT};

/// What a topic must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
    /// Topic-level settings that must have exactly these values.
    pub configs: Vec<(&'static str, String)>,
    /// Why the topic exists, for error messages.
    pub role: &'static str,
}

/// Every topic presence uses, public and internal.
pub fn specs(t: &TopicsConfig) -> Vec<TopicSpec> {
    let ms = |d: std::time::Duration| d.as_millis().to_string();
    let delete = |retention: std::time::Duration| {
        vec![
            ("cleanup.policy", "delete".to_string()),
            ("retention.ms", ms(retention)),
        ]
    };
    // Compaction that really happens: segments roll at least every `compacted_segment`, and
    // the cleaner runs once 10% of the log is dirty (the broker default is 50%).
    let compact = || {
        vec![
            ("cleanup.policy", "compact".to_string()),
            ("segment.ms", ms(t.compacted_segment)),
            ("min.cleanable.dirty.ratio", "0.1".to_string()),
        ]
    };
    let spec = |name: String, partitions, configs, role| TopicSpec {
        name,
        partitions,
        replication: t.replication_factor,
        configs,
        role,
    };
    vec![
        spec(t.heartbeats.clone(), t.heartbeats_partitions, delete(t.heartbeats_retention), "heartbeats, keyed by session id"),
        spec(t.facility_status.clone(), t.facility_partitions, compact(), "facility transitions; the latest record per facility is its status, so it must be compacted"),
        spec(t.dead_letters.clone(), t.heartbeats_partitions, delete(t.dead_letters_retention), "records that could not be processed"),
        spec(t.session_transitions(), t.facility_partitions, delete(t.heartbeats_retention), "internal: session transitions re-keyed by facility"),
        spec(t.sessions_changelog(), t.heartbeats_partitions, compact(), "internal: stage-1 state, one partition per heartbeats partition"),
        spec(t.facilities_changelog(), t.facility_partitions, compact(), "internal: stage-2 state, one partition per facility partition"),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Verified,
    /// Exists with the wrong settings; each line says what is wrong and how to fix it.
    Wrong(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub topics: Vec<(String, Outcome)>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.topics
            .iter()
            .all(|(_, o)| !matches!(o, Outcome::Wrong(_)))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, outcome) in &self.topics {
            match outcome {
                Outcome::Created => writeln!(f, "created   {name}")?,
                Outcome::Verified => writeln!(f, "ok        {name}")?,
                Outcome::Wrong(problems) => {
                    writeln!(f, "WRONG     {name}")?;
                    for p in problems {
                        writeln!(f, "          - {p}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error(
        "cannot reach Kafka at {brokers} ({detail}); start it (make stack) or set KAFKA_BROKERS"
    )]
    Unreachable { brokers: String, detail: String },
    #[error(
        "creating topic {topic} failed: {code}; check the broker log and the ACLs of this client"
    )]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("reading the settings of topic {topic} failed: {detail}")]
    Describe { topic: String, detail: String },
}

/// Creates missing topics and verifies existing ones against `specs(config)`.
pub async fn ensure(config: &Config) -> Result<Report, TopicsError> {
    let brokers = config.kafka.brokers.clone();
    let unreachable = |detail: String| TopicsError::Unreachable {
        brokers: brokers.clone(),
        detail,
    };
    let admin = admin_client(&config.kafka).map_err(|e| unreachable(e.to_string()))?;
    // A one-shot blocking call at start-up; the admin client has no async metadata call.
    let metadata = admin
        .inner()
        .fetch_metadata(None, ADMIN_TIMEOUT)
        .map_err(|e| unreachable(e.to_string()))?;
    let existing: std::collections::HashMap<&str, i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name(), t.partitions().len() as i32))
        .collect();
    let opts = AdminOptions::new()
        .request_timeout(Some(ADMIN_TIMEOUT))
        .operation_timeout(Some(ADMIN_TIMEOUT));
    let mut report = Report { topics: Vec::new() };
    for spec in specs(&config.topics) {
        let outcome = match existing.get(spec.name.as_str()) {
            Some(&partitions) => {
                Outcome::from_problems(verify(&admin, &opts, &spec, partitions, &brokers).await?)
            }
            None => {
                let mut new = NewTopic::new(
                    &spec.name,
                    spec.partitions,
                    TopicReplication::Fixed(spec.replication),
                );
                for (k, v) in &spec.configs {
                    new = new.set(k, v);
                }
                let results = admin
                    .create_topics([&new], &opts)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                match results.into_iter().next() {
                    Some(Ok(_)) => Outcome::Created,
                    // Created meanwhile by another `presence topics`: verify it like any other.
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Outcome::from_problems(
                        verify(&admin, &opts, &spec, spec.partitions, &brokers).await?,
                    ),
                    Some(Err((_, code))) => {
                        return Err(TopicsError::Create {
                            topic: spec.name.clone(),
                            code,
                        })
                    }
                    None => {
                        return Err(TopicsError::Create {
                            topic: spec.name.clone(),
                            code: RDKafkaErrorCode::Unknown,
                        })
                    }
                }
            }
        };
        report.topics.push((spec.name, outcome));
    }
    Ok(report)
}

impl Outcome {
    fn from_problems(problems: Vec<String>) -> Outcome {
        if problems.is_empty() {
            Outcome::Verified
        } else {
            Outcome::Wrong(problems)
        }
    }
}

async fn verify(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    opts: &AdminOptions,
    spec: &TopicSpec,
    partitions: i32,
    brokers: &str,
) -> Result<Vec<String>, TopicsError> {
    let describe_err = |detail: String| TopicsError::Describe {
        topic: spec.name.clone(),
        detail,
    };
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(&spec.name)], opts)
        .await
        .map_err(|e| describe_err(e.to_string()))?;
    let resource = match results.into_iter().next() {
        Some(Ok(r)) => r,
        Some(Err(code)) => return Err(describe_err(code.to_string())),
        None => return Err(describe_err("no answer".into())),
    };
    let actual: Vec<(String, Option<String>)> = resource
        .entries
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    Ok(problems(spec, partitions, &actual, brokers))
}

/// What is wrong with an existing topic, each item with its fix. Pure, so it is unit-tested.
pub fn problems(
    spec: &TopicSpec,
    partitions: i32,
    actual: &[(String, Option<String>)],
    brokers: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    if partitions != spec.partitions {
        out.push(format!(
            "has {partitions} partitions, the configuration says {}: partitions cannot change under running state (keys would move); \
             set the matching topics.*_partitions to {partitions}, or delete and recreate the topic ({})",
            spec.partitions, spec.role
        ));
    }
    for (key, want) in &spec.configs {
        let have = actual
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.clone());
        if have.as_deref() != Some(want.as_str()) {
            out.push(format!(
                "{key}={} but must be {want} ({}): run kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics --entity-name {} --add-config {key}={want}",
                have.as_deref().unwrap_or("<unset>"),
                spec.role,
                spec.name
            ));
        }
    }
    out
}

/// With `schema_registry.framing = "confluent"`: registers the value subjects of the public
/// topics (`<topic>-value` for `heartbeats` and `facility-status`) in the schema registry,
/// every released schema version oldest first under FULL_TRANSITIVE compatibility, so that
/// the registry refuses an incompatible schema from any producer. Returns one report line
/// per subject; nothing with the default framing. Running it twice changes nothing.
pub async fn register_subjects(
    config: &Config,
) -> Result<Vec<String>, crate::registry::RegistryError> {
    use crate::records::{FacilityStatus, Heartbeat};
    use crate::registry::{register_history, value_subject, Framing, RegistryClient};
    let registry = &config.schema_registry;
    if registry.framing != Framing::Confluent {
        return Ok(Vec::new());
    }
    let Some(client) = RegistryClient::new(registry)? else {
        return Ok(Vec::new());
    };
    let t = &config.topics;
    let heartbeats = value_subject(&t.heartbeats);
    let status = value_subject(&t.facility_status);
    let lines = vec![
        (
            register_history::<Heartbeat>(&client, &heartbeats).await?,
            heartbeats,
        ),
        (
            register_history::<FacilityStatus>(&client, &status).await?,
            status,
        ),
    ];
    Ok(lines
        .into_iter()
        .map(|(id, subject)| {
            format!(
                "subject   {subject} (FULL_TRANSITIVE, current schema id {id}) at {}",
                client.url()
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_is_covered_and_internal_ones_share_the_prefix() {
        let t = TopicsConfig::default();
        let s = specs(&t);
        assert_eq!(s.len(), 6);
        assert_eq!(
            s.iter()
                .filter(|s| s.name.starts_with(&t.internal_prefix))
                .count(),
            3
        );
        let status = s.iter().find(|s| s.name == "facility-status").unwrap();
        assert!(status
            .configs
            .contains(&("cleanup.policy", "compact".into())));
        // Stage-1 state is co-partitioned with its input.
        let sessions = s.iter().find(|s| s.name == t.sessions_changelog()).unwrap();
        assert_eq!(sessions.partitions, t.heartbeats_partitions);
    }

    #[test]
    fn a_wrong_cleanup_policy_is_reported_with_its_fix() {
        let t = TopicsConfig::default();
        let spec = specs(&t)
            .into_iter()
            .find(|s| s.name == "facility-status")
            .unwrap();
        let actual = vec![
            ("cleanup.policy".to_string(), Some("delete".to_string())),
            ("segment.ms".to_string(), Some("600000".to_string())),
            (
                "min.cleanable.dirty.ratio".to_string(),
                Some("0.1".to_string()),
            ),
        ];
        let p = problems(&spec, spec.partitions, &actual, "b:9092");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("cleanup.policy=delete but must be compact"),
            "{}",
            p[0]
        );
        assert!(
            p[0].contains("--add-config cleanup.policy=compact"),
            "{}",
            p[0]
        );
        let p = problems(&spec, spec.partitions + 1, &actual, "b:9092");
        assert_eq!(p.len(), 2);
        assert!(p[0].contains("partitions"));
    }
}
