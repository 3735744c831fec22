//! Kafka client builders: every client starts from the same base (brokers, client id,
//! pass-through properties) and adds only what its role needs. One function per role owns
//! that role's settings and says why each number was chosen: [`idempotent_producer_config`]
//! (gateway, load generator), [`consumer_config`] (readers), [`downstream_consumer_config`]
//! (notifier, sink), and the processor's three: [`transactional_producer_config`],
//! [`stage_consumer_config`] and [`restore_consumer_config`]. Run loops set nothing of their
//! own.
//!
//! This module depends on [`crate::config`] (for [`KafkaConfig`]), never the other way
//! round: the configuration checks its pass-through properties with librdkafka itself.

use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::telemetry::Health;

/// The settings every client shares. `role` ends up in the client id (`presence-gateway`).
pub fn base_config(k: &KafkaConfig, role: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    c.set("client.id", format!("{}-{role}", k.client_id));
    // Small requests (transaction commits, offset commits) must not wait for Nagle's
    // algorithm; Kafka's own clients disable it too.
    c.set("socket.nagle.disable", "true");
    for (key, value) in &k.properties {
        c.set(key, value.expose());
    }
    c
}

/// A producer that never loses or duplicates a record it was asked to send: idempotent,
/// acks=all. For the gateway and the load generator.
pub fn idempotent_producer_config(k: &KafkaConfig, role: &str) -> ClientConfig {
    let mut c = base_config(k, role);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        // One produce request in flight per broker connection, not librdkafka's 5.
        // librdkafka 2.12 (librdkafka issue #4953, fix in PR #4972 not yet released)
        // answers an OUT_OF_ORDER_SEQUENCE_NUMBER on the second to fifth request in flight,
        // which follows from the first one failing (a broker killed mid-request), by
        // bumping the producer's epoch and renumbering everything it sends again. The
        // broker deduplicates by (producer id, epoch, sequence), so a record of the failed
        // request that had in fact been written is written a second time, and acknowledged:
        // the chaos run (seed 4) caught loadgen writing an acknowledged beat twice during a
        // broker kill. With one request in flight there is no second request to fail that
        // way; a failed request is retried under the same epoch and sequence and
        // deduplicated. Batching (linger, up to a MiB a partition) keeps the rate.
        .set("max.in.flight.requests.per.connection", "1");
    c
}

/// A consumer that sees only committed records and never commits by itself.
pub fn consumer_config(k: &KafkaConfig, role: &str, group_id: &str) -> ClientConfig {
    let mut c = base_config(k, role);
    c.set("group.id", group_id)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    c
}

/// The notifier's and the sink's member of its group on `facility-status`: a consumer
/// (above) that fetches as soon as the processor commits, reports broker reachability, and
/// hands a dead member's partitions on within seconds.
pub fn downstream_consumer_config(k: &KafkaConfig, role: &str, group_id: &str) -> ClientConfig {
    let mut c = consumer_config(k, role, group_id);
    // Downstream latency: a fetch returns after 10 ms even when it has little.
    c.set("fetch.wait.max.ms", "10")
        // Broker reachability for readiness (BrokerWatch) and the lag metrics.
        .set("statistics.interval.ms", BROKER_WATCH_INTERVAL_MS);
    // A member killed with -9 keeps its partitions until its session expires: with
    // librdkafka's default (45 s) a restarted notifier left its regions' browsers without
    // transitions for 45 s (the chaos run's "notifier kill -9" recovery, 45.7 s, and the
    // sink's, 43.8 s). 10 s: several missed heartbeats (one a
    // second, on librdkafka's own thread, so a slow batch never misses one) before a
    // member counts as gone, and above the broker's group.min.session.timeout.ms (6 s).
    group_session(&mut c, k, DOWNSTREAM_SESSION_TIMEOUT_MS);
    c
}

/// A group member's `session.timeout.ms` (`session_ms`) and a heartbeat a second, unless
/// the operator passed either through.
fn group_session(c: &mut ClientConfig, k: &KafkaConfig, session_ms: u64) {
    unless_passed(c, k, "session.timeout.ms", session_ms.to_string());
    unless_passed(c, k, "heartbeat.interval.ms", "1000".into());
}

/// Sets `key` to `value` unless the operator passed the same key through
/// (`kafka.properties`), whose value then stands: for the timeouts and sizes the processes
/// choose for themselves but a deployment may know better.
pub fn unless_passed(c: &mut ClientConfig, k: &KafkaConfig, key: &str, value: String) {
    if !k.properties.contains_key(key) {
        c.set(key, value);
    }
}

/// The `session.timeout.ms` the stage consumers run with: `kafka.properties`' if given,
/// else [`STAGE_SESSION_TIMEOUT_MS`].
pub fn stage_session_timeout(k: &KafkaConfig) -> std::time::Duration {
    let ms = k
        .properties
        .get("session.timeout.ms")
        .and_then(|v| v.expose().parse().ok())
        .unwrap_or(STAGE_SESSION_TIMEOUT_MS);
    std::time::Duration::from_millis(ms)
}

/// `session.timeout.ms` of the notifier's and the sink's consumers, in ms (see
/// [`downstream_consumer_config`]).
pub const DOWNSTREAM_SESSION_TIMEOUT_MS: u64 = 10_000;

/// A stage's transactional producer (one per processor stage and instance).
/// `transactional_id` must be unique per running instance and stable across its restarts:
/// a restarted instance then aborts its predecessor's open transaction at once.
pub fn transactional_producer_config(
    k: &KafkaConfig,
    role: &str,
    transactional_id: &str,
) -> ClientConfig {
    let mut c = base_config(k, role);
    // A crashed instance's open transaction blocks read_committed readers until the
    // instance that takes its partitions over fences it (`presence_processor::takeover`),
    // or, should that fail, until it times out: 10 s bounds that stall, and is well above a
    // commit's duration.
    unless_passed(
        &mut c,
        k,
        "transaction.timeout.ms",
        TRANSACTION_TIMEOUT_MS.to_string(),
    );
    // Every commit waits for the transaction's last records, which are produced just before
    // it (stage 1's watermarks, one per partition of the transitions topic): a linger only
    // delays them. Records produced while a request is in flight still batch. 5 ms (the
    // default) against 0, `presence bench latency --rate 20000 --seconds 60`, five pairs
    // alternating: p99 507 against 172 ms, p50 80 against 68 ms (medians; README).
    unless_passed(&mut c, k, "linger.ms", "0".into());
    c.set("transactional.id", transactional_id)
        // Right after a commit the coordinator answers CONCURRENT_TRANSACTIONS until the
        // markers are written; librdkafka retries after retry.backoff.ms (default 100 ms),
        // which would add 100 ms to every commit.
        .set("retry.backoff.ms", "5")
        .set("retry.backoff.max.ms", "100")
        .set("compression.type", "lz4")
        // Broker reachability for readiness (BrokerWatch).
        .set("statistics.interval.ms", BROKER_WATCH_INTERVAL_MS);
    // Queue and batch sizes: the memory budget (after the settings above, so it wins).
    crate::kafka_memory::transactional_producer(&mut c, k);
    c
}

/// `transaction.timeout.ms` of the stages' producers, in ms (see
/// [`transactional_producer_config`]).
pub const TRANSACTION_TIMEOUT_MS: &str = "10000";

