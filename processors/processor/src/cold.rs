//! Stage 2's on-disk store of quiet facilities (`processor.facility_retention`): one
//! [redb](https://docs.rs/redb) file per stage-2 partition, under
//! `<processor.state_dir>/<group_id>.<instance>/facilities-<partition>.redb`.
//!
//! A facility that has been OFFLINE with no open session and no flap hold pending for longer
//! than the retention moves here from memory ([`crate::facilities::FacilityTask`] decides
//! which and when); an event for it takes it back, with its `seq`. The store is a cache of
//! the facilities changelog, like a Kafka Streams state store: it is cleared when its
//! partition is assigned and rebuilt from the changelog, deleted when the partition is
//! revoked or lost, and never trusted across processes (a file left by a crash is
//! discarded). So its commits need not be durable: most skip the fsync, and one in
//! [`DURABLE_EVERY`] is durable only because redb frees pages at durable commits.
//!
//! Values are `FacilityState` records in the changelog's encoding (single-object Avro).
//! Writes are buffered ([`ColdStore::put`], [`ColdStore::take`] and [`ColdStore::remove`]
//! record them) and written in one transaction by [`ColdStore::flush`] (just before each
//! Kafka commit), or once [`BATCH`] are waiting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use presence_core::codec::{decode, encode};
use redb::{Database, Durability, ReadableDatabase, ReadableTableMetadata, TableDefinition};

use crate::records::FacilityState;

/// Facility id → `FacilityState` (single-object Avro).
const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("facilities");

/// redb's page cache per partition. Its default is 1 GiB; a store of quiet facilities is
/// read once per facility that comes back, so a small cache costs little, and an instance
/// may own a dozen partitions.
const CACHE_BYTES: usize = 4 << 20;

/// Buffered writes beyond this are written at once (a restore of a large changelog).
pub const BATCH: usize = 4096;

/// One commit in this many is durable (fsync): redb reuses freed pages only then, so a
/// file written by non-durable commits alone would only grow.
const DURABLE_EVERY: u64 = 64;

/// The store failed: fatal for the stage (a facility must never be dropped silently).
#[derive(Debug, thiserror::Error)]
#[error("stage 2's facility store {path} cannot {op}: {source}; processor.state_dir must be a writable local directory with free space (mount a volume there, e.g. an emptyDir), or set processor.facility_retention = \"off\" to keep every facility in memory")]
pub struct ColdError {
    path: String,
    op: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl ColdError {
    fn new(
        path: &Path,
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> ColdError {
        ColdError {
            path: path.display().to_string(),
            op,
            source: source.into(),
        }
    }
}

/// The quiet facilities of one stage-2 partition, on disk.
pub struct ColdStore {
    path: PathBuf,
    /// Opened at the first write: a partition whose facilities all stay busy has no file.
    db: Option<Database>,
    /// Writes not yet in the file: `Some` = put, `None` = delete. Read before the file.
    pending: BTreeMap<String, Option<Vec<u8>>>,
    /// Facilities in the file after the last flush.
    on_disk: usize,
    commits: u64,
}

impl ColdStore {
    /// A store at `path`, empty: whatever a file there holds (an earlier process's, a
    /// crash's) is discarded, since the changelog is the truth.
    pub fn create(path: PathBuf) -> Result<ColdStore, ColdError> {
        remove_file(&path)?;
        Ok(ColdStore {
            path,
            db: None,
            pending: BTreeMap::new(),
            on_disk: 0,
            commits: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Facilities in the store as of the last flush.
    pub fn len(&self) -> usize {
        self.on_disk
    }

    pub fn is_empty(&self) -> bool {
        self.on_disk == 0 && self.pending.is_empty()
    }

    /// Stores `state` (written at the next flush).
    pub fn put(&mut self, state: &FacilityState) -> Result<(), ColdError> {
        self.pending
            .insert(state.facility_id.clone(), Some(encode(state)));
        self.flush_if_full()
    }

    /// Deletes `facility` if it is stored (at the next flush).
    pub fn remove(&mut self, facility: &str) -> Result<(), ColdError> {
        if self.db.is_none() && self.pending.is_empty() {
            return Ok(());
        }
        self.pending.insert(facility.to_string(), None);
        self.flush_if_full()
    }

    /// The stored state of `facility`, removed from the store; `None` when it is not here.
    pub fn take(&mut self, facility: &str) -> Result<Option<FacilityState>, ColdError> {
        let bytes = match self.pending.get(facility) {
            Some(Some(bytes)) => Some(bytes.clone()),
            Some(None) => return Ok(None),
            None => match &self.db {
                None => return Ok(None),
                Some(db) => {
                    let read = |e: redb::Error| ColdError::new(&self.path, "be read", e);
                    let txn = db.begin_read().map_err(|e| read(e.into()))?;
                    let table = txn.open_table(TABLE).map_err(|e| read(e.into()))?;
                    let got = table.get(facility).map_err(|e| read(e.into()))?;
                    got.map(|v| v.value().to_vec())
                }
            },
        };
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let state = decode::<FacilityState>(&bytes)
            .map_err(|e| ColdError::new(&self.path, "decode a stored facility", e.to_string()))?;
        self.pending.insert(facility.to_string(), None);
        self.flush_if_full()?;
        Ok(Some(state))
    }

    fn flush_if_full(&mut self) -> Result<(), ColdError> {
        if self.pending.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the buffered puts and deletes in one transaction.
    pub fn flush(&mut self) -> Result<(), ColdError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.db.is_none() {
            if self.pending.values().all(Option::is_none) {
                // Only deletes, and no file: nothing is stored.
                self.pending.clear();
                return Ok(());
            }
            self.db = Some(open(&self.path)?);
        }
        let Some(db) = &self.db else {
            return Ok(());
        };
        let write = |e: redb::Error| ColdError::new(&self.path, "be written", e);
        let mut txn = db.begin_write().map_err(|e| write(e.into()))?;
        self.commits += 1;
        let durability = if self.commits.is_multiple_of(DURABLE_EVERY) {
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability)
            .map_err(|e| write(e.into()))?;
        let len = {
            let mut table = txn.open_table(TABLE).map_err(|e| write(e.into()))?;
            for (facility, value) in &self.pending {
                match value {
                    Some(bytes) => {
                        table
                            .insert(facility.as_str(), bytes.as_slice())
                            .map_err(|e| write(e.into()))?;
                    }
                    None => {
                        table
                            .remove(facility.as_str())
                            .map_err(|e| write(e.into()))?;
                    }
                }
            }
            table.len().map_err(|e| write(e.into()))?
        };
        txn.commit().map_err(|e| write(e.into()))?;
        self.pending.clear();
        self.on_disk = len as usize;
        Ok(())
    }
}

impl Drop for ColdStore {
    /// The partition is gone (revoked, lost, rewound, shut down): so is its cache.
    fn drop(&mut self) {
        self.db = None;
        if let Err(e) = remove_file(&self.path) {
            tracing::warn!(error = %e, "cannot delete a stage-2 facility store; it is discarded at the next assignment of its partition");
        }
    }
}

fn open(path: &Path) -> Result<Database, ColdError> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| ColdError::new(path, "be created", e))?;
    // The table exists from the start, so that reads never meet a missing one.
    let write = |e: redb::Error| ColdError::new(path, "be written", e);
    let mut txn = db.begin_write().map_err(|e| write(e.into()))?;
    txn.set_durability(Durability::None)
        .map_err(|e| write(e.into()))?;
    txn.open_table(TABLE).map_err(|e| write(e.into()))?;
    txn.commit().map_err(|e| write(e.into()))?;
    Ok(db)
}

fn remove_file(path: &Path) -> Result<(), ColdError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ColdError::new(path, "be deleted", e)),
    }
}

