//! The PostgreSQL edge: a batch split by facility over [`CONNECTIONS`] connections; on
//! each, one prepared statement ([`WRITE`]) that inserts the history rows and moves the
//! current status forward, in one round trip and one (implicit) transaction.
//!
//! Where the time went before (about 40 k transitions/s): per shard and batch six round
//! trips (BEGIN, parse and plan each of two statements, execute each, COMMIT); on the
//! server, an upsert of `facility_status` that wrote a new entry into both of its indexes
//! for every transition, because its full pages left no room for the new row version next
//! to the old one (3% of the updates were HOT); and index inserts in random key order (a
//! batch comes in partition order). Now:
//!
//! - the statement is prepared once per connection, and history and current status are
//!   one statement (a data-modifying `WITH`, atomic on its own): one round trip;
//! - `facility_status` keeps half of each page free (migration 0003): its updates are HOT
//!   and touch no index;
//! - each shard's rows go in sorted by facility ([`in_key_order`]).
//!
//! Backend CPU time on the server alone, 200 k transitions of 20 k facilities in batches
//! of 5,000 over one connection: 3.5–4.0 s before for rows in key order, 2.2–2.5 s with
//! the fillfactor; 3.4–3.7 s with the fillfactor for rows in random order, which the sort
//! saves. Most of what is left is the history's two B-tree inserts per row (its key, and
//! `(facility_id, since)` for the console), which the schema needs, and the current
//! status's upsert. Comparing facility ids byte by byte (collation "C", migration 0004)
//! took 2.87 s to 2.58 s for 200 k rows. COPY into a temporary staging table and the same
//! two statements from it cost 3.1 s instead of 2.55 s (the index and heap work stays, the
//! COPY adds a write), so the rows travel as arrays (`unnest`).

use presence_core::config::{Config, DatabaseConfig};
use presence_core::delivery::{connect_postgres, Tables};
use presence_core::downstream::{Received, WriteError, Writer};
use tokio_postgres::{Client, Statement};

use crate::migrations;

/// Connections a batch is written over, in parallel, each in its own transaction. A facility
/// always goes to the same one (a hash of its id), so the rows of one facility are written
/// in order and no two transactions touch the same row (no lock waits, no deadlocks).
/// PostgreSQL serves a connection with one backend process, one core: with one connection
/// the sink was bound by that process's index maintenance (~40 k transitions/s, README
/// "Benchmarks"). Four lets the server use four cores where it has them and overlaps each
/// connection's commit (WAL flush) with the others' work; more only adds idle backends.
pub const CONNECTIONS: usize = 4;

/// The write of one shard, `{history}` and `{current}` replaced by the tables and
/// `{replay}` by [`FIRST_TIME`] or [`REPLAY`]: every row into the history, then per facility
/// the row of its highest `seq` into the current status, which only ever moves forward in
/// `seq` (an older or replayed transition changes nothing, not even `updated_at`).
/// Parameters: facility, region, status, open sessions, since (ms), seq, emitted at (ms),
/// Kafka partition, Kafka offset; one array each, a row per index.
///
/// One statement, so one transaction without BEGIN/COMMIT and one round trip; a
/// data-modifying `WITH` runs to completion whether or not the outer statement reads it.
/// Times stay ms in bigint until PostgreSQL converts them, so that a value beyond its
/// range is the server's refusal (SQLSTATE 22008, dead-lettered) and not a client error.
/// `t::float8 / 1000` is the correctly rounded quotient, as `t / 1000.0` (numeric, then
/// converted to float8 for `to_timestamp`) was, without the numeric arithmetic: the same
/// timestamp for every ms value (2.1 M values compared, none differed).
///
/// Two forms of it are prepared on each connection. Rows written for the first time (the
/// steady case) go in with a plain `INSERT` into the history ([`FIRST_TIME`]); a replay (a
/// sink restarted before its offsets were committed, two sinks overlapping in a rebalance)
/// meets rows already there, the statement fails on the history's key (SQLSTATE 23505) having
/// changed nothing (one statement, one transaction), and the shard is written again with
/// `ON CONFLICT DO NOTHING` ([`REPLAY`]), which skips them. `ON CONFLICT` costs on every row,
/// conflicting or not (a speculative insertion: the key is looked up, the row inserted with a
/// token, the index entry made, the token confirmed): 200 k rows of 20 k facilities in
/// batches of 1,250 on one connection took 3.33–3.44 s of the server with it and 2.07–2.53 s
/// without (three rounds alternating, session 22).
pub const WRITE: &str = "WITH b AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[], $8::int[], $9::bigint[])
        AS b(f, r, s, o, t, q, e, p, k)
), history AS (
    INSERT INTO {history} (facility_id, region_id, status, open_sessions, since, seq, emitted_at, kafka_partition, kafka_offset)
    SELECT f, r, s, o, to_timestamp(t::float8 / 1000), q, to_timestamp(e::float8 / 1000), p, k FROM b
    {replay}
)
INSERT INTO {current} AS c (facility_id, region_id, status, open_sessions, since, seq, emitted_at)
SELECT DISTINCT ON (f) f, r, s, o, to_timestamp(t::float8 / 1000), q, to_timestamp(e::float8 / 1000) FROM b
ORDER BY f, q DESC
ON CONFLICT (facility_id) DO UPDATE SET
    region_id = EXCLUDED.region_id, status = EXCLUDED.status,
    open_sessions = EXCLUDED.open_sessions, since = EXCLUDED.since,
    seq = EXCLUDED.seq, emitted_at = EXCLUDED.emitted_at, updated_at = now()
