//! Who is online: the sessions open now, in `<schema>.open_sessions`, kept by following
//! two topics by hand (no consumer group, no committed offsets):
//!
//! - the processor's sessions changelog (`<internal_prefix>sessions-changelog`, compacted):
//!   stage 1 writes a session's record when it opens or moves and a tombstone when it
//!   closes, in the same Kafka transaction as the session event and so as the facility's
//!   transition. Read `read_committed`, so a row exists exactly for a session the committed
//!   pipeline holds open.
//! - `heartbeats`, for `last_beat` only (the changelog is not written per beat): from the
//!   end of the topic when the follower starts, the newest BEAT per (user, session).
//!
//! On start the follower reads the whole changelog (compacted: the open sessions and the
//! recent tombstones) and replaces the table with it in one transaction, so rows of sessions
//! that closed while the sink was down (their tombstones compacted away) go too; then it
//! applies each batch in one transaction. Applying a batch is idempotent (the final change
//! per session wins; beats only move `last_beat` forward), so a crash or a retry repeats
//! nothing visible: the table is a function of the committed changelog.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use presence_core::codec::decode;
use presence_core::config::Config;
use presence_core::delivery::{connect_postgres, Tables};
use presence_core::kafka::{restore_consumer_config, QuietEof};
use presence_core::records::{is_session_mark_key, HeartbeatKind, HeartbeatRef, SessionState};
use presence_core::telemetry::Health;
use presence_core::Shutdown;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_postgres::Client;

/// Records applied per PostgreSQL transaction, at most; a partial batch waits at most
/// [`LINGER`]. Session changes are rare next to transitions; beats are many but collapse
/// to one row per session.
const BATCH: usize = 5000;
/// Newest beats reach `last_beat` within this (plus the write).
const LINGER: Duration = Duration::from_millis(200);

/// The follower's consumer: end-of-partition notices (it asks for them to know when the
/// changelog is read whole) stay out of the logs.
type Follower = StreamConsumer<QuietEof>;

/// Where a changelog record lives: its partition and key.
pub type SessionKey = (i32, Vec<u8>);

/// What a batch does to the table, reduced: the last change per session (a later record of
/// a key replaces an earlier one: same partition, read in order), and the newest beat per
/// (user id, session id).
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub sessions: BTreeMap<SessionKey, Option<(SessionState, i64)>>,
    pub beats: BTreeMap<(String, String), i64>,
}

impl Changes {
    /// A changelog record: a session (with its offset), or `None` for a tombstone.
    pub fn session(&mut self, key: SessionKey, value: Option<(SessionState, i64)>) {
        self.sessions.insert(key, value);
    }

    /// A beat of `session` by `user` at `at` (ms); only the newest per session is kept.
    pub fn beat(&mut self, user: &str, session: &str, at: i64) {
        let newest = self
            .beats
            .entry((user.to_string(), session.to_string()))
            .or_insert(at);
        *newest = (*newest).max(at);
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.beats.is_empty()
    }
}

/// The follower's metrics, beside the sink's `presence_sink_*` of transitions.
#[derive(Clone)]
pub struct Metrics {
    /// Changelog records applied (opens, moves, closes; the rebuild's included).
    pub changes: prometheus::IntCounter,
    /// BEATs read from `heartbeats` for `last_beat`.
    pub beats: prometheus::IntCounter,
    /// Writes to PostgreSQL that failed and are retried.
    pub write_errors: prometheus::IntCounter,
    /// Sessions in the table after the rebuild at start-up.
    pub rebuilt: prometheus::IntGauge,
}

impl Metrics {
    pub fn new(registry: &prometheus::Registry) -> Metrics {
        use presence_core::metrics::{counter, gauge};
        Metrics {
            changes: counter(
                registry,
                "presence_sink_session_changes_total",
                "Sessions changelog records applied to open_sessions (rebuild included)",
            ),
            beats: counter(
                registry,
                "presence_sink_session_beats_total",
                "BEATs read from heartbeats for open_sessions.last_beat",
            ),
            write_errors: counter(
                registry,
                "presence_sink_session_write_errors_total",
                "open_sessions writes that failed (retried every second)",
            ),
            rebuilt: gauge(
                registry,
                "presence_sink_open_sessions_rebuilt",
                "Open sessions found in the sessions changelog at start-up",
            ),
        }
    }
}