/// `session.timeout.ms` of the stage consumers, in ms: a member that stops heartbeating
/// (process gone, broker unreachable) loses its partitions after this, and it is most of a
/// takeover (the new owner fences the departed one's open transaction at once, see
/// `presence_processor::takeover`, so the transaction timeout no longer adds to it). 8 s:
/// a takeover under the 10 s issue 11 aims at, eight missed heartbeats (one a second, on
/// librdkafka's own thread, so a slow batch never misses one) before a member counts as
/// gone, and above the broker's group.min.session.timeout.ms (6 s). The processor's
/// assignment watchdog waits this long, too.
pub const STAGE_SESSION_TIMEOUT_MS: u64 = 8_000;

/// A stage's consumer-group member: read_committed, never commits by itself (offsets go
/// into the stage's transactions), told where a partition ends (stage 1 expires sessions of
/// caught-up partitions by wall clock), static membership under `group_instance_id`.
pub fn stage_consumer_config(
    k: &KafkaConfig,
    role: &str,
    group: &str,
    group_instance_id: &str,
) -> ClientConfig {
    let mut c = consumer_config(k, role, group);
    // Static membership: a restarted instance takes its partitions back at once instead of
    // waiting for the group to notice that its predecessor is gone.
    c.set("group.instance.id", group_instance_id)
        .set("enable.partition.eof", "true")
        // Live latency: a fetch returns after 10 ms even when it has little.
        .set("fetch.wait.max.ms", "10")
        // Lag metrics, the group state for the assignment watchdog, and broker
        // reachability (with the producer's).
        .set("statistics.interval.ms", BROKER_WATCH_INTERVAL_MS)
        // A connection to every broker, not only to those leading its partitions, so that
        // the broker watch sees any broker lost (`NodeOutage`): producers stall on every
        // partition when one broker dies. Seed 11 of the long chaos run: a broker that led
        // none of stage 1's partitions (leadership had moved off it after earlier kills) was
        // killed 70 ms after a session's first beat was stamped; the producer held the beat
        // 7 s, stage 1 had no connection to that broker and so held no clock, and the beat
        // was counted at the clock's time: a false OFFLINE. One idle connection per broker.
        .set("enable.sparse.connections", "false")
        // ...and to every broker that comes back. librdkafka (2.10 and later) forgets a
        // broker the cluster's metadata stops listing (a killed or stopped broker, once the
        // controller has fenced it) and learns it again only from the next metadata it
        // fetches: every five minutes by default. Until then this client has no connection
        // to it, so its next loss shows nowhere. Seed 11 of the long chaos run, second run:
        // broker 3 killed, back, stopped, back, killed again within 75 s; stage 1's watch saw
        // the first loss only, its clocks ran on through the last, and a session's END sent
        // just before it, delivered late, was counted after the clock: a short OFFLINE
        // missed. One metadata request per statistics interval for the subscribed topic.
        .set(
            "topic.metadata.refresh.interval.ms",
            BROKER_WATCH_INTERVAL_MS,
        );
    // An operator may pass a shorter session (kafka.properties, at least the broker's
    // group.min.session.timeout.ms) for faster takeovers: see [`stage_session_timeout`].
    group_session(&mut c, k, STAGE_SESSION_TIMEOUT_MS);
    // Prefetch and fetch sizes: the memory budget, which leaves a size passed through in
    // `kafka.properties` alone.
    crate::kafka_memory::stage_consumer(&mut c, k);
    c
}

/// The consumers that read a partition back (changelogs, recent heartbeats) to rebuild a
/// stage's state: read_committed, assigned by hand (`group` only names them), told where a
/// partition ends; a restore reads whole partitions as fast as the broker serves them, within
/// the memory budget's prefetch.
pub fn restore_consumer_config(k: &KafkaConfig, role: &str, group: &str) -> ClientConfig {
    let mut c = consumer_config(k, role, group);
    c.set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10");
    // Prefetch and fetch sizes: the memory budget, which leaves a size passed through in
    // `kafka.properties` alone.
    crate::kafka_memory::restore_consumer(&mut c, k);
    c
}

/// Where each partition ends (its high watermark), asked of the broker through `consumer`:
/// `None` when the broker did not answer within `timeout`. A stage's clean stop keeps it
/// beside its shutdown snapshots.
pub fn end_offsets<C: rdkafka::consumer::Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    timeout: Duration,
) -> impl Fn(&str, i32) -> Option<i64> + '_ {
    move |topic, partition| {
        consumer
            .fetch_watermarks(topic, partition, timeout)
            .ok()
            .map(|(_, high)| high)
    }
}

/// librdkafka's error events as a warning, minus the end-of-partition notices that
/// consumers with `enable.partition.eof` ask for on purpose.
pub fn log_client_error(component: &str, error: KafkaError, reason: &str) {
    if matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
    {
        return;
    }
    tracing::warn!(component, error = %error, reason, "Kafka client error");
}

/// The context of a consumer that asks for end-of-partition notices (`enable.partition.eof`)
/// and watches nothing else: librdkafka's error events as warnings ([`log_client_error`]),
/// minus those notices. rdkafka's default context logs every error event at ERROR, each end
/// of partition included: a follower at the end of its partitions logged one a partition
/// for every fetch that caught up.
pub struct QuietEof(pub &'static str);

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(self.0, error, reason);
    }
}

impl ConsumerContext for QuietEof {}

/// How often a client watched by [`BrokerWatch`] reports librdkafka's statistics, in ms
/// (`statistics.interval.ms`): readiness follows a broker that comes back within this. A
/// lost connection is reported at once. One second costs one small JSON parse a second.
pub const BROKER_WATCH_INTERVAL_MS: &str = "1000";

/// Readiness of a process's connection to the cluster, as health component `component`:
/// not ready once none of the clients that share this watch (clones) has shown a live
/// broker connection in librdkafka's statistics for two intervals
/// ([`BROKER_WATCH_INTERVAL_MS`]). Several clients, because one alone can mislead: a
/// producer with nothing to send keeps no connection, and a consumer whose loop is blocked
/// reports nothing. librdkafka reconnects by itself; this only tells operators and load
/// balancers. Use it as the clients' context (or call it from one), with
/// `statistics.interval.ms` set to [`BROKER_WATCH_INTERVAL_MS`].
#[derive(Clone)]
pub struct BrokerWatch {
    health: Health,
    component: &'static str,
    brokers: String,
    /// When some client last showed a live broker connection (ms since the epoch; 0: never).
    last_up: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// After an outage: when connections came back, and the last live moment before (when
    /// the outage began). 0: no outage seen.
    back_at: std::sync::Arc<std::sync::atomic::AtomicI64>,
    outage_began: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Per (topic, partition): whether its leader's connection was up, as the statistics
    /// of the clients that share this watch showed it.
    leaders:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, i32), Reachability>>>,
    /// Per (client, broker node id): that client's connections to that broker
    /// ([`NodeOutage`]).
    nodes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, i32), NodeOutage>>>,
}

