//! Stage 1 on one core, decoding included, and its memory per open session.
//!
//!     cargo bench -p presence-processor --bench stage1
//!
//! Prints medians over several runs, and ratios against baselines measured in the same run
//! (decoding alone with our reader, and apache-avro's generic `Value` decoder on the same
//! bytes), because absolute numbers on a shared two-core machine drift.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use presence_core::codec::{codec, encode};
use presence_core::records::{Heartbeat, HeartbeatKind, HeartbeatRef};
use presence_processor::records::{SessionEvent, SessionMark, SessionState};
use presence_processor::sessions::{Beat, SessionKey, SessionOutput, SessionTask};

/// Counts live heap bytes, so memory per session is measured, not estimated.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Counts outputs without keeping them, like a producer would take them away.
#[derive(Default)]
struct Sink {
    events: u64,
    marks: u64,
}

impl SessionOutput for Sink {
    fn event(&mut self, _e: SessionEvent) {
        self.events += 1;
    }
    fn put_session(&mut self, _k: SessionKey, _s: SessionState) {}
    fn delete_session(&mut self, _k: SessionKey) {}
    fn put_mark(&mut self, _k: SessionKey, _m: SessionMark) {
        self.marks += 1;
    }
}

const TIMEOUT: i64 = 90_000;
const SESSIONS: usize = 100_000;
const FACILITIES: usize = 2_000;
const BEATS: usize = 2_000_000;
const RUNS: usize = 7;
/// Event time of the first record.
const START: i64 = 1_764_300_000_000;

fn heartbeat(s: usize, kind: HeartbeatKind) -> Heartbeat {
    Heartbeat {
        session_id: format!("6f1c2a0e-5b7d-4c8e-9a3f-{s:012}"),
        user_id: format!("user-{s:08}"),
        facility_id: format!("facility-{:05}", s % FACILITIES),
        region_id: format!("region-{}", s % 16),
        kind,
        client_sent_at: Some(1_764_300_000_000),
        client_version: None,
    }
}