/// Prepares `<state_dir>/<name>` for this instance's stores at start: creates it, and deletes
/// the stores an earlier run of this instance left (a crash; they are never trusted). The
/// error names `processor.state_dir` and what to do.
pub fn prepare_dir(state_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = state_dir.join(name);
    let fix = "point processor.state_dir (PRESENCE_PROCESSOR__STATE_DIR) at a writable local directory (in a container, a volume such as an emptyDir), or set processor.facility_retention = \"off\" to keep every facility in memory";
    std::fs::create_dir_all(&dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the stage-2 state directory {} (processor.state_dir = {}): {e}; {fix}",
            dir.display(),
            state_dir.display()
        )
    })?;
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the stage-2 state directory {} (processor.state_dir = {}): {e}; {fix}",
            dir.display(),
            state_dir.display()
        )
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("facilities-") && name.ends_with(".redb") {
            remove_file(&entry.path()).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    // Writable? A store is created only at the first quiet facility, which may be hours
    // away: find out now.
    let probe = dir.join(".presence-probe");
    std::fs::write(&probe, b"").map_err(|e| {
        anyhow::anyhow!(
            "the stage-2 state directory {} is not writable (processor.state_dir = {}): {e}; {fix}",
            dir.display(),
            state_dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str, seq: i64) -> FacilityState {
        FacilityState {
            facility_id: id.into(),
            region_id: "r".into(),
            open_sessions: 0,
            online: false,
            seq,
            since: 10,
            pending_offline_since: None,
            last_event_at: Some(10),
        }
    }

    #[test]
    fn put_flush_take_and_drop_deletes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("facilities-0.redb");
        let mut s = ColdStore::create(path.clone()).unwrap();
        assert_eq!(s.take("a").unwrap(), None);
        s.put(&state("a", 3)).unwrap();
        s.put(&state("b", 5)).unwrap();
        assert_eq!(s.take("a").unwrap(), Some(state("a", 3)), "from the buffer");
        s.flush().unwrap();
        assert!(path.exists());
        assert_eq!(s.len(), 1);
        assert_eq!(s.take("a").unwrap(), None, "taken once");
        assert_eq!(s.take("b").unwrap(), Some(state("b", 5)), "from the file");
        s.flush().unwrap();
        assert_eq!(s.len(), 0);
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn a_file_left_behind_is_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("facilities-1.redb");
        let mut s = ColdStore::create(path.clone()).unwrap();
        s.put(&state("a", 3)).unwrap();
        s.flush().unwrap();
        // A crash: the file stays.
        std::mem::forget(s);
        assert!(path.exists());
        let mut again = ColdStore::create(path.clone()).unwrap();
        assert_eq!(again.take("a").unwrap(), None);
        std::fs::write(&path, b"not a database").unwrap();
        let mut garbage = ColdStore::create(path).unwrap();
        garbage.put(&state("b", 1)).unwrap();
        garbage.flush().unwrap();
        assert_eq!(garbage.len(), 1);
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let e = prepare_dir(&file, "g.i").unwrap_err().to_string();
        assert!(e.contains("processor.state_dir"), "{e}");
        let e = ColdStore::create(file.join("facilities-0.redb"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("processor.state_dir") && e.contains("be deleted"),
            "{e}"
        );
    }

    #[test]
    fn prepare_dir_clears_stores_of_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let inst = prepare_dir(dir.path(), "g.i").unwrap();
        std::fs::write(inst.join("facilities-3.redb"), b"old").unwrap();
        std::fs::write(inst.join("other"), b"kept").unwrap();
        prepare_dir(dir.path(), "g.i").unwrap();
        assert!(!inst.join("facilities-3.redb").exists());
        assert!(inst.join("other").exists());
    }
}
