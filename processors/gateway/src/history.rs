//! The PostgreSQL edge of the read side: a facility's transitions over a time range, its
//! uptime per day and per window, the regions' uptime, and the sessions open now, from the
//! tables and SQL functions the sink keeps (`presence_core::delivery::Tables`; the sink's
//! `migrations/`).
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
    #[error("PostgreSQL does not know the time zone {0:?}: use an IANA name such as Europe/Berlin or UTC")]
    UnknownTimeZone(String),
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

    /// The transitions of `facility` in [from, to), after the newest before `from` (the state
    /// the range starts in; newest by `since`, then `seq`, as `facility_spans` picks it: one
    /// step back on the history's key). `region`: only rows of that region (the region the
    /// caller was authorised for), or every row when `None`.
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
            "(SELECT {columns} FROM {h} WHERE facility_id = $1 AND ($4::text IS NULL OR region_id = $4) AND since < to_timestamp($2::bigint / 1000.0) ORDER BY since DESC, seq DESC LIMIT 1)
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

/// One calendar day of a facility in the asked-for time zone.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Day {
    /// `YYYY-MM-DD` in the asked-for time zone.
    pub day: String,
    pub online_seconds: f64,
    /// Seconds of the day the history covers: less than the day before the facility's
    /// first transition and for today (up to now).
    pub known_seconds: f64,
    /// The OFFLINE spans within the day, `[from, to)` in ms since the epoch, oldest first.
    pub outages: Vec<[i64; 2]>,
}

/// ONLINE share over one window that ends now.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Window {
    /// `24h`, `7d` or `30d`.
    pub window: String,
    pub online_seconds: f64,
    pub known_seconds: f64,
    /// 100 × online / known; `null` when the history covers none of the window.
    pub uptime_percent: Option<f64>,
}

/// `GET /v1/facilities/{id}/uptime`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Uptime {
    pub facility_id: String,
    pub tz: String,
    /// Oldest first; the last one is today.
    pub days: Vec<Day>,
    pub windows: Vec<Window>,
}

/// One open session of a facility.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Session {
    pub user_id: String,
    /// When the session opened at this facility (its first beat here), ms since the epoch.
    pub since: i64,
    /// Its newest beat the sink has read, ms since the epoch.
    pub last_beat: i64,
}

/// `GET /v1/facilities/{id}/sessions`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Sessions {
    pub facility_id: String,
    /// Oldest first, at most [`MAX_SESSIONS`].
    pub sessions: Vec<Session>,
    /// More sessions are open than listed.
    pub truncated: bool,
}

/// A region's ONLINE share over a range, all facilities together.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionUptime {
    pub region: String,
    pub online_seconds: f64,
    pub known_seconds: f64,
}

/// Most sessions one response lists.
pub const MAX_SESSIONS: i64 = 1000;

/// The windows of [`Uptime::windows`]: name and days.
const WINDOWS: [(&str, i32); 3] = [("24h", 1), ("7d", 7), ("30d", 30)];

/// 100 × online / known, `None` when nothing is known.
pub fn percent(online_seconds: f64, known_seconds: f64) -> Option<f64> {
    (known_seconds > 0.0).then(|| (100.0 * online_seconds / known_seconds).clamp(0.0, 100.0))
}

