//! The Kafka edge both stages share: one consumer-group member and one transactional
//! producer per stage, on a thread of their own, around a [`Stage`] that knows nothing
//! about transactions.
//!
//! Every transaction holds the stage's output records, its changelog writes and its input
//! offsets (with the stage's checkpoint in the offset metadata), so all of them become
//! visible together or not at all. Partitions are restored (changelog, then whatever the
//! stage needs) inside the rebalance callback ([`crate::rebalance`]), before the consumer
//! fetches them, and the consumer then starts exactly at the committed offsets the state
//! belongs to. Transaction errors follow librdkafka's classes ([`crate::txn`]): abortable
//! ones abort the transaction, rebuild every assigned partition's state from its changelog
//! and seek back to the committed offsets ([`crate::member`]); fatal ones also rebuild the
//! producer.
//!
//! # Broker restarts, fatal clients and the watchdogs
//!
//! librdkafka never recovers a client it declared fatal. A static group member is fenced
//! (`FencedInstanceId`) when the coordinator takes a newer join for its
//! `group.instance.id` — after a broker restart that can be its own abandoned join — and an
//! idempotent or transactional producer can be fenced by its coordinator. The loop checks
//! both clients every time round: a fatal producer is rebuilt and the state rewound; a
//! fatal consumer is closed (the open transaction aborted, every partition dropped) and a
//! new one joins, which restores its partitions from the changelogs as on any assignment.
//! Fenced again and again within a minute (another live instance with the same
//! `processor.instance_id`), the stage gives up with an error and the process exits
//! non-zero.
//!
//! Clients that are not fatal but make no progress are replaced by the watchdogs
//! ([`crate::watchdog`]): a consumer that has held no partition for longer than a group
//! session timeout while its group has fewer members than the input topic has partitions
//! (it lost its assignment and never got it back), and a producer whose transaction calls
//! have kept failing for [`crate::txn::PRODUCER_FAILING_LIMIT`]. Each replacement is counted
//! in `presence_watchdog_replacements_total{stage,client}` and named on `/readyz`.
//!
//! Health: readiness component `<stage>` is the stage itself (restores, rewinds, rebuilt
//! clients, failing transactions, input held back); `<stage>.kafka` is 503 while neither
//! the consumer nor the producer has a live broker connection. Liveness: the loop beats a
//! pulse every time round, also while it waits for a broker to come back; `/healthz` fails
//! once it has not for [`STALL`].

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use presence_core::config::Config;
use presence_core::kafka::{
    restore_consumer_config, stage_consumer_config, stage_session_timeout,
    transactional_producer_config, BrokerWatch,
};
use presence_core::metrics::ConsumerLag;
use presence_core::telemetry::{Health, Pulse};
use presence_core::Shutdown;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::member::{seek_each, Member, SEEK_TIMEOUT};
use crate::metrics::Metrics;
use crate::rebalance::{lock, GroupState, StageContext};
use crate::stage::{now_ms, Clock, Stage};
use crate::takeover::{group_instance_id, transactional_id, Successor};
use crate::txn::{Txn, TxnIo};
use crate::watchdog::{assignment_verdict, AssignmentWatch, GroupView};

/// A stage loop that has not gone round for this long is stuck, and `/healthz` says so.
/// Every blocking step it takes is bounded well below: transaction calls give up after
/// 30 s, a producer rebuild attempt after 30 s, and a restore (during which the check is
/// held) after a minute without records.
pub const STALL: Duration = Duration::from_secs(120);

/// Fatal consumer errors this close together mean another live instance shares this one's
/// `group.instance.id`: rebuilding would only fence it back, so the stage stops.
const FENCED_AGAIN_WITHIN: Duration = Duration::from_secs(60);
const MAX_FENCES: usize = 3;

/// A consumer is never rebuilt sooner than this after it was built (the broker may still
/// be away).
const REBUILD_PAUSE: Duration = Duration::from_secs(1);
/// How long a new consumer waits for its predecessor to finish closing (see [`retire`]).
const RETIRE_WAIT: Duration = Duration::from_secs(5);