WHERE c.seq < EXCLUDED.seq";

/// [`WRITE`]'s history insert for rows not written before: a row already there fails the
/// statement (SQLSTATE 23505), and the shard is written again with [`REPLAY`].
pub const FIRST_TIME: &str = "";

/// [`WRITE`]'s history insert for a replay: a row already there adds nothing.
pub const REPLAY: &str = "ON CONFLICT DO NOTHING";

/// A connection and [`WRITE`] prepared on it in both forms.
struct Connection {
    client: Client,
    first_time: Statement,
    replay: Statement,
}

pub struct PostgresWriter {
    database: DatabaseConfig,
    schema: String,
    /// [`WRITE`] for this schema's tables, in its two forms: [`FIRST_TIME`] and [`REPLAY`].
    sql: [String; 2],
    /// Empty until the first write, and after a connection died (all are made anew).
    connections: Vec<Connection>,
    /// The schema was created (a new or emptied database) and the rewind that follows has
    /// not been asked for yet: kept across a failure between the two (a connection or a
    /// prepare that fails after the migration), which would otherwise lose it.
    created: bool,
}

impl PostgresWriter {
    pub fn new(config: &Config) -> PostgresWriter {
        let tables = Tables::new(&config.database.schema);
        PostgresWriter {
            database: config.database.clone(),
            schema: config.database.schema.clone(),
            sql: [FIRST_TIME, REPLAY].map(|form| {
                WRITE
                    .replace("{history}", &tables.history())
                    .replace("{current}", &tables.current())
                    .replace("{replay}", form)
            }),
            connections: Vec::new(),
            created: false,
        }
    }

    /// Connects (migrates, prepares) on first use and after a connection died. A schema
    /// created just now (a new or emptied database) is a rewind: every transition is read
    /// again.
    async fn connections(&mut self) -> Result<&[Connection], WriteError> {
        if self.connections.iter().any(|c| c.client.is_closed()) {
            self.connections.clear();
        }
        if self.connections.is_empty() {
            let mut first = connect_postgres(&self.database)
                .await
                .map_err(WriteError::Retry)?;
            let applied = migrations::apply(&mut first, &self.schema)
                .await
                .map_err(|e| WriteError::Retry(format!("schema migration failed: {e}")))?;
            if !applied.is_empty() {
                tracing::info!(schema = %self.schema, ?applied, "applied schema migrations");
            }
            self.created |= applied.first() == Some(&1);
            let mut connections = Vec::with_capacity(CONNECTIONS);
            let mut next = Some(first);
            while connections.len() < CONNECTIONS {
                let client = match next.take() {
                    Some(c) => c,
                    None => connect_postgres(&self.database)
                        .await
                        .map_err(WriteError::Retry)?,
                };
                let [first_sql, replay_sql] = &self.sql;
                let (first_time, replay) =
                    futures::try_join!(client.prepare(first_sql), client.prepare(replay_sql))
                        .map_err(|e| {
                            WriteError::Retry(format!(
                                "cannot prepare the sink's write statement: {}",
                                describe(&e)
                            ))
                        })?;
                connections.push(Connection {
                    client,
                    first_time,
                    replay,
                });
            }
            self.connections = connections;
        }
        if std::mem::take(&mut self.created) {
            return Err(WriteError::Rewind(format!(
                "schema '{}' was created just now",
                self.schema
            )));
        }
        Ok(&self.connections)
    }

