//! Versioned schema migrations, embedded in the binary. Each file in `migrations/` is one
//! version (`NNNN_name.sql`), applied once, in order, in its own transaction, recorded in
//! `<schema>.schema_migrations`. Released files never change: a change is a new file.

use tokio_postgres::Client;

/// (version, name, SQL). Unqualified names in the SQL land in the configured schema.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "status_and_history",
        include_str!("../migrations/0001_status_and_history.sql"),
    ),
    (2, "console", include_str!("../migrations/0002_console.sql")),
    (
        3,
        "status_fillfactor",
        include_str!("../migrations/0003_status_fillfactor.sql"),
    ),
    (
        4,
        "facility_id_collate_c",
        include_str!("../migrations/0004_facility_id_collate_c.sql"),
    ),
    (
        5,
        "history_one_index",
        include_str!("../migrations/0005_history_one_index.sql"),
    ),
];

/// Creates the schema if needed and applies what is missing; returns the versions applied.
/// Concurrent sinks serialise on an advisory lock, so each version runs exactly once.
pub async fn apply(client: &mut Client, schema: &str) -> Result<Vec<i32>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // A lock per schema, held to the end of the transaction.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("presence-migrations:{schema}")],
    )
    .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS \"{schema}\".schema_migrations (
             version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
         SET LOCAL search_path TO \"{schema}\";"
    ))
    .await?;
    let done: Vec<i32> = tx
        .query(
            &format!("SELECT version FROM \"{schema}\".schema_migrations"),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            &format!("INSERT INTO \"{schema}\".schema_migrations (version, name) VALUES ($1, $2)"),
            &[version, name],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, (v, _, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v, i as i32 + 1);
        }
    }
}