/// When the broker does not describe the group, the watchdog replaces a consumer without
/// partitions only after this long (an outage is on readiness already).
const ASSIGNMENT_GIVE_UP: Duration = Duration::from_secs(60);
/// How long asking for a partition's end offset at a clean stop may block (each snapshot
/// the stage writes asks once).
const END_OFFSET_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the watchdog's look at the group (members, partitions) may block.
const GROUP_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The loop's longest wait for records: ticks, commits and watchdogs run at least this often.
const POLL_WAIT: Duration = Duration::from_millis(50);
/// Records taken per burst before the clock, ticks and commit checks run again.
const BURST: usize = 1024;
/// Longer than this away from the consumer (between polls, or blocked inside one), and the
/// expiry clock waits until the queue has been read to empty (`consume`).
const AWAY_MS: i64 = 100;

/// Why one consumer's run ended.
enum Ended {
    Shutdown,
    /// librdkafka declared the consumer fatal: build a new one.
    Fatal(String),
    /// A rewind failed: typically the consumer cannot get its partitions' committed offsets
    /// because its group coordinator does not answer it (after a broker restart, while the
    /// member is being fenced or rebalanced). Retrying with the same member has been seen
    /// to time out again and again; a new member finds the coordinator afresh, and its
    /// assignment restores every partition as usual.
    Rejoin(String),
    /// The assignment watchdog: the consumer lost its partitions and did not get them back.
    Watchdog(String),
    /// A defect of the stage (a checkpoint that cannot be stored): the stage stops.
    Defect(String),
}

type StageConsumer<S> = BaseConsumer<StageContext<S>>;

