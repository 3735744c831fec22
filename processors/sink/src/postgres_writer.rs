//! The PostgreSQL edge: one transaction per batch, two multi-row statements over arrays.

use presence_core::config::{Config, DatabaseConfig};
use presence_core::delivery::{connect_postgres, Tables};
use presence_core::downstream::{Received, WriteError, Writer};
use tokio_postgres::Client;

use crate::migrations;

pub struct PostgresWriter {
    database: DatabaseConfig,
    schema: String,
    tables: Tables,
    client: Option<Client>,
}

impl PostgresWriter {
    pub fn new(config: &Config) -> PostgresWriter {
        PostgresWriter {
            database: config.database.clone(),
            schema: config.database.schema.clone(),
            tables: Tables::new(&config.database.schema),
            client: None,
        }
    }

    /// Connects (and migrates) on first use and after the connection died. A schema created
    /// just now (a new or emptied database) is a rewind: every transition is read again.
    async fn client(&mut self) -> Result<&mut Client, WriteError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let mut client = connect_postgres(&self.database)
                .await
                .map_err(WriteError::Retry)?;
            let applied = migrations::apply(&mut client, &self.schema)
                .await
                .map_err(|e| WriteError::Retry(format!("schema migration failed: {e}")))?;
            if !applied.is_empty() {
                tracing::info!(schema = %self.schema, ?applied, "applied schema migrations");
            }
            self.client = Some(client);
            if applied.first() == Some(&1) {
                return Err(WriteError::Rewind(format!(
                    "schema '{}' was created just now",
                    self.schema
                )));
            }
        }
        self.client
            .as_mut()
            .ok_or_else(|| WriteError::Retry("no PostgreSQL connection".into()))
    }

    pub async fn write_batch(&mut self, batch: &[Received]) -> Result<(), WriteError> {
        let history = self.tables.history();
        let current = self.tables.current();
        let client = self.client().await?;
        let n = batch.len();
        let mut facility = Vec::with_capacity(n);
        let mut region = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut open = Vec::with_capacity(n);
        let mut since = Vec::with_capacity(n);
        let mut seq = Vec::with_capacity(n);
        let mut emitted = Vec::with_capacity(n);
        let mut partition = Vec::with_capacity(n);
        let mut offset = Vec::with_capacity(n);
        for r in batch {
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
        let result: Result<(), tokio_postgres::Error> = async {
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
        .await;
        result.map_err(|e| {
            // A lost connection, or tables that vanished (a restored or wiped database):
            // reconnect, which migrates again and then asks for a rewind.
            if e.is_closed() || e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
            {
                self.client = None;
            }
            classify(&e)
        })
    }
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