/// Whether one partition's leader was reachable, from statistics (ms since the epoch).
///
/// A partition whose leader is away (killed, partitioned off, not yet elected) looks
/// caught up to its consumer: nothing arrives. Meanwhile producers hold its records,
/// stamped while they waited, and deliver them once a new leader is elected (after the
/// broker's session timeout, 9 s by default, and the election). A clock that expires
/// sessions on the wall clock must not pass where the leader went away until then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reachability {
    /// The last statistics that showed the leader up (0: never).
    last_up: i64,
    /// The statistics since then showed it away.
    away: bool,
    /// The leader's broker id the last statistics showed (-1: none yet).
    leader: i32,
    /// The last outage: when it began (the last moment up before it) and when the leader
    /// came back (0: none yet).
    outage_began: i64,
    back_at: i64,
}

impl Default for Reachability {
    fn default() -> Self {
        Reachability {
            last_up: 0,
            away: false,
            leader: -1,
            outage_began: 0,
            back_at: 0,
        }
    }
}

impl Reachability {
    /// Statistics at `now` showed `leader` up. A gap in the statistics longer than
    /// `down_after` counts as an outage, as an explicit `away` does, and so does a new
    /// leader: a leadership move (a broker's controlled shutdown, a preferred-leader
    /// election) sends producers back to their metadata before they deliver what they held,
    /// and the statistics may never show the partition without a leader in between.
    pub fn saw_up(&mut self, now: i64, leader: i32, down_after: i64) {
        let moved = self.leader >= 0 && leader != self.leader;
        if self.last_up != 0 && (self.away || moved || now - self.last_up > down_after) {
            self.outage_began = self.last_up;
            self.back_at = now;
        }
        self.last_up = now;
        self.away = false;
        self.leader = leader;
    }

    /// Statistics showed the leader away (no leader, or no connection to it).
    pub fn saw_away(&mut self) {
        self.away = true;
    }

    /// Statistics showed the connection to the leader up but silent: requests waiting for
    /// an answer and nothing received on it since `last_rx`, longer than a fetch ever waits
    /// (an overloaded or paused broker that neither answers nor closes). Away since
    /// `last_rx`, even when this is the first look at the partition: a partition just
    /// assigned to a consumer whose connection to its leader went quiet is as likely to
    /// have records held back from it (producers wait on the same broker) as one watched
    /// throughout. Seed 64544 of the long chaos
    /// run: a partition taken over while its leader answered nothing for ten seconds was
    /// caught up to what the leader had, and its clock followed the wall clock past a
    /// session's deadline while the next session's first beat, stamped before it, was
    /// still on its way.
    pub fn saw_silent(&mut self, last_rx: i64) {
        if self.last_up == 0 || last_rx < self.last_up {
            self.last_up = last_rx.max(1);
        }
        self.away = true;
    }

    /// How far a wall-clock-driven clock of this partition may go at `now`: where the
    /// leader went away, while it is away and for `settle` after it is back (producers
    /// find the new leader and deliver what they held); otherwise `now`. Never held
    /// before the leader was first seen up: nothing was held back from us.
    pub fn limit(&self, now: i64, down_after: i64, settle: i64) -> i64 {
        if self.last_up == 0 {
            return now;
        }
        if self.away || now - self.last_up > down_after {
            return self.last_up.min(now);
        }
        if self.outage_began != 0 && now - self.back_at < settle {
            return self.outage_began.min(now);
        }
        now
    }
}

/// One client's connections to one broker, for the hold every partition's clock takes while
/// a broker is lost.
///
/// A producer stalls on every partition, not only on those the lost broker led: measured
/// on the three-node cluster with an idempotent producer sending to three partitions, one
/// per broker, the records sent at the moment one broker was killed with -9 were delivered
/// 7.4–8.8 s later on all three (librdkafka drains and renumbers the whole producer, and
/// waits for the new leaders), and on the loaded chaos run (seed 4) beats of a partition
/// whose leader stayed up arrived more than 17 s after their stamp, after its clock had
/// passed them: a false OFFLINE. So while a broker this client was connected to is lost, and
/// for `settle` after it is back, every partition's clock stays where it went away; but not
/// for longer than `cap` while it stays lost (the controller has long since fenced it and
/// elected new leaders, and producers have found them: a broker lost for good must not stop
/// expiry for good).
///
/// A connection up for less than a statistics interval is seen by its count of
/// disconnects (librdkafka counts one only for a connection that was up): seed 12 of the
/// long chaos run killed broker 3, which came back, and 29 s later killed it again 0.3 s
/// after the stage clients had reconnected to it, before any statistics showed the new
/// connection up. The watch still had the first loss, whose cap ran out a second later,
/// and the partitions' clocks followed the wall clock while producers held 8 s of beats:
/// two false OFFLINEs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeOutage {
    /// The last statistics that showed a connection to the broker up (0: never).
    last_up: i64,
    /// The statistics since then showed none up.
    lost: bool,
    /// The last outage shorter than the cap: when it began (the last moment up) and when
    /// the broker came back.
    outage_began: i64,
    back_at: i64,
    /// The client's disconnects from the broker in the last statistics that listed it; read
    /// as 0 when the client's previous statistics did not list it (librdkafka forgets a
    /// broker absent from the metadata, and counts afresh when it learns it again).
    disconnects: i64,
    /// When the last statistics that listed the broker were taken (0: never).
    seen_at: i64,
}

impl NodeOutage {
    /// Statistics at `now` showed a connection to the broker up.
    pub fn saw_up(&mut self, now: i64, cap: i64) {
        if self.lost && now - self.last_up <= cap {
            self.outage_began = self.last_up;
            self.back_at = now;
        }
        self.last_up = now;
        self.lost = false;
    }

    /// Statistics showed no connection to the broker up. Before the first one was up this
    /// is a connection still being made, not a loss.
    pub fn saw_lost(&mut self) {
        if self.last_up != 0 {
            self.lost = true;
        }
    }

    /// Statistics showed no connection to the broker up, and more disconnects than those
    /// taken at `before`: a connection was up after `before`, and is lost.
    pub fn saw_lost_since(&mut self, before: i64) {
        self.last_up = self.last_up.max(before);
        self.lost = true;
    }

    /// How far a wall-clock-driven clock may go at `now` because of this broker.
    pub fn limit(&self, now: i64, cap: i64, settle: i64) -> i64 {
        if self.lost && now - self.last_up <= cap {
            return self.last_up.min(now);
        }
        if self.outage_began != 0 && now - self.back_at < settle {
            return self.outage_began.min(now);
        }
        now
    }
}

/// How long a lost broker holds every partition's clock ([`NodeOutage`]): the controller
/// fences a broker 9 s after its last heartbeat (`broker.session.timeout.ms`), elects new
/// leaders, and producers find them and deliver what they held; 30 s covers the 17 s and
/// more the loaded chaos run took.
pub const NODE_LOSS_HOLD_MS: i64 = 30_000;

/// No broker connection (all down, or this one's transport failed): librdkafka reconnects.
pub fn is_connection_error(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure)
    )
}

/// Errors a client reports while the cluster changes under it, which librdkafka recovers
/// from by itself (reconnect, metadata refresh, fetch from the new leader, a new
/// coordinator): connection errors and leadership or coordinator moves.
pub fn is_transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    is_connection_error(error)
        || matches!(
            error.rdkafka_error_code(),
            Some(
                C::Resolve
                    | C::OperationTimedOut
                    | C::RequestTimedOut
                    | C::NetworkException
                    | C::LeaderNotAvailable
                    | C::NotLeaderForPartition
                    | C::FencedLeaderEpoch
                    | C::UnknownLeaderEpoch
                    | C::ReplicaNotAvailable
                    | C::NotCoordinator
                    | C::CoordinatorNotAvailable
                    | C::CoordinatorLoadInProgress
            )
        )
}

