//! The sink's PostgreSQL writer against real PostgreSQL, batch by batch (no Kafka): the one
//! statement per shard keeps the newest state whatever the order inside a batch, adds each
//! transition once however often it comes, rewrites no row on a replay, takes a batch far
//! larger than the default, and refuses a batch with a poison record as a whole while the
//! record alone is refused and the others alone are written (what the consumer loop does);
//! connected and migrated at start-up, before any batch, it still asks the first write for
//! the rewind a new schema needs; a history written before migration 5 keeps its rows under
//! the one key and still absorbs their replays.

use std::collections::BTreeMap;

use presence_core::config::Config;
use presence_core::delivery::Tables;
use presence_core::downstream::{Raw, Received, WriteError};
use presence_core::records::FacilityStatus;
use presence_sink::postgres_writer::PostgresWriter;
use presence_testkit::{isolated_config, transition};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio_postgres::NoTls;

/// The writer and a client of its own on a schema of the test's own, dropped by [`Db::drop`].
struct Db {
    config: Config,
    client: tokio_postgres::Client,
    tables: Tables,
}

impl Db {
    async fn new() -> (Db, PostgresWriter) {
        let config = isolated_config();
        let (client, connection) = tokio_postgres::connect(config.database.url.expose(), NoTls)
            .await
            .expect("PostgreSQL of the shared stack (deploy/stack.sh up)");
        tokio::spawn(connection);
        let mut writer = PostgresWriter::new(&config);
        // The first write creates the schema and asks for a rewind (nothing written yet).
        match writer.write_batch(&[]).await {
            Err(WriteError::Rewind(_)) => {}
            other => panic!("a new schema asks for a rewind, got {other:?}"),
        }
        let tables = Tables::new(&config.database.schema);
        (
            Db {
                config,
                client,
                tables,
            },
            writer,
        )
    }

