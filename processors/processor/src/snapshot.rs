//! Stage 1's shutdown snapshots: a warm restart of the same instance without reading the
//! changelog.
//!
//! A stage-1 restore reads the partition's whole changelog (one record a session) and
//! every heartbeat of the last session timeout again (three a session at the browsers'
//! 30 s beat and the 90 s timeout): 40 M records for 10 M open sessions, about half a
//! minute on two cores. When the instance stops cleanly (SIGTERM: a rolling upgrade, a
//! restart by its supervisor), its last transaction has just committed, so its sessions in
//! memory are exactly what that restore would rebuild. It writes them to
//! `<processor.state_dir>/<group_id>.<instance>/sessions-<partition>.snapshot`, beside the
//! offset and checkpoint they belong to, and the next assignment of the partition to this
//! instance loads the file instead (32 bytes a session, read at disk speed), as Kafka
//! Streams reuses a state store after a clean shutdown.
//!
//! The file is only a cache: a snapshot is used only if the partition's committed offset
//! and checkpoint (stream time and next sequence number) are still the ones it was written
//! at, and no changelog record was committed past the changelog's end at the stop. Any
//! transaction that changed the partition's sessions since moved one of the first (a beat
//! moves the offset; an expiry, which is the only change without a record, takes a
//! sequence number), whoever made it; the second catches a changelog written from outside
//! the processor (an upgrade's rewrite). A snapshot that passes stands for the committed
//! state exactly. Each file is read once and deleted; a damaged one (its xxh3 checksum
//! over everything before it) or a stale one is logged, counted in
//! `presence_snapshot_restores_total{outcome}` and ignored, and the partition restores from
//! its changelog as always.
//!
//! Layout: `PRSNAP01`, the header's length (u32) and the header (JSON, [`Header`]), the
//! sessions ([`SessionTask::write_sessions`]), then the xxh3-64 of all that (u64),
//! little-endian.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::sessions::{SessionTask, SnapshotError};

/// 02: each session also holds when its mark was written (a file of 01 is not read: the
/// partition restores from its changelog).
const MAGIC: &[u8; 8] = b"PRSNAP02";
/// A header longer than this is damage (a real one is ~200 bytes).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Buffer of the file's reads and writes.
const IO_BUFFER: usize = 1 << 20;

/// A committed point of a partition: the topics, the committed offset (the next heartbeat
/// to read) and the checkpoint stored with it. A snapshot stands for the state at one.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// The heartbeats and changelog topics it was written for: a snapshot of other topics
    /// (the same group and instance pointed at other ones) is never used.
    pub heartbeats: String,
    pub changelog: String,
    pub partition: i32,
    pub offset: i64,
    pub stream_time: i64,
    pub next_seq: i64,
}

/// What a snapshot holds besides its sessions.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The committed point its sessions are the state at.
    #[serde(flatten)]
    pub point: Point,
    /// The changelog partition's end (high watermark) after the last commit: every
    /// changelog record at or past it was written after the snapshot. A snapshot is used
    /// only if none was committed there since (a changelog rewritten by hand, an upgrade).
    pub changelog_end: i64,
    /// Open sessions written: a file that holds another number is damaged.
    pub sessions: u64,
}

/// What became of a snapshot found at restore (the label of
/// `presence_snapshot_restores_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Loaded: the partition did not read its changelog.
    Used,
    /// Written at another committed point than today's: the partition moved on since.
    Stale,
    /// Unreadable (checksum, layout, I/O): ignored.
    Damaged,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Used => "used",
            Outcome::Stale => "stale",
            Outcome::Damaged => "damaged",
        }
    }
}

/// The snapshot file of `partition` in `dir`.
pub fn path(dir: &Path, partition: i32) -> PathBuf {
    dir.join(format!("sessions-{partition}.snapshot"))
}

/// Removes the snapshots in `dir` (`sessions-*.snapshot`), and with `leftovers_only` only
/// the temporary files of writes a crash cut short. A clean stop clears the snapshots of the
/// stop before, which no partition used since (it went to another instance, or moved on):
/// only one stop's snapshots are ever kept.
pub fn clear(dir: &Path, leftovers_only: bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with("sessions-")
            && (name.ends_with(".snapshot.tmp")
                || (!leftovers_only && name.ends_with(".snapshot")));
        if ours {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove an old shutdown snapshot");
            }
        }
    }
}

