//! Stage 2's retention (`processor.facility_retention`) against the real broker: facilities
//! that go OFFLINE and stay quiet leave the processor's memory for its on-disk store
//! (`presence_stage2_facilities{place}`), one that comes back continues its `seq` by one,
//! also after a kill -9 and a restore, and the whole `facility-status` output equals the
//! oracle's; a store that cannot be used stops the processor before it commits.

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use presence_core::records::{HeartbeatKind, Status};
use presence_testkit::oracle::oracle;
use presence_testkit::sim::SimRecord;
use support::*;

const TIMEOUT_MS: u64 = 3_005;
/// Facilities that go OFFLINE and stay quiet.
const N: usize = 20;

/// A state directory of this test's own, removed when dropped.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The memory and disk samples of `presence_stage2_facilities`.
async fn places(ops: u16) -> (f64, f64) {
    (
        metric_sum(ops, "presence_stage2_facilities", "place=\"memory\"").await,
        metric_sum(ops, "presence_stage2_facilities", "place=\"disk\"").await,
    )
}

/// Polls the gauge until it shows `(memory, disk)`, at most 60 s.
async fn wait_places(ops: u16, want: (f64, f64), what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        presence_testkit::check_processes();
        let got = places(ops).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: presence_stage2_facilities (memory, disk) = {got:?}, want {want:?} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn beat(ts: i64, session: &str, facility: &str, kind: HeartbeatKind) -> SimRecord {
    SimRecord {
        ts,
        heartbeat: heartbeat(session, facility, kind),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn quiet_facilities_leave_memory_and_a_returning_one_continues_its_seq() {
    let _one = serial();
    let mut c = setup(TIMEOUT_MS).await;
    let _cleanup = Cleanup::new(&c);
    // The beats below are stamped before they are produced (a producer starts first): a
    // lateness of 1.5 s lets each count at its own time, as the oracle counts it.
    c.processor.allowed_lateness = Duration::from_millis(1_500);
    let state = StateDir(std::env::temp_dir().join(presence_testkit::unique("retention")));
    let ops = presence_testkit::free_port();
    let mut reader = StatusReader::new(&c);
    let p = watched_processor(
        &c,
        "a",
        &[
            ("PRESENCE_PROCESSOR__FACILITY_RETENTION", "1s"),
            (
                "PRESENCE_PROCESSOR__STATE_DIR",
                &state.0.display().to_string(),
            ),
            (
                "PRESENCE_PROCESSOR__OPS_LISTEN",
                &format!("127.0.0.1:{ops}"),
            ),
        ],
    );
    let facility = |i: usize| format!("f{i}");
    // N facilities: one session each, opened and ended.
    let t0 = now_ms();
    let mut log: Vec<SimRecord> = (0..N)
        .map(|i| beat(t0, &format!("s{i}"), &facility(i), HeartbeatKind::Beat))
        .chain((0..N).map(|i| beat(t0 + 10, &format!("s{i}"), &facility(i), HeartbeatKind::End)))
        .collect();
    produce(&c, &log).await;
    assert!(
        reader.read_until(Duration::from_secs(60), |s| s.len() >= 2 * N),
        "every facility ONLINE then OFFLINE within 60 s: {} transitions",
        reader.seen.len()
    );
    // A second of event time later they have all left memory for the store.
    wait_places(ops, (0.0, N as f64), "quiet facilities").await;
    let instance_dir = state.0.join(format!("{}.a", c.processor.group_id));
    let files = std::fs::read_dir(&instance_dir)
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    assert!(
        files >= 1,
        "a store file per partition with quiet facilities in {}",
        instance_dir.display()
    );

    // f3 comes back: ONLINE with seq 3 (ONLINE 1, OFFLINE 2 before it left memory).
    let back = facility(3);
    let t1 = now_ms();
    let again = beat(t1, "s-back", &back, HeartbeatKind::Beat);
    produce(&c, std::slice::from_ref(&again)).await;
    log.push(again);
    assert!(
        reader.read_until(Duration::from_secs(60), |s| s.len() > 2 * N),
        "f3's return within 60 s"
    );
    let online = &reader.seen[2 * N];
    assert_eq!(
        (online.facility_id.as_str(), online.status, online.seq),
        (back.as_str(), Status::Online, 3),
        "the returning facility continues its seq by one: {online:?}"
    );
    wait_places(ops, (1.0, (N - 1) as f64), "f3 back in memory").await;
    // Quiet again: OFFLINE with seq 4, then back to disk.
    let end = beat(now_ms(), "s-back", &back, HeartbeatKind::End);
    produce(&c, std::slice::from_ref(&end)).await;
    log.push(end);
    assert!(
        reader.read_until(Duration::from_secs(60), |s| s.len() > 2 * N + 1),
        "f3's OFFLINE within 60 s"
    );
    let offline = &reader.seen[2 * N + 1];
    assert_eq!(
        (offline.facility_id.as_str(), offline.status, offline.seq),
        (back.as_str(), Status::Offline, 4)
    );
    wait_places(ops, (0.0, N as f64), "f3 quiet again").await;

    // kill -9 and a restart: the store is rebuilt from the changelog (the file the killed
    // instance left is discarded), the quiet facilities are on disk again, and one of them
    // that returns continues its seq.
    let mut p = p;
    kill9(&mut p);
    let ops = presence_testkit::free_port();
    let p = watched_processor(
        &c,
        "a",
        &[
            ("PRESENCE_PROCESSOR__FACILITY_RETENTION", "1s"),
            (
                "PRESENCE_PROCESSOR__STATE_DIR",
                &state.0.display().to_string(),
            ),
            (
                "PRESENCE_PROCESSOR__OPS_LISTEN",
                &format!("127.0.0.1:{ops}"),
            ),
        ],
    );
    wait_places(ops, (0.0, N as f64), "restored").await;
    let other = facility(5);
    let again = beat(now_ms(), "s-other", &other, HeartbeatKind::Beat);
    produce(&c, std::slice::from_ref(&again)).await;
    log.push(again);
    assert!(
        reader.read_until(Duration::from_secs(60), |s| s.len() > 2 * N + 2),
        "f5's return within 60 s"
    );
    let online = &reader.seen[2 * N + 2];
    assert_eq!(
        (online.facility_id.as_str(), online.status, online.seq),
        (other.as_str(), Status::Online, 3),
        "restored from the changelog to disk, then back with its seq: {online:?}"
    );
    let end = beat(now_ms(), "s-other", &other, HeartbeatKind::End);
    produce(&c, std::slice::from_ref(&end)).await;
    log.push(end);

    // The whole output is the oracle's; a clean stop deletes the stores (the directory
    // keeps stage 1's shutdown snapshots, if it has any).
    let expected = oracle(&log, TIMEOUT_MS as i64);
    finish(&c, &expected, reader, vec![p], "retention of 1 s");
    let left: Vec<String> = std::fs::read_dir(&instance_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.ends_with(".snapshot"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "the stores are gone after a clean stop: {left:?} left in {}",
        instance_dir.display()
    );
}

/// A state directory that cannot be created stops the processor at start, with an error
/// naming `processor.state_dir`.
#[tokio::test(flavor = "multi_thread")]
async fn an_unusable_state_dir_stops_the_processor_at_start() {
    let _one = serial();
    let c = setup(TIMEOUT_MS).await;
    let _cleanup = Cleanup::new(&c);
    let state = StateDir(std::env::temp_dir().join(presence_testkit::unique("retention")));
    // A file where the directory should be.
    std::fs::write(&state.0, b"").expect("a file in the temporary directory");
    let mut p = watched_processor(
        &c,
        "a",
        &[(
            "PRESENCE_PROCESSOR__STATE_DIR",
            &state.0.join("state").display().to_string(),
        )],
    );
    let status = p.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{status:?}");
    let log = p.log_tail(20);
    assert!(log.contains("processor.state_dir"), "{log}");
    let _ = std::fs::remove_file(&state.0);
}

/// The store fails while the processor runs (its directory deleted under it, as a lost
/// volume would): the stage stops with an error naming `processor.state_dir`, the process
/// exits non-zero, and nothing past the failure was committed: what is on `facility-status`
/// is, facility by facility, the oracle's first transitions.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_store_stops_the_stage_before_it_commits() {
    let _one = serial();
    let mut c = setup(TIMEOUT_MS).await;
    let _cleanup = Cleanup::new(&c);
    c.processor.allowed_lateness = Duration::from_millis(1_500);
    let state = StateDir(std::env::temp_dir().join(presence_testkit::unique("retention")));
    let mut p = watched_processor(
        &c,
        "a",
        &[
            ("PRESENCE_PROCESSOR__FACILITY_RETENTION", "1s"),
            (
                "PRESENCE_PROCESSOR__STATE_DIR",
                &state.0.display().to_string(),
            ),
        ],
    );
    // Started (it made its directory), then the directory goes.
    let instance_dir = state.0.join(format!("{}.a", c.processor.group_id));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !instance_dir.exists() {
        presence_testkit::check_processes();
        assert!(
            Instant::now() < deadline,
            "the processor made no state directory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_dir_all(&state.0).expect("delete the state directory");
    let t0 = now_ms();
    let log: Vec<SimRecord> = (0..N)
        .map(|i| beat(t0, &format!("s{i}"), &format!("f{i}"), HeartbeatKind::Beat))
        .chain((0..N).map(|i| {
            beat(
                t0 + 10,
                &format!("s{i}"),
                &format!("f{i}"),
                HeartbeatKind::End,
            )
        }))
        .collect();
    produce(&c, &log).await;
    // Quiet for a second of event time, the facilities are due to move to disk: that fails.
    let status = p.wait_exit(Duration::from_secs(90));
    assert!(!status.success(), "{status:?}");
    let tail = p.log_tail(30);
    assert!(
        tail.contains("processor.state_dir") && tail.contains("facility store"),
        "{tail}"
    );
    eprintln!(
        "the processor's last words: {}",
        tail.lines()
            .rfind(|l| l.contains("facility store"))
            .unwrap_or_default()
    );
    let expected = oracle(&log, TIMEOUT_MS as i64);
    let got = as_expected(&statuses_to_end(&c));
    for f in (0..N).map(|i| format!("f{i}")) {
        let mine: Vec<_> = got.iter().filter(|e| e.facility_id == f).collect();
        let want: Vec<_> = expected.iter().filter(|e| e.facility_id == f).collect();
        assert!(
            mine.len() <= want.len() && mine[..] == want[..mine.len()],
            "{f}: committed {mine:?}, oracle {want:?}"
        );
    }
}
