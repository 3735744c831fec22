//! The PostgreSQL edge of the read side: a facility's transitions over a time range, from
//! the tables the sink keeps (`presence_core::delivery::Tables`).

use presence_core::config::DatabaseConfig;
use presence_core::delivery::{connect_postgres, Tables};
use presence_core::records::{FacilityStatus, Status};
use tokio::sync::Mutex;
use tokio_postgres::Client;

#[derive(Debug, serde::Serialize)]
pub struct History {
    pub facility_id: String,
    pub from: i64,
    pub to: i64,
    /// The facility's state when the range starts (its newest transition before `from`).
    pub initial: Option<FacilityStatus>,
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
}

/// One lazily (re)connected client: history reads are rare, a pool is not needed.
pub struct HistoryReader {
    database: DatabaseConfig,
    tables: Tables,
    client: Mutex<Option<Client>>,
}

/// Most transitions one response holds; a wider range is cut at the newest this many.
pub const MAX_TRANSITIONS: i64 = 10_000;

impl HistoryReader {
    pub fn new(database: &DatabaseConfig, tables: Tables) -> HistoryReader {
        HistoryReader {
            database: database.clone(),
            tables,
            client: Mutex::new(None),
        }
    }

    pub async fn read(&self, facility: &str, from: i64, to: i64) -> Result<History, HistoryError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(
                connect_postgres(&self.database)
                    .await
                    .map_err(HistoryError::Unavailable)?,
            );
        }
        let Some(client) = guard.as_ref() else {
            return Err(HistoryError::Unavailable("no connection".into()));
        };
        let h = self.tables.history();
        let columns = "facility_id, region_id, status, open_sessions, (extract(epoch from since) * 1000)::bigint, seq, (extract(epoch from emitted_at) * 1000)::bigint";
        let query = format!(
            "(SELECT {columns} FROM {h} WHERE facility_id = $1 AND since < to_timestamp($2::bigint / 1000.0) ORDER BY seq DESC LIMIT 1)
             UNION ALL
             (SELECT {columns} FROM (SELECT * FROM {h} WHERE facility_id = $1 AND since >= to_timestamp($2::bigint / 1000.0) AND since < to_timestamp($3::bigint / 1000.0) ORDER BY seq LIMIT {MAX_TRANSITIONS}) t)"
        );
        let rows = client
            .query(&query, &[&facility, &from, &to])
            .await
            .map_err(classify)?;
        let seconds_query = format!(
            "SELECT {}($1, to_timestamp($2::bigint / 1000.0), to_timestamp($3::bigint / 1000.0))",
            self.tables.online_seconds()
        );
        let online_seconds: f64 = client
            .query_one(&seconds_query, &[&facility, &from, &to])
            .await
            .map_err(classify)?
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

fn classify(e: tokio_postgres::Error) -> HistoryError {
    match e.code() {
        Some(c)
            if *c == tokio_postgres::error::SqlState::UNDEFINED_TABLE
                || *c == tokio_postgres::error::SqlState::UNDEFINED_FUNCTION =>
        {
            HistoryError::NoTables
        }
        _ => HistoryError::Unavailable(e.to_string()),
    }
}