/// Runs `stage` until `shutdown`: blocks the calling thread.
pub fn run_stage<S: Stage>(
    config: &Config,
    stage: S,
    metrics: Metrics,
    health: Health,
    health_name: &'static str,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let pc = &config.processor;
    let instance = if pc.instance_id.is_empty() {
        presence_core::kafka::hostname()
    } else {
        pc.instance_id.clone()
    };
    let group = format!("{}.{}", pc.group_id, S::NAME);
    let role = format!("processor-{}", S::NAME);
    let producer_config =
        transactional_producer_config(&config.kafka, &role, &transactional_id(&group, &instance));
    let restore_config = restore_consumer_config(
        &config.kafka,
        &format!("processor-{}-restore", S::NAME),
        &format!("{group}.restore"),
    );
    let consumer_config = stage_consumer_config(
        &config.kafka,
        &role,
        &group,
        &group_instance_id(S::NAME, &instance),
    );
    let topic = stage.input_topic();
    let brokers = BrokerWatch::new(
        &health,
        crate::leak(format!("{health_name}.kafka")),
        &config.kafka.brokers,
    );
    let pulse = health.pulse(health_name, STALL);
    let txn = Txn::new(
        producer_config.clone(),
        brokers.clone(),
        TxnIo {
            stage: S::NAME,
            metrics: metrics.clone(),
            health: health.clone(),
            health_name,
            shutdown: shutdown.clone(),
        },
    )
    .map_err(|e| {
        anyhow::anyhow!("cannot start the {} stage's transactional producer at {}: {e}; is Kafka up (make stack) and KAFKA_BROKERS right?", S::NAME, config.kafka.brokers)
    })?;
    health.register(health_name);
    let shared = Arc::new(Mutex::new(Member {
        stage,
        txn,
        restore_config,
        consumed_since_commit: false,
        positions: HashMap::new(),
        assigned: BTreeSet::new(),
        paused: BTreeSet::new(),
        read: HashMap::new(),
        needs_rewind: false,
        defect: None,
        metrics: metrics.clone(),
        health: health.clone(),
        health_name,
        topic,
        pulse: pulse.clone(),
        successor: Successor {
            instance: instance.clone(),
            group: group.clone(),
            stage: S::NAME,
            producer: producer_config,
            lookup: presence_core::kafka::consumer_config(
                &config.kafka,
                &format!("processor-{}-takeover", S::NAME),
                &group,
            )
            .set("isolation.level", "read_uncommitted")
            .clone(),
            looker: None,
        },
    }));
    let mut fences: Vec<Instant> = Vec::new();
    loop {
        let group_state = Arc::new(Mutex::new(GroupState::default()));
        let consumer: StageConsumer<S> = consumer_config.create_with_context(StageContext {
            shared: shared.clone(),
            lag: ConsumerLag::for_stage(&metrics.consumer_lag, S::NAME),
            brokers: brokers.clone(),
            group: group_state.clone(),
            retired: AtomicBool::new(false),
        })?;
        consumer.subscribe(&[topic])?;
        // Pauses belong to the consumer they were made on.
        {
            let mut g = lock(&shared);
            g.paused.clear();
            g.read.clear();
        }
        health.set_ready(health_name);
        tracing::info!(stage = S::NAME, %group, topic, "stage running");
        let created = Instant::now();
        let reason = match consume::<S>(
            &consumer,
            &shared,
            config,
            &pulse,
            &shutdown,
            &group,
            &group_state,
        ) {
            Ended::Shutdown => {
                close_on_shutdown(consumer, &shared);
                return Ok(());
            }
            Ended::Defect(e) => {
                lock(&shared).abort("defect");
                anyhow::bail!("the {} stage stops: {e}", S::NAME);
            }
            Ended::Fatal(reason) => {
                let now = Instant::now();
                fences.retain(|t| now.duration_since(*t) < FENCED_AGAIN_WITHIN);
                fences.push(now);
                if fences.len() >= MAX_FENCES {
                    anyhow::bail!("the {} stage's consumer was declared fatal {} times within {:?} (last: {reason}); another running instance probably has the same processor.instance_id '{instance}': give each instance its own", S::NAME, fences.len(), FENCED_AGAIN_WITHIN);
                }
                tracing::warn!(stage = S::NAME, %reason, "the consumer is unusable (librdkafka declared it fatal); closing it, then joining again with a new one and restoring from the changelogs");
                reason
            }
            Ended::Rejoin(reason) => {
                tracing::warn!(stage = S::NAME, %reason, "cannot rewind with this consumer; closing it, then joining again with a new one and restoring from the changelogs");
                reason
            }
            Ended::Watchdog(reason) => {
                tracing::warn!(stage = S::NAME, %reason, "assignment watchdog: closing the consumer, then joining again with a new one and restoring from the changelogs");
                metrics
                    .watchdog
                    .with_label_values(&[S::NAME, "consumer"])
                    .inc();
                format!("watchdog: {reason}")
            }
        };
        metrics
            .client_rebuilds
            .with_label_values(&[S::NAME, "consumer"])
            .inc();
        health.set_unready(
            health_name,
            format!("replacing the Kafka consumer ({reason}); its partitions restore from the changelogs"),
        );
        {
            // Nothing of this member may commit any more: the rebalance callbacks the close
            // runs must abort, not commit.
            let mut g = lock(&shared);
            g.abort("consumer_fatal");
            g.needs_rewind = true;
        }
        let closing = retire(consumer);
        let mut g = lock(&shared);
        let left: Vec<i32> = g.assigned.iter().copied().collect();
        for p in left {
            g.drop_partition(p);
        }
        g.positions.clear();
        g.needs_rewind = false;
        drop(g);
        if created.elapsed() < REBUILD_PAUSE {
            std::thread::sleep(REBUILD_PAUSE);
        }
        // A static member's requests still in flight when its successor joins can fence
        // the successor: give the old one a moment to finish closing, not a minute.
        let waiting = Instant::now();
        while closing.as_ref().is_some_and(|h| !h.is_finished()) && waiting.elapsed() < RETIRE_WAIT
        {
            pulse.beat();
            std::thread::sleep(Duration::from_millis(50));
        }
        pulse.beat();
        if shutdown.is_triggered() {
            return Ok(());
        }
    }
}