/// How long after the brokers come back from an outage the wall clock stays where the
/// outage began (see [`BrokerWatch::wall_clock_limit`]): producers reconnect with backoff
/// (librdkafka's `reconnect.backoff.max.ms`, 10 s by default) and then deliver what they
/// held, stamped before the outage ended.
pub const RECONNECT_SETTLE_MS: i64 = 10_000;

/// When librdkafka took `statistics`, on the wall clock (ms since the epoch), given the
/// wall clock (`wall`, ms) and the monotonic clock (`monotonic_us`, µs) now: statistics carry
/// librdkafka's monotonic clock (`ts`, CLOCK_MONOTONIC in µs, `rd_clock`) at the moment they
/// were taken. They wait in the client's queue until it is polled, and a stage's loop does
/// not poll while it commits or restores: seed 7 of the long chaos run had stage 1 blocked
/// 9.4 s in a commit whose transaction coordinator had been killed, then read the nine
/// statistics taken meanwhile in one millisecond, each as if taken then; the first of them
/// (taken just before the kill, the leader up) made the whole outage look like one second of
/// statistics, the partitions' clocks followed the wall clock at once, and four beats sent
/// just before the kill, still on their way to the new leader, were counted at the clock's
/// time: false OFFLINEs. Statistics whose `ts` is missing or ahead of now are taken now.
pub fn statistics_taken_at(statistics: &Statistics, wall: i64, monotonic_us: i64) -> i64 {
    if statistics.ts <= 0 || statistics.ts > monotonic_us {
        return wall;
    }
    wall - (monotonic_us - statistics.ts) / 1_000
}

/// CLOCK_MONOTONIC now, µs: the clock of librdkafka's statistics (`ts`).
pub fn monotonic_us() -> i64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given, which lives on this stack.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec * 1_000_000 + t.tv_nsec / 1_000
}

/// [`BrokerWatch::wall_clock_limit`] on plain numbers (ms since the epoch; 0: never).
pub fn wall_clock_limit(
    now: i64,
    last_up: i64,
    back_at: i64,
    outage_began: i64,
    down_after: i64,
    settle: i64,
) -> i64 {
    if last_up == 0 {
        // Not connected yet since the start: nothing was held back from us.
        return now;
    }
    if now - last_up > down_after {
        return last_up.min(now);
    }
    if outage_began != 0 && now - back_at < settle {
        return outage_began.min(now);
    }
    now
}

impl BrokerWatch {
    /// Registers `component` as not ready until the first statistics show a connection.
    pub fn new(health: &Health, component: &'static str, brokers: &str) -> BrokerWatch {
        health.set_unready(component, format!("connecting to Kafka at {brokers}"));
        BrokerWatch {
            health: health.clone(),
            component,
            brokers: brokers.to_string(),
            last_up: Default::default(),
            back_at: Default::default(),
            outage_began: Default::default(),
            leaders: Default::default(),
            nodes: Default::default(),
        }
    }

    fn down(&self, why: &str) {
        self.health.set_unready(
            self.component,
            format!(
                "no connection to any Kafka broker at {} ({why}); reconnecting by itself — check the brokers and KAFKA_BROKERS",
                self.brokers
            ),
        );
    }

    /// From `ClientContext::error`: whether the error is a connection error, which
    /// readiness reports, so that callers need not log each one.
    pub fn is_connection_error(error: &KafkaError) -> bool {
        is_connection_error(error)
    }

    /// From `ClientContext::stats`: ready while some broker connection of some client is
    /// up. Coordinator connections (librdkafka's "logical" brokers) count: they are TCP
    /// connections to a broker like the others, and a consumer that waits for its group or
    /// a producer between transactions may hold no other. Only librdkafka's internal
    /// pseudo-broker, which is no connection at all, does not.
    pub fn on_stats(&self, statistics: &Statistics) {
        let now = statistics_taken_at(statistics, crate::now_ms(), monotonic_us());
        self.on_stats_taken_at(statistics, now);
    }

    /// [`Self::on_stats`] for statistics taken at `now` (ms since the epoch), which may be
    /// well before they are read: see [`statistics_taken_at`].
    pub fn on_stats_taken_at(&self, statistics: &Statistics, now: i64) {
        use std::sync::atomic::Ordering;
        let up = statistics
            .brokers
            .values()
            .any(|b| b.source != "internal" && b.state == "UP");
        if up {
            // Clients read their statistics at their own pace (a stage's producer at once,
            // its consumer when the loop polls): a late one never moves `last_up` back.
            let before = self.last_up.fetch_max(now, Ordering::Relaxed);
            if before != 0 && now - before > Self::down_after() {
                self.outage_began.store(before, Ordering::Relaxed);
                self.back_at.store(now, Ordering::Relaxed);
            }
            self.health.set_ready(self.component);
        } else if now - self.last_up.load(Ordering::Relaxed) > Self::down_after() {
            self.down("no broker connection is up");
        }
        self.on_leader_stats(statistics, now);
        self.on_node_stats(statistics, now);
    }

    /// Per broker node of this client: is some connection to it up, or is one being made
    /// again? ([`NodeOutage`]) A connection never made (`INIT`: librdkafka connects to a
    /// broker only when it needs it) says neither, so a coordinator that moved away from a
    /// broker this client has no other connection to is not a lost broker.
    fn on_node_stats(&self, statistics: &Statistics, now: i64) {
        // node id -> (some connection up, some connection down or reconnecting, disconnects)
        let mut seen: std::collections::HashMap<i32, (bool, bool, i64)> =
            std::collections::HashMap::new();
        for b in statistics.brokers.values() {
            if b.source == "internal" || b.nodeid < 0 {
                continue;
            }
            let s = seen.entry(b.nodeid).or_default();
            s.0 |= b.state == "UP";
            s.1 |= b.state != "UP" && b.state != "INIT";
            s.2 += b.disconnects.unwrap_or(0);
        }
        let client = &statistics.name;
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let was_held = Self::nodes_limit(&nodes, now) < now;
        // When this client's previous statistics were taken.
        let previous = nodes
            .iter()
            .filter(|((c, _), _)| c == client)
            .map(|(_, n)| n.seen_at)
            .max()
            .filter(|t| *t > 0);
        let before = previous.unwrap_or(now).min(now);
        for (node, (up, down, disconnects)) in seen {
            let n = nodes.entry((client.clone(), node)).or_default();
            // A node those statistics did not list is counted afresh.
            let counted = if Some(n.seen_at) == previous {
                n.disconnects
            } else {
                0
            };
            let dropped = disconnects > counted;
            n.disconnects = disconnects;
            n.seen_at = now;
            if up {
                n.saw_up(now, NODE_LOSS_HOLD_MS);
            } else if dropped {
                n.saw_lost_since(before);
            } else if down {
                n.saw_lost();
            }
        }
        // Forget what no longer holds, has not been seen up for longer than a hold and a
        // settle, and is not in these statistics: the connections of clients rebuilt or
        // closed, and brokers lost for good (their cap has passed) once librdkafka forgets
        // them. One still listed is kept with its count of disconnects, which, counted
        // afresh, would look like a new loss. Entries of live clients are refreshed every
        // second.
        nodes.retain(|(c, _), n| {
            (c == client && n.seen_at == now)
                || n.limit(now, NODE_LOSS_HOLD_MS, RECONNECT_SETTLE_MS) < now
                || now - n.last_up <= NODE_LOSS_HOLD_MS + RECONNECT_SETTLE_MS
        });
        let held = Self::nodes_limit(&nodes, now) < now;
        if held != was_held {
            let lost: Vec<i32> = nodes
                .iter()
                .filter(|(_, n)| n.lost)
                .map(|((_, node), _)| *node)
                .collect();
            if held {
                tracing::info!(
                    component = self.component,
                    ?lost,
                    "a broker was lost: every partition's expiry clock stays where it went away until producers have delivered what they held (at most {} s while it stays lost, {} s after it is back)",
                    NODE_LOSS_HOLD_MS / 1_000,
                    RECONNECT_SETTLE_MS / 1_000
                );
            } else {
                tracing::info!(
                    component = self.component,
                    "brokers settled: expiry clocks follow the wall clock again"
                );
            }
        }
    }