/// Writes `task` as the snapshot of `header` (atomically: a temporary file renamed over the
/// old one). Not synced: a file a crash cut short fails its checksum and is ignored.
pub fn write(dir: &Path, header: &Header, task: &SessionTask) -> anyhow::Result<()> {
    let target = path(dir, header.point.partition);
    let temporary = target.with_extension("snapshot.tmp");
    let file = std::fs::File::create(&temporary)
        .map_err(|e| anyhow::anyhow!("cannot create the snapshot {}: {e}", temporary.display()))?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(IO_BUFFER, file),
        hash: Xxh3::new(),
    };
    let written = (|| -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        let json = serde_json::to_vec(header)?;
        w.write_all(&(json.len() as u32).to_le_bytes())?;
        w.write_all(&json)?;
        task.write_sessions(&mut w)?;
        let sum = w.hash.digest();
        w.inner.write_all(&sum.to_le_bytes())?;
        w.inner.flush()
    })();
    if let Err(e) = written.and_then(|()| std::fs::rename(&temporary, &target)) {
        let _ = std::fs::remove_file(&temporary);
        anyhow::bail!(
            "cannot write the snapshot {}: {e}; processor.state_dir must be a writable local directory with free space",
            target.display()
        );
    }
    Ok(())
}

/// Takes the snapshot of `committed.partition` from `dir` (the file is deleted, whatever it
/// held): `None` when there is none; the task and its header when it was written at
/// `committed`; otherwise why not.
pub fn take(
    dir: &Path,
    committed: &Point,
    timeout_ms: i64,
    max_future_ms: i64,
) -> Option<Result<(SessionTask, Header), (Outcome, String)>> {
    let file = path(dir, committed.partition);
    let opened = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err((Outcome::Damaged, format!("cannot open it: {e}")))),
    };
    let read = read(opened, committed, timeout_ms, max_future_ms);
    if let Err(e) = std::fs::remove_file(&file) {
        tracing::warn!(file = %file.display(), error = %e, "cannot delete a snapshot once read; it is ignored at the next restore unless the partition is still at its point");
    }
    Some(read)
}

fn read(
    file: std::fs::File,
    committed: &Point,
    timeout_ms: i64,
    max_future_ms: i64,
) -> Result<(SessionTask, Header), (Outcome, String)> {
    let damaged = |e: SnapshotError| (Outcome::Damaged, e.to_string());
    let mut r = Hashing {
        inner: BufReader::with_capacity(IO_BUFFER, file),
        hash: Xxh3::new(),
    };
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| damaged(e.into()))?;
    if &magic != MAGIC {
        return Err((Outcome::Damaged, "not a presence sessions snapshot".into()));
    }
    let mut word = [0u8; 4];
    r.read_exact(&mut word).map_err(|e| damaged(e.into()))?;
    let len = u32::from_le_bytes(word) as usize;
    if len > MAX_HEADER_BYTES {
        return Err((Outcome::Damaged, format!("a header of {len} bytes")));
    }
    let mut json = vec![0u8; len];
    r.read_exact(&mut json).map_err(|e| damaged(e.into()))?;
    let header: Header = serde_json::from_slice(&json)
        .map_err(|e| (Outcome::Damaged, format!("its header does not parse: {e}")))?;
    let written = &header.point;
    if written != committed {
        return Err((
            Outcome::Stale,
            format!(
                "written at offset {} (stream time {}, next seq {}) of {}/{}, committed now: offset {} (stream time {}, next seq {}) of {}/{}",
                written.offset,
                written.stream_time,
                written.next_seq,
                written.heartbeats,
                written.partition,
                committed.offset,
                committed.stream_time,
                committed.next_seq,
                committed.heartbeats,
                committed.partition,
            ),
        ));
    }
    let task = SessionTask::read_sessions(
        written.partition,
        timeout_ms,
        max_future_ms,
        (written.stream_time, written.next_seq),
        &mut r,
    )
    .map_err(damaged)?;
    let sum = r.hash.digest();
    let mut stored = [0u8; 8];
    r.inner
        .read_exact(&mut stored)
        .map_err(|e| damaged(e.into()))?;
    if u64::from_le_bytes(stored) != sum {
        return Err((Outcome::Damaged, "its checksum does not match".into()));
    }
    let mut rest = [0u8; 1];
    if r.inner.read(&mut rest).map_err(|e| damaged(e.into()))? != 0 {
        return Err((Outcome::Damaged, "bytes after its checksum".into()));
    }
    if task.open_sessions() as u64 != header.sessions {
        return Err((
            Outcome::Damaged,
            format!(
                "{} sessions in it, {} in its header",
                task.open_sessions(),
                header.sessions
            ),
        ));
    }
    Ok((task, header))
}

/// Hashes what goes through it.
struct Hashing<T> {
    inner: T,
    hash: Xxh3,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::{Beat, Collected};
    use presence_core::records::HeartbeatKind;