/// The consume-process-produce loop over one consumer, until shutdown or until the consumer
/// is to be replaced. A fatal producer is rebuilt here.
fn consume<S: Stage>(
    consumer: &StageConsumer<S>,
    shared: &Mutex<Member<S>>,
    config: &Config,
    pulse: &Pulse,
    shutdown: &Shutdown,
    group: &str,
    group_state: &Mutex<GroupState>,
) -> Ended {
    let base_interval = config.processor.commit_interval;
    let backlog_interval = (base_interval * 10)
        .min(Duration::from_secs(1))
        .max(base_interval);
    let mut out = Vec::new();
    // The assignment watchdog looks at the group after the consumer has held no partition
    // for a group session timeout: by then a member that lost its partitions has joined again.
    let mut watch = AssignmentWatch::new(stage_session_timeout(&config.kafka));
    let mut held_back = false;
    let topic = lock(shared).topic;
    let lateness = config.processor.allowed_lateness.as_millis() as i64;
    let prefetch = presence_core::kafka_memory::stage_prefetch_records(&config.kafka);
    // When the loop last returned from a poll, and, after it was away from the consumer
    // for longer than `AWAY_MS`, since when records may be waiting unread in librdkafka's
    // queue (cleared by a poll that finds the queue empty).
    let mut last_poll = now_ms();
    let mut unread_since: Option<i64> = None;
    while !shutdown.is_triggered() {
        pulse.beat();
        if let Some((code, reason)) = consumer.client().fatal_error() {
            return Ended::Fatal(format!("{code:?}: {reason}"));
        }
        // Replaying: long transactions for throughput. Live: `commit_interval`.
        let (commit_interval, timeout, holds_partitions, producer_ready) = {
            let mut g = lock(shared);
            if let Some((code, reason)) = g.txn.fatal_error() {
                tracing::error!(stage = S::NAME, error = ?code, reason, "the transactional producer is unusable (librdkafka declared it fatal); replacing it and rewinding");
                g.health.set_unready(
                    g.health_name,
                    format!("replacing the transactional producer after a fatal error: {reason}"),
                );
                g.txn.rebuild("fatal");
                // The open transaction died with the producer (the fence aborted it): what
                // the stage applied since the last commit is read again from the committed
                // state, even when the new producer is ready at once. Seed 7's long run, a
                // rerun: a producer fenced between two commits was replaced in 0.08 s, the
                // state kept two transitions whose records the fence had aborted, and their
                // facilities' `seq` skipped them.
                g.consumed_since_commit = false;
                g.needs_rewind = true;
            }
            // While the producer is replaced the loop goes on polling (the consumer's group
            // session and rebalances must be served, or it loses its partitions to a
            // session it cannot renew), but takes no records: they are read again after.
            let producer_ready = g.txn.ready();
            if !producer_ready {
                g.needs_rewind = true;
            }
            let commit_interval = if g.stage.backlogged() {
                backlog_interval
            } else {
                base_interval
            };
            let mut t = POLL_WAIT;
            // A held clock (below) has nothing due before it moves again.
            let wall = now_ms();
            let limit = |p| {
                consumer
                    .context()
                    .brokers
                    .partition_clock_limit(topic, p, wall)
            };
            if let Some(wake) = g.stage.next_wakeup(&Clock::new(wall, lateness, &limit)) {
                t = t.min(Duration::from_millis(
                    (wake - now_ms()).clamp(0, POLL_WAIT.as_millis() as i64) as u64,
                ));
            }
            if g.txn.is_open() {
                t = t.min(until_commit(&g, commit_interval));
            }
            (commit_interval, t, !g.assigned.is_empty(), producer_ready)
        };
        if let Some(empty) = watch.observe(holds_partitions, Instant::now()) {
            let view = group_view(consumer, group, shared);
            let state = lock(group_state).clone();
            let joining = state.join_state.starts_with("wait-");
            match assignment_verdict(&view, empty, ASSIGNMENT_GIVE_UP, joining) {
                Some(reason) => {
                    return Ended::Watchdog(format!(
                        "{reason} (its group handler: state {}, join state {})",
                        state.state, state.join_state
                    ))
                }
                None => watch.restart(Instant::now()),
            }
        }
        // Drain what is ready in one burst: the clock, ticks and commit checks run once per
        // burst, not per record. Outputs are handed to the producer after every record, since
        // a rebalance inside the next poll may commit the transaction.
        let mut wait = timeout;
        for _ in 0..BURST {
            // Time the loop spent away from its consumer (a commit, a restore, a replaced
            // producer) or blocked inside a poll (a rebalance callback): librdkafka went on
            // fetching meanwhile, so records stamped then may sit in its queue, unread.
            let before = now_ms();
            if before - last_poll > AWAY_MS {
                unread_since.get_or_insert(last_poll);
            }
            let started = Instant::now();
            let polled = consumer.poll(wait);
            last_poll = now_ms();
            let blocked = started.elapsed() > wait + Duration::from_millis(AWAY_MS as u64);
            if blocked {
                unread_since.get_or_insert(before);
            }
            let Some(polled) = polled else {
                if !blocked {
                    // An empty queue: everything fetched so far has been read.
                    unread_since = None;
                }
                break;
            };
            wait = Duration::ZERO;
            let mut g = lock(shared);
            match polled {
                Ok(m) if !g.needs_rewind => {
                    if g.assigned.contains(&m.partition()) {
                        g.txn.begin();
                        g.stage.on_message(&m, now_ms(), &mut out);
                        g.positions.insert(m.partition(), m.offset() + 1);
                        *g.read.entry(m.partition()).or_default() += 1;
                        g.consumed_since_commit = true;
                        g.send(&mut out);
                    }
                }
                Ok(_) => {}
                Err(KafkaError::PartitionEOF(p)) => {
                    position_at_end(consumer, &mut g, p);
                    g.stage.on_eof(p)
                }
                Err(KafkaError::MessageConsumptionFatal(code)) => {
                    return Ended::Fatal(
                        consumer
                            .client()
                            .fatal_error()
                            .map_or_else(|| format!("{code:?}"), |(c, r)| format!("{c:?}: {r}")),
                    );
                }
                Err(e) => {
                    // Connection errors are on readiness (`<stage>.kafka`) already, and
                    // librdkafka retries by itself.
                    tracing::debug!(stage = S::NAME, error = %e, "consumer error");
                }
            }
            if g.txn.is_open() && until_commit(&g, commit_interval).is_zero() {
                break;
            }
        }
        let mut g = lock(shared);
        let wall = now_ms();
        if !g.needs_rewind {
            // The wall clock as far as each partition may go (`Clock`): behind by the
            // allowed lateness, and held while the brokers or its leader are away and until
            // producers have delivered what they held (`BrokerWatch::partition_clock_limit`);
            // and not past the moment the loop last left its consumer until the queue it
            // left has been read to empty.
            let now = unread_since.map_or(wall, |t| t.min(wall));
            let limit = |p| {
                consumer
                    .context()
                    .brokers
                    .partition_clock_limit(topic, p, now)
            };
            g.stage
                .on_tick(&Clock::new(now, lateness, &limit).with_wall(wall), &mut out);
            g.send(&mut out);
        }
        let commit_due = until_commit(&g, commit_interval).is_zero();
        let due = g.txn.is_open() && commit_due;
        let idle_due =
            !g.txn.is_open() && g.stage.commits_when_idle() && !g.assigned.is_empty() && commit_due;
        if (due || idle_due) && !g.needs_rewind {
            if idle_due {
                g.txn.begin();
            }
            g.finish_transaction(consumer);
        }
        if let Some(defect) = g
            .defect
            .take()
            .or_else(|| g.stage.defect().map(str::to_string))
        {
            return Ended::Defect(defect);
        }
        if !producer_ready {
            out.clear();
        }
        if g.needs_rewind && producer_ready {
            g.abort("rewind");
            out.clear();
            if consumer.client().fatal_error().is_some() {
                // Rewinding needs a live consumer: build one first (next time round).
                continue;
            }
            resume_all(consumer, &mut g);
            match g.rewind(consumer) {
                Ok(()) => g.health.set_ready(g.health_name),
                Err(e) => {
                    g.health
                        .set_unready(g.health_name, format!("cannot restore state: {e}"));
                    return Ended::Rejoin(format!("rewind failed: {e}"));
                }
            }
        }
        read_again(consumer, &mut g);
        align(consumer, &mut g, prefetch);
        match g.stage.held_back() {
            Some(reason) => {
                g.health.set_unready(g.health_name, reason);
                held_back = true;
            }
            None if held_back => {
                g.health.set_ready(g.health_name);
                held_back = false;
            }
            None => {}
        }
    }
    Ended::Shutdown
}