/// 2M records over 100k sessions, each beating every 30 s of event time; 1 in 200 is a
/// logout followed by a new login, so opens and closes run through too. With `churn`, 1% of
/// the sessions are replaced each round by new ones without an END (closed tabs): the old
/// ones wait for their timeout, quiet, about 3% of the open sessions at any time.
fn workload(churn: bool) -> Vec<(i64, Vec<u8>)> {
    let mut out = Vec::with_capacity(BEATS);
    let step = 30_000 / SESSIONS as i64;
    let mut t = START;
    for i in 0..BEATS {
        let (s, round) = (i % SESSIONS, i / SESSIONS);
        let s = if churn && s % 100 == 0 {
            s + round * SESSIONS
        } else {
            s
        };
        let kind = if i % 200 == 199 {
            HeartbeatKind::End
        } else {
            HeartbeatKind::Beat
        };
        // The churning log beats every 30 s of event time exactly (0.3 ms a record); the
        // plain one as it always did (1 ms a record).
        let ts = if churn {
            START + (i as i64 * 30_000) / SESSIONS as i64
        } else {
            t
        };
        out.push((ts, encode(&heartbeat(s, kind))));
        t += step.max(1);
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Records a commit takes in the live processor at ~100 k records/s and ~33 commits/s.
const RECORDS_PER_COMMIT: usize = 3_000;

/// Records per second through stage 1, and the quiet sessions' marks it wrote. `commits`:
/// each [`RECORDS_PER_COMMIT`] records, the walk a commit makes for marks.
fn stage1_rate(work: &[(i64, Vec<u8>)], commits: bool) -> (f64, u64) {
    let mut task = SessionTask::new(0, TIMEOUT, 60_000);
    let mut sink = Sink::default();
    let wall = i64::MAX / 2;
    let started = Instant::now();
    for (offset, (ts, bytes)) in work.iter().enumerate() {
        let Ok(Some(h)) = HeartbeatRef::decode(bytes) else {
            panic!("bench data must decode")
        };
        let _ = task.on_heartbeat(offset as i64, *ts, &Beat::of(&h), wall, &mut sink);
        if commits && offset % RECORDS_PER_COMMIT == 0 {
            task.mark_quiet(&mut sink);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(sink.events > 0 && task.open_sessions() > 0);
    (work.len() as f64 / secs, sink.marks)
}

/// Seconds a restore takes to apply the marks of 1% of `n` sessions restored from their
/// changelog records (in the order of their opens), each mark's last-seen later than 99% of
/// the opens: as in a long-lived population, where a quiet session last beat recently.
fn apply_marks_seconds(n: usize) -> f64 {
    use presence_core::records::SessionStateRef;
    use presence_processor::sessions::session_key;
    let mut task = SessionTask::new(0, TIMEOUT, 60_000);
    let key = |s: usize| session_key("user", &format!("session-{s}"));
    for s in 0..n {
        let state = SessionStateRef {
            session_id: "",
            user_id: "user",
            facility_id: "facility",
            region_id: "region",
            last_seen: START + s as i64,
            open_offset: s as i64,
        };
        task.restore_session(key(s), state);
    }
    for s in (0..n).step_by(100) {
        let last_seen = START + (n * 99 / 100 + s % 1000) as i64;
        let mark = SessionMark {
            last_seen,
            offset: n as i64,
        };
        task.restore_mark(key(s), Some(mark));
    }
    task.set_clock(START + n as i64, 1);
    let started = Instant::now();
    task.apply_marks();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(task.open_sessions(), n);
    secs
}

fn decode_rate(work: &[(i64, Vec<u8>)]) -> f64 {
    let started = Instant::now();
    let mut n = 0usize;
    for (_, bytes) in work {
        if let Ok(Some(h)) = HeartbeatRef::decode(bytes) {
            n += h.session_id.len();
        }
    }
    assert!(n > 0);
    work.len() as f64 / started.elapsed().as_secs_f64()
}

fn generic_decode_rate(work: &[(i64, Vec<u8>)]) -> f64 {
    let schema = codec::<Heartbeat>().schema();
    let sample = &work[..work.len() / 10];
    let started = Instant::now();
    for (_, bytes) in sample {
        let mut body = &bytes[10..];
        let v = apache_avro::from_avro_datum(schema, &mut body, None).expect("decodes");
        std::hint::black_box(v);
    }
    sample.len() as f64 / started.elapsed().as_secs_f64()
}

fn memory_per_session(n: usize) -> (f64, f64) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut task = SessionTask::new(0, TIMEOUT, 60_000);
    let mut sink = Sink::default();
    let mut id = String::new();
    for s in 0..n {
        use std::fmt::Write;
        id.clear();
        let _ = write!(id, "6f1c2a0e-5b7d-4c8e-9a3f-{s:012}");
        let f = format!("facility-{:05}", s % FACILITIES);
        let u = format!("user-{s:08}");
        let b = Beat {
            session_id: &id,
            user_id: &u,
            facility_id: &f,
            region_id: "region-1",
            kind: HeartbeatKind::Beat,
        };
        let _ = task.on_heartbeat(s as i64, 1_764_300_000_000, &b, i64::MAX / 2, &mut sink);
    }
    assert_eq!(task.open_sessions(), n);
    let live = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    let estimate = task.heap_bytes() as f64 / n as f64;
    drop(task);
    (live, estimate)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let work = workload(false);
    let churning = workload(true);
    let (mut full, mut dec, mut generic) = (Vec::new(), Vec::new(), Vec::new());
    let (mut plain, mut walked, mut marks) = (Vec::new(), Vec::new(), 0);
    for _ in 0..RUNS {
        full.push(stage1_rate(&work, false).0);
        dec.push(decode_rate(&work));
        generic.push(generic_decode_rate(&work));
        plain.push(stage1_rate(&churning, false).0);
        let (rate, m) = stage1_rate(&churning, true);
        walked.push(rate);
        marks = m;
    }
    let (full, dec, generic) = (median(full), median(dec), median(generic));
    let (plain, walked) = (median(plain), median(walked));
    println!(
        "stage 1, decode + state machine, one core: {:>12.0} heartbeats/s (median of {RUNS})",
        full
    );
    println!(
        "churning sessions (1% replaced a round, ~3% quiet), with a commit's walk for marks every {RECORDS_PER_COMMIT} records: {walked:>12.0} heartbeats/s against {plain:.0} without the walks ({:.3}x; {marks} marks written)",
        walked / plain
    );
    println!("baseline: our decoder alone:                {:>12.0} heartbeats/s  (stage 1 = {:.2}x of it)", dec, full / dec);
    println!("baseline: apache-avro generic Value decode: {:>12.0} heartbeats/s  (our decoder = {:.1}x of it)", generic, dec / generic);
    let applies: Vec<f64> = (0..RUNS).map(|_| apply_marks_seconds(1_000_000)).collect();
    println!(
        "restore, the marks of 1% of 1 M sessions applied: {:.1} ms (median of {RUNS})",
        median(applies) * 1000.0
    );
    for n in [100_000, 1_000_000, 10_000_000] {
        let (live, estimate) = memory_per_session(n);
        println!("memory with {n:>9} open sessions: {live:.1} bytes/session measured by the allocator ({estimate:.1} by heap_bytes())");
    }
}
