//! Topic provisioning (`presence topics`): creates what is missing, verifies what exists,
//! and reports a topic with the wrong settings as an error that says how to fix it. Running
//! it twice changes nothing.
//!
//! Verification refuses only what the product depends on: the cleanup policy, the partition
//! count, and a retention shorter than the processor needs ([`Rule`]). A longer retention,
//! different tuning (`segment.ms`, `min.cleanable.dirty.ratio`) or a setting the broker does
//! not have at all (Redpanda has no `min.cleanable.dirty.ratio`) is accepted with a warning.

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
    /// Topic-level settings a new topic gets, and how an existing topic's value is judged.
    pub configs: Vec<(&'static str, String, Rule)>,
    /// Why the topic exists, for error messages.
    pub role: &'static str,
}

impl TopicSpec {
    /// The value a new topic gets for `key`.
    pub fn config(&self, key: &str) -> Option<&str> {
        self.configs
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, v, _)| v.as_str())
    }
}

/// How an existing topic's setting is judged against the value presence creates it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The product depends on this value (`cleanup.policy`): anything else is refused.
    Exact,
    /// A retention in ms of at least this much (-1, unlimited, counts as longer): shorter is
    /// refused; longer, or shorter than presence's default but enough, is accepted with a
    /// warning.
    AtLeastMs(i64),
    /// Tuning: a different value, or a broker without the setting, is a warning.
    Preferred,
}

/// The shortest retention of the processor's inputs (`heartbeats`, session transitions):
/// stage-1 restore re-reads the heartbeats of the last session timeout before its
/// checkpoint, and a restart needs as much again to find its committed offsets' records.
pub fn min_input_retention(session_timeout: std::time::Duration) -> std::time::Duration {
    session_timeout * 2
}

