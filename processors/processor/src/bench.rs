//! Benchmarks that need the broker (`presence bench ...`): restore time, end-to-end
//! throughput against a plain consumer's ceiling, and heartbeat-to-transition latency.
//! Each one creates its own topics, so it never disturbs a running pipeline.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use presence_core::codec::{decode, encode};
use presence_core::config::Config;
use presence_core::kafka::{consumer_config, idempotent_producer_config};
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind, Status};
use presence_core::Shutdown;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::measured::mib;
use presence_core::topics::Throwaway;

use crate::records::{SessionEvent, SessionEventKind, SessionMark, SessionState};
use crate::sessions::{key_bytes, mark_key_bytes, session_key};
use crate::stage::{now_ms, Committed, RestoreIo, Stage};

/// The config with fresh topic and group names, provisioned.
pub async fn isolated(
    base: &Config,
    tag: &str,
    heartbeats_partitions: i32,
) -> anyhow::Result<Config> {
    let mut c = base.isolated(&format!("bench-{tag}-{}", now_ms()));
    c.topics.heartbeats_partitions = heartbeats_partitions;
    c.processor.instance_id = "bench".into();
    let report = presence_core::topics::ensure(&c).await?;
    anyhow::ensure!(report.is_ok(), "bench topics: {report}");
    Ok(c)
}

pub(crate) fn producer(c: &Config) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    let mut pc = idempotent_producer_config(&c.kafka, "bench");
    pc.set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "2000000");
    Ok(pc.create()?)
}

fn send(
    p: &ThreadedProducer<DefaultProducerContext>,
    r: BaseRecord<'_, [u8], [u8]>,
) -> anyhow::Result<()> {
    Ok(presence_core::kafka::send_when_room(p, r, None)?)
}

/// Sends `h` to `topic`, keyed by its session id, stamped `ts`, to `partition` if given
/// (else the key's).
fn send_beat(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    h: &Heartbeat,
    ts: i64,
    partition: Option<i32>,
) -> anyhow::Result<()> {
    let bytes = encode(h);
    let mut record = BaseRecord::to(topic)
        .key(h.session_id.as_bytes())
        .payload(&bytes[..])
        .timestamp(ts);
    if let Some(n) = partition {
        record = record.partition(n);
    }
    send(p, record)
}

