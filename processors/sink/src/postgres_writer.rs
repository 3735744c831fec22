//! The PostgreSQL edge: a batch split by facility over [`CONNECTIONS`] connections, one
//! transaction each, two multi-row statements over arrays.

use presence_core::config::{Config, DatabaseConfig};
use presence_core::delivery::{connect_postgres, Tables};
use presence_core::downstream::{Received, WriteError, Writer};
use tokio_postgres::Client;

use crate::migrations;

/// Connections a batch is written over, in parallel, each in its own transaction. A facility
/// always goes to the same one (a hash of its id), so the rows of one facility are written
/// in order and no two transactions touch the same row (no lock waits, no deadlocks).
/// PostgreSQL serves a connection with one backend process, one core: with one connection
/// the sink was bound by that process's index maintenance (~40 k transitions/s, README
/// "Benchmarks"). Four lets the server use four cores where it has them and overlaps each
/// connection's commit (WAL flush) with the others' work; more only adds idle backends.
pub const CONNECTIONS: usize = 4;

pub struct PostgresWriter {
    database: DatabaseConfig,
    schema: String,
    tables: Tables,
    /// Empty until the first write, and after a connection died (all are made anew).
    clients: Vec<Client>,
}

impl PostgresWriter {
    pub fn new(config: &Config) -> PostgresWriter {
        PostgresWriter {
            database: config.database.clone(),
            schema: config.database.schema.clone(),
            tables: Tables::new(&config.database.schema),
            clients: Vec::new(),
        }
    }

    /// Connects (and migrates) on first use and after a connection died. A schema created
    /// just now (a new or emptied database) is a rewind: every transition is read again.
    async fn clients(&mut self) -> Result<&mut [Client], WriteError> {
        if self.clients.iter().any(Client::is_closed) {
            self.clients.clear();
        }
        if self.clients.is_empty() {
            let mut first = connect_postgres(&self.database)
                .await
                .map_err(WriteError::Retry)?;
            let applied = migrations::apply(&mut first, &self.schema)
                .await
                .map_err(|e| WriteError::Retry(format!("schema migration failed: {e}")))?;
            if !applied.is_empty() {
                tracing::info!(schema = %self.schema, ?applied, "applied schema migrations");
            }
            let mut clients = vec![first];
            while clients.len() < CONNECTIONS {
                clients.push(
                    connect_postgres(&self.database)
                        .await
                        .map_err(WriteError::Retry)?,
                );
            }
            self.clients = clients;
            if applied.first() == Some(&1) {
                return Err(WriteError::Rewind(format!(
                    "schema '{}' was created just now",
                    self.schema
                )));
            }
        }
        Ok(&mut self.clients)
    }

    pub async fn write_batch(&mut self, batch: &[Received]) -> Result<(), WriteError> {
        let history = self.tables.history();
        let current = self.tables.current();
        let clients = self.clients().await?;
        let shards = shard(batch, clients.len());
        let writes = clients
            .iter_mut()
            .zip(&shards)
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(client, rows)| write_rows(client, &history, &current, rows));
        let result = futures::future::try_join_all(writes).await;
        result.map(|_| ()).map_err(|e| {
            // A lost connection, or tables that vanished (a restored or wiped database):
            // reconnect, which migrates again and then asks for a rewind. Shards that did
            // commit are written again after the rewind, which changes nothing.
            if e.is_closed() || e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
            {
                self.clients.clear();
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

/// One transaction: the history rows `ON CONFLICT DO NOTHING`, then the current status of
/// each facility, moved only forward in `seq`; each one statement over arrays.
async fn write_rows(
    client: &mut Client,
    history: &str,
    current: &str,
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
    let tx = client.transaction().await?;
    tx.execute(
        &format!(
            "INSERT INTO {history} (facility_id, region_id, status, open_sessions, since, seq, emitted_at, kafka_partition, kafka_offset)
             SELECT f, r, s, o, to_timestamp(t / 1000.0), q, to_timestamp(e / 1000.0), p, k
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[], $8::int[], $9::bigint[])
                  AS b(f, r, s, o, t, q, e, p, k)
             ON CONFLICT (facility_id, seq) DO NOTHING"
        ),
        &[&facility, &region, &status, &open, &since, &seq, &emitted, &partition, &offset],
    )
    .await?;
    tx.execute(
        &format!(
            "INSERT INTO {current} AS c (facility_id, region_id, status, open_sessions, since, seq, emitted_at)
             SELECT DISTINCT ON (f) f, r, s, o, to_timestamp(t / 1000.0), q, to_timestamp(e / 1000.0)
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::bigint[])
                  AS b(f, r, s, o, t, q, e)
             ORDER BY f, q DESC
             ON CONFLICT (facility_id) DO UPDATE SET
                 region_id = EXCLUDED.region_id, status = EXCLUDED.status,
                 open_sessions = EXCLUDED.open_sessions, since = EXCLUDED.since,
                 seq = EXCLUDED.seq, emitted_at = EXCLUDED.emitted_at, updated_at = now()
             WHERE c.seq < EXCLUDED.seq"
        ),
        &[&facility, &region, &status, &open, &since, &seq, &emitted],
    )
    .await?;
    tx.commit().await
}

/// Only errors about the values themselves (SQLSTATE class 22, data exception: a value out
/// of range, a byte PostgreSQL text cannot hold; class 23, a constraint) are refusals that
/// repeat for the same records; anything else (connections, timeouts, resources, locks, a
/// missing table) is the database's state, retried for as long as it lasts.
fn classify(e: &tokio_postgres::Error) -> WriteError {
    // A server error's Display is only "db error": say what it was.
    let detail = e.as_db_error().map_or_else(
        || e.to_string(),
        |d| format!("{} (SQLSTATE {})", d.message(), d.code().code()),
    );
    let message = format!("PostgreSQL write failed: {detail}");
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