/// Every topic presence uses, public and internal, for processes whose sessions time out
/// after `session_timeout` (`processor.session_timeout`).
pub fn specs(t: &TopicsConfig, session_timeout: std::time::Duration) -> Vec<TopicSpec> {
    let ms = |d: std::time::Duration| d.as_millis().to_string();
    let min_input = min_input_retention(session_timeout).as_millis() as i64;
    let delete = |retention: std::time::Duration, min_ms: i64| {
        vec![
            ("cleanup.policy", "delete".to_string(), Rule::Exact),
            ("retention.ms", ms(retention), Rule::AtLeastMs(min_ms)),
        ]
    };
    // Compaction that really happens: segments roll at least every `compacted_segment`, and
    // the cleaner runs once 10% of the log is dirty (the broker default is 50%).
    let compact = || {
        vec![
            ("cleanup.policy", "compact".to_string(), Rule::Exact),
            ("segment.ms", ms(t.compacted_segment), Rule::Preferred),
            (
                "min.cleanable.dirty.ratio",
                "0.1".to_string(),
                Rule::Preferred,
            ),
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
        spec(t.heartbeats.clone(), t.heartbeats_partitions, delete(t.heartbeats_retention, min_input), "heartbeats, keyed by session id"),
        spec(t.facility_status.clone(), t.facility_partitions, compact(), "facility transitions; the latest record per facility is its status, so it must be compacted"),
        // Dead letters are for operators: any retention will do.
        spec(t.dead_letters.clone(), t.heartbeats_partitions, delete(t.dead_letters_retention, 0), "records that could not be processed"),
        spec(t.session_transitions(), t.facility_partitions, delete(t.heartbeats_retention, min_input), "internal: session transitions re-keyed by facility"),
        spec(t.sessions_changelog(), t.heartbeats_partitions, compact(), "internal: stage-1 state, one partition per heartbeats partition"),
        spec(t.facilities_changelog(), t.facility_partitions, compact(), "internal: stage-2 state, one partition per facility partition"),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Verified,
    /// Exists with settings that differ from presence's but that it can work with (a longer
    /// retention, other tuning, a setting the broker does not have); each line says which.
    Accepted(Vec<String>),
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
                Outcome::Accepted(warnings) => {
                    writeln!(f, "ok        {name}")?;
                    for w in warnings {
                        writeln!(f, "          ! {w}")?;
                    }
                }
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
    for spec in specs(&config.topics, config.processor.session_timeout) {
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
                for (k, v, _) in &spec.configs {
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
    fn from_problems((problems, warnings): (Vec<String>, Vec<String>)) -> Outcome {
        if !problems.is_empty() {
            Outcome::Wrong(problems)
        } else if !warnings.is_empty() {
            Outcome::Accepted(warnings)
        } else {
            Outcome::Verified
        }
    }
}

/// How long a topic's settings may take to show after it was created.
const DESCRIBE_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

async fn verify(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    opts: &AdminOptions,
    spec: &TopicSpec,
    partitions: i32,
    brokers: &str,
) -> Result<(Vec<String>, Vec<String>), TopicsError> {
    let describe_err = |detail: String| TopicsError::Describe {
        topic: spec.name.clone(),
        detail,
    };
    // A topic created a moment ago can be described before the broker answering has its
    // configuration, and then comes back without entries: every broker reports every
    // setting it has, and `cleanup.policy` is one, so ask again for a while.
    let deadline = std::time::Instant::now() + DESCRIBE_SETTLE;
    let actual = loop {
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
        let complete = actual.iter().any(|(k, _)| k == "cleanup.policy");
        if complete || std::time::Instant::now() >= deadline {
            break actual;
        }
        tracing::debug!(topic = %spec.name, entries = actual.len(), "topic settings not reported yet; asking again");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    let judged = problems(spec, partitions, &actual, brokers);
    for w in &judged.1 {
        tracing::warn!(topic = %spec.name, "{w}");
    }
    Ok(judged)
}

/// What is wrong with an existing topic, each item with its fix, and what differs but is
/// accepted (warnings). Pure, so it is unit-tested.
pub fn problems(
    spec: &TopicSpec,
    partitions: i32,
    actual: &[(String, Option<String>)],
    brokers: &str,
) -> (Vec<String>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    if partitions != spec.partitions {
        out.push(format!(
            "has {partitions} partitions, the configuration says {}: partitions cannot change under running state (keys would move); \
             set the matching topics.*_partitions to {partitions}, or delete and recreate the topic ({})",
            spec.partitions, spec.role
        ));
    }
    for (key, want, rule) in &spec.configs {
        let fix = || {
            format!(
                "kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics --entity-name {} --add-config {key}={want}",
                spec.name
            )
        };
        let Some(entry) = actual.iter().find(|(k, _)| k == key) else {
            // The broker does not know the setting at all (describe lists every setting a
            // broker has, set or not).
            match rule {
                Rule::Exact => out.push(format!(
                    "{key} is not reported by the broker but must be {want} ({}): this broker cannot hold the topic presence needs",
                    spec.role
                )),
                _ => warnings.push(format!(
                    "{key} is not supported by this broker; presence would set {want} ({}): accepted",
                    spec.role
                )),
            }
            continue;
        };
        let have = entry.1.as_deref();
        if have == Some(want.as_str()) {
            continue;
        }
        let shown = have.unwrap_or("<unset>");
        match rule {
            Rule::Exact => out.push(format!(
                "{key}={shown} but must be {want} ({}): run {}",
                spec.role,
                fix()
            )),
            Rule::AtLeastMs(min) => match have.and_then(|h| h.parse::<i64>().ok()) {
                Some(h) if h < 0 || h >= *min => {
                    let how = if h < 0 { "unlimited".to_string() } else { format!("{h} ms") };
                    let needed = if *min > 0 {
                        format!("at least {min} ms is needed")
                    } else {
                        "any retention will do".to_string()
                    };
                    warnings.push(format!(
                        "{key} is {how} where presence would set {want} ms; {needed} ({}): accepted",
                        spec.role
                    ));
                }
                _ => out.push(format!(
                    "{key}={shown} is shorter than the {min} ms the processor needs (twice processor.session_timeout) ({}): run {}",
                    spec.role,
                    fix()
                )),
            },
            Rule::Preferred => warnings.push(format!(
                "{key}={shown} where presence would set {want} ({}): accepted; to match, run {}",
                spec.role,
                fix()
            )),
        }
    }
    (out, warnings)
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

    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

    #[test]
    fn every_topic_is_covered_and_internal_ones_share_the_prefix() {
        let t = TopicsConfig::default();
        let s = specs(&t, TIMEOUT);
        assert_eq!(s.len(), 6);
        assert_eq!(
            s.iter()
                .filter(|s| s.name.starts_with(&t.internal_prefix))
                .count(),
            3
        );
        let status = s.iter().find(|s| s.name == "facility-status").unwrap();
        assert_eq!(status.config("cleanup.policy"), Some("compact"));
        // Stage-1 state is co-partitioned with its input.
        let sessions = s.iter().find(|s| s.name == t.sessions_changelog()).unwrap();
        assert_eq!(sessions.partitions, t.heartbeats_partitions);
    }

    #[test]
    fn a_wrong_cleanup_policy_is_reported_with_its_fix() {
        let t = TopicsConfig::default();
        let spec = specs(&t, TIMEOUT)
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
        let (p, _) = problems(&spec, spec.partitions, &actual, "b:9092");
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
        let (p, _) = problems(&spec, spec.partitions + 1, &actual, "b:9092");
        assert_eq!(p.len(), 2);
        assert!(p[0].contains("partitions"));
    }

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, Option<String>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect()
    }

    #[test]
    fn a_broker_without_a_tuning_setting_is_accepted_with_a_warning() {
        // Redpanda: no min.cleanable.dirty.ratio at all, another segment.ms.
        let t = TopicsConfig::default();
        let spec = specs(&t, TIMEOUT)
            .into_iter()
            .find(|s| s.name == "facility-status")
            .unwrap();
        let actual = entries(&[("cleanup.policy", "compact"), ("segment.ms", "3600000")]);
        let (p, w) = problems(&spec, spec.partitions, &actual, "b:9092");
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w.iter()
                .any(|w| w.starts_with("min.cleanable.dirty.ratio is not supported")),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|w| w.starts_with("segment.ms=3600000 where presence would set 600000")),
            "{w:?}"
        );
        // Without cleanup.policy the topic is refused: compaction is what the product needs.
        let (p, _) = problems(
            &spec,
            spec.partitions,
            &entries(&[("segment.ms", "600000")]),
            "b",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("cleanup.policy is not reported"), "{p:?}");
    }

    #[test]
    fn retention_longer_or_enough_is_accepted_shorter_than_needed_is_refused() {
        let t = TopicsConfig::default();
        let spec = specs(&t, TIMEOUT)
            .into_iter()
            .find(|s| s.name == "heartbeats")
            .unwrap();
        let judge = |retention: &str| {
            problems(
                &spec,
                spec.partitions,
                &entries(&[("cleanup.policy", "delete"), ("retention.ms", retention)]),
                "b:9092",
            )
        };
        assert_eq!(
            judge("86400000"),
            (vec![], vec![]),
            "the default: no remark"
        );
        for accepted in ["604800000", "-1", "3600000", "180000"] {
            let (p, w) = judge(accepted);
            assert!(p.is_empty(), "{accepted}: {p:?}");
            assert_eq!(w.len(), 1, "{accepted}: {w:?}");
            assert!(w[0].contains("at least 180000 ms is needed"), "{w:?}");
        }
        for refused in ["179999", "0", "soon"] {
            let (p, w) = judge(refused);
            assert!(w.is_empty(), "{refused}: {w:?}");
            assert_eq!(p.len(), 1, "{refused}: {p:?}");
            assert!(
                p[0].contains("shorter than the 180000 ms the processor needs"),
                "{p:?}"
            );
            assert!(p[0].contains("--add-config retention.ms=86400000"), "{p:?}");
        }
        // Dead letters: any retention, with a remark.
        let dlq = specs(&t, TIMEOUT)
            .into_iter()
            .find(|s| s.name == t.dead_letters)
            .unwrap();
        let (p, w) = problems(
            &dlq,
            dlq.partitions,
            &entries(&[("cleanup.policy", "delete"), ("retention.ms", "60000")]),
            "b",
        );
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(w.len(), 1, "{w:?}");
    }
}

/// Deletes every topic of `configs` (throw-away topics of benchmarks). Errors are logged:
/// whatever is left, `deploy/stack.sh sweep` does not know, so it is named.
pub async fn delete(configs: &[Config]) {
    let Some(first) = configs.first() else {
        return;
    };
    let admin = match admin_client(&first.kafka) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot delete throw-away topics: no admin client");
            return;
        }
    };
    let mut names: Vec<String> = configs
        .iter()
        .flat_map(|c| specs(&c.topics, c.processor.session_timeout))
        .map(|s| s.name)
        .collect();
    names.sort();
    names.dedup();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    if let Err(e) = admin.delete_topics(&refs, &opts).await {
        tracing::warn!(error = %e, topics = ?names, "could not delete throw-away topics; delete them by hand");
    }
}