    fn nodes_limit(nodes: &std::collections::HashMap<(String, i32), NodeOutage>, now: i64) -> i64 {
        nodes
            .values()
            .map(|n| n.limit(now, NODE_LOSS_HOLD_MS, RECONNECT_SETTLE_MS))
            .min()
            .unwrap_or(now)
    }

    /// Per partition of every topic the statistics list: is its leader's connection up?
    fn on_leader_stats(&self, statistics: &Statistics, now: i64) {
        // Up, and when it last received something if it has requests waiting for an answer
        // and received nothing for longer than a fetch waits. A connection with nothing
        // asked (its partitions paused, the consumer's queue full while the runner restores)
        // is quiet, not silent: holding the clock then would delay expiry after every
        // restore.
        let up_nodes: std::collections::HashMap<i32, Option<i64>> = statistics
            .brokers
            .values()
            .filter(|b| b.source != "internal" && b.state == "UP")
            .map(|b| {
                let silent = b.waitresp_cnt > 0 && b.rxidle > Self::down_after() * 1_000;
                (b.nodeid, silent.then(|| now - b.rxidle / 1_000))
            })
            .collect();
        let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
        for (name, topic) in &statistics.topics {
            for part in topic.partitions.values() {
                if part.partition < 0 {
                    // librdkafka's unassigned-partition pseudo entry.
                    continue;
                }
                let key = (name.clone(), part.partition);
                if part.fetch_state == "none" {
                    // Not fetched by this client (not assigned, or a producer's): forgotten,
                    // so that a partition assigned later starts free, not "back from an
                    // outage" because no connection to its leader was needed meanwhile.
                    leaders.remove(&key);
                    continue;
                }
                let r = leaders.entry(key).or_default();
                let was_held = r.limit(now, Self::down_after(), RECONNECT_SETTLE_MS) < now;
                // -1: no leader (bootstrap connections have node id -1 too).
                let leader = (part.leader >= 0)
                    .then(|| up_nodes.get(&part.leader))
                    .flatten();
                match leader {
                    Some(None) => r.saw_up(now, part.leader, Self::down_after()),
                    Some(Some(last_rx)) => r.saw_silent(*last_rx),
                    None => r.saw_away(),
                }
                let held = r.limit(now, Self::down_after(), RECONNECT_SETTLE_MS) < now;
                if held != was_held {
                    tracing::info!(
                        component = self.component,
                        topic = %name,
                        partition = part.partition,
                        leader = part.leader,
                        held,
                        "partition leader {}: its expiry clock {}",
                        if held { "away or just back" } else { "reachable" },
                        if held {
                            "stays where the leader went away until producers have delivered what they held"
                        } else {
                            "follows the wall clock again"
                        }
                    );
                }
            }
        }
    }

    /// [`Self::wall_clock_limit`] for one partition of `topic`: also held while that
    /// partition's leader is away and until producers have delivered to the new one
    /// ([`Reachability`]).
    pub fn partition_clock_limit(&self, topic: &str, partition: i32, now: i64) -> i64 {
        let all = self.wall_clock_limit(now);
        let leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
        match leaders.get(&(topic.to_string(), partition)) {
            Some(r) => all.min(r.limit(now, Self::down_after(), RECONNECT_SETTLE_MS)),
            None => all,
        }
    }

    /// How long without a live connection counts as an outage: two statistics intervals.
    fn down_after() -> i64 {
        2 * BROKER_WATCH_INTERVAL_MS.parse::<i64>().unwrap_or(1000)
    }

    /// How far a clock driven by the wall clock may go at `now`: during an outage, and for
    /// [`RECONNECT_SETTLE_MS`] after it, no further than where it began. Producers hold
    /// what they could not deliver meanwhile and send it once they reconnect, stamped
    /// before; a session whose beats are in there has not ended, so its deadline must not
    /// pass on the wall clock before they arrive. So, too, while one broker is lost and
    /// after ([`NodeOutage`]): producers stall on every partition then. Before the first
    /// connection and long after an outage: `now`.
    pub fn wall_clock_limit(&self, now: i64) -> i64 {
        use std::sync::atomic::Ordering;
        let all_down = wall_clock_limit(
            now,
            self.last_up.load(Ordering::Relaxed),
            self.back_at.load(Ordering::Relaxed),
            self.outage_began.load(Ordering::Relaxed),
            Self::down_after(),
            RECONNECT_SETTLE_MS,
        );
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        all_down.min(Self::nodes_limit(&nodes, now))
    }
}

impl ClientContext for BrokerWatch {
    fn stats(&self, statistics: Statistics) {
        self.on_stats(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !Self::is_connection_error(&error) {
            log_client_error(self.component, error, reason);
        }
    }
}

impl ConsumerContext for BrokerWatch {}

/// Delivery reports are not looked at: transactional producers learn of failed deliveries
/// from the commit.
impl rdkafka::producer::ProducerContext for BrokerWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

pub fn admin_client(k: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    base_config(k, "admin").create()
}

/// How long admin and metadata calls may take before we say the cluster is unreachable.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Headers of a dead letter: what was wrong and where the record came from. Codes are the
/// small fixed set of `CodecError::code()` and the processors' own rejections.
pub fn dead_letter_headers(
    code: &str,
    message: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    let partition = partition.to_string();
    let offset = offset.to_string();
    let ts = timestamp.map(|t| t.to_string()).unwrap_or_default();
    OwnedHeaders::new_with_capacity(6)
        .insert(Header {
            key: "presence.error.code",
            value: Some(code),
        })
        .insert(Header {
            key: "presence.error.message",
            value: Some(message),
        })
        .insert(Header {
            key: "presence.source.topic",
            value: Some(topic),
        })
        .insert(Header {
            key: "presence.source.partition",
            value: Some(&partition),
        })
        .insert(Header {
            key: "presence.source.offset",
            value: Some(&offset),
        })
        .insert(Header {
            key: "presence.source.timestamp",
            value: Some(&ts),
        })
}

/// The machine's host name, for default instance ids.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "presence".into())
}

