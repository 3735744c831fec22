//! A crash between a batch's write and its offset commit, with the next batch already read
//! ahead (the consumer loop reads a batch while the one before is written): the offsets
//! committed stop at the last batch whose write finished, none of the batch read ahead; a
//! new sink replays from there, the crashed batch among it, and the tables end as if each
//! transition had been written once.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use presence_core::config::Config;
use presence_core::delivery::Tables;
use presence_core::downstream::{self, Batching, Metrics, Received, WriteError, Writer};
use presence_core::records::FacilityStatus;
use presence_core::telemetry::Health;
use presence_core::Shutdown;
use presence_sink::postgres_writer::PostgresWriter;
use presence_testkit::{
    committed_offsets, ensure_topics, eventually, isolated_config, produce, produce_status_markers,
    spawn_process, status_records, transition, TestTopics,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// (partition, offset) of every record of each batch written, in order.
type Written = Arc<Mutex<Vec<Vec<(i32, i64)>>>>;

fn written(w: &Written) -> Vec<Vec<(i32, i64)>> {
    w.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The sink's writer, recording what it wrote; with `crash_at`, the write of that batch
/// (counted from 0) reaches PostgreSQL and then never returns, as if the process died
/// right after it: its offsets are never committed.
struct Recording {
    inner: PostgresWriter,
    written: Written,
    crash_at: Option<usize>,
    crashed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Writer for Recording {
    const DEPENDENCY: &'static str = "postgres";

    async fn write(&mut self, batch: &[Received]) -> Result<(), WriteError> {
        self.inner.write_batch(batch).await?;
        let offsets = batch.iter().map(|r| (r.partition, r.offset)).collect();
        let n = {
            let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
            w.push(offsets);
            w.len()
        };
        if self.crash_at == Some(n - 1) {
            if let Some(crashed) = self.crashed.take() {
                let _ = crashed.send(());
            }
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

fn run_sink(
    config: &Config,
    writer: Recording,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static {
    let config = config.clone();
    async move {
        let registry = presence_core::metrics::registry();
        let health = Health::new(&registry);
        let metrics = Metrics::new(&registry, "sink");
        let batching = Batching {
            max_records: config.sink.batch_size,
            linger: config.sink.batch_linger,
        };
        downstream::run(
            &config,
            "sink",
            &config.sink.group_id.clone(),
            batching,
            writer,
            metrics,
            health,
            shutdown,
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_write_and_commit_commits_nothing_read_ahead_and_replays_idempotently() {
    let mut config = isolated_config();
    let _topics = TestTopics::own(&config);
    // Many small batches, so that the crash is in the middle of the backlog.
    config.sink.batch_size = 100;
    ensure_topics(&config).await;
    let tables = Tables::new(&config.database.schema);
    let topic = config.topics.facility_status.clone();

    // 200 facilities x seqs 1..=5, shuffled.
    let mut statuses: Vec<FacilityStatus> = (0..200)
        .flat_map(|f| (1..=5).map(move |s| transition(&format!("f{f:03}"), "west", s, s % 2 == 1)))
        .collect();
    statuses.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
    produce(&config, &topic, &status_records(&statuses)).await;

    // First sink: dies right after writing batch 3, with batch 4 read ahead by then.
    const CRASH_AT: usize = 3;
    let first = Written::default();
    let (crashed_tx, crashed) = tokio::sync::oneshot::channel();
    let writer = Recording {
        inner: PostgresWriter::new(&config),
        written: first.clone(),
        crash_at: Some(CRASH_AT),
        crashed: Some(crashed_tx),
    };
    let sink = tokio::spawn(run_sink(&config, writer, Shutdown::new()));
    tokio::time::timeout(Duration::from_secs(120), crashed)
        .await
        .expect("the first sink wrote 4 batches within 120 s")
        .expect("the crashing writer signals");

    // What the batches before the crashed one covered: exactly what may be committed.
    let before: Vec<Vec<(i32, i64)>> = written(&first)[..CRASH_AT].to_vec();
    let mut expected: BTreeMap<i32, i64> = BTreeMap::new();
    for &(p, o) in before.iter().flatten() {
        let next = expected.entry(p).or_insert(0);
        *next = (*next).max(o + 1);
    }
    let group = config.sink.group_id.clone();
    let committed = eventually(
        "the offsets of the batches before the crashed one committed",
        Duration::from_secs(30),
        || {
            let (config, group, topic, expected) = (
                config.clone(),
                group.clone(),
                topic.clone(),
                expected.clone(),
            );
            async move {
                let committed: BTreeMap<i32, i64> = committed_offsets(&config, &group, &topic)
                    .into_iter()
                    .filter(|&(_, o)| o >= 0)
                    .collect();
                (committed == expected).then_some(committed)
            }
        },
    )
    .await;
    let crashed_batch: BTreeSet<(i32, i64)> = written(&first)[CRASH_AT].iter().copied().collect();
    assert!(
        crashed_batch
            .iter()
            .all(|(p, o)| committed.get(p).is_none_or(|&c| *o >= c)),
        "no offset of the crashed batch is committed: {committed:?}"
    );
    sink.abort();
    let _ = sink.await;
    // Nothing moved after the crash.
    let after: BTreeMap<i32, i64> = committed_offsets(&config, &group, &topic)
        .into_iter()
        .filter(|&(_, o)| o >= 0)
        .collect();
    assert_eq!(after, expected);

    // Second sink: replays from the committed offsets, the crashed batch first among it.
    let partitions = produce_status_markers(&config, "west").await;
    let second = Written::default();
    let writer = Recording {
        inner: PostgresWriter::new(&config),
        written: second.clone(),
        crash_at: None,
        crashed: None,
    };
    let shutdown = Shutdown::new();
    let sink = spawn_process("sink", &shutdown, |s| run_sink(&config, writer, s));
    wait_for_markers(&config, &tables, partitions.len()).await;
    sink.stop(Duration::from_secs(30)).await;
    let replayed: BTreeSet<(i32, i64)> = written(&second).into_iter().flatten().collect();
    assert!(
        crashed_batch.is_subset(&replayed),
        "the crashed batch, uncommitted, was written again"
    );
    assert!(
        before
            .iter()
            .flatten()
            .all(|(p, o)| !replayed.contains(&(*p, *o))),
        "batches committed before the crash are not read again"
    );

    let client = db(&config).await.expect("db");
    let history: Vec<(String, i64)> = history_pairs(&client, &tables).await;
    assert_eq!(history, pairs_of(&statuses), "each transition once");
    let current: Vec<(i64, String)> = client
        .query(
            &format!(
                "SELECT seq, status FROM {} WHERE facility_id LIKE 'f%'",
                tables.current()
            ),
            &[],
        )
        .await
        .expect("current")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(current.len(), 200);
    assert!(
        current.iter().all(|c| *c == (5, "ONLINE".to_string())),
        "every facility at its newest seq"
    );
    client
        .batch_execute(&format!(
            "DROP SCHEMA \"{}\" CASCADE",
            config.database.schema
        ))
        .await
        .expect("drop the test's schema");
}