/// Throw-away topics, deleted when this is dropped: on success, on an early `?` return and
/// on a panic alike (benchmarks make fresh topics per run and must leave nothing behind).
#[derive(Default)]
pub struct Throwaway(Vec<Config>);

impl Throwaway {
    pub fn of(c: &Config) -> Throwaway {
        Throwaway(vec![c.clone()])
    }

    pub fn add(&mut self, c: &Config) {
        self.0.push(c.clone());
    }
}

/// Removes the local state a processor of `c`'s throw-away group left under
/// `processor.state_dir`: its `<group_id>.<instance>` directories (stage 2's stores, stage 1's
/// shutdown snapshots).
pub fn remove_local_state(c: &Config) {
    let prefix = format!("{}.", c.processor.group_id);
    let Ok(entries) = std::fs::read_dir(&c.processor.state_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove a throw-away group's local state");
            }
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let configs = std::mem::take(&mut self.0);
        if configs.is_empty() {
            return;
        }
        for c in &configs {
            remove_local_state(c);
        }
        // A thread of its own: drop may run inside a runtime, which cannot block on another.
        let done = std::thread::spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(delete(&configs)),
                Err(e) => tracing::warn!(error = %e, "cannot delete throw-away topics: no runtime"),
            }
        })
        .join();
        if done.is_err() {
            tracing::warn!("deleting throw-away topics panicked");
        }
    }
}
