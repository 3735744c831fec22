//! The PostgreSQL edge of the read side: a facility's transitions over a time range, from
//! the tables the sink keeps (`presence_core::delivery::Tables`).
//!
//! A small pool (`gateway.history_pool_size` connections, made on demand and reused), so
//! that one slow query does not stall the others; every connection runs with
//! `statement_timeout = gateway.history_statement_timeout`, and a request waits at most that
//! long for a connection.

use std::sync::Mutex;
use std::time::Duration;

use presence_core::config::DatabaseConfig;
use presence_core::delivery::{connect_postgres, Tables};
use presence_core::records::{FacilityStatus, Status};
use tokio::sync::Semaphore;
use tokio_postgres::Client;

use crate::metrics::Metrics;

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct History {
    pub facility_id: String,
    pub from: i64,
    pub to: i64,
    /// The facility's state when the range starts (its newest transition before `from`).
    #[schema(value_type = Option<crate::openapi::FacilityStatus>)]
    pub initial: Option<FacilityStatus>,
    #[schema(value_type = Vec<crate::openapi::FacilityStatus>)]
    pub transitions: Vec<FacilityStatus>,
    /// Seconds ONLINE within [from, to).
    pub online_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("PostgreSQL is unreachable ({0}); the history is back when it is")]
    Unavailable(String),
    #[error("the history tables do not exist yet: start `presence sink`, which creates them")]
    NoTables,
    #[error("the history query ran longer than gateway.history_statement_timeout ({0:?}) or no connection was free within it: ask for a shorter range, or retry")]
    TooSlow(Duration),
}

/// Reads history through a small pool of connections.
pub struct HistoryReader {
    database: DatabaseConfig,
    tables: Tables,
    statement_timeout: Duration,
    /// One permit per connection that may exist.
    permits: Semaphore,
    /// Connections not in use.
    idle: Mutex<Vec<Client>>,
    metrics: Metrics,
}

/// A connection taken from the pool; it goes back on drop unless it is closed.
struct Lease<'a> {
    reader: &'a HistoryReader,
    client: Option<Client>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take().filter(|c| !c.is_closed()) {
            self.reader
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}

/// Most transitions one response holds; a wider range is cut at the newest this many.
pub const MAX_TRANSITIONS: i64 = 10_000;

impl HistoryReader {
    pub fn new(
        database: &DatabaseConfig,
        tables: Tables,
        pool_size: usize,
        statement_timeout: Duration,
        metrics: Metrics,
    ) -> HistoryReader {
        HistoryReader {
            database: database.clone(),
            tables,
            statement_timeout,
            permits: Semaphore::new(pool_size),
            idle: Mutex::new(Vec::new()),
            metrics,
        }
    }

    /// A free connection, made if none is idle; waits at most the statement timeout.
    async fn lease(&self) -> Result<Lease<'_>, HistoryError> {
        let permit = tokio::time::timeout(self.statement_timeout, self.permits.acquire())
            .await
            .map_err(|_| HistoryError::TooSlow(self.statement_timeout))?
            .map_err(|_| HistoryError::Unavailable("the pool is closed".into()))?;
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .filter(|c| !c.is_closed());
        let client = match idle {
            Some(c) => c,
            None => {
                let c = connect_postgres(&self.database)
                    .await
                    .map_err(HistoryError::Unavailable)?;
                c.batch_execute(&format!(
                    "SET statement_timeout = {}",
                    self.statement_timeout.as_millis()
                ))
                .await
                .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
                c
            }
        };
        Ok(Lease {
            reader: self,
            client: Some(client),
            _permit: permit,
        })
    }

    /// The transitions of `facility` in [from, to). `region`: only rows of that region (the
    /// region the caller was authorised for), or every row when `None`.
    pub async fn read(
        &self,
        facility: &str,
        region: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<History, HistoryError> {
        let lease = self.lease().await?;
        let Some(client) = lease.client.as_ref() else {
            return Err(HistoryError::Unavailable("no connection".into()));
        };
        self.metrics.history_queries.inc();
        let h = self.tables.history();
        let columns = "facility_id, region_id, status, open_sessions, (extract(epoch from since) * 1000)::bigint, seq, (extract(epoch from emitted_at) * 1000)::bigint";
        let query = format!(
            "(SELECT {columns} FROM {h} WHERE facility_id = $1 AND ($4::text IS NULL OR region_id = $4) AND since < to_timestamp($2::bigint / 1000.0) ORDER BY seq DESC LIMIT 1)
             UNION ALL
             (SELECT {columns} FROM (SELECT * FROM {h} WHERE facility_id = $1 AND ($4::text IS NULL OR region_id = $4) AND since >= to_timestamp($2::bigint / 1000.0) AND since < to_timestamp($3::bigint / 1000.0) ORDER BY seq LIMIT {MAX_TRANSITIONS}) t)"
        );
        let rows = client
            .query(&query, &[&facility, &from, &to, &region])
            .await
            .map_err(|e| self.classify(e))?;
        let seconds_query = format!(
            "SELECT {}($1, to_timestamp($2::bigint / 1000.0), to_timestamp($3::bigint / 1000.0))",
            self.tables.online_seconds()
        );
        let online_seconds: f64 = client
            .query_one(&seconds_query, &[&facility, &from, &to])
            .await
            .map_err(|e| self.classify(e))?
            .get(0);
        let mut initial = None;
        let mut transitions = Vec::new();
        for row in rows {
            let t = FacilityStatus {
                facility_id: row.get(0),
                region_id: row.get(1),
                status: if row.get::<_, &str>(2) == "ONLINE" {
                    Status::Online
                } else {
                    Status::Offline
                },
                open_sessions: row.get(3),
                since: row.get(4),
                seq: row.get(5),
                emitted_at: row.get(6),
                previous_since: None,
            };
            if t.since < from {
                initial = Some(t);
            } else {
                transitions.push(t);
            }
        }
        Ok(History {
            facility_id: facility.to_string(),
            from,
            to,
            initial,
            transitions,
            online_seconds,
        })
    }
}

impl HistoryReader {
    fn classify(&self, e: tokio_postgres::Error) -> HistoryError {
        use tokio_postgres::error::SqlState;
        match e.code() {
            Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::UNDEFINED_FUNCTION => {
                HistoryError::NoTables
            }
            Some(c) if *c == SqlState::QUERY_CANCELED => {
                HistoryError::TooSlow(self.statement_timeout)
            }
            _ => HistoryError::Unavailable(e.to_string()),
        }
    }
}