fn beat(session: usize, facility: usize, kind: HeartbeatKind) -> Heartbeat {
    Heartbeat {
        session_id: format!("6f1c2a0e-5b7d-4c8e-9a3f-{session:012}"),
        user_id: format!("user-{session:08}"),
        facility_id: format!("facility-{facility:05}"),
        region_id: format!("region-{}", facility % 16),
        kind,
        client_sent_at: None,
        client_version: None,
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Restore of `partitions` partitions holding `sessions` open sessions between them, each
/// session beating three times within the timeout (once, for the `quiet_percent` that went
/// quiet): every partition's changelog (one record per session) plus the re-read of its
/// beats since the checkpoint's timeout window, newest first, and in the same runs the
/// whole window oldest first, as before ([`crate::window`]). With
/// more than one partition, each run restores them all once one after another, once one
/// per core and once [`crate::stage1::restore_concurrency`] at a time (the default),
/// alternating, so that the ratios come from the same runs.
pub async fn restore(
    base: &Config,
    sessions: usize,
    partitions: i32,
    runs: usize,
    quiet_percent: u8,
) -> anyhow::Result<String> {
    Ok(
        restore_measured(base, sessions, partitions, runs, quiet_percent)
            .await?
            .report,
    )
}

/// What [`restore`] measured.
pub struct Restored {
    /// The report it prints.
    pub report: String,
    /// Heartbeats the last run's restores read again: reading the window newest first, and
    /// the whole window oldest first.
    pub window_records: [u64; 2],
}

/// [`restore`], with the records read beside the report (a test checks what the marks of
/// quiet sessions save on a real broker).
pub async fn restore_measured(
    base: &Config,
    sessions: usize,
    partitions: i32,
    runs: usize,
    quiet_percent: u8,
) -> anyhow::Result<Restored> {
    anyhow::ensure!(partitions >= 1, "--partitions must be at least 1");
    // Session s went quiet after its first beat when its index in its partition is below
    // quiet_percent modulo 100 (so that every partition has its share).
    let parts = partitions as usize;
    let quiet = |s: usize| (s / parts) % 100 < quiet_percent as usize;
    let c = isolated(base, "restore", partitions).await?;
    let _topics = Throwaway::of(&c);
    let timeout = c.processor.session_timeout.as_millis() as i64;
    let p = producer(&c)?;
    // Every session beats every third of the timeout (30 s of 90 s, as browsers do), the
    // beats spread evenly over the interval; the checkpoint is just after the third round.
    let interval = timeout / 3;
    let t0 = now_ms() - 3 * interval - 5_000;
    let stamp =
        |round: i64, s: usize| t0 + round * interval + s as i64 * interval / sessions as i64;
    let facilities = (sessions / 100).max(1);
    let changelog = c.topics.sessions_changelog();
    let started = Instant::now();
    // The mark the live processor's last walk before the checkpoint wrote for each quiet
    // session (`window`): first once it was quiet for `quiet_after`, renewed every
    // `mark_every`; its offset is the partition's last record stamped at or before the
    // walk, found below as the beats go out (a partition's beats go out in stamp order).
    let checkpoint_t = t0 + 3 * interval;
    let (quiet_after, every) = (
        crate::window::quiet_after(timeout),
        crate::window::mark_every(timeout),
    );
    let mut pending: Vec<Vec<(i64, usize)>> = vec![Vec::new(); parts];
    for s in (0..sessions).filter(|&s| quiet(s)) {
        let first = stamp(0, s) + quiet_after;
        if first <= checkpoint_t {
            let at = first + (checkpoint_t - first) / every * every;
            pending[s % parts].push((at, s));
        }
    }
    for p in &mut pending {
        p.sort_unstable();
    }
    let mut next_mark = vec![0usize; parts];
    let mut marks: Vec<(usize, SessionMark)> = Vec::new();
    let mark_of = |q: usize, offset: i64| {
        let last_seen = stamp(0, q);
        (q, SessionMark { last_seen, offset })
    };
    // Session s lives on partition s % partitions, where it is the (s / partitions)-th.
    // Three beats per session inside the window; the first opens it (offset = that index).
    let mut ends = vec![0i64; parts];
    for round in 0..3 {
        for s in (0..sessions).filter(|&s| round == 0 || !quiet(s)) {
            let (part, ts) = (s % parts, stamp(round, s));
            while let Some(&(_, q)) = pending[part].get(next_mark[part]).filter(|m| m.0 < ts) {
                marks.push(mark_of(q, ends[part] - 1));
                next_mark[part] += 1;
            }
            ends[s % parts] += 1;
            let h = beat(s, s % facilities, HeartbeatKind::Beat);
            send_beat(&p, &c.topics.heartbeats, &h, ts, Some((s % parts) as i32))?;
        }
    }
    for (part, p) in pending.iter().enumerate() {
        for &(_, q) in &p[next_mark[part]..] {
            marks.push(mark_of(q, ends[part] - 1));
        }
    }
    // Session s's changelog records go to its partition.
    let to_changelog = |s: usize, key: &[u8], value: &[u8]| {
        let record = BaseRecord::to(&changelog).key(key).payload(value);
        send(&p, record.partition((s % parts) as i32))
    };
    for s in 0..sessions {
        let h = beat(s, s % facilities, HeartbeatKind::Beat);
        let state = SessionState {
            session_id: h.session_id.clone(),
            user_id: h.user_id.clone(),
            facility_id: h.facility_id,
            region_id: h.region_id,
            last_seen: stamp(0, s),
            open_offset: (s / parts) as i64,
        };
        let key = key_bytes(&session_key(&h.user_id, &h.session_id));
        to_changelog(s, &key, &encode(&state))?;
    }
    for (s, mark) in &marks {
        let h = beat(*s, s % facilities, HeartbeatKind::Beat);
        let key = mark_key_bytes(&session_key(&h.user_id, &h.session_id));
        to_changelog(*s, &key, &encode(mark))?;
    }
    let marks = marks.len();
    p.flush(Duration::from_secs(120))?;
    let written = started.elapsed();
    let io_config = presence_core::kafka::restore_consumer_config(
        &c.kafka,
        "bench-restore",
        &format!("{}.restore", c.processor.group_id),
    );
    let topics = crate::stage1::Topics::of(&c.topics, c.topics.facility_partitions);
    // One after another first, so that a single partition is measured as before; then one
    // per core; then the default.
    let mut modes: Vec<usize> = vec![1];
    if parts > 1 {
        for threads in [crate::stage1::cores(), crate::stage1::restore_concurrency()] {
            if threads > *modes.last().unwrap_or(&1) {
                modes.push(threads);
            }
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // The baseline in the same runs: the default concurrency reading the whole window
    // oldest first, as restores did before they read it newest first (`window`).
    let mut whole = Vec::new();
    let mut window_records = [0u64; 2];
    let mut state_bytes = 0;
    // This process's resident memory before and after a restore: what the restored state
    // and the restore's own buffers add (the producer above is dropped by then, and what
    // it freed given back).
    drop(p);
    presence_core::allocator::release_free_memory();
    let pid = std::process::id();
    let rss_before = crate::measured::Memory::of(pid).map_or(0, |m| m.rss_kib);
    let (mut rss_after, mut rss_trimmed) = (0, 0);
    let mut last = None;
    for _ in 0..runs {
        let last_mode = modes.len() - 1;
        for (m, &threads) in modes.iter().chain([modes[last_mode]].iter()).enumerate() {
            let baseline = m > last_mode;
            let mut stage = crate::stage1::SessionsStage::new(topics, timeout, 60_000)
                .with_restore_concurrency(threads);
            if baseline {
                stage = stage.reading_whole_windows();
            }
            // Only one restored state at a time in memory (the RSS below is its).
            drop(last.take());
            let load = partition_load(sessions, &ends, t0 + 3 * interval);
            let started = Instant::now();
            let cfg = io_config.clone();
            let stage = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let mut stage = stage;
                stage.restore_partitions(load, &RestoreIo { config: &cfg })?;
                Ok(stage)
            })
            .await??;
            if baseline {
                whole.push(started.elapsed().as_secs_f64());
            } else {
                times[m].push(started.elapsed().as_secs_f64());
            }
            window_records[baseline as usize] = stage.window_records_read();
            let open = stage.open_sessions();
            state_bytes = stage.state_bytes();
            rss_after = crate::measured::Memory::of(pid).map_or(0, |m| m.rss_kib);
            // What the restores' buffers leave behind is given back as the processor's trim
            // thread gives it back (`allocator::trim_when_idle`, within 5 s).
            presence_core::allocator::release_free_memory();
            rss_trimmed = crate::measured::Memory::of(pid).map_or(0, |m| m.rss_kib);
            anyhow::ensure!(
                open == sessions,
                "restored {open} sessions, expected {sessions}"
            );
            last = Some(stage);
        }
    }
    let warm = match last {
        Some(stage) => Some(
            warm_restore(
                stage,
                &partition_load(sessions, &ends, t0 + 3 * interval),
                topics,
                timeout,
                runs,
                &io_config,
            )
            .await?,
        ),
        None => None,
    };
    let mut lines = vec![format!(
        "restore of {sessions} open sessions, {quiet_percent}% of them quiet since their first beat (changelog {sessions} records and {marks} quiet sessions' marks; {} heartbeats in the timeout window, of which the restore read {} newest first, all {} oldest first) on {partitions} partition(s); writing the test data took {:.1} s; \
         session state {:.1} MiB ({:.1} B a session); this process's RSS {:.0} MiB before the restore, {:.0} MiB with the restored state ({:.0} MiB once the allocator gives back what the restore freed)",
        ends.iter().sum::<i64>(),
        window_records[0],
        window_records[1],
        written.as_secs_f64(),
        state_bytes as f64 / 1048576.0,
        state_bytes as f64 / sessions.max(1) as f64,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        rss_trimmed as f64 / 1024.0,
    )];
    for (m, &threads) in modes.iter().enumerate() {
        let t = &times[m];
        lines.push(format!(
            "{threads} partition(s) at a time: median {:.2} s over {runs} runs (min {:.2} s; {:.2} M records/s)",
            median(t.clone()),
            t.iter().copied().fold(f64::INFINITY, f64::min),
            (sessions as u64 + window_records[0]) as f64 / median(t.clone()) / 1e6,
        ));
    }
    for m in 1..modes.len() {
        lines.push(format!(
            "ratio ({} at a time against {}, same runs): {:.2}",
            modes[m],
            if modes[m - 1] == 1 {
                "one after another".to_string()
            } else {
                format!("{} at a time", modes[m - 1])
            },
            median(times[m].clone()) / median(times[m - 1].clone()),
        ));
    }
    let newest_first = median(times[modes.len() - 1].clone());
    lines.push(format!(
        "the whole window oldest first, as before ({} at a time, same runs): median {:.2} s (min {:.2} s); ratio newest first against it {:.2}",
        modes[modes.len() - 1],
        median(whole.clone()),
        whole.iter().copied().fold(f64::INFINITY, f64::min),
        newest_first / median(whole),
    ));
    if let Some(w) = warm {
        let from_changelog = median(times[modes.len() - 1].clone());
        lines.push(format!(
            "warm restart from shutdown snapshots ({} at a time): median {:.2} s over {runs} runs (min {:.2} s), ratio {:.3} against the changelog restore above; writing them at shutdown: median {:.2} s, {:.1} MiB on disk ({:.1} B a session)",
            modes[modes.len() - 1],
            median(w.load.clone()),
            w.load.iter().copied().fold(f64::INFINITY, f64::min),
            median(w.load.clone()) / from_changelog,
            median(w.write.clone()),
            w.bytes as f64 / 1048576.0,
            w.bytes as f64 / sessions.max(1) as f64,
        ));
    }
    Ok(Restored {
        report: lines.join("\n"),
        window_records,
    })
}

/// What each partition of the restore benchmark's data has committed: the offset after
/// its beats (`ends`), and the clock of the last of them.
fn partition_load(
    sessions: usize,
    ends: &[i64],
    stream_time: i64,
) -> Vec<(i32, Option<Committed<crate::stage1::Checkpoint>>)> {
    let parts = ends.len();
    (0..parts as i32)
        .map(|q| {
            let here = (sessions + parts - 1 - q as usize) / parts;
            let committed = Committed {
                offset: ends[q as usize],
                checkpoint: Some(crate::stage1::Checkpoint {
                    t: stream_time,
                    s: here as i64 + 1,
                }),
            };
            (q, Some(committed))
        })
        .collect()
}

/// Times of the warm restart: writing the shutdown snapshots, then loading them.
struct Warm {
    write: Vec<f64>,
    load: Vec<f64>,
    bytes: u64,
}

/// The warm restart of `restored` (as restored from the changelog): each run writes its
/// shutdown snapshots (as a clean stop does), then a new stage restores every partition from
/// them, at the default concurrency. Fails unless every snapshot was used.
async fn warm_restore(
    restored: crate::stage1::SessionsStage,
    load: &[(i32, Option<Committed<crate::stage1::Checkpoint>>)],
    topics: crate::stage1::Topics,
    timeout: i64,
    runs: usize,
    io_config: &rdkafka::config::ClientConfig,
) -> anyhow::Result<Warm> {
    let dir = std::env::temp_dir().join(format!(
        "presence-bench-snapshots-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir)?;
    let _gone = RemoveDir(dir.clone());
    let positions: HashMap<i32, i64> = load
        .iter()
        .filter_map(|(p, c)| Some((*p, c.as_ref()?.offset)))
        .collect();
    let mut warm = Warm {
        write: Vec::new(),
        load: Vec::new(),
        bytes: 0,
    };
    let mut stage = restored.with_snapshots(dir.clone());
    // Where each changelog ends, as the runner asks its stage consumer at a clean stop.
    let watermarks: rdkafka::consumer::BaseConsumer = io_config.create()?;
    for _ in 0..runs {
        let started = Instant::now();
        let end_of = presence_core::kafka::end_offsets(&watermarks, Duration::from_secs(10));
        stage.on_clean_stop(&positions, &end_of);
        warm.write.push(started.elapsed().as_secs_f64());
        warm.bytes = std::fs::read_dir(&dir)?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        let sessions = stage.open_sessions();
        drop(stage);
        let fresh =
            crate::stage1::SessionsStage::new(topics, timeout, 60_000).with_snapshots(dir.clone());
        let (load, cfg) = (load.to_vec(), io_config.clone());
        let started = Instant::now();
        let fresh = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut fresh = fresh;
            fresh.restore_partitions(load, &RestoreIo { config: &cfg })?;
            Ok(fresh)
        })
        .await??;
        warm.load.push(started.elapsed().as_secs_f64());
        let [used, stale, damaged] = fresh.snapshot_outcomes();
        anyhow::ensure!(
            used == positions.len() as u64 && stale + damaged == 0 && fresh.open_sessions() == sessions,
            "warm restart: {used} snapshots used, {stale} stale, {damaged} damaged of {}; {} sessions restored of {sessions}",
            positions.len(),
            fresh.open_sessions()
        );
        stage = fresh;
    }
    Ok(warm)
}

/// Removes a directory when dropped.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `presence bench throughput` runs.
pub struct ThroughputOptions {
    pub heartbeats: usize,
    /// Open sessions the heartbeats are spread over (default: heartbeats / 20).
    pub sessions: Option<usize>,
    /// Processor runs per binary; medians are reported.
    pub runs: usize,
    /// Another build of `presence` to run on the same input in the same benchmark, run for
    /// run alternating with this one (e.g. the build before a change).
    pub against: Option<std::path::PathBuf>,
    /// How long the processor stays up after it drained the backlog, before its idle
    /// memory is read.
    pub idle: Duration,
    /// Processor instances that share the work (one consumer group, static members
    /// `bench`, `bench-2`, ...); memory figures are their sum.
    pub instances: usize,
}

/// One processor run of the throughput benchmark.
struct DrainRun {
    rate: f64,
    /// VmHWM when the backlog was drained: the peak over the whole run.
    peak_kib: u64,
    /// VmRSS after `idle` with every session still open.
    idle_kib: u64,
    state_bytes: f64,
    open_sessions: f64,
}

/// Heartbeats per second through the whole processor (both stages, transactions), run as a
/// child process, against the rate at which a plain read_committed consumer reads the same
/// topic (the ceiling); with the processor's peak and idle resident memory.
///
/// Every session beats every 30 s of event time, as browsers do, and the last round ends
/// just before the benchmark starts; the processor gets a one-hour session timeout, so that
/// once it has drained the backlog every session is still open and the idle memory is that
/// of `sessions` open sessions.
pub async fn throughput(base: &Config, o: &ThroughputOptions) -> anyhow::Result<String> {
    let c = isolated(base, "throughput", base.topics.heartbeats_partitions).await?;
    let mut topics = Throwaway::of(&c);
    let p = producer(&c)?;
    let heartbeats = o.heartbeats;
    let sessions = o
        .sessions
        .unwrap_or(heartbeats / 20)
        .clamp(1, heartbeats.max(1));
    let facilities = (sessions / 50).max(1);
    let t_end = now_ms() - 5_000;
    let produced = Instant::now();
    for i in 0..heartbeats {
        let s = i % sessions;
        let h = beat(s, s % facilities, HeartbeatKind::Beat);
        let ts = t_end - ((heartbeats - i) as i64 * 30_000 / sessions as i64);
        send_beat(&p, &c.topics.heartbeats, &h, ts, None)?;
    }
    p.flush(Duration::from_secs(300))?;
    drop(p);
    let produced = produced.elapsed();
    let ends = end_offsets(&c, &c.topics.heartbeats)?;
    let total: i64 = ends.values().sum();

    // The ceiling: a plain consumer with the processor's fetch settings reading everything,
    // touching each payload.
    let mut ceilings = Vec::new();
    for run in 0..3 {
        let mut cc = consumer_config(
            &c.kafka,
            "bench-ceiling",
            &format!("{}-ceiling-{run}", c.processor.group_id),
        );
        cc.set("fetch.wait.max.ms", "10");
        presence_core::kafka_memory::stage_consumer(&mut cc, &c.kafka);
        let consumer: BaseConsumer = cc.create()?;
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition_offset(&c.topics.heartbeats, *p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let started = Instant::now();
        let (mut n, mut bytes) = (0i64, 0usize);
        while n < total {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                bytes += m.payload().map_or(0, <[u8]>::len);
                n += 1;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "ceiling consumer stalled"
            );
        }
        std::hint::black_box(bytes);
        ceilings.push(total as f64 / started.elapsed().as_secs_f64());
    }
    let ceiling = median(ceilings);

    let this = crate::measured::this_binary()?;
    let mut binaries = vec![("this build", this)];
    if let Some(other) = &o.against {
        binaries.push(("--against", other.clone()));
    }
    let mut report = format!(
        "{total} heartbeats of {sessions} sessions ({facilities} facilities) on {} partitions, written in {:.1} s; {} processor instance(s); \
         plain read_committed consumer with the processor's fetch settings (ceiling, median of 3): {ceiling:.0}/s\n",
        ends.len(),
        produced.as_secs_f64(),
        o.instances.max(1),
    );
    let mut results: Vec<Vec<DrainRun>> = binaries.iter().map(|_| Vec::new()).collect();
    for run in 0..o.runs.max(1) {
        for (b, (label, binary)) in binaries.iter().enumerate() {
            // Everything but the input is the run's own: groups, internal and output topics.
            let mut rc = c.clone();
            let tag = format!("r{run}b{b}");
            rc.processor.group_id = format!("{}-{tag}", c.processor.group_id);
            rc.topics.internal_prefix = format!("{}{tag}.", c.topics.internal_prefix);
            rc.topics.facility_status = format!("{}-{tag}", c.topics.facility_status);
            rc.topics.dead_letters = format!("{}-{tag}", c.topics.dead_letters);
            rc.processor.session_timeout = Duration::from_secs(3600);
            let report_ = presence_core::topics::ensure(&rc).await?;
            anyhow::ensure!(report_.is_ok(), "bench topics: {report_}");
            topics.add(&rc);
            let (binary, rc2, idle, n) = (binary.clone(), rc.clone(), o.idle, o.instances.max(1));
            let r =
                tokio::task::spawn_blocking(move || drain(&binary, &rc2, total, idle, n)).await??;
            report.push_str(&format!(
                "run {} {label}: {:.0} heartbeats/s ({:.0}% of the ceiling); peak RSS {:.0} MiB; idle {:.0} MiB with {:.0} open sessions holding {:.1} MiB of state ({:.1} B each)\n",
                run + 1,
                r.rate,
                100.0 * r.rate / ceiling,
                mib(r.peak_kib),
                mib(r.idle_kib),
                r.open_sessions,
                r.state_bytes / 1048576.0,
                r.state_bytes / r.open_sessions.max(1.0),
            ));
            results[b].push(r);
        }
    }
    let summary = |runs: &[DrainRun]| {
        (
            median(runs.iter().map(|r| r.rate).collect()),
            median(runs.iter().map(|r| r.peak_kib as f64).collect()),
            median(runs.iter().map(|r| r.idle_kib as f64).collect()),
            median(runs.iter().map(|r| r.state_bytes).collect()),
        )
    };
    for (b, (label, binary)) in binaries.iter().enumerate() {
        let (rate, peak, idle, state) = summary(&results[b]);
        report.push_str(&format!(
            "median of {} runs, {label} ({}): processor sustained {rate:.0} heartbeats/s (from 10% to 100% committed), {:.0}% of the ceiling; \
             peak RSS {:.0} MiB; idle RSS {:.0} MiB = {:.2}x its session state ({:.1} MiB)\n",
            results[b].len(),
            binary.display(),
            100.0 * rate / ceiling,
            peak / 1024.0,
            idle / 1024.0,
            idle * 1024.0 / state.max(1.0),
            state / 1048576.0
        ));
    }
    if results.len() == 2 {
        let (a, _, _, _) = summary(&results[0]);
        let (b, _, _, _) = summary(&results[1]);
        report.push_str(&format!(
            "throughput of this build / --against: {:.2}\n",
            a / b
        ));
    }
    Ok(report)
}

/// Runs `instances` × `binary processor` on `c` until stage 1 has committed `total`
/// heartbeats, then `idle` longer; the rate from 10% to 100% committed and the memory of all
/// instances together.
fn drain(
    binary: &std::path::Path,
    c: &Config,
    total: i64,
    idle: Duration,
    instances: usize,
) -> anyhow::Result<DrainRun> {
    let ends = end_offsets(c, &c.topics.heartbeats)?;
    // Started together, so that the group forms once rather than rebalancing per instance.
    let started: Vec<anyhow::Result<crate::measured::Processor>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..instances)
            .map(|i| {
                let mut ic = c.clone();
                if i > 0 {
                    ic.processor.instance_id = format!("{}-{}", c.processor.instance_id, i + 1);
                }
                s.spawn(move || {
                    crate::measured::Processor::start(binary, &ic, Duration::from_secs(120))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("starting a processor panicked")))
            })
            .collect()
    });
    let processors = started.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let group = format!("{}.sessions", c.processor.group_id);
    let watcher: BaseConsumer = consumer_config(&c.kafka, "bench-watch", &group).create()?;
    let mut first: Option<(Instant, i64)> = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    let finished = loop {
        let done = match committed_total(&watcher, &c.topics.heartbeats, &ends) {
            Ok(done) => done,
            // The group's coordinator moving or loading (NotCoordinator, CoordinatorLoad...
            // on the three-node cluster, `make scale`): ask again.
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "committed offsets not readable yet; asking again");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Err(e) => return Err(e),
        };
        if first.is_none() && done >= total / 10 {
            first = Some((Instant::now(), done));
        }
        if done >= total {
            break Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "processor did not finish in 900 s ({done}/{total})"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (t_first, n_first) = first.context("no commit observed")?;
    let rate = (total - n_first) as f64 / finished.duration_since(t_first).as_secs_f64();
    let peak_kib = processors
        .iter()
        .map(|p| {
            let (at_end, sampled_peak) = p.memory();
            at_end.hwm_kib.max(sampled_peak)
        })
        .sum();
    std::thread::sleep(idle);
    let idle_kib = processors.iter().map(|p| p.memory().0.rss_kib).sum();
    let state_bytes = processors
        .iter()
        .map(|p| p.metric("presence_session_state_bytes").unwrap_or(f64::NAN))
        .sum();
    let open_sessions = processors
        .iter()
        .map(|p| p.metric("presence_open_sessions").unwrap_or(0.0))
        .sum();
    for p in processors {
        p.stop()?;
    }
    Ok(DrainRun {
        rate,
        peak_kib,
        idle_kib,
        state_bytes,
        open_sessions,
    })
}

