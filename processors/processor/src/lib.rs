//! `presence processor`: heartbeats in, exact facility transitions out, exactly-once.
//!
//! # Layout
//!
//! - [`sessions`]: stage 1's rules, pure: open sessions of one `heartbeats` partition, their
//!   expiry by stream time, and the session events they emit.
//! - [`facilities`]: stage 2's rules, pure: open-session counts per facility, applied in
//!   event-time order across sources, and the ONLINE/OFFLINE transitions they make;
//!   [`cold`]: the on-disk store its quiet facilities move to (`processor.facility_retention`).
//! - [`records`]: the internal Avro records between and behind the stages.
//! - [`stage1`], [`stage2`]: each stage's Kafka edge (decode, dead letters, changelog,
//!   restore, checkpoints in the offset metadata).
//! - [`stage`]: the contract between a stage's logic and the runner (the [`stage::Stage`]
//!   trait, output records, checkpoints).
//! - [`runner`]: the consume-process-produce loop both stages run in, one consumer and one
//!   transactional producer per stage, and the watchdogs that replace stuck clients;
//!   around it [`member`] (commit, restore and rewind of the assigned partitions),
//!   [`txn`] (the transaction state machine and librdkafka's error classes),
//!   [`rebalance`] (the rebalance callback) and [`watchdog`] (when a client is stuck,
//!   pure); [`restore`]: reading a partition back, and [`window`]: how much of the timeout
//!   window a stage-1 restore reads again (pure); [`align`]: which partitions stage 1 pauses
//!   so that a backlog is read in step (pure). Client settings live in
//!   `presence_core::kafka`, one function per role.
//! - [`metrics`]: every metric the processor exports; [`bench`]: `presence bench`, with
//!   [`measured`]: the processor as a child process whose memory is sampled from `/proc`.
//!
//! Data flow: `heartbeats` → stage 1 → `<prefix>session-transitions` (keyed by facility,
//! plus watermarks to every partition) → stage 2 → `facility-status`. Each stage is its own
//! consumer group with its own transactional producer, so each scales over its partitions.

pub mod align;
pub mod bench;
pub mod cold;
pub mod facilities;
pub mod measured;
pub mod member;
pub mod metrics;
pub mod rebalance;
pub mod records;
pub mod restore;
pub mod runner;
pub mod sessions;
pub mod snapshot;
pub mod soak;
pub mod stage;
pub mod stage1;
pub mod stage2;
pub mod takeover;
pub mod txn;
pub mod watchdog;
pub mod window;

use std::time::Duration;

use anyhow::Context;
use presence_core::kafka::{admin_client, ADMIN_TIMEOUT};
use presence_core::records::{FacilityStatus, Heartbeat};
use presence_core::registry::{header_for, value_subject, IdCache};
use presence_core::telemetry::{serve_ops, Health};
use presence_core::{Config, Shutdown};

pub(crate) fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// How long the processor waits at start for its topics to appear: right after `presence
/// topics` a broker can take a moment to list a new topic, and a loaded one longer.
const TOPIC_WAIT: Duration = Duration::from_secs(30);