/// Hands `record` to `producer`, waiting (1 ms steps) while its queue is full: the
/// producers that generate load (loadgen, benchmarks) must slow down to the broker, not
/// drop. Gives up with the queue-full error after `patience` (`None`: waits as long as
/// it takes); any other error at once.
pub fn send_when_room<K, P>(
    producer: &ThreadedProducer<DefaultProducerContext>,
    mut record: BaseRecord<'_, K, P>,
    patience: Option<Duration>,
) -> Result<(), KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    let deadline = patience.map(|p| std::time::Instant::now() + p);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if deadline.is_none_or(|d| std::time::Instant::now() < d) =>
            {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stages_timeouts_are_ours_unless_the_operator_passes_them() {
        let k = KafkaConfig::default();
        let c = stage_consumer_config(&k, "processor-sessions", "g", "sessions.a");
        assert_eq!(
            c.get("session.timeout.ms"),
            Some(STAGE_SESSION_TIMEOUT_MS.to_string().as_str())
        );
        let p = transactional_producer_config(&k, "processor-sessions", "g.a");
        assert_eq!(
            p.get("transaction.timeout.ms"),
            Some(TRANSACTION_TIMEOUT_MS)
        );
        assert_eq!(p.get("linger.ms"), Some("0"));
        assert_eq!(
            stage_session_timeout(&k),
            std::time::Duration::from_millis(STAGE_SESSION_TIMEOUT_MS)
        );
        let mut k = KafkaConfig::default();
        for (key, value) in [
            ("session.timeout.ms", "6000"),
            ("transaction.timeout.ms", "6000"),
            ("linger.ms", "5"),
        ] {
            k.properties.insert(key.into(), crate::Secret::new(value));
        }
        let c = stage_consumer_config(&k, "processor-sessions", "g", "sessions.a");
        assert_eq!(c.get("session.timeout.ms"), Some("6000"));
        assert_eq!(c.get("heartbeat.interval.ms"), Some("1000"));
        let p = transactional_producer_config(&k, "processor-sessions", "g.a");
        assert_eq!(p.get("transaction.timeout.ms"), Some("6000"));
        assert_eq!(p.get("linger.ms"), Some("5"));
        assert_eq!(
            stage_session_timeout(&k),
            std::time::Duration::from_millis(6000)
        );
        let d = downstream_consumer_config(&k, "sink", "g");
        assert_eq!(d.get("session.timeout.ms"), Some("6000"));
    }

    #[test]
    fn a_broker_away_is_transient_and_a_missing_topic_is_not() {
        let e = |c| KafkaError::MessageConsumption(c);
        assert!(is_transient(&e(RDKafkaErrorCode::BrokerTransportFailure)));
        assert!(is_connection_error(&e(RDKafkaErrorCode::AllBrokersDown)));
        assert!(is_transient(&e(RDKafkaErrorCode::NotLeaderForPartition)));
        assert!(!is_connection_error(&e(
            RDKafkaErrorCode::NotLeaderForPartition
        )));
        assert!(!is_transient(&e(RDKafkaErrorCode::UnknownTopicOrPartition)));
        assert!(!is_transient(&e(
            RDKafkaErrorCode::TopicAuthorizationFailed
        )));
    }

    const DOWN: i64 = 2_000;
    const SETTLE: i64 = RECONNECT_SETTLE_MS;

    #[test]
    fn the_wall_clock_runs_before_the_first_connection_and_while_connected() {
        assert_eq!(wall_clock_limit(5_000, 0, 0, 0, DOWN, SETTLE), 5_000);
        assert_eq!(wall_clock_limit(5_000, 4_500, 0, 0, DOWN, SETTLE), 5_000);
    }

    #[test]
    fn during_an_outage_it_stops_where_the_brokers_went_away() {
        // Last live at 10 s, now 30 s: down.
        assert_eq!(wall_clock_limit(30_000, 10_000, 0, 0, DOWN, SETTLE), 10_000);
        // A gap shorter than two statistics intervals is no outage.
        assert_eq!(wall_clock_limit(11_500, 10_000, 0, 0, DOWN, SETTLE), 11_500);
    }

    #[test]
    fn a_partition_clock_holds_where_its_leader_went_away_until_producers_settle() {
        let mut r = Reachability::default();
        // Never seen: free.
        assert_eq!(r.limit(1_000, DOWN, SETTLE), 1_000);
        r.saw_up(1_000, 1, DOWN);
        r.saw_up(2_000, 1, DOWN);
        assert_eq!(r.limit(2_500, DOWN, SETTLE), 2_500);
        // The leader is killed: held at once where it was last seen up.
        r.saw_away();
        assert_eq!(r.limit(3_000, DOWN, SETTLE), 2_000);
        assert_eq!(r.limit(12_000, DOWN, SETTLE), 2_000);
        // A new leader at 12 s: held until producers had `settle` to deliver.
        r.saw_up(12_000, 2, DOWN);
        assert_eq!(r.limit(12_000, DOWN, SETTLE), 2_000);
        settles(&mut r, 12_000, 2, 2_000);
        // Statistics that stop coming count as an outage too.
        assert_eq!(
            r.limit(12_000 + SETTLE + 5_000, DOWN, SETTLE),
            12_000 + SETTLE
        );
    }

    #[test]
    fn a_leadership_move_holds_the_partition_clock_until_producers_settle() {
        let mut r = Reachability::default();
        r.saw_up(1_000, 1, DOWN);
        r.saw_up(2_000, 1, DOWN);
        // Broker 1 shut down cleanly: the next statistics already show broker 3 leading.
        r.saw_up(3_000, 3, DOWN);
        assert_eq!(r.limit(3_000, DOWN, SETTLE), 2_000);
        settles(&mut r, 3_000, 3, 2_000);
    }

    /// Back (leader `leader`) at `back`, statistics every second: held at `held_at` until
    /// `back + SETTLE`, free from then on.
    fn settles(r: &mut Reachability, back: i64, leader: i32, held_at: i64) {
        for t in (back + 1_000..back + SETTLE).step_by(1_000) {
            r.saw_up(t, leader, DOWN);
            assert_eq!(r.limit(t, DOWN, SETTLE), held_at, "at {t}");
        }
        r.saw_up(back + SETTLE, leader, DOWN);
        assert_eq!(r.limit(back + SETTLE, DOWN, SETTLE), back + SETTLE);
    }

    #[test]
    fn a_leader_that_answers_nothing_holds_the_clock_from_its_last_answer() {
        // Watched throughout: up at 1 s and 2 s, silent since 2.5 s (seen at 5 s).
        let mut r = Reachability::default();
        r.saw_up(1_000, 1, DOWN);
        r.saw_up(2_000, 1, DOWN);
        r.saw_silent(2_500);
        assert_eq!(r.limit(5_000, DOWN, SETTLE), 2_000);
        r.saw_silent(2_500);
        assert_eq!(r.limit(9_000, DOWN, SETTLE), 2_000);
        // It answers again at 10 s: held until producers had `settle` to deliver.
        r.saw_up(10_000, 1, DOWN);
        settles(&mut r, 10_000, 1, 2_000);
        // First seen (just assigned) while silent since 4 s: held there, not free.
        let mut r = Reachability::default();
        r.saw_silent(4_000);
        assert_eq!(r.limit(7_000, DOWN, SETTLE), 4_000);
        r.saw_up(8_000, 1, DOWN);
        settles(&mut r, 8_000, 1, 4_000);
    }

    #[test]
    fn a_partition_first_seen_without_a_leader_is_not_held() {
        let mut r = Reachability::default();
        r.saw_away();
        assert_eq!(r.limit(5_000, DOWN, SETTLE), 5_000);
        r.saw_up(6_000, 1, DOWN);
        assert_eq!(r.limit(6_000, DOWN, SETTLE), 6_000);
    }

    const CAP: i64 = 30_000;

    #[test]
    fn a_lost_broker_holds_the_clock_until_it_settles_or_for_the_cap() {
        // Never up: a connection still being made holds nothing.
        let mut n = NodeOutage::default();
        n.saw_lost();
        assert_eq!(n.limit(5_000, CAP, SETTLE), 5_000);
        // Up at 10 s, lost after: held at 10 s while lost, up to the cap.
        n.saw_up(10_000, CAP);
        assert_eq!(n.limit(10_000, CAP, SETTLE), 10_000);
        n.saw_lost();
        assert_eq!(n.limit(12_000, CAP, SETTLE), 10_000);
        assert_eq!(n.limit(40_000, CAP, SETTLE), 10_000);
        // Back at 30 s: held at 10 s for the settle, then free.
        n.saw_up(30_000, CAP);
        assert_eq!(n.limit(30_000, CAP, SETTLE), 10_000);
        assert_eq!(n.limit(39_999, CAP, SETTLE), 10_000);
        assert_eq!(n.limit(40_000, CAP, SETTLE), 40_000);
    }

    #[test]
    fn a_broker_lost_for_good_stops_holding_after_the_cap() {
        let mut n = NodeOutage::default();
        n.saw_up(10_000, CAP);
        n.saw_lost();
        assert_eq!(n.limit(10_000 + CAP, CAP, SETTLE), 10_000);
        assert_eq!(n.limit(10_001 + CAP, CAP, SETTLE), 10_001 + CAP);
        // Back much later: its partitions have had other leaders for long; no settle.
        n.saw_up(100_000, CAP);
        assert_eq!(n.limit(100_000, CAP, SETTLE), 100_000);
    }

    /// Statistics of one client (`name`) with one connection per node: (node id, state).
    fn stats(name: &str, brokers: &[(i32, &str)]) -> Statistics {
        let counted: Vec<(i32, &str, i64)> = brokers.iter().map(|(id, s)| (*id, *s, 0)).collect();
        stats_counted(name, &counted)
    }

    /// [`stats`] with each connection's count of disconnects: (node id, state, disconnects).
    fn stats_counted(name: &str, brokers: &[(i32, &str, i64)]) -> Statistics {
        let brokers: serde_json::Map<String, serde_json::Value> = brokers
            .iter()
            .map(|(id, state, disconnects)| {
                (
                    format!("127.0.0.1:{id}/{id}"),
                    serde_json::json!({
                        "name": format!("127.0.0.1:{id}/{id}"), "nodeid": id,
                        "nodename": format!("127.0.0.1:{id}"), "source": "learned",
                        "state": state, "stateage": 0, "outbuf_cnt": 0, "outbuf_msg_cnt": 0,
                        "waitresp_cnt": 0, "waitresp_msg_cnt": 0, "tx": 0, "txbytes": 0,
                        "txerrs": 0, "txretries": 0, "txidle": 0, "req_timeouts": 0, "rx": 0,
                        "rxbytes": 0, "rxerrs": 0, "rxcorriderrs": 0, "rxpartial": 0,
                        "rxidle": 0, "zbuf_grow": 0, "buf_grow": 0, "wakeups": 0,
                        "connects": 1, "disconnects": disconnects, "req": {}, "toppars": {}
                    }),
                )
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "name": name, "client_id": "presence", "type": "consumer", "ts": 0, "time": 0,
            "age": 0, "replyq": 0, "msg_cnt": 0, "msg_size": 0, "msg_max": 0,
            "msg_size_max": 0, "tx": 0, "tx_bytes": 0, "rx": 0, "rx_bytes": 0, "txmsgs": 0,
            "txmsg_bytes": 0, "rxmsgs": 0, "rxmsg_bytes": 0, "simple_cnt": 0,
            "metadata_cache_cnt": 0, "brokers": brokers, "topics": {}
        }))
        .expect("statistics")
    }

    /// A broker lost by one client holds every partition's clock, also partitions it does
    /// not lead; a client that never connected to it holds nothing.
    #[test]
    fn a_broker_lost_by_a_client_holds_every_partition() {
        let watch = BrokerWatch::new(&Health::new(&prometheus::Registry::new()), "test", "b");
        let now = crate::now_ms();
        // Within two statistics intervals of the last statistics: no outage of all brokers.
        let at = now + 1_500;
        let free = |why: &str| {
            assert_eq!(watch.partition_clock_limit("t", 0, at), at, "{why}");
        };
        watch.on_stats(&stats("c1", &[(1, "UP"), (2, "UP")]));
        watch.on_stats(&stats("c2", &[(1, "UP"), (3, "INIT")]));
        free("every connection up");
        watch.on_stats(&stats("c2", &[(1, "UP"), (3, "CONNECT")]));
        free("c2 never had node 3 up");
        // c1's only connection to node 2 (a coordinator's) moved elsewhere: INIT is no loss.
        watch.on_stats(&stats("c1", &[(1, "UP"), (2, "INIT")]));
        free("no connection lost");
        watch.on_stats(&stats("c1", &[(1, "UP"), (2, "CONNECT")]));
        let held = watch.partition_clock_limit("t", 5, at);
        assert!(
            held < now + 500,
            "held where node 2 was last up ({now}), not at {held}"
        );
    }

    /// A broker lost, back, and lost again within a statistics interval of the client
    /// reconnecting to it (seed 12 of the long chaos run): the second loss holds the clocks
    /// from the client's statistics before it, not only until the first loss's cap runs out.
    /// Also when the client forgot the broker while it was away and learned it again.
    #[test]
    fn a_broker_lost_again_before_statistics_showed_it_back_holds_the_clock() {
        for forgotten in [false, true] {
            let watch = BrokerWatch::new(&Health::new(&prometheus::Registry::new()), "test", "b");
            let t = 1_000_000;
            let sample = |at: i64, node3: Option<(&str, i64)>| {
                let mut brokers = vec![(1, "UP", 0)];
                brokers.extend(node3.map(|(state, d)| (3, state, d)));
                watch.on_node_stats(&stats_counted("c", &brokers), at);
            };
            sample(t, Some(("UP", 0)));
            sample(t + 1_000, Some(("CONNECT", 1)));
            for k in 2..29 {
                sample(t + k * 1_000, (!forgotten).then_some(("CONNECT", 1)));
            }
            // Reconnected after 29 s and lost again before 30 s.
            let again = if forgotten { 1 } else { 2 };
            sample(t + 30_000, Some(("CONNECT", again)));
            assert_eq!(
                watch.wall_clock_limit(t + 32_000),
                t + 28_000,
                "held where the client's statistics before the second loss were taken (forgotten: {forgotten})"
            );
            // Back after 8 s: held there until the settle has passed.
            sample(t + 38_000, Some(("UP", again)));
            assert_eq!(watch.wall_clock_limit(t + 47_999), t + 28_000);
            assert_eq!(watch.wall_clock_limit(t + 48_000), t + 48_000);
        }
    }

    /// A broker lost for good that the client still lists (a connection it keeps trying)
    /// holds for the cap once, not again each time its entry would be forgotten.
    #[test]
    fn a_broker_lost_for_good_and_still_listed_holds_once() {
        let watch = BrokerWatch::new(&Health::new(&prometheus::Registry::new()), "test", "b");
        let t = 1_000_000;
        let sample = |at: i64, node2: (&str, i64)| {
            let (state, d) = node2;
            watch.on_node_stats(&stats_counted("c", &[(1, "UP", 0), (2, state, d)]), at);
        };
        sample(t, ("UP", 0));
        sample(t + 1_000, ("CONNECT", 1));
        assert_eq!(watch.wall_clock_limit(t + 2_000), t);
        for k in 2..200 {
            let at = t + k * 1_000;
            sample(at, ("CONNECT", 1));
            if at > t + CAP {
                assert_eq!(watch.wall_clock_limit(at), at, "held again at {k} s");
            }
        }
    }

    /// A consumer's statistics taken at `ts_us` (librdkafka's monotonic clock): node 2 in
    /// `state`, leading partition 3 of topic `t`, which the consumer fetches.
    fn fetching_stats(ts_us: i64, state: &str) -> Statistics {
        let mut s = serde_json::to_value(stats("consumer", &[(2, state)])).expect("json");
        let window = serde_json::json!({
            "min": 0, "max": 0, "avg": 0, "sum": 0, "cnt": 0, "stddev": 0, "hdrsize": 0,
            "p50": 0, "p75": 0, "p90": 0, "p95": 0, "p99": 0, "p99_99": 0, "outofrange": 0
        });
        let mut partition = serde_json::Map::new();
        for field in [
            "msgq_cnt",
            "msgq_bytes",
            "xmit_msgq_cnt",
            "xmit_msgq_bytes",
            "fetchq_cnt",
            "fetchq_size",
            "query_offset",
            "next_offset",
            "app_offset",
            "stored_offset",
            "committed_offset",
            "eof_offset",
            "lo_offset",
            "hi_offset",
            "ls_offset",
            "consumer_lag",
            "consumer_lag_stored",
            "txmsgs",
            "txbytes",
            "rxmsgs",
            "rxbytes",
            "msgs",
            "rx_ver_drops",
            "msgs_inflight",
            "next_ack_seq",
            "next_err_seq",
            "acked_msgid",
        ] {
            partition.insert(field.into(), 0.into());
        }
        for (field, value) in [
            ("partition", serde_json::json!(3)),
            ("broker", serde_json::json!(2)),
            ("leader", serde_json::json!(2)),
            ("desired", serde_json::json!(true)),
            ("unknown", serde_json::json!(false)),
            ("fetch_state", serde_json::json!("active")),
        ] {
            partition.insert(field.into(), value);
        }
        s["ts"] = ts_us.into();
        s["topics"] = serde_json::json!({ "t": {
            "topic": "t", "metadata_age": 0, "batchsize": window, "batchcnt": window,
            "partitions": { "3": partition }
        }});
        serde_json::from_value(s).expect("statistics")
    }

    #[test]
    fn a_stage_consumer_connects_to_every_broker() {
        let k = crate::config::Config::default().kafka;
        let c = stage_consumer_config(&k, "sessions", "g.sessions", "sessions.a");
        assert_eq!(c.get("enable.sparse.connections"), Some("false"));
        // A broker that left the metadata is learned again within a statistics interval.
        assert_eq!(
            c.get("topic.metadata.refresh.interval.ms"),
            Some(BROKER_WATCH_INTERVAL_MS)
        );
    }

    #[test]
    fn statistics_count_when_they_were_taken_not_when_they_are_read() {
        let s = fetching_stats(50_000_000, "UP");
        assert_eq!(
            statistics_taken_at(&s, 1_000_000, 59_400_000),
            1_000_000 - 9_400
        );
        // No `ts` (or one from another clock, ahead of now): now.
        assert_eq!(statistics_taken_at(&s, 1_000_000, 40_000_000), 1_000_000);
        assert_eq!(
            statistics_taken_at(&stats("c", &[]), 1_000_000, 59_400_000),
            1_000_000
        );
    }

    /// Seed 7 of the long chaos run: stage 1 blocked 9.4 s in a commit while its partition's
    /// leader (node 2) was killed and restarted, then read the statistics taken meanwhile all
    /// at once. Counted when they were taken, they show the outage, and the clock holds where
    /// the leader went away until producers have had the settle to deliver what they held;
    /// counted when read (as before), the first of them showed the leader up at the moment of
    /// reading and the clock ran free at once, past beats still on their way.
    #[test]
    fn statistics_read_late_after_a_blocked_loop_still_hold_the_clock() {
        let watch = BrokerWatch::new(&Health::new(&prometheus::Registry::new()), "test", "b");
        let (wall0, mono0) = (1_000_000_i64, 500_000_000_i64);
        let taken = |k: i64| mono0 + k * 1_000_000;
        let states = [
            "UP", "UP", "DOWN", "CONNECT", "CONNECT", "DOWN", "CONNECT", "CONNECT", "CONNECT", "UP",
        ];
        // Read at 9.5 s after the first, one after the other.
        let (read_wall, read_mono) = (wall0 + 9_500, mono0 + 9_500_000);
        for (k, state) in states.iter().enumerate() {
            let s = fetching_stats(taken(k as i64), state);
            watch.on_stats_taken_at(&s, statistics_taken_at(&s, read_wall, read_mono));
        }
        // Up last at 1 s before the outage; back at 9 s: held at 1 s until 19 s.
        assert_eq!(
            watch.partition_clock_limit("t", 3, read_wall),
            wall0 + 1_000
        );
        assert_eq!(
            watch.partition_clock_limit("t", 3, wall0 + 9_000 + SETTLE - 1),
            wall0 + 1_000
        );
    }

    /// The entries of a client that is gone (rebuilt after a fault) are forgotten once they
    /// hold nothing, so rebuilds do not grow the watch.
    #[test]
    fn a_gone_clients_connections_are_forgotten() {
        let watch = BrokerWatch::new(&Health::new(&prometheus::Registry::new()), "test", "b");
        let t = 1_000_000;
        watch.on_node_stats(&stats("old", &[(1, "UP"), (2, "UP")]), t);
        watch.on_node_stats(&stats("old", &[(1, "UP"), (2, "CONNECT")]), t + 1_000);
        let later = t + 1_000 + CAP + SETTLE + 1;
        watch.on_node_stats(&stats("new", &[(1, "UP"), (2, "UP")]), later);
        let nodes = watch.nodes.lock().unwrap();
        let mut left: Vec<&(String, i32)> = nodes.keys().collect();
        left.sort();
        assert_eq!(left, vec![&("new".to_string(), 1), &("new".to_string(), 2)]);
    }

    #[test]
    fn after_an_outage_it_waits_for_the_producers_to_settle() {
        // Down from 10 s, back at 30 s: held at 10 s until 40 s, then free.
        let at = |now| wall_clock_limit(now, now - 500, 30_000, 10_000, DOWN, SETTLE);
        assert_eq!(at(30_500), 10_000);
        assert_eq!(at(39_999), 10_000);
        assert_eq!(at(40_000), 40_000);
    }
}