    /// [`Writer::prepare`]: connects now; a failure is left for the first write, which
    /// retries it, and the rewind a new schema asks for is kept for it.
    pub async fn prepare_connections(&mut self) {
        match self.connections().await {
            Ok(_) => {}
            Err(WriteError::Rewind(_)) => self.created = true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot connect to PostgreSQL at start-up; the first write retries")
            }
        }
    }

    pub async fn write_batch(&mut self, batch: &[Received]) -> Result<(), WriteError> {
        let connections = self.connections().await?;
        let mut shards = shard(batch, connections.len());
        for rows in &mut shards {
            in_key_order(rows);
        }
        let writes = connections
            .iter()
            .zip(&shards)
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(connection, rows)| write_rows(connection, rows));
        let result = futures::future::try_join_all(writes).await;
        result.map(|_| ()).map_err(|e| {
            // A lost connection, or tables that vanished (a restored or wiped database):
            // reconnect, which migrates again and then asks for a rewind. Shards that did
            // commit are written again after the rewind, which changes nothing.
            if e.is_closed() || e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
            {
                self.connections.clear();
            }
            classify(&e)
        })
    }
}

/// `batch` split into `n` shards by facility, each in the batch's order.
fn shard(batch: &[Received], n: usize) -> Vec<Vec<&Received>> {
    use std::hash::{Hash, Hasher};
    let n = n.max(1);
    let mut shards: Vec<Vec<&Received>> = (0..n).map(|_| Vec::new()).collect();
    for r in batch {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        r.status.facility_id.hash(&mut h);
        shards[(h.finish() % n as u64) as usize].push(r);
    }
    shards
}

/// `rows` by facility, and within a facility newest `seq` first. The order of the rows
/// changes nothing in what [`WRITE`] does; it changes how it does it: the index entries
/// go in in key order, each insert on or next to the leaf page of the one before, instead
/// of all over both indexes of the history (the batch comes in partition order, which is
/// random by facility); and the current status's `DISTINCT ON` finds its input sorted.
/// A quarter less server CPU per transition than in random order (module doc).
fn in_key_order(rows: &mut [&Received]) {
    rows.sort_unstable_by(|a, b| {
        a.status
            .facility_id
            .cmp(&b.status.facility_id)
            .then(b.status.seq.cmp(&a.status.seq))
    });
}

/// One shard: [`WRITE`] over its rows as arrays, one round trip; a second one, with
/// [`REPLAY`], when some of the rows were written before.
async fn write_rows(
    connection: &Connection,
    rows: &[&Received],
) -> Result<(), tokio_postgres::Error> {
    let n = rows.len();
    let mut facility = Vec::with_capacity(n);
    let mut region = Vec::with_capacity(n);
    let mut status = Vec::with_capacity(n);
    let mut open = Vec::with_capacity(n);
    let mut since = Vec::with_capacity(n);
    let mut seq = Vec::with_capacity(n);
    let mut emitted = Vec::with_capacity(n);
    let mut partition = Vec::with_capacity(n);
    let mut offset = Vec::with_capacity(n);
    for r in rows {
        let s = &r.status;
        facility.push(s.facility_id.as_str());
        region.push(s.region_id.as_str());
        status.push(s.status.as_str());
        open.push(s.open_sessions);
        since.push(s.since);
        seq.push(s.seq);
        emitted.push(s.emitted_at);
        partition.push(r.partition);
        offset.push(r.offset);
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
        &facility, &region, &status, &open, &since, &seq, &emitted, &partition, &offset,
    ];
    match connection
        .client
        .execute(&connection.first_time, &params)
        .await
    {
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            tracing::debug!(
                rows = n,
                "rows written before (a replay): writing the shard again, skipping them"
            );
            connection.client.execute(&connection.replay, &params).await
        }
        written => written,
    }
    .map(|_| ())
}