    /// (facility, seq, status) of every facility's current row.
    async fn current(&self) -> Current {
        self.client
            .query(
                &format!(
                    "SELECT facility_id, seq, status FROM {} ORDER BY facility_id",
                    self.tables.current()
                ),
                &[],
            )
            .await
            .expect("current status")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// (facility, seq) of every history row, with duplicates if there were any.
    async fn history(&self) -> History {
        self.client
            .query(
                &format!(
                    "SELECT facility_id, seq FROM {} ORDER BY facility_id, seq",
                    self.tables.history()
                ),
                &[],
            )
            .await
            .expect("history")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// Each current row's physical version (ctid) and creating transaction (xmin): both
    /// stay the same exactly when the row was not written again.
    async fn versions(&self) -> Vec<(String, String)> {
        self.client
            .query(
                &format!(
                    "SELECT facility_id, ctid::text || '/' || xmin::text FROM {} ORDER BY facility_id",
                    self.tables.current()
                ),
                &[],
            )
            .await
            .expect("row versions")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    async fn drop(self) {
        self.client
            .batch_execute(&format!(
                "DROP SCHEMA \"{}\" CASCADE",
                self.config.database.schema
            ))
            .await
            .expect("drop the test's schema");
    }
}

/// (facility, seq, status) rows of the current status, and (facility, seq) rows of the history.
type Current = Vec<(String, i64, String)>;
type History = Vec<(String, i64)>;

fn status_of(seq: i64) -> &'static str {
    if seq % 2 == 1 {
        "ONLINE"
    } else {
        "OFFLINE"
    }
}

fn received(status: FacilityStatus, offset: i64) -> Received {
    Received {
        partition: (offset % 3) as i32,
        offset,
        raw: Raw {
            key: Some(status.facility_id.as_bytes().to_vec()),
            payload: Vec::new(),
            timestamp: None,
        },
        status,
    }
}

/// `facilities` facilities with seqs 1..=`seqs` each, in an order shuffled by `seed`.
fn shuffled(facilities: usize, seqs: i64, seed: u64) -> Vec<Received> {
    let mut statuses: Vec<FacilityStatus> = (0..facilities)
        .flat_map(|f| {
            (1..=seqs).map(move |s| transition(&format!("f{f:05}"), "north", s, s % 2 == 1))
        })
        .collect();
    statuses.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    statuses
        .into_iter()
        .enumerate()
        .map(|(i, s)| received(s, i as i64))
        .collect()
}

/// What the tables must hold after `batch`: each facility at its highest seq, and every
/// distinct (facility, seq) once.
fn expected(batch: &[Received]) -> (Current, History) {
    let mut newest: BTreeMap<String, i64> = BTreeMap::new();
    let mut history: History = Vec::new();
    for r in batch {
        let s = &r.status;
        let seq = newest.entry(s.facility_id.clone()).or_insert(s.seq);
        *seq = (*seq).max(s.seq);
        history.push((s.facility_id.clone(), s.seq));
    }
    history.sort();
    history.dedup();
    let current = newest
        .into_iter()
        .map(|(f, seq)| (f, seq, status_of(seq).to_string()))
        .collect();
    (current, history)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_with_each_facility_many_times_out_of_order_keeps_the_newest_once() {
    let (db, mut writer) = Db::new().await;
    // 40 facilities (spread over every connection) x seqs 1..=12 in random order, and a
    // third of them a second time in the same batch (a replay that reached one batch).
    let mut batch = shuffled(40, 12, 7);
    let again: Vec<Received> = batch.iter().step_by(3).cloned().collect();
    batch.extend(again);
    writer.write_batch(&batch).await.expect("the batch");
    let (current, history) = expected(&batch);
    assert_eq!(db.current().await, current);
    assert_eq!(db.history().await, history);
    assert_eq!(history.len(), 40 * 12);
    assert!(current.iter().all(|(_, seq, _)| *seq == 12));

    // The current status keeps room on its pages for the next version of a row (HOT
    // updates, migration 0003).
    let options: Option<Vec<String>> = db
        .client
        .query_one(
            &format!(
                "SELECT reloptions FROM pg_class WHERE oid = '{}'::regclass",
                db.tables.current()
            ),
            &[],
        )
        .await
        .expect("reloptions")
        .get(0);
    assert_eq!(options, Some(vec!["fillfactor=50".to_string()]));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_older_batches_write_nothing_and_newer_ones_move_forward() {
    let (db, mut writer) = Db::new().await;
    let first = shuffled(30, 6, 11);
    writer.write_batch(&first).await.expect("first");
    let (current, history) = expected(&first);
    let versions = db.versions().await;

    // The same batch again, then its older half alone, in another order.
    writer.write_batch(&first).await.expect("replay");
    let older: Vec<Received> = first
        .iter()
        .filter(|r| r.status.seq <= 3)
        .rev()
        .cloned()
        .collect();
    writer.write_batch(&older).await.expect("older");
    assert_eq!(db.current().await, current, "never back in seq");
    assert_eq!(db.history().await, history, "each transition once");
    assert_eq!(
        db.versions().await,
        versions,
        "a replay or an older transition rewrites no current row"
    );

    // Newer transitions of a third of the facilities, mixed with replays of all.
    let mut mixed: Vec<Received> = (0..30)
        .step_by(3)
        .map(|f| received(transition(&format!("f{f:05}"), "north", 7, true), 1000 + f))
        .collect();
    mixed.extend(first.iter().cloned());
    mixed.shuffle(&mut rand::rngs::StdRng::seed_from_u64(12));
    writer.write_batch(&mixed).await.expect("mixed");
    let (current, history) = expected(&mixed);
    assert_eq!(db.current().await, current);
    assert_eq!(db.history().await, history);
    assert_eq!(
        current.iter().filter(|(_, seq, _)| *seq == 7).count(),
        10,
        "the ten facilities with a seq 7 moved forward"
    );
    let moved = db
        .versions()
        .await
        .iter()
        .zip(&versions)
        .filter(|(now, before)| now != before)
        .count();
    assert_eq!(moved, 10, "only the rows that moved forward were written");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_far_larger_than_the_default_is_written_whole() {
    let (db, mut writer) = Db::new().await;
    // 40,000 transitions (2x the default sink.batch_size, ~10,000 rows per connection):
    // 4,000 facilities x 10 seqs, shuffled.
    let batch = shuffled(4000, 10, 3);
    writer.write_batch(&batch).await.expect("the batch");
    let (current, history) = expected(&batch);
    assert_eq!(db.history().await.len(), 40_000);
    assert_eq!(db.history().await, history);
    assert_eq!(db.current().await, current);
    // And once more, over the rows it wrote: nothing changes.
    let versions = db.versions().await;
    writer.write_batch(&batch).await.expect("the replay");
    assert_eq!(db.versions().await, versions);
    assert_eq!(db.history().await.len(), 40_000);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_refused_with_its_batch_and_alone_and_the_others_are_written() {
    let (db, mut writer) = Db::new().await;
    let mut batch = shuffled(20, 2, 5);
    let mut poison = transition("f00003", "north", 3, true);
    // Beyond PostgreSQL's timestamp range: SQLSTATE 22008 on every attempt.
    poison.since = i64::MAX / 4;
    batch.insert(17, received(poison, 999));
    match writer.write_batch(&batch).await {
        Err(WriteError::Refused { code, message }) => {
            assert_eq!(code, "postgres_data_exception");
            assert!(message.contains("out of range"), "{message}");
        }
        other => panic!("a batch with a poison record is refused, got {other:?}"),
    }
    // The consumer loop then writes the records one at a time.
    let mut refused = Vec::new();
    for r in &batch {
        match writer.write_batch(std::slice::from_ref(r)).await {
            Ok(()) => {}
            Err(WriteError::Refused { code, .. }) => {
                refused.push((r.status.facility_id.clone(), r.status.seq, code))
            }
            Err(e) => panic!("only the poison record is refused: {e}"),
        }
    }
    assert_eq!(
        refused,
        vec![("f00003".to_string(), 3, "postgres_data_exception")]
    );
    let good: Vec<Received> = batch.into_iter().filter(|r| r.offset != 999).collect();
    let (current, history) = expected(&good);
    assert_eq!(db.current().await, current);
    assert_eq!(db.history().await, history);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_at_start_up_a_new_schema_still_asks_the_first_write_for_a_rewind() {
    let config = isolated_config();
    let (client, connection) = tokio_postgres::connect(config.database.url.expose(), NoTls)
        .await
        .expect("PostgreSQL of the shared stack (deploy/stack.sh up)");
    tokio::spawn(connection);
    let mut writer = PostgresWriter::new(&config);
    writer.prepare_connections().await;
    // Connected and migrated before any batch: the schema is there.
    let migrations: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".schema_migrations",
                config.database.schema
            ),
            &[],
        )
        .await
        .expect("the schema was migrated at start-up")
        .get(0);
    assert_eq!(
        migrations as usize,
        presence_sink::migrations::MIGRATIONS.len()
    );
    let batch = shuffled(10, 3, 1);
    match writer.write_batch(&batch).await {
        Err(WriteError::Rewind(_)) => {}
        other => panic!("the first write after a new schema asks for a rewind, got {other:?}"),
    }
    writer.write_batch(&batch).await.expect("then it writes");
    let db = Db {
        tables: Tables::new(&config.database.schema),
        config,
        client,
    };
    let (current, history) = expected(&batch);
    assert_eq!(db.history().await, history);
    assert_eq!(db.current().await, current);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_written_before_the_one_key_migration_keeps_its_rows_and_absorbs_replays() {
    let config = isolated_config();
    let schema = config.database.schema.clone();
    let (client, connection) = tokio_postgres::connect(config.database.url.expose(), NoTls)
        .await
        .expect("PostgreSQL of the shared stack (deploy/stack.sh up)");
    tokio::spawn(connection);
    // The schema as a sink before migration 5 left it, with transitions it wrote: 40
    // facilities at seqs 1..=4, the rows the writer writes for them (the same since).
    let before = &presence_sink::migrations::MIGRATIONS[..4];
    let mut sql = format!(
        "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";
         CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());"
    );
    for (version, name, text) in before {
        sql.push_str(text);
        sql.push_str(&format!(
            ";INSERT INTO schema_migrations (version, name) VALUES ({version}, '{name}');"
        ));
    }
    let old = shuffled(40, 4, 7);
    for r in &old {
        let s = &r.status;
        sql.push_str(&format!(
            "INSERT INTO facility_transitions VALUES ('{}', {}, '{}', '{}', {}, to_timestamp({}::float8 / 1000), now(), {}, {});",
            s.facility_id,
            s.seq,
            s.region_id,
            status_of(s.seq),
            s.open_sessions,
            s.since,
            r.partition,
            r.offset
        ));
    }
    sql.push_str("RESET search_path;");
    client.batch_execute(&sql).await.expect("the old schema");

    // The writer migrates it on its first write, then takes replays of every old row with
    // new transitions of half the facilities.
    let mut writer = PostgresWriter::new(&config);
    writer
        .write_batch(&[])
        .await
        .expect("an existing schema is migrated, not rewound");
    let mut batch = shuffled(40, 6, 8);
    batch.retain(|r| r.status.seq <= 4 || r.status.facility_id.as_str() < "f00020");
    writer
        .write_batch(&batch)
        .await
        .expect("replays and new transitions");

    let db = Db {
        tables: Tables::new(&schema),
        config,
        client,
    };
    let (_, history) = expected(&batch);
    assert_eq!(
        db.history().await,
        history,
        "every old row kept, each replay absorbed, each new transition once"
    );
    let indexes: Vec<String> = db
        .client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = 'facility_transitions'",
            &[&schema],
        )
        .await
        .expect("the history's indexes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(indexes.len(), 1, "one index on the history: {indexes:?}");
    assert!(
        indexes[0].ends_with("(facility_id, since, seq)"),
        "the history's key: {indexes:?}"
    );
    db.drop().await;
}