/// How long until the open transaction (or, when none is open, the next idle one) is due:
/// `interval` after it began, a tenth of that while the stage holds something a user waits
/// for.
fn until_commit<S: Stage>(g: &Member<S>, interval: Duration) -> Duration {
    let interval = if g.stage.urgent() {
        interval / 10
    } else {
        interval
    };
    interval.saturating_sub(g.txn.started().elapsed())
}

/// How long the loop may wait for an empty partition's offsets ([`position_at_end`]).
const EMPTY_END_TIMEOUT: Duration = Duration::from_millis(500);

/// A partition restored with nothing committed (a new topic) had no position until its
/// first record, so its transactions committed no offset and no checkpoint for it, while
/// stage 1 sent its watermarks from the moment it reached the end. A rewind before that first
/// record restarted its clock afresh, below the watermarks already sent: a record stamped
/// before them then made an event that stage 2 had already passed, applied out of order (the
/// chaos verdict's *none before a watermark its source sent earlier*). At the end of such a
/// partition, its first offset (the log's start: the partition read from its beginning and
/// found nothing) is its position until its first record, so that every commit carries its
/// checkpoint. Not the end offset: a record appended since the end was reached would sit
/// below it, unread, and a restart from it would skip the record. One offset lookup per empty
/// partition; if it fails, the partition goes on as before and its first record gives it a
/// position.
fn position_at_end<S: Stage>(consumer: &StageConsumer<S>, g: &mut Member<S>, p: i32) {
    if g.positions.contains_key(&p) || !g.assigned.contains(&p) {
        return;
    }
    match consumer.fetch_watermarks(g.topic, p, EMPTY_END_TIMEOUT) {
        Ok((low, _)) => {
            g.positions.insert(p, low);
        }
        Err(e) => {
            tracing::debug!(stage = S::NAME, partition = p, error = %e, "no first offset for an empty partition yet; its first record gives it a position")
        }
    }
}