/// The processor binary as a measured child process on `c`, once its stages are ready.
async fn start_processor(c: &Config) -> anyhow::Result<crate::measured::Processor> {
    let c = c.clone();
    tokio::task::spawn_blocking(move || {
        crate::measured::Processor::start(
            &crate::measured::this_binary()?,
            &c,
            Duration::from_secs(120),
        )
    })
    .await?
}

/// A `facility-status` reader tuned for latency: with read_committed, a fetch that finds no
/// committed data waits `fetch.wait.max.ms` (default 500 ms) before it looks again.
pub(crate) fn status_reader(c: &Config, client: &str) -> anyhow::Result<BaseConsumer> {
    let reader: BaseConsumer = consumer_config(
        &c.kafka,
        client,
        &format!("{}-reader", c.processor.group_id),
    )
    .set("fetch.wait.max.ms", "10")
    .create()?;
    reader.subscribe(&[&c.topics.facility_status])?;
    Ok(reader)
}

fn end_offsets(c: &Config, topic: &str) -> anyhow::Result<HashMap<i32, i64>> {
    let consumer: BaseConsumer = consumer_config(&c.kafka, "bench-meta", "bench-meta").create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut out = HashMap::new();
    for p in md.topics()[0].partitions() {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        out.insert(p.id(), high);
    }
    Ok(out)
}