impl HistoryReader {
    /// The last `days` calendar days of `facility` in `tz` (today included, up to now), and
    /// its uptime over the last 24 h, 7 d and 30 d. `region` as in [`HistoryReader::read`].
    pub async fn uptime(
        &self,
        facility: &str,
        region: Option<&str>,
        days: i32,
        tz: &str,
    ) -> Result<Uptime, HistoryError> {
        let lease = self.lease().await?;
        let Some(client) = lease.client.as_ref() else {
            return Err(HistoryError::Unavailable("no connection".into()));
        };
        self.metrics.history_queries.inc();
        let schema = &self.tables.schema;
        let rows = client
            .query(
                &format!(
                    "SELECT day::text, online_seconds, known_seconds, outages::text
                     FROM \"{schema}\".facility_days($1, $2,
                         (date_trunc('day', now() AT TIME ZONE $3) - ($4::int - 1) * interval '1 day') AT TIME ZONE $3,
                         now(), $3)"
                ),
                &[&facility, &region, &tz, &days],
            )
            .await
            .map_err(|e| self.classify_tz(e, tz))?;
        let days = rows
            .iter()
            .map(|r| Day {
                day: r.get(0),
                online_seconds: r.get(1),
                known_seconds: r.get(2),
                outages: serde_json::from_str(r.get::<_, &str>(3)).unwrap_or_default(),
            })
            .collect();
        let (names, lengths): (Vec<&str>, Vec<i32>) = WINDOWS.iter().copied().unzip();
        let rows = client
            .query(
                &format!(
                    "SELECT w.name,
                            coalesce(sum(extract(epoch FROM s.ended - s.started)) FILTER (WHERE s.status = 'ONLINE'), 0)::double precision,
                            coalesce(sum(extract(epoch FROM s.ended - s.started)), 0)::double precision
                     FROM unnest($3::text[], $4::int[]) WITH ORDINALITY AS w(name, days, i)
                     LEFT JOIN LATERAL \"{schema}\".facility_spans($1, $2, now() - w.days * interval '1 day', now()) s ON true
                     GROUP BY w.name, w.i ORDER BY w.i"
                ),
                &[&facility, &region, &names, &lengths],
            )
            .await
            .map_err(|e| self.classify(e))?;
        let windows = rows
            .iter()
            .map(|r| {
                let (online, known): (f64, f64) = (r.get(1), r.get(2));
                Window {
                    window: r.get(0),
                    online_seconds: online,
                    known_seconds: known,
                    uptime_percent: percent(online, known),
                }
            })
            .collect();
        Ok(Uptime {
            facility_id: facility.to_string(),
            tz: tz.to_string(),
            days,
            windows,
        })
    }

    /// Each of `regions`' ONLINE and known seconds from `from` (ms) until now; regions
    /// without history are left out.
    pub async fn region_uptime(
        &self,
        regions: &[String],
        from: i64,
    ) -> Result<Vec<RegionUptime>, HistoryError> {
        let rows = self
            .query(
                &format!(
                    "SELECT region_id, online_seconds, known_seconds FROM \"{}\".region_uptime($1, to_timestamp($2::bigint / 1000.0))",
                    self.tables.schema
                ),
                &[&regions, &from],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| RegionUptime {
                region: r.get(0),
                online_seconds: r.get(1),
                known_seconds: r.get(2),
            })
            .collect())
    }

    /// The sessions open now at `facility`, oldest first. `region` as in
    /// [`HistoryReader::read`].
    pub async fn sessions(
        &self,
        facility: &str,
        region: Option<&str>,
    ) -> Result<Sessions, HistoryError> {
        let rows = self
            .query(
                &format!(
                    "SELECT user_id, (extract(epoch FROM opened_at) * 1000)::bigint, (extract(epoch FROM last_beat) * 1000)::bigint
                     FROM \"{}\".open_sessions WHERE facility_id = $1 AND ($2::text IS NULL OR region_id = $2)
                     ORDER BY opened_at, user_id LIMIT {}",
                    self.tables.schema,
                    MAX_SESSIONS + 1
                ),
                &[&facility, &region],
            )
            .await?;
        let truncated = rows.len() as i64 > MAX_SESSIONS;
        Ok(Sessions {
            facility_id: facility.to_string(),
            sessions: rows
                .iter()
                .take(MAX_SESSIONS as usize)
                .map(|r| Session {
                    user_id: r.get(0),
                    since: r.get(1),
                    last_beat: r.get(2),
                })
                .collect(),
            truncated,
        })
    }

    /// One statement on a leased connection, counted in `history_queries`.
    async fn query(
        &self,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, HistoryError> {
        let lease = self.lease().await?;
        let Some(client) = lease.client.as_ref() else {
            return Err(HistoryError::Unavailable("no connection".into()));
        };
        self.metrics.history_queries.inc();
        client
            .query(statement, params)
            .await
            .map_err(|e| self.classify(e))
    }

    /// As [`HistoryReader::classify`], and an unknown time zone is the caller's.
    fn classify_tz(&self, e: tokio_postgres::Error, tz: &str) -> HistoryError {
        if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) {
            return HistoryError::UnknownTimeZone(tz.to_string());
        }
        self.classify(e)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_a_share_of_the_known_time() {
        assert_eq!(percent(0.0, 0.0), None, "nothing known is not 0 %");
        assert_eq!(percent(30.0, 60.0), Some(50.0));
        assert_eq!(percent(60.0, 60.0), Some(100.0));
        // Rounding in SQL can put online a hair above known.
        assert_eq!(percent(60.000001, 60.0), Some(100.0));
    }
}
