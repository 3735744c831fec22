//! Helpers the sink's integration tests share (each test file is a crate of its own, so not
//! every file uses every helper).
#![allow(dead_code)]

use presence_core::config::Config;
use presence_core::delivery::Tables;
use tokio_postgres::NoTls;

/// A client of the test's PostgreSQL; `None` while it cannot connect.
pub async fn db(config: &Config) -> Option<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(config.database.url.expose(), NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(client)
}

/// The `(facility_id, seq)` of each of `statuses`, sorted: what the history must hold.
pub fn pairs_of(statuses: &[presence_core::records::FacilityStatus]) -> Vec<(String, i64)> {
    let mut pairs: Vec<(String, i64)> = statuses
        .iter()
        .map(|s| (s.facility_id.clone(), s.seq))
        .collect();
    pairs.sort();
    pairs
}

/// Every `(facility_id, seq)` of the history whose facility id starts with `f`, sorted.
pub async fn history_pairs(client: &tokio_postgres::Client, tables: &Tables) -> Vec<(String, i64)> {
    client
        .query(
            &format!(
                "SELECT facility_id, seq FROM {} WHERE facility_id LIKE 'f%' ORDER BY 1, 2",
                tables.history()
            ),
            &[],
        )
        .await
        .expect("history")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits (at most 2 minutes) until the history holds the status marker of each of
/// `partitions` (`presence_testkit::produce_status_markers`): then the sink has written
/// every record before them.
pub async fn wait_for_markers(config: &Config, tables: &Tables, partitions: usize) {
    let markers = format!(
        "SELECT count(*) FROM {} WHERE facility_id LIKE 'z-%'",
        tables.history()
    );
    presence_testkit::eventually(
        "the marker of every partition written",
        std::time::Duration::from_secs(120),
        || async {
            let n: i64 = db(config)
                .await?
                .query_one(&markers, &[])
                .await
                .ok()?
                .get(0);
            (n == partitions as i64).then_some(())
        },
    )
    .await;
}