fn committed_total(
    watcher: &BaseConsumer,
    topic: &str,
    ends: &HashMap<i32, i64>,
) -> anyhow::Result<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = watcher.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum())
}

/// Sessions that keep the latency bench's background facilities online, beating in turn.
const BACKGROUND_SESSIONS: usize = 20_000;

/// Heartbeat-to-`facility-status` latency at a steady `rate` heartbeats/s for `seconds`:
/// background sessions keep their facilities online while probe sessions open fresh
/// facilities; each probe's ONLINE record is timed from the beat's timestamp to its
/// arrival at a read_committed consumer. The first `warmup` seconds run at the same rate and
/// are reported apart: the background sessions open in them (at 20 k/s, 20,000 opens and
/// their changelog writes in the first second), a burst the steady state does not have.
pub async fn latency(
    base: &Config,
    rate: usize,
    seconds: u64,
    warmup: u64,
    hops: bool,
) -> anyhow::Result<String> {
    let c = isolated(base, "latency", base.topics.heartbeats_partitions).await?;
    let _topics = Throwaway::of(&c);
    let shutdown = Shutdown::new();
    let processor = start_processor(&c).await?;
    let reader = status_reader(&c, "bench-latency")?;
    // Wait for the processor: one probe round trip.
    let p = producer(&c)?;
    let warm = beat(usize::MAX / 2, 999_999, HeartbeatKind::Beat);
    send_beat(&p, &c.topics.heartbeats, &warm, now_ms(), None)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(Ok(_)) = reader.poll(Duration::from_millis(100)) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "processor did not answer in 60 s"
        );
    }
    // With `hops`: where each probe's time goes, from its beat as the broker hands it out
    // and its session event as stage 1 produced it and as a read_committed reader sees it.
    let watchers = if hops {
        let beats = watch_arrivals(&c, &c.topics.heartbeats, shutdown.clone(), |b| {
            decode::<Heartbeat>(b)
                .ok()
                .map(|h| h.facility_id)
                .filter(|f| f.starts_with("facility-1"))
        })?;
        let events = watch_arrivals(&c, &c.topics.session_transitions(), shutdown.clone(), |b| {
            decode::<SessionEvent>(b)
                .ok()
                .filter(|e| e.kind == SessionEventKind::Opened)
                .map(|e| e.facility_id)
                .filter(|f| f.starts_with("facility-1"))
        })?;
        Some((beats, events))
    } else {
        None
    };
    let load = {
        let c = c.clone();
        let stop = shutdown.clone();
        type Sent = (u64, HashMap<String, i64>, HashMap<String, i64>);
        std::thread::spawn(move || -> anyhow::Result<Sent> {
            // Sent as a Kafka producer with librdkafka's default linger (5 ms) sends: the
            // bench's bulk linger (20 ms) counted up to 20 ms into each probe.
            let mut pc = idempotent_producer_config(&c.kafka, "bench-latency");
            pc.set("linger.ms", "5");
            let p: ThreadedProducer<DefaultProducerContext> = pc.create()?;
            let sessions = BACKGROUND_SESSIONS;
            let facilities = 500usize;
            let started = Instant::now();
            let mut sent = 0u64;
            let mut probes = HashMap::new();
            let mut warm_probes = HashMap::new();
            let mut probe = 0usize;
            let warm = Duration::from_secs(warmup);
            let mut warm_sent = 0u64;
            while started.elapsed() < warm + Duration::from_secs(seconds) && !stop.is_triggered() {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                let warming = started.elapsed() < warm;
                while sent < due {
                    let now = now_ms();
                    let h = if sent.is_multiple_of(100) {
                        probe += 1;
                        let h = beat(1_000_000_000 + probe, 100_000 + probe, HeartbeatKind::Beat);
                        let into = if warming {
                            &mut warm_probes
                        } else {
                            &mut probes
                        };
                        into.insert(h.facility_id.clone(), now);
                        h
                    } else {
                        let s = (sent as usize) % sessions;
                        beat(s, s % facilities, HeartbeatKind::Beat)
                    };
                    send_beat(&p, &c.topics.heartbeats, &h, now, None)?;
                    sent += 1;
                }
                if warming {
                    warm_sent = sent;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            p.flush(Duration::from_secs(30))?;
            Ok((sent - warm_sent, probes, warm_probes))
        })
    };
    let mut arrivals: HashMap<String, (i64, FacilityStatus)> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(warmup + seconds + 10);
    while Instant::now() < until {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) {
            let at = now_ms();
            if let Some(Ok(s)) = m.payload().map(decode::<FacilityStatus>) {
                if s.status == Status::Online && s.facility_id.starts_with("facility-1") {
                    arrivals.entry(s.facility_id.clone()).or_insert((at, s));
                }
            }
        }
    }
    let (sent, probes, warm_probes) = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    // The stages' transaction commits (send offsets, wait for deliveries, commit).
    let commits = ["sessions", "facilities"]
        .map(|stage| {
            let label = format!("stage=\"{stage}\"");
            let n = processor.metric_having("presence_transaction_commit_seconds_count", &label);
            let sum = processor.metric_having("presence_transaction_commit_seconds_sum", &label);
            match (n, sum) {
                (Some(n), Some(sum)) if n > 0.0 => {
                    let steps = ["offsets", "deliveries", "commit"].map(|step| {
                        let label = format!("{label},step=\"{step}\"");
                        let spent = processor
                            .metric_having("presence_transaction_step_seconds_sum", &label)
                            .unwrap_or(f64::NAN);
                        format!("{step} {:.1}", spent / n * 1000.0)
                    });
                    // The slow ones, from the histogram's buckets: a commit blocks the
                    // stage's loop, so every beat that arrives meanwhile waits it out.
                    let slow = [("0.1", 100), ("0.25", 250), ("0.5", 500)].map(|(le, ms)| {
                        let within = processor
                            .metric_having(
                                "presence_transaction_commit_seconds_bucket",
                                &format!("{label},le=\"{le}\""),
                            )
                            .unwrap_or(f64::NAN);
                        // Clamped: the count and the bucket are two scrapes, and commits
                        // made between them would make the difference negative.
                        format!("{:.0} over {ms} ms", (n - within).max(0.0))
                    });
                    format!(
                        "{stage} {n:.0} commits ({:.0}/s), mean {:.1} ms ({} ms), {}",
                        n / seconds as f64,
                        sum / n * 1000.0,
                        steps.join(", "),
                        slow.join(", ")
                    )
                }
                _ => format!("{stage}: no commits on record"),
            }
        })
        .join("; ");
    shutdown.trigger();
    let hops = match watchers {
        Some((beats, events)) => {
            let beats = beats
                .join()
                .map_err(|_| anyhow::anyhow!("heartbeats reader panicked"))??;
            let events = events
                .join()
                .map_err(|_| anyhow::anyhow!("session-transitions reader panicked"))??;
            Hops::of(&probes, &beats, &events, &arrivals).to_string()
        }
        None => "hops not timed (--hops)".to_string(),
    };
    let (memory, sampled_peak) = processor.memory();
    tokio::task::spawn_blocking(move || processor.stop()).await??;
    reader.commit_consumer_state(CommitMode::Async).ok();
    // Per probe seen arriving: when it was sent, and its latency (ms).
    let latencies = |probes: &HashMap<String, i64>| -> Vec<(i64, f64)> {
        probes
            .iter()
            .filter_map(|(f, &sent_at)| {
                arrivals
                    .get(f)
                    .map(|(at, _)| (sent_at, (at - sent_at) as f64))
            })
            .collect()
    };
    let sorted = |v: &[(i64, f64)]| {
        let mut ms: Vec<f64> = v.iter().map(|&(_, ms)| ms).collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        ms
    };
    let timed = latencies(&probes);
    let lat = sorted(&timed);
    let warm = sorted(&latencies(&warm_probes));
    // The part before stage 2's commit: emitted_at - since (since = the beat's timestamp),
    // for the probes of the timed run.
    let mut emit: Vec<f64> = probes
        .keys()
        .filter_map(|f| arrivals.get(f))
        .map(|(_, s)| (s.emitted_at - s.since) as f64)
        .collect();
    emit.sort_by(|a, b| a.total_cmp(b));
    let missing = probes.len() - lat.len();
    let slow = SlowSeconds::of(&timed, percentile(&lat, 0.99));
    let report = format!(
        "latency at {:.0} heartbeats/s for {seconds} s ({} probes, {missing} not seen): beat timestamp to read_committed arrival \
         p50 {:.0} ms, p99 {:.0} ms, p99.9 {:.0} ms, max {:.0} ms (commit interval {} ms); of which beat to stage-2 emission p50 {:.0} ms, p99 {:.0} ms; \
         processor peak RSS {:.0} MiB\n\
         before it, {warmup} s at the same rate opening the {BACKGROUND_SESSIONS} background sessions (not counted above): {} probes, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n{slow}\n{hops}\ntransaction commits: {commits}",
        sent as f64 / seconds as f64,
        probes.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.last().copied().unwrap_or(f64::NAN),
        c.processor.commit_interval.as_millis(),
        percentile(&emit, 0.5),
        percentile(&emit, 0.99),
        mib(memory.hwm_kib.max(sampled_peak)),
        warm.len(),
        percentile(&warm, 0.5),
        percentile(&warm, 0.99),
        warm.last().copied().unwrap_or(f64::NAN),
    );
    Ok(report)
}