    const TIMEOUT: i64 = 90_000;

    fn task(sessions: usize) -> SessionTask {
        let mut t = SessionTask::new(3, TIMEOUT, 60_000);
        let mut out = Collected::default();
        for i in 0..sessions {
            let (s, f) = (format!("s{i}"), format!("f{}", i % 7));
            let b = Beat {
                session_id: &s,
                user_id: "u",
                facility_id: &f,
                region_id: "r",
                kind: HeartbeatKind::Beat,
            };
            t.on_heartbeat(i as i64, 1_000 + i as i64, &b, i64::MAX / 2, &mut out)
                .unwrap();
        }
        t
    }

    fn header_of(t: &SessionTask, offset: i64) -> Header {
        Header {
            point: Point {
                heartbeats: "heartbeats".into(),
                changelog: "sessions-changelog".into(),
                partition: t.partition(),
                offset,
                stream_time: t.stream_time(),
                next_seq: t.next_seq(),
            },
            changelog_end: 42,
            sessions: t.open_sessions() as u64,
        }
    }

    #[test]
    fn a_snapshot_at_the_committed_point_is_used_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = task(100);
        let header = header_of(&t, 100);
        write(dir.path(), &header, &t).unwrap();
        let (read, written) = take(dir.path(), &header.point, TIMEOUT, 60_000)
            .expect("a snapshot is there")
            .unwrap_or_else(|(o, why)| panic!("{o:?}: {why}"));
        assert_eq!(written, header);
        assert_eq!(read.open_sessions(), 100);
        assert_eq!(read.next_expiry(), t.next_expiry());
        assert_eq!(
            (read.stream_time(), read.next_seq()),
            (t.stream_time(), t.next_seq())
        );
        assert!(
            take(dir.path(), &header.point, TIMEOUT, 60_000).is_none(),
            "read once, then deleted"
        );
    }

    #[test]
    fn a_snapshot_of_another_point_is_stale_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let t = task(10);
        write(dir.path(), &header_of(&t, 10), &t).unwrap();
        let moved_on = header_of(&t, 11).point;
        match take(dir.path(), &moved_on, TIMEOUT, 60_000) {
            Some(Err((Outcome::Stale, why))) => assert!(why.contains("offset 10"), "{why}"),
            other => panic!("expected stale, got {:?}", other.map(|r| r.map(|_| ()))),
        }
        assert!(!path(dir.path(), 3).exists());
        // Another sequence number at the same offset (an expiry since): stale too.
        write(dir.path(), &header_of(&t, 10), &t).unwrap();
        let mut expired = header_of(&t, 10).point;
        expired.next_seq += 1;
        assert!(matches!(
            take(dir.path(), &expired, TIMEOUT, 60_000),
            Some(Err((Outcome::Stale, _)))
        ));
    }

    #[test]
    fn clearing_removes_the_last_stops_snapshots_and_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let t = task(5);
        write(dir.path(), &header_of(&t, 5), &t).unwrap();
        let leftover = dir.path().join("sessions-4.snapshot.tmp");
        let other = dir.path().join("facilities-0.redb");
        std::fs::write(&leftover, b"cut short").unwrap();
        std::fs::write(&other, b"not ours").unwrap();
        clear(dir.path(), true);
        assert!(!leftover.exists() && path(dir.path(), 3).exists());
        clear(dir.path(), false);
        assert!(!path(dir.path(), 3).exists());
        assert!(other.exists(), "only snapshot files are removed");
    }

    #[test]
    fn a_damaged_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = task(50);
        let header = header_of(&t, 50);
        let file = path(dir.path(), 3);
        for at in [20usize, 200, 900] {
            write(dir.path(), &header, &t).unwrap();
            let mut bytes = std::fs::read(&file).unwrap();
            assert!(at < bytes.len());
            bytes[at] ^= 0x40;
            std::fs::write(&file, &bytes).unwrap();
            match take(dir.path(), &header.point, TIMEOUT, 60_000) {
                Some(Err((Outcome::Damaged, _))) | Some(Err((Outcome::Stale, _))) => {}
                other => panic!(
                    "byte {at} flipped: expected damaged, got {:?}",
                    other.map(|r| r.map(|_| ()))
                ),
            }
        }
        // Cut short, and with bytes after its checksum.
        write(dir.path(), &header, &t).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            take(dir.path(), &header.point, TIMEOUT, 60_000),
            Some(Err((Outcome::Damaged, _)))
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&file, &longer).unwrap();
        assert!(matches!(
            take(dir.path(), &header.point, TIMEOUT, 60_000),
            Some(Err((Outcome::Damaged, _)))
        ));
    }
}