/// Follows the changelog and the beats into PostgreSQL until `shutdown`. An error is fatal
/// for the process (the caller stops the sink); PostgreSQL being away is not an error (the
/// batch is retried).
/// Readiness component of the follower on the sink's `/readyz`.
pub const HEALTH: &str = "open_sessions";

pub async fn follow(
    config: Config,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    health.set_unready(
        HEALTH,
        "rebuilding the open sessions from the sessions changelog",
    );
    let changelog = config.topics.sessions_changelog();
    let heartbeats = config.topics.heartbeats.clone();
    let group = format!("{}.sessions", config.sink.group_id);
    let consumer: Follower = restore_consumer_config(&config.kafka, "sink-sessions", &group)
        .set("fetch.wait.max.ms", "50")
        .create_with_context(QuietEof("sink-sessions"))?;
    let tables = Tables::new(&config.database.schema);
    let mut db = Db {
        config: &config,
        client: None,
        table: format!("\"{}\".open_sessions", tables.schema),
        health,
    };

    // Where the heartbeats end now, before the rebuild: the beats appended while it runs are
    // read after it, not skipped (reading from the end once rebuilt lost them).
    let Some(beat_partitions) =
        wait_for_partitions(&consumer, &heartbeats, "the heartbeats topic", &shutdown).await
    else {
        return Ok(());
    };
    let Some(beats_from) = wait_for_ends(&consumer, &heartbeats, &beat_partitions, &shutdown).await
    else {
        return Ok(());
    };

    // The whole changelog first: every partition to its end.
    let Some(changelog_partitions) =
        wait_for_partitions(&consumer, &changelog, "the sessions changelog", &shutdown).await
    else {
        return Ok(());
    };
    let mut tpl = TopicPartitionList::new();
    for p in &changelog_partitions {
        tpl.add_partition_offset(&changelog, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut open: HashMap<SessionKey, (SessionState, i64)> = HashMap::new();
    let mut at_end: std::collections::BTreeSet<i32> = Default::default();
    while at_end.len() < changelog_partitions.len() {
        let m = tokio::select! {
            m = consumer.recv() => m,
            _ = shutdown.wait() => return Ok(()),
        };
        match m {
            // Stage 1's marks of quiet sessions are notes for its own restores.
            Ok(m) if m.key().is_some_and(is_session_mark_key) => {}
            Ok(m) => {
                let key = (m.partition(), m.key().unwrap_or_default().to_vec());
                metrics.changes.inc();
                match read_session(m.payload()) {
                    Some(Some(s)) => {
                        open.insert(key, (s, m.offset()));
                    }
                    Some(None) => {
                        open.remove(&key);
                    }
                    None => {}
                }
            }
            Err(KafkaError::PartitionEOF(p)) => {
                at_end.insert(p);
            }
            Err(e) => fatal_or_transient(&consumer, &changelog, e)?,
        }
    }
    let rebuilt = open.len();
    if !db.write(Write::Replace(&open), &metrics, &shutdown).await {
        return Ok(());
    }
    db.health.set_ready(HEALTH);
    drop(open);
    metrics.rebuilt.set(rebuilt as i64);
    tracing::info!(
        open_sessions = rebuilt,
        "open sessions rebuilt from the sessions changelog; following it and the heartbeats"
    );

    // Then both topics, live; beats from where they ended when the rebuild began.
    consumer.incremental_assign(&beats_from)?;
    loop {
        let first = tokio::select! {
            m = consumer.recv() => m,
            _ = shutdown.wait() => return Ok(()),
        };
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut changes = Changes::default();
        let (mut n, mut changed, mut beats) = (0, 0u64, 0u64);
        let mut next = Some(first);
        loop {
            match next.take() {
                Some(Ok(m)) => {
                    n += 1;
                    if m.topic() == changelog {
                        // A quiet session's mark is no change of who is online.
                        let session = !m.key().is_some_and(is_session_mark_key);
                        changed += u64::from(session);
                        if let Some(value) = session.then(|| read_session(m.payload())).flatten() {
                            changes.session(
                                (m.partition(), m.key().unwrap_or_default().to_vec()),
                                value.map(|s| (s, m.offset())),
                            );
                        }
                    } else if let Some(Ok(Some(h))) = m.payload().map(|p| {
                        HeartbeatRef::decode(p).map(|h| h.filter(|h| h.kind == HeartbeatKind::Beat))
                    }) {
                        if let Some(at) = m.timestamp().to_millis() {
                            beats += 1;
                            changes.beat(h.user_id, h.session_id, at);
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => fatal_or_transient(&consumer, &changelog, e)?,
                None => {}
            }
            if n >= BATCH {
                break;
            }
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(m) => next = Some(m),
                Err(_) => break,
            }
        }
        // Per batch, not per record: beats are the sink's busiest input.
        metrics.changes.inc_by(changed);
        metrics.beats.inc_by(beats);
        if !changes.is_empty() && !db.write(Write::Apply(&changes), &metrics, &shutdown).await {
            return Ok(());
        }
    }
}

/// A changelog value: `Some(Some)` a session, `Some(None)` a tombstone, `None` a record that
/// does not decode (skipped and logged: the processor wrote it, so this sink is older than
/// the schema; upgrade it). Not for a quiet session's mark (its key says so,
/// [`is_session_mark_key`]), which is no session.
fn read_session(payload: Option<&[u8]>) -> Option<Option<SessionState>> {
    let Some(bytes) = payload else {
        return Some(None);
    };
    match decode::<SessionState>(bytes) {
        Ok(s) => Some(Some(s)),
        Err(e) => {
            tracing::warn!(error = %e, "a sessions changelog record does not decode; skipped (is this sink older than the processor? upgrade it)");
            None
        }
    }
}

/// `topic`'s partitions, once the broker lists the topic (`what` names it in the logs);
/// `None` if `shutdown` comes first.
async fn wait_for_partitions(
    consumer: &Follower,
    topic: &str,
    what: &str,
    shutdown: &Shutdown,
) -> Option<Vec<i32>> {
    every_second(shutdown, || match partitions(consumer, topic) {
        Ok(p) if !p.is_empty() => Some(p),
        Ok(_) => {
            tracing::warn!(
                topic,
                "{what} does not exist yet (`presence topics` creates it); waiting"
            );
            None
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "cannot read {what}'s metadata; retrying");
            None
        }
    })
    .await
}

/// `topic`'s `partitions` at their current ends; `None` if `shutdown` comes first.
async fn wait_for_ends(
    consumer: &Follower,
    topic: &str,
    partitions: &[i32],
    shutdown: &Shutdown,
) -> Option<TopicPartitionList> {
    every_second(shutdown, || {
        let ends = partitions.iter().try_fold(TopicPartitionList::new(), |mut tpl, &p| {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
            Ok::<_, KafkaError>(tpl)
        });
        ends.inspect_err(|e| {
            tracing::warn!(topic, error = %e, "cannot read where {topic}'s partitions end; retrying")
        })
        .ok()
    })
    .await
}

/// `attempt`'s first answer, asked again every second (it logs why not); `None` if `shutdown`
/// comes first.
async fn every_second<T>(shutdown: &Shutdown, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(t) = attempt() {
            return Some(t);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait() => return None,
        }
    }
}

fn partitions(consumer: &Follower, topic: &str) -> Result<Vec<i32>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

fn fatal_or_transient(consumer: &Follower, topic: &str, e: KafkaError) -> anyhow::Result<()> {
    if let Some((code, reason)) = consumer.client().fatal_error() {
        anyhow::bail!("the sessions follower's consumer hit a fatal Kafka error ({code:?}: {reason}) reading {topic}; exiting so that the sink is restarted with a new client");
    }
    tracing::warn!(error = %e, "Kafka consumer error in the sessions follower; librdkafka retries by itself");
    Ok(())
}

/// What [`Db::write`] writes: the whole table once on start, then each batch's changes.
#[derive(Clone, Copy)]
enum Write<'a> {
    Replace(&'a HashMap<SessionKey, (SessionState, i64)>),
    Apply(&'a Changes),
}

/// The PostgreSQL edge: one connection, made (after the sink's migrations) on first use.
struct Db<'a> {
    config: &'a Config,
    client: Option<Client>,
    table: String,
    /// `/readyz`: [`HEALTH`] is 503 with the reason while a write fails.
    health: Health,
}

impl Db<'_> {
    async fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let mut c = connect_postgres(&self.config.database).await?;
            crate::migrations::apply(&mut c, &self.config.database.schema)
                .await
                .map_err(|e| format!("schema migration failed: {e}"))?;
            self.client = Some(c);
        }
        self.client
            .as_mut()
            .ok_or_else(|| "no connection".to_string())
    }

    /// Writes `what` until PostgreSQL takes it (each failure counted, logged and followed by
    /// a fresh connection a second later); `false` if `shutdown` came first.
    async fn write(&mut self, what: Write<'_>, metrics: &Metrics, shutdown: &Shutdown) -> bool {
        loop {
            let written = match what {
                Write::Replace(open) => self.replace(open).await,
                Write::Apply(changes) => self.apply(changes).await,
            };
            match written {
                Ok(()) => {
                    if matches!(what, Write::Apply(_)) {
                        self.health.set_ready(HEALTH);
                    }
                    return true;
                }
                Err(e) => {
                    metrics.write_errors.inc();
                    self.health.set_unready(
                        HEALTH,
                        format!(
                            "cannot write open sessions to PostgreSQL ({e}); retrying every second"
                        ),
                    );
                    self.wait(&e, shutdown).await
                }
            }
            if shutdown.is_triggered() {
                return false;
            }
        }
    }

    async fn wait(&mut self, error: &str, shutdown: &Shutdown) {
        tracing::warn!(
            error,
            "cannot write open sessions to PostgreSQL; retrying in 1 s"
        );
        self.client = None;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.wait() => {}
        }
    }

    /// The table becomes exactly `open` (a session already there keeps its newer
    /// `last_beat`).
    async fn replace(
        &mut self,
        open: &HashMap<SessionKey, (SessionState, i64)>,
    ) -> Result<(), String> {
        let table = self.table.clone();
        let client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        let (partitions, keys): (Vec<i32>, Vec<Vec<u8>>) =
            open.keys().map(|(p, k)| (*p, k.clone())).unzip();
        tx.execute(
            &format!(
                "DELETE FROM {table} o WHERE NOT EXISTS (SELECT 1 FROM unnest($1::int[], $2::bytea[]) k(p, key) WHERE k.p = o.kafka_partition AND k.key = o.session_key)"
            ),
            &[&partitions, &keys],
        )
        .await
        .map_err(|e| e.to_string())?;
        let rows: Vec<_> = open.iter().map(|(k, (s, o))| (k, s, *o)).collect();
        for chunk in rows.chunks(BATCH) {
            upsert(&tx, &table, chunk)
                .await
                .map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())
    }

    async fn apply(&mut self, changes: &Changes) -> Result<(), String> {
        let table = self.table.clone();
        let client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        let (mut gone_p, mut gone_k) = (Vec::new(), Vec::new());
        let mut opened = Vec::new();
        for (key, value) in &changes.sessions {
            match value {
                None => {
                    gone_p.push(key.0);
                    gone_k.push(key.1.clone());
                }
                Some((s, offset)) => opened.push((key, s, *offset)),
            }
        }
        if !gone_p.is_empty() {
            tx.execute(
                &format!("DELETE FROM {table} o USING unnest($1::int[], $2::bytea[]) k(p, key) WHERE k.p = o.kafka_partition AND k.key = o.session_key"),
                &[&gone_p, &gone_k],
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        upsert(&tx, &table, &opened)
            .await
            .map_err(|e| e.to_string())?;
        if !changes.beats.is_empty() {
            let (mut users, mut sessions, mut ats) = (Vec::new(), Vec::new(), Vec::new());
            for ((u, s), at) in &changes.beats {
                users.push(u.as_str());
                sessions.push(s.as_str());
                ats.push(*at);
            }
            tx.execute(
                &format!(
                    "UPDATE {table} o SET last_beat = to_timestamp(b.t / 1000.0)
                     FROM unnest($1::text[], $2::text[], $3::bigint[]) b(u, s, t)
                     WHERE o.session_id = b.s AND o.user_id = b.u AND o.last_beat < to_timestamp(b.t / 1000.0)"
                ),
                &[&users, &sessions, &ats],
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        tx.commit().await.map_err(|e| e.to_string())
    }
}

/// Inserts or replaces sessions; `last_beat` starts at the open and never moves back.
async fn upsert(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    rows: &[(&SessionKey, &SessionState, i64)],
) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let (mut p, mut k, mut sid, mut uid) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut fid, mut rid, mut at, mut off) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((partition, key), s, offset) in rows {
        p.push(*partition);
        k.push(key.as_slice());
        sid.push(s.session_id.as_str());
        uid.push(s.user_id.as_str());
        fid.push(s.facility_id.as_str());
        rid.push(s.region_id.as_str());
        at.push(s.last_seen); // in the changelog: when the session opened or moved here
        off.push(*offset);
    }
    tx.execute(
        &format!(
            "INSERT INTO {table} AS o (kafka_partition, session_key, session_id, user_id, facility_id, region_id, opened_at, last_beat, kafka_offset)
             SELECT p, k, s, u, f, r, to_timestamp(t / 1000.0), to_timestamp(t / 1000.0), x
             FROM unnest($1::int[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[]) AS b(p, k, s, u, f, r, t, x)
             ON CONFLICT (kafka_partition, session_key) DO UPDATE SET
                 session_id = EXCLUDED.session_id, user_id = EXCLUDED.user_id,
                 facility_id = EXCLUDED.facility_id, region_id = EXCLUDED.region_id,
                 opened_at = EXCLUDED.opened_at,
                 last_beat = greatest(o.last_beat, EXCLUDED.last_beat),
                 kafka_offset = EXCLUDED.kafka_offset"
        ),
        &[&p, &k, &sid, &uid, &fid, &rid, &at, &off],
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, facility: &str, at: i64) -> SessionState {
        SessionState {
            session_id: id.into(),
            user_id: format!("u-{id}"),
            facility_id: facility.into(),
            region_id: "r".into(),
            last_seen: at,
            open_offset: at,
        }
    }

    #[test]
    fn the_last_change_of_a_session_wins_and_beats_keep_the_newest() {
        let mut c = Changes::default();
        let key = (0, vec![1u8; 16]);
        c.session(key.clone(), Some((session("s", "a", 1), 10)));
        c.session(key.clone(), None);
        c.session((1, vec![2u8; 16]), Some((session("t", "a", 2), 11)));
        c.session((1, vec![2u8; 16]), Some((session("t", "b", 3), 12)));
        c.beat("u-t", "t", 5);
        c.beat("u-t", "t", 4);
        assert_eq!(c.sessions.get(&key), Some(&None), "closed after it opened");
        assert_eq!(
            c.sessions.get(&(1, vec![2u8; 16])),
            Some(&Some((session("t", "b", 3), 12))),
            "moved to b"
        );
        assert_eq!(c.beats.get(&("u-t".into(), "t".into())), Some(&5));
    }

    #[test]
    fn changelog_records_of_every_released_version_decode() {
        let s = session("s-1", "f-1", 1_700_000_000_000);
        let bytes = presence_core::codec::encode(&s);
        assert_eq!(decode::<SessionState>(&bytes).unwrap(), s);
        presence_core::codec::verify_history::<SessionState>(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../schemas/history/session_state"),
        )
        .unwrap();
        assert_eq!(read_session(None), Some(None), "a tombstone");
        assert_eq!(read_session(Some(b"junk")), None);
    }
}