/// Seeks to the input positions the stage asks to read again (records it let go from
/// memory to stay within its bound). A failed seek rewinds every partition instead.
fn read_again<S: Stage>(consumer: &StageConsumer<S>, g: &mut Member<S>) {
    let seeks = g.stage.take_seeks();
    if seeks.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for &(p, offset) in &seeks {
        if g.assigned.contains(&p) {
            if let Err(e) = tpl.add_partition_offset(g.topic, p, Offset::Offset(offset)) {
                tracing::error!(stage = S::NAME, partition = p, offset, error = %e, "cannot read the partition again from this offset; rewinding");
                g.needs_rewind = true;
                return;
            }
        }
    }
    if tpl.count() == 0 {
        return;
    }
    match seek_each(consumer, tpl) {
        Ok(()) => {
            for (p, offset) in seeks {
                if let Some(next) = g.positions.get_mut(&p) {
                    *next = (*next).min(offset);
                }
            }
            tracing::debug!(stage = S::NAME, "reading again");
        }
        Err(e) => {
            tracing::error!(stage = S::NAME, error = %e, "a seek to read again failed; rewinding");
            g.needs_rewind = true;
        }
    }
}

/// Pauses and resumes partitions as the stage asks, so that they are read in step
/// ([`crate::align`]). A pause throws away what librdkafka prefetched for the partition; it
/// fetches again from the next record the loop has not read.
fn align<S: Stage>(consumer: &StageConsumer<S>, g: &mut Member<S>, prefetch: u64) {
    let read_a_fetch: BTreeSet<i32> = g
        .read
        .iter()
        .filter(|(_, &n)| n >= prefetch)
        .map(|(&p, _)| p)
        .collect();
    let want: BTreeSet<i32> = g
        .stage
        .to_pause(&g.paused, &read_a_fetch)
        .intersection(&g.assigned)
        .copied()
        .collect();
    if want == g.paused {
        return;
    }
    let pause: Vec<i32> = want.difference(&g.paused).copied().collect();
    let resume: Vec<i32> = g.paused.difference(&want).copied().collect();
    if !pause.is_empty() {
        if let Err(e) = consumer.pause(&partition_list(g.topic, &pause)) {
            // Nothing lost: the partitions go on being read, out of step.
            tracing::warn!(stage = S::NAME, partitions = ?pause, error = %e, "cannot pause partitions that are read ahead of the others");
            return;
        }
    }
    if !resume.is_empty() {
        if let Err(e) = consumer.resume(&partition_list(g.topic, &resume)) {
            tracing::warn!(stage = S::NAME, partitions = ?resume, error = %e, "cannot resume partitions paused to read in step; trying again");
            return;
        }
        wake_fetcher(consumer, g, &resume);
        for p in &resume {
            g.read.insert(*p, 0);
        }
    }
    tracing::debug!(stage = S::NAME, ?pause, ?resume, "reading in step");
    g.paused = want;
}

/// Seeks resumed partitions to where the loop goes on reading, so that they are fetched now.
///
/// A resume alone only clears a flag (librdkafka 2.12.1 handles it on its main thread); the
/// thread of the broker leading the partition notices at its next wake-up. On a cluster,
/// reading in step can pause every partition a broker leads, and that broker's thread then
/// sleeps for up to a second (its `rd_kafka_max_block_ms`) with no fetch in flight to wake
/// it: each resume cost a second, and one instance read 7 k heartbeats/s on the three-node
/// cluster against 529 k/s without pausing. A seek moves the partition's fetch state, which
/// wakes the broker's thread (`rd_kafka_toppar_set_fetch_state`). It seeks to the record the
/// pause would have resumed at, so nothing is read twice or skipped.
fn wake_fetcher<S: Stage>(consumer: &StageConsumer<S>, g: &Member<S>, resumed: &[i32]) {
    let mut tpl = TopicPartitionList::new();
    for p in resumed {
        if let Some(&next) = g.positions.get(p) {
            if tpl
                .add_partition_offset(g.topic, *p, Offset::Offset(next))
                .is_err()
            {
                return;
            }
        }
    }
    if tpl.count() == 0 {
        return;
    }
    // Nothing lost if it fails: the partition is fetched at the broker thread's next wake-up.
    if let Err(e) = consumer.seek_partitions(tpl, SEEK_TIMEOUT) {
        tracing::debug!(stage = S::NAME, partitions = ?resumed, error = %e, "a seek to wake the fetcher of resumed partitions failed");
    }
}