/// A server error's Display is only "db error": its message and SQLSTATE instead.
fn describe(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(
        || e.to_string(),
        |d| format!("{} (SQLSTATE {})", d.message(), d.code().code()),
    )
}

/// Only errors about the values themselves (SQLSTATE class 22, data exception: a value out
/// of range, a byte PostgreSQL text cannot hold; class 23, a constraint) are refusals that
/// repeat for the same records; anything else (connections, timeouts, resources, locks, a
/// missing table) is the database's state, retried for as long as it lasts.
fn classify(e: &tokio_postgres::Error) -> WriteError {
    let message = format!("PostgreSQL write failed: {}", describe(e));
    let code = match e.code().map(|c| c.code()) {
        Some(c) if c.starts_with("22") => "postgres_data_exception",
        Some(c) if c.starts_with("23") => "postgres_constraint_violation",
        _ => return WriteError::Retry(message),
    };
    WriteError::Refused { code, message }
}

impl Writer for PostgresWriter {
    const DEPENDENCY: &'static str = "postgres";

    async fn write(&mut self, batch: &[Received]) -> Result<(), WriteError> {
        self.write_batch(batch).await
    }

    /// Connects, migrates and prepares at start-up, while the consumer joins its group.
    /// A schema created here still asks the first write for the rewind, when the consumer
    /// has partitions to seek.
    async fn prepare(&mut self) {
        self.prepare_connections().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use presence_core::downstream::Raw;
    use presence_core::records::{FacilityStatus, Status};

    fn received(facility: &str, seq: i64) -> Received {
        Received {
            status: FacilityStatus {
                facility_id: facility.into(),
                region_id: "r".into(),
                status: Status::Online,
                open_sessions: 1,
                since: seq,
                seq,
                emitted_at: seq,
                previous_since: None,
            },
            partition: 0,
            offset: seq,
            raw: Raw {
                key: None,
                payload: Vec::new(),
                timestamp: None,
            },
        }
    }

    #[test]
    fn rows_go_in_by_facility_and_newest_seq_first() {
        let batch = [
            received("b", 1),
            received("a", 1),
            received("b", 3),
            received("a", 2),
            received("b", 2),
        ];
        let mut rows: Vec<&Received> = batch.iter().collect();
        in_key_order(&mut rows);
        let order: Vec<(&str, i64)> = rows
            .iter()
            .map(|r| (r.status.facility_id.as_str(), r.status.seq))
            .collect();
        assert_eq!(order, [("a", 2), ("a", 1), ("b", 3), ("b", 2), ("b", 1)]);
    }

    #[test]
    fn each_facility_goes_to_one_shard_in_batch_order() {
        let batch: Vec<Received> = (0..400)
            .map(|i| received(&format!("f{}", i % 40), i / 40))
            .collect();
        let shards = shard(&batch, CONNECTIONS);
        assert_eq!(shards.len(), CONNECTIONS);
        assert_eq!(shards.iter().map(Vec::len).sum::<usize>(), batch.len());
        // Forty facilities spread over every connection.
        assert!(shards.iter().all(|s| !s.is_empty()));
        for f in 0..40 {
            let id = format!("f{f}");
            let holding: Vec<&Vec<&Received>> = shards
                .iter()
                .filter(|s| s.iter().any(|r| r.status.facility_id == id))
                .collect();
            assert_eq!(holding.len(), 1, "facility {id} is on one shard");
            let seqs: Vec<i64> = holding[0]
                .iter()
                .filter(|r| r.status.facility_id == id)
                .map(|r| r.status.seq)
                .collect();
            assert_eq!(seqs, (0..10).collect::<Vec<_>>());
        }
    }
}