/// Partition counts of the topics the stages are wired by, read from the broker. A topic
/// that is missing (or has no leaders yet) is asked for again, with backoff, for
/// [`TOPIC_WAIT`] before it is an error.
async fn partitions_of(config: &Config, topic: &str) -> anyhow::Result<i32> {
    let admin = admin_client(&config.kafka)?;
    let deadline = tokio::time::Instant::now() + TOPIC_WAIT;
    let mut backoff = Duration::from_millis(100);
    loop {
        let md = admin
            .inner()
            .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
            .with_context(|| {
                format!(
                    "cannot reach Kafka at {}; start it (make stack) or set KAFKA_BROKERS",
                    config.kafka.brokers
                )
            })?;
        let found = md
            .topics()
            .first()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32);
        if let Some(n) = found {
            return Ok(n);
        }
        if tokio::time::Instant::now() + backoff > deadline {
            anyhow::bail!(
                "topic {topic} does not exist (waited {} s); create the topics with `presence topics`",
                TOPIC_WAIT.as_secs()
            );
        }
        tracing::warn!(%topic, "topic not listed by the broker yet; waiting (create it with `presence topics`)");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Stage 2's state directory and retention (ms), prepared at start (created, emptied of
/// an earlier run's stores, checked writable); `None` with `processor.facility_retention`
/// off. One directory per group and instance, so that instances sharing a host (and
/// `processor.state_dir`) never touch each other's stores.
fn state_dir(config: &Config) -> anyhow::Result<Option<(std::path::PathBuf, i64)>> {
    let p = &config.processor;
    if p.facility_retention.is_zero() {
        return Ok(None);
    }
    let dir = cold::prepare_dir(&p.state_dir, &instance_dir_name(config))?;
    tracing::info!(dir = %dir.display(), retention = ?p.facility_retention, "stage 2 moves facilities quiet for longer than processor.facility_retention to disk");
    Ok(Some((dir, p.facility_retention.as_millis().max(1) as i64)))
}

/// This instance's directory under `processor.state_dir`: `<group_id>.<instance>`, made
/// safe as a file name.
fn instance_dir_name(config: &Config) -> String {
    let p = &config.processor;
    let instance = if p.instance_id.is_empty() {
        presence_core::kafka::hostname()
    } else {
        p.instance_id.clone()
    };
    format!("{}.{instance}", p.group_id)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Where stage 1's shutdown snapshots go (`processor.shutdown_snapshots`); `None` when they
/// are off. The directory is made when the stage stops (it only saves time: the processor
/// runs without it, and says so then); the temporary files of a write a crash cut short
/// are removed now.
fn snapshot_dir(config: &Config) -> Option<std::path::PathBuf> {
    let p = &config.processor;
    if !p.shutdown_snapshots {
        return None;
    }
    if p.state_dir.as_os_str().is_empty() {
        tracing::warn!("processor.state_dir is empty: no shutdown snapshots, every restart restores stage 1 from its changelog; name a writable local directory, or set processor.shutdown_snapshots = false to silence this");
        return None;
    }
    let dir = p.state_dir.join(instance_dir_name(config));
    snapshot::clear(&dir, true);
    Some(dir)
}

/// Runs both stages until `shutdown`, serving `/metrics`, `/healthz`, `/readyz` on
/// `processor.ops_listen`. Returns the ops address once serving, through `on_ready` (tests).
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    run_with(config, shutdown, |_| {}).await
}

pub async fn run_with(
    config: Config,
    shutdown: Shutdown,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let state_dir = state_dir(&config)?;
    let t = &config.topics;
    let sources = partitions_of(&config, &t.heartbeats).await?;
    let transition_partitions = partitions_of(&config, &t.session_transitions()).await?;
    if sources != t.heartbeats_partitions {
        tracing::warn!(topic = %t.heartbeats, actual = sources, configured = t.heartbeats_partitions, "heartbeats has another partition count than configured; using the topic's");
    }
    let registry = presence_core::metrics::registry();
    let health = Health::new(&registry);
    let metrics = metrics::Metrics::new(&registry);
    let (addr, ops) = serve_ops(
        config.processor.ops_listen,
        registry,
        health.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "processor ops endpoints listening");
    on_ready(addr);

    // Heartbeats in either framing; `facility-status` in the configured one.
    let ids = std::sync::Arc::new(IdCache::new(&config.schema_registry)?);
    ids.prewarm::<Heartbeat>(&value_subject(&t.heartbeats))
        .await;
    let status_header =
        header_for::<FacilityStatus>(&config.schema_registry, &t.facility_status).await?;

    let timeout = config.processor.session_timeout.as_millis() as i64;
    let stage1 = stage1::SessionsStage::new(
        stage1::Topics::of(t, transition_partitions),
        timeout,
        config.processor.max_clock_skew.as_millis() as i64,
    )
    .with_registry_ids(ids)
    .with_restore_concurrency(config.processor.restore_concurrency);
    let stage1 = match snapshot_dir(&config) {
        Some(dir) => stage1.with_snapshots(dir),
        None => stage1,
    };
    let stage2 = stage2::FacilitiesStage::new(
        stage2::Topics::of(t),
        sources as usize,
        config.processor.flap_hold.as_millis() as i64,
    )
    .with_max_buffered(config.processor.max_buffered_events)
    .with_status_header(status_header);
    let stage2 = match &state_dir {
        Some((dir, ms)) => stage2.with_retention(*ms, dir.clone()),
        None => stage2,
    };
    let (c1, m1, h1, s1) = (
        config.clone(),
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    );
    let one =
        tokio::task::spawn_blocking(move || runner::run_stage(&c1, stage1, m1, h1, "sessions", s1));
    let (c2, m2, h2, s2) = (config.clone(), metrics, health, shutdown.clone());
    let two = tokio::task::spawn_blocking(move || {
        runner::run_stage(&c2, stage2, m2, h2, "facilities", s2)
    });
    let (r1, r2) = tokio::join!(
        async {
            let r = one.await;
            shutdown.trigger();
            r
        },
        async {
            let r = two.await;
            shutdown.trigger();
            r
        }
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), ops).await;
    r1.context("stage 1 thread")?
        .context("stage 1 (sessions)")?;
    r2.context("stage 2 thread")?
        .context("stage 2 (facilities)")?;
    Ok(())
}