/// Resumes every partition the loop paused (before a rewind seeks them).
fn resume_all<S: Stage>(consumer: &StageConsumer<S>, g: &mut Member<S>) {
    if g.paused.is_empty() {
        return;
    }
    let paused: Vec<i32> = std::mem::take(&mut g.paused).into_iter().collect();
    if let Err(e) = consumer.resume(&partition_list(g.topic, &paused)) {
        tracing::warn!(stage = S::NAME, partitions = ?paused, error = %e, "cannot resume partitions paused to read in step");
    }
}

pub(crate) fn partition_list(topic: &str, partitions: &[i32]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    tpl
}

/// What the broker says about `group`: its member count and the input topic's partition
/// count (for the assignment watchdog).
fn group_view<S: Stage>(
    consumer: &StageConsumer<S>,
    group: &str,
    shared: &Mutex<Member<S>>,
) -> GroupView {
    let topic = lock(shared).topic;
    let members = match consumer.fetch_group_list(Some(group), GROUP_QUERY_TIMEOUT) {
        Ok(list) => list
            .groups()
            .iter()
            .find(|g| g.name() == group)
            .map_or(0, |g| g.members().len()),
        Err(e) => return GroupView::Unknown(format!("group: {e}")),
    };
    let partitions = match consumer.fetch_metadata(Some(topic), GROUP_QUERY_TIMEOUT) {
        Ok(md) => md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len()),
        Err(e) => return GroupView::Unknown(format!("metadata: {e}")),
    };
    GroupView::Known {
        members,
        partitions,
    }
}

/// Lets a consumer that is being replaced go without waiting for it: closing a consumer
/// whose coordinator does not answer (typically a fenced static member, right after a
/// broker restart) has been seen to block for a minute (requests time out after
/// `socket.timeout.ms`), and the stage must not stand still meanwhile. It closes on a thread
/// of its own; its callbacks no longer touch the member (see `StageContext::retired`).
fn retire<S: Stage>(consumer: StageConsumer<S>) -> Option<std::thread::JoinHandle<()>> {
    consumer.context().retired.store(true, Ordering::Release);
    let spawned = std::thread::Builder::new()
        .name(format!("{}-retired-consumer", S::NAME))
        .spawn(move || {
            let started = Instant::now();
            drop(consumer);
            tracing::debug!(
                stage = S::NAME,
                seconds = started.elapsed().as_secs_f64(),
                "replaced consumer closed"
            );
        });
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            // The consumer went with the closure: it is closed right here.
            tracing::warn!(stage = S::NAME, error = %e, "cannot start a thread to close the replaced consumer; it was closed in place");
            None
        }
    }
}

/// SIGTERM: commits the open transaction (unless a rewind is pending) and leaves.
fn close_on_shutdown<S: Stage>(consumer: StageConsumer<S>, shared: &Mutex<Member<S>>) {
    tracing::info!(
        stage = S::NAME,
        "shutting down: committing the open transaction"
    );
    {
        let mut g = lock(shared);
        if !g.needs_rewind && consumer.client().fatal_error().is_none() {
            g.finish_transaction(&consumer);
            if !g.needs_rewind && !g.txn.is_open() && g.defect.is_none() {
                let positions = g.positions.clone();
                let end_of = presence_core::kafka::end_offsets(&consumer, END_OFFSET_TIMEOUT);
                g.stage.on_clean_stop(&positions, &end_of);
            }
        } else {
            g.abort("shutdown");
        }
    }
    consumer.unsubscribe();
    // Let the revoke callback run (it commits nothing more: the transaction is closed).
    let _ = consumer.poll(Duration::from_millis(100));
}