/// Where the slowest 1% of probes sit in time: the probes over the run's p99, by the wall
/// second they were sent in. A tail made of a few seconds in which every probe is late is a
/// stall (the machine, a pause) and the ones around it are fast; a tail spread over the
/// whole run is the pipeline's own variance.
struct SlowSeconds {
    over_p99: usize,
    seconds: usize,
    /// The worst seconds: (second since the epoch, probes over p99 in it, probes sent in it,
    /// the slowest of them in ms).
    worst: Vec<(i64, usize, usize, f64)>,
}

impl SlowSeconds {
    /// `timed`: per probe, when it was sent and its latency (ms).
    fn of(timed: &[(i64, f64)], p99: f64) -> SlowSeconds {
        let mut by_second: BTreeMap<i64, (usize, usize, f64)> = BTreeMap::new();
        for &(at, ms) in timed {
            let s = by_second.entry(at / 1000).or_default();
            s.1 += 1;
            if ms > p99 {
                s.0 += 1;
                s.2 = s.2.max(ms);
            }
        }
        let mut worst: Vec<_> = by_second
            .iter()
            .filter(|(_, s)| s.0 > 0)
            .map(|(&t, &(over, n, max))| (t, over, n, max))
            .collect();
        let over_p99 = worst.iter().map(|w| w.1).sum();
        let seconds = worst.len();
        worst.sort_by_key(|w| std::cmp::Reverse(w.1));
        worst.truncate(5);
        SlowSeconds {
            over_p99,
            seconds,
            worst,
        }
    }
}

impl std::fmt::Display for SlowSeconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} probes over p99 were sent in {} different seconds; the worst (UTC, over p99 / sent, slowest):",
            self.over_p99, self.seconds
        )?;
        for (t, over, n, max) in &self.worst {
            let day = t.rem_euclid(86_400);
            let (h, m, s) = (day / 3600, day / 60 % 60, day % 60);
            write!(f, " {h:02}:{m:02}:{s:02} {over}/{n} {max:.0} ms;")?;
        }
        Ok(())
    }
}

/// Per probe facility: a record's timestamp and when it arrived at a reader.
type Arrivals = HashMap<String, (i64, i64)>;

/// Reads `topic` read_committed from its beginning in a thread until `stop`; for each record
/// whose value `pick` names (a probe's facility), the first one's timestamp and when it
/// arrived here.
fn watch_arrivals(
    c: &Config,
    topic: &str,
    stop: Shutdown,
    pick: impl Fn(&[u8]) -> Option<String> + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Arrivals>>> {
    let consumer: BaseConsumer = consumer_config(
        &c.kafka,
        "bench-hops",
        &format!("{}-hops", c.processor.group_id),
    )
    .set("fetch.wait.max.ms", "10")
    .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in md
        .topics()
        .first()
        .map(|t| t.partitions())
        .unwrap_or_default()
    {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(std::thread::spawn(move || {
        let mut seen = HashMap::new();
        while !stop.is_triggered() {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                let at = now_ms();
                if let (Some(f), Some(ts)) =
                    (m.payload().and_then(&pick), m.timestamp().to_millis())
                {
                    seen.entry(f).or_insert((ts, at));
                }
            }
        }
        Ok(seen)
    }))
}

/// A probe's way from its beat to its `facility-status` record, hop by hop (ms): the beat
/// until a consumer of `heartbeats` has it; stage 1 until it produced the session event
/// (the event's timestamp); stage 1's commit until a read_committed consumer has the event;
/// stage 2 until it emitted the transition (`emitted_at`: the watermarks of every source,
/// its fetch); stage 2's commit until the bench's read_committed reader has it.
struct Hops {
    names: [&'static str; 5],
    /// Per probe seen through every hop: the five hops and the total.
    probes: Vec<([f64; 5], f64)>,
}

impl Hops {
    fn of(
        sent: &HashMap<String, i64>,
        beats: &HashMap<String, (i64, i64)>,
        events: &HashMap<String, (i64, i64)>,
        statuses: &HashMap<String, (i64, FacilityStatus)>,
    ) -> Hops {
        let probes = sent
            .iter()
            .filter_map(|(f, &sent_at)| {
                let (_, beat_seen) = beats.get(f)?;
                let (event_ts, event_seen) = events.get(f)?;
                let (status_seen, s) = statuses.get(f)?;
                let hops = [
                    beat_seen - sent_at,
                    event_ts - beat_seen,
                    event_seen - event_ts,
                    s.emitted_at - event_seen,
                    status_seen - s.emitted_at,
                ]
                .map(|d| d as f64);
                Some((hops, (status_seen - sent_at) as f64))
            })
            .collect();
        Hops {
            names: [
                "beat to the broker and back",
                "stage 1",
                "stage 1's commit",
                "stage 2 (watermarks, fetch)",
                "stage 2's commit and the reader's fetch",
            ],
            probes,
        }
    }
}

impl std::fmt::Display for Hops {
    /// Each hop's p50 and p99, and its mean over the slowest 1% of probes (what the tail is
    /// made of).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut by_total: Vec<&([f64; 5], f64)> = self.probes.iter().collect();
        by_total.sort_by(|a, b| a.1.total_cmp(&b.1));
        let tail = &by_total[by_total.len() - by_total.len().div_ceil(100).min(by_total.len())..];
        write!(
            f,
            "hops of {} probes (p50 / p99 / mean over the slowest 1%, ms):",
            self.probes.len()
        )?;
        for (i, name) in self.names.iter().enumerate() {
            let mut v: Vec<f64> = self.probes.iter().map(|p| p.0[i]).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            let tail_mean = tail.iter().map(|p| p.0[i]).sum::<f64>() / tail.len().max(1) as f64;
            write!(
                f,
                " {name} {:.0} / {:.0} / {tail_mean:.0};",
                percentile(&v, 0.5),
                percentile(&v, 0.99)
            )?;
        }
        Ok(())
    }
}

/// What `presence bench offline` runs.
pub struct OfflineOptions {
    /// Open sessions, each alone at its facility, so that each one that stops takes its
    /// facility OFFLINE.
    pub sessions: usize,
    /// Sessions that stop beating per second, in order, for `stop_seconds`.
    pub stop_rate: usize,
    pub stop_seconds: u64,
    /// The processor's session timeout; sessions beat every third of it (browsers: 30 s
    /// beats, 90 s timeout).
    pub timeout: Duration,
}

/// Offline detection: sessions stop beating at a steady rate while the rest keep beating;
/// for each facility that goes OFFLINE, its emission time (`emitted_at`) and its arrival at
/// a read_committed reader, minus its true deadline (the session's last beat + timeout).
pub async fn offline(base: &Config, o: &OfflineOptions) -> anyhow::Result<String> {
    let mut c = isolated(base, "offline", base.topics.heartbeats_partitions).await?;
    let _topics = Throwaway::of(&c);
    c.processor.session_timeout = o.timeout;
    let timeout = o.timeout.as_millis() as i64;
    let processor = start_processor(&c).await?;
    let reader = status_reader(&c, "bench-offline")?;
    let stopping = (o.stop_rate * o.stop_seconds as usize).min(o.sessions);
    let beat_interval = timeout / 3;
    // The load: every session beats every `beat_interval`, spread evenly; after one full
    // round, session s (s < stopping) stops at `stop_from + s / stop_rate`.
    let load = {
        let (c, sessions, stop_rate) = (c.clone(), o.sessions, o.stop_rate.max(1));
        std::thread::spawn(move || -> anyhow::Result<(u64, Vec<i64>, i64)> {
            let p = producer(&c)?;
            let t0 = now_ms();
            let stop_from = t0 + beat_interval;
            let stop_end = stop_from + (stopping as i64 * 1000) / stop_rate as i64;
            let mut last = vec![i64::MIN; stopping];
            let mut sent = 0u64;
            // The k-th beat goes to session k % sessions at t0 + k * interval / sessions.
            let mut k = 0u64;
            loop {
                let now = now_ms();
                if now > stop_end + beat_interval {
                    break;
                }
                let due = ((now - t0) as u64 * sessions as u64) / beat_interval as u64;
                while k <= due {
                    let s = (k % sessions as u64) as usize;
                    k += 1;
                    if s < stopping && now >= stop_from + (s as i64 * 1000) / stop_rate as i64 {
                        continue;
                    }
                    let h = beat(s, s, HeartbeatKind::Beat);
                    send_beat(&p, &c.topics.heartbeats, &h, now, None)?;
                    if s < stopping {
                        last[s] = now;
                    }
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            p.flush(Duration::from_secs(30))?;
            Ok((sent, last, stop_end))
        })
    };
    // Read facility-status until every stopped session's facility is OFFLINE, or until well
    // past the last deadline.
    let load_ends = Instant::now()
        + Duration::from_millis((beat_interval * 2) as u64)
        + Duration::from_secs(o.stop_seconds)
        + o.timeout
        + Duration::from_secs(20);
    let mut offline: HashMap<String, (i64, i64)> = HashMap::new();
    while Instant::now() < load_ends && offline.len() < stopping {
        let polled = {
            let r = &reader;
            tokio::task::block_in_place(|| r.poll(Duration::from_millis(50)))
        };
        if let Some(Ok(m)) = polled {
            let at = now_ms();
            if let Some(Ok(s)) = m.payload().map(decode::<FacilityStatus>) {
                if s.status == Status::Offline {
                    offline.entry(s.facility_id).or_insert((s.emitted_at, at));
                }
            }
        }
    }
    let (sent, last, _) = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let (memory, sampled_peak) = processor.memory();
    tokio::task::spawn_blocking(move || processor.stop()).await??;
    let mut emitted = Vec::new();
    let mut arrived = Vec::new();
    let mut early = 0;
    for (s, &last_beat) in last.iter().enumerate() {
        if last_beat == i64::MIN {
            continue;
        }
        let facility = beat(s, s, HeartbeatKind::Beat).facility_id;
        if let Some(&(emitted_at, at)) = offline.get(&facility) {
            let deadline = last_beat + timeout;
            if emitted_at < deadline {
                early += 1;
            }
            emitted.push((emitted_at - deadline) as f64);
            arrived.push((at - deadline) as f64);
        }
    }
    emitted.sort_by(f64::total_cmp);
    arrived.sort_by(f64::total_cmp);
    Ok(format!(
        "offline detection: {} sessions each alone at its facility, beating every {} ms (timeout {} ms; {sent} beats); {stopping} stop at {}/s; \
         {} facilities went OFFLINE ({} missing, {early} before their deadline): emission - deadline p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         read_committed arrival - deadline p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; processor peak RSS {:.0} MiB",
        o.sessions,
        beat_interval,
        timeout,
        o.stop_rate,
        emitted.len(),
        stopping - emitted.len(),
        percentile(&emitted, 0.5),
        percentile(&emitted, 0.99),
        emitted.last().copied().unwrap_or(f64::NAN),
        percentile(&arrived, 0.5),
        percentile(&arrived, 0.99),
        arrived.last().copied().unwrap_or(f64::NAN),
        mib(memory.hwm_kib.max(sampled_peak)),
    ))
}

/// What `presence bench failover` runs.
pub struct FailoverOptions {
    /// Background heartbeats per second (probes come on top, one per 100).
    pub rate: usize,
    pub runs: usize,
    /// Seconds of load before the kill.
    pub warm_seconds: u64,
}

/// How a killed instance's partitions get an owner again.
#[derive(Clone, Copy, Debug)]
enum Failover {
    /// kill -9 and restarted at once with the same instance id (a supervisor's restart):
    /// the static member rejoins without a rebalance.
    Restart,
    /// Two instances; one killed -9 and not restarted: the other takes its partitions once
    /// the group drops the dead static member (`session.timeout.ms` of the stage consumers).
    Takeover,
}

/// Failover: kill -9 of a processor instance under live load, until every heartbeats
/// partition emits again. Probe sessions open fresh facilities on each partition in turn;
/// a partition has failed over once a probe sent to it after the kill reaches a
/// read_committed reader. Reported per way of failing over, median and max over runs.
pub async fn failover(base: &Config, o: &FailoverOptions) -> anyhow::Result<String> {
    let mut lines = Vec::new();
    for mode in [Failover::Restart, Failover::Takeover] {
        let mut times = Vec::new();
        let mut before = Vec::new();
        for run in 0..o.runs {
            let (t, baseline) = failover_run(base, o, mode).await?;
            tracing::info!(?mode, run, seconds = t, "failover run");
            times.push(t);
            before.push(baseline);
        }
        let max = times.iter().copied().fold(f64::NAN, f64::max);
        lines.push(format!(
            "failover ({}): kill -9 -> every heartbeats partition emitting again: median {:.1} s, max {:.1} s over {} runs ({}); probe latency before the kill p50 {:.0} ms",
            match mode {
                Failover::Restart => "restarted at once with the same instance id",
                Failover::Takeover => "the other of two instances takes over",
            },
            median(times.clone()),
            max,
            o.runs,
            times.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>().join(", "),
            median(before),
        ));
    }
    Ok(lines.join("\n"))
}

/// One run: (seconds from the kill until every partition emitted again, probe latency
/// p50 before the kill in ms).
async fn failover_run(
    base: &Config,
    o: &FailoverOptions,
    mode: Failover,
) -> anyhow::Result<(f64, f64)> {
    let c = isolated(base, "failover", base.topics.heartbeats_partitions).await?;
    let _topics = Throwaway::of(&c);
    let partitions = c.topics.heartbeats_partitions;
    let first = start_processor(&c).await?;
    let second = match mode {
        Failover::Restart => None,
        Failover::Takeover => {
            let mut b = c.clone();
            b.processor.instance_id = "bench-b".into();
            Some(start_processor(&b).await?)
        }
    };
    let reader = status_reader(&c, "bench-failover")?;
    let shutdown = Shutdown::new();
    // Probe facility -> (heartbeats partition, sent at).
    let probes: std::sync::Arc<std::sync::Mutex<HashMap<String, (i32, i64)>>> = Default::default();
    // The load: background sessions keep facilities online; every 100th beat is a probe
    // that opens a fresh facility on partition `probe % partitions`.
    let load = {
        let (c, stop, rate) = (c.clone(), shutdown.clone(), o.rate.max(100));
        let probes = probes.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let p = producer(&c)?;
            let (sessions, facilities) = (10_000usize, 500usize);
            let started = Instant::now();
            let mut sent = 0u64;
            let mut probe = 0usize;
            while !stop.is_triggered() {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    let now = now_ms();
                    let mut record_partition = None;
                    let h = if sent.is_multiple_of(100) {
                        probe += 1;
                        let h = beat(1_000_000_000 + probe, 100_000 + probe, HeartbeatKind::Beat);
                        let part = (probe % partitions as usize) as i32;
                        probes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(h.facility_id.clone(), (part, now));
                        record_partition = Some(part);
                        h
                    } else {
                        let s = (sent as usize) % sessions;
                        beat(s, s % facilities, HeartbeatKind::Beat)
                    };
                    let bytes = encode(&h);
                    let mut r = BaseRecord::to(&c.topics.heartbeats)
                        .key(h.session_id.as_bytes())
                        .payload(&bytes[..])
                        .timestamp(now);
                    if let Some(part) = record_partition {
                        r = r.partition(part);
                    }
                    send(&p, r)?;
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            p.flush(Duration::from_secs(30))?;
            Ok(())
        })
    };
    // Arrivals of probe ONLINEs: facility -> arrival time.
    let mut arrivals: HashMap<String, i64> = HashMap::new();
    let poll_for = |until: Instant, arrivals: &mut HashMap<String, i64>| {
        while Instant::now() < until {
            let polled = tokio::task::block_in_place(|| reader.poll(Duration::from_millis(20)));
            if let Some(Ok(m)) = polled {
                let at = now_ms();
                if let Some(Ok(s)) = m.payload().map(decode::<FacilityStatus>) {
                    if s.status == Status::Online && s.facility_id.starts_with("facility-1") {
                        arrivals.entry(s.facility_id).or_insert(at);
                    }
                }
            }
        }
    };
    poll_for(
        Instant::now() + Duration::from_secs(o.warm_seconds),
        &mut arrivals,
    );
    let killed_at = now_ms();
    first.kill9()?;
    let restarted = match mode {
        Failover::Restart => {
            let c = c.clone();
            Some(tokio::task::spawn_blocking(move || {
                crate::measured::Processor::start(
                    &crate::measured::this_binary()?,
                    &c,
                    Duration::from_secs(120),
                )
            }))
        }
        Failover::Takeover => None,
    };
    // Per partition: the first arrival of a probe sent to it after the kill. Until every
    // partition has one, or two minutes.
    let give_up = Instant::now() + Duration::from_secs(120);
    let recovered = |arrivals: &HashMap<String, i64>| -> HashMap<i32, i64> {
        let mut per_partition: HashMap<i32, i64> = HashMap::new();
        for (f, (part, sent_at)) in probes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if *sent_at < killed_at {
                continue;
            }
            if let Some(at) = arrivals.get(f) {
                let e = per_partition.entry(*part).or_insert(i64::MAX);
                *e = (*e).min(*at);
            }
        }
        per_partition
    };
    while Instant::now() < give_up && (recovered(&arrivals).len() as i32) < partitions {
        poll_for(Instant::now() + Duration::from_millis(200), &mut arrivals);
    }
    shutdown.trigger();
    load.join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let per_partition = recovered(&arrivals);
    let probes = probes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut baseline: Vec<f64> = probes
        .iter()
        .filter(|(_, (_, sent_at))| *sent_at < killed_at - 1_000)
        .filter_map(|(f, (_, sent_at))| arrivals.get(f).map(|at| (at - sent_at) as f64))
        .collect();
    baseline.sort_by(f64::total_cmp);
    let stopped = match restarted {
        Some(h) => h.await??.stop(),
        None => second
            .map(|s| s.stop())
            .transpose()
            .map(|m| m.unwrap_or_default()),
    };
    stopped.context("stopping the processor after a failover run")?;
    anyhow::ensure!(
        per_partition.len() as i32 == partitions,
        "{mode:?}: only {} of {partitions} partitions emitted again within 120 s of the kill",
        per_partition.len()
    );
    let worst = per_partition.values().max().copied().unwrap_or(killed_at);
    Ok(((worst - killed_at) as f64 / 1e3, percentile(&baseline, 0.5)))
}
