//! `presence bench soak`: the processor under steady load for a long time, with faults, and
//! whether what an operator watches stays flat. Background sessions beat at a steady rate
//! (each one every `sessions / rate` seconds, so the open-session count holds); every 100th
//! beat is a probe that opens a probe facility (one of a pool used in turn, each OFFLINE
//! again before its next probe), whose ONLINE record a read_committed reader times. Every `sample_every` the run records the processor's resident memory (all
//! instances, from `/proc`), stage 2's buffered events and open sessions (its `/metrics`),
//! and the probes' latency in that window. Every `fault_every` it injects the next fault of
//! a cycle: kill -9 of the instance and a restart with the same id (a supervisor's restart),
//! a second instance joining for a minute and leaving (scale 1 → 2 → 1), and the instance
//! frozen with SIGSTOP past its group session timeout and resumed (a zombie). Broker faults
//! are the chaos run's (`cli/tests/chaos.rs`): this run shares the configured broker.
//!
//! It writes `soak.csv` (one row per sample) and `soak.svg` (the three series over time, the
//! faults marked) to the output directory, and reports the figures: each series early and
//! late in the run, the probes' latency away from faults, each fault's recovery time
//! (until a probe sent after it is read), and probes never seen or seen twice.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use presence_core::codec::{decode, encode};
use presence_core::config::Config;
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind, Status};
use presence_core::topics::Throwaway;
use presence_core::Shutdown;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer};

use crate::bench::{isolated, median, percentile, producer, status_reader};
use crate::measured::{mib, this_binary, Processor};
use crate::stage::now_ms;

pub struct SoakOptions {
    pub minutes: u64,
    /// Background heartbeats per second (probes come on top, one per 100).
    pub rate: usize,
    /// Background sessions, all open throughout.
    pub sessions: usize,
    pub fault_every: Duration,
    pub sample_every: Duration,
    /// Where `soak.csv` and `soak.svg` go.
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillRestart,
    ScaleOut,
    Pause,
}

impl Fault {
    const CYCLE: [Fault; 3] = [Fault::KillRestart, Fault::ScaleOut, Fault::Pause];

    fn label(self) -> &'static str {
        match self {
            Fault::KillRestart => "kill -9 + restart",
            Fault::ScaleOut => "scale 1-2-1",
            Fault::Pause => "SIGSTOP 15 s",
        }
    }
}

/// One sample: seconds since the load started, then what was read.
#[derive(Debug, Clone, Default)]
struct Sample {
    t: f64,
    instances: usize,
    rss_mib: f64,
    /// The heap the processes use (`presence_allocator_allocated_bytes`): resident memory
    /// less code, stacks and what the allocator holds free. NaN when a process does not
    /// report it.
    in_use_mib: f64,
    /// Times the live instances' allocators gave memory back
    /// (`presence_allocator_trims_total`, summed; a restarted instance counts from 0).
    trims: f64,
    buffered: f64,
    open_sessions: f64,
    probes: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

/// A fault: when it started (seconds since the load started), what it was.
struct Mark {
    t: f64,
    fault: Fault,
}

/// The running instances: slot 0 is the one faults hit, slot 1 the one that scales out.
type Fleet = Arc<Mutex<[Option<Processor>; 2]>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn start(c: &Config) -> anyhow::Result<Processor> {
    Processor::start(&this_binary()?, c, Duration::from_secs(120))
}

/// Probe facilities, used in turn: enough that a facility's last probe session has expired
/// (one beat, then the session timeout) and its OFFLINE been written 30 s before the next
/// probe opens it again. New facilities for every probe (200 a second at 20 k beats/s) grew
/// stage 2's state by 360 k facilities over 30 minutes, which each restart restored: the
/// memory series rose for the harness's sake, not the processor's.
fn probe_facilities(rate: usize, timeout: Duration) -> usize {
    let probes_a_second = rate as f64 * 1.01 / 100.0;
    ((probes_a_second * (timeout.as_secs_f64() + 30.0)).ceil() as usize).max(1)
}

fn probe_beat(n: usize, facilities: usize) -> Heartbeat {
    Heartbeat {
        session_id: format!("probe-session-{n:012}"),
        user_id: format!("probe-user-{n:012}"),
        facility_id: format!("probe-{:09}", n % facilities),
        region_id: "probes".into(),
        kind: HeartbeatKind::Beat,
        client_sent_at: None,
        client_version: None,
    }
}

fn background_beat(session: usize) -> Heartbeat {
    Heartbeat {
        session_id: format!("soak-session-{session:012}"),
        user_id: format!("soak-user-{session:012}"),
        // Two users per facility.
        facility_id: format!("soak-facility-{:09}", session / 2),
        region_id: format!("region-{}", session % 16),
        kind: HeartbeatKind::Beat,
        client_sent_at: None,
        client_version: None,
    }
}

pub async fn soak(base: &Config, o: &SoakOptions) -> anyhow::Result<String> {
    std::fs::create_dir_all(&o.out).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the output directory {}: {e}; pass --out <a writable directory>",
            o.out.display()
        )
    })?;
    let c = isolated(base, "soak", base.topics.heartbeats_partitions).await?;
    let _topics = Throwaway::of(&c);
    let mut second = c.clone();
    second.processor.instance_id = "bench-b".into();
    let fleet: Fleet = Arc::new(Mutex::new([None, None]));
    {
        let c = c.clone();
        let first = tokio::task::spawn_blocking(move || start(&c)).await??;
        lock(&fleet)[0] = Some(first);
    }
    let shutdown = Shutdown::new();
    // Probe facility -> sent at (ms) of its probe not read yet; (arrival ms, latency ms) of
    // each probe read; probes whose facility came round again before they were read.
    let probes: Arc<Mutex<HashMap<String, i64>>> = Default::default();
    let overdue = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let facilities = probe_facilities(o.rate.max(100), c.processor.session_timeout);
    let arrivals: Arc<Mutex<Vec<(i64, f64)>>> = Default::default();
    let duplicates = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let epoch = now_ms();

    let load = {
        let (c, stop, probes, overdue) =
            (c.clone(), shutdown.clone(), probes.clone(), overdue.clone());
        let (rate, sessions) = (o.rate.max(100), o.sessions.max(1));
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let p = producer(&c)?;
            let begun = Instant::now();
            let (mut sent, mut probe) = (0u64, 0usize);
            while !stop.is_triggered() {
                let due = (begun.elapsed().as_secs_f64() * rate as f64 * 1.01) as u64;
                while sent < due {
                    let now = now_ms();
                    let h = if sent.is_multiple_of(100) {
                        probe += 1;
                        let h = probe_beat(probe, facilities);
                        if lock(&probes).insert(h.facility_id.clone(), now).is_some() {
                            overdue.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        h
                    } else {
                        background_beat((sent as usize) % sessions)
                    };
                    let bytes = encode(&h);
                    let r = BaseRecord::to(&c.topics.heartbeats)
                        .key(h.session_id.as_bytes())
                        .payload(&bytes[..])
                        .timestamp(now);
                    presence_core::kafka::send_when_room(&p, r, None)?;
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            p.flush(Duration::from_secs(30))?;
            Ok(sent)
        })
    };

    let reader = {
        let (c, stop) = (c.clone(), shutdown.clone());
        let (probes, arrivals, duplicates) = (probes.clone(), arrivals.clone(), duplicates.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let reader = status_reader(&c, "bench-soak")?;
            let mut seen = std::collections::HashSet::new();
            while !stop.is_triggered() {
                let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let at = now_ms();
                let Some(Ok(s)) = m.payload().map(decode::<FacilityStatus>) else {
                    continue;
                };
                if s.status != Status::Online || !s.facility_id.starts_with("probe-") {
                    continue;
                }
                // A facility comes round again, each time with the next seq.
                if !seen.insert((s.facility_id.clone(), s.seq)) {
                    duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                if let Some(sent) = lock(&probes).remove(&s.facility_id) {
                    lock(&arrivals).push((at, (at - sent) as f64));
                }
            }
            reader.unsubscribe();
            Ok(())
        })
    };

    let faults = {
        let (fleet, stop) = (fleet.clone(), shutdown.clone());
        let (c, second, every) = (c.clone(), second.clone(), o.fault_every);
        let until = Duration::from_secs(o.minutes * 60).saturating_sub(Duration::from_secs(90));
        std::thread::spawn(move || -> anyhow::Result<Vec<Mark>> {
            let mut marks = Vec::new();
            let mut next = every;
            for fault in Fault::CYCLE.iter().cycle() {
                // A fault's own length (the minute a second instance runs, the 15 s freeze)
                // is part of the schedule, not a wait for something.
                while started.elapsed() < next {
                    if stop.is_triggered() {
                        return Ok(marks);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                if next > until || stop.is_triggered() {
                    return Ok(marks);
                }
                marks.push(Mark {
                    t: started.elapsed().as_secs_f64(),
                    fault: *fault,
                });
                tracing::info!(fault = fault.label(), "soak: fault");
                match fault {
                    Fault::KillRestart => {
                        let old = lock(&fleet)[0].take();
                        if let Some(p) = old {
                            p.kill9()?;
                        }
                        let p = start(&c)?;
                        lock(&fleet)[0] = Some(p);
                    }
                    Fault::ScaleOut => {
                        let p = start(&second)?;
                        lock(&fleet)[1] = Some(p);
                        std::thread::sleep(Duration::from_secs(60));
                        let p = lock(&fleet)[1].take();
                        if let Some(p) = p {
                            p.stop()?;
                        }
                    }
                    Fault::Pause => {
                        let pid = lock(&fleet)[0].as_ref().map(|p| p.pid());
                        if let Some(pid) = pid {
                            signal(pid, libc::SIGSTOP);
                            std::thread::sleep(Duration::from_secs(15));
                            signal(pid, libc::SIGCONT);
                        }
                    }
                }
                next += every;
            }
            Ok(marks)
        })
    };

    // The samples, on this task: nothing here waits on the load.
    let mut samples = Vec::new();
    let total = Duration::from_secs(o.minutes * 60);
    let mut next = o.sample_every;
    while started.elapsed() < total {
        tokio::time::sleep(next.saturating_sub(started.elapsed())).await;
        next += o.sample_every;
        let window: Vec<(i64, f64)> = std::mem::take(&mut *lock(&arrivals));
        let fleet = fleet.clone();
        let mut s = tokio::task::spawn_blocking(move || {
            let fleet = lock(&fleet);
            let mut s = Sample::default();
            for p in fleet.iter().flatten() {
                s.instances += 1;
                s.rss_mib += mib(p.memory().0.rss_kib);
                s.in_use_mib += p
                    .metric("presence_allocator_allocated_bytes")
                    .map_or(f64::NAN, |bytes| bytes / 1048576.0);
                s.trims += p
                    .metric("presence_allocator_trims_total")
                    .unwrap_or(f64::NAN);
                s.buffered += p.metric("presence_stage2_buffered_events").unwrap_or(0.0);
                s.open_sessions += p.metric("presence_open_sessions").unwrap_or(0.0);
            }
            s
        })
        .await?;
        s.t = started.elapsed().as_secs_f64();
        let mut lat: Vec<f64> = window.iter().map(|&(_, l)| l).collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        s.probes = lat.len();
        s.p50_ms = percentile(&lat, 0.5);
        s.p99_ms = percentile(&lat, 0.99);
        s.p999_ms = percentile(&lat, 0.999);
        tracing::info!(?s, "soak: sample");
        samples.push((s, window));
    }
    shutdown.trigger();
    let sent = load
        .join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    let marks = faults
        .join()
        .map_err(|_| anyhow::anyhow!("the fault thread panicked"))??;
    let instances: Vec<Processor> = {
        let mut fleet = lock(&fleet);
        fleet.iter_mut().filter_map(Option::take).collect()
    };
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for p in instances {
            p.stop()?;
        }
        Ok(())
    })
    .await??;

    let arrivals: Vec<(i64, f64)> = samples.iter().flat_map(|(_, w)| w.clone()).collect();
    let samples: Vec<Sample> = samples.into_iter().map(|(s, _)| s).collect();
    let missing = lock(&probes).len() + overdue.load(std::sync::atomic::Ordering::Relaxed) as usize;
    write_csv(&o.out.join("soak.csv"), &samples)?;
    write_faults(&o.out.join("soak-faults.csv"), &marks)?;
    std::fs::write(o.out.join("soak.svg"), plot(&samples, &marks, o))?;
    Ok(report(
        o,
        sent,
        epoch,
        &samples,
        &marks,
        &arrivals,
        missing,
        duplicates.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with our own child's pid and a valid signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn write_csv(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut text = String::from(
        "t_s,instances,rss_mib,stage2_buffered,open_sessions,probes,p50_ms,p99_ms,p999_ms,in_use_mib,trims\n",
    );
    for s in samples {
        let _ = writeln!(
            text,
            "{:.1},{},{:.1},{:.0},{:.0},{},{:.0},{:.0},{:.0},{:.1},{:.0}",
            s.t,
            s.instances,
            s.rss_mib,
            s.buffered,
            s.open_sessions,
            s.probes,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.in_use_mib,
            s.trims
        );
    }
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

fn write_faults(path: &Path, marks: &[Mark]) -> anyhow::Result<()> {
    let mut text = String::from("t_s,fault\n");
    for m in marks {
        let _ = writeln!(text, "{:.1},{}", m.t, m.fault.label());
    }
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// Draws `soak.svg` again from the `soak.csv` and `soak-faults.csv` of an earlier run in
/// `o.out` (say, after a change to the drawing).
pub fn replot(o: &SoakOptions) -> anyhow::Result<String> {
    let read = |name: &str| {
        let path = o.out.join(name);
        std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}; run the soak first", path.display()))
    };
    let number = |v: Option<&str>| v.and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    let samples: Vec<Sample> = read("soak.csv")?
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            Sample {
                t: number(f.first().copied()),
                instances: number(f.get(1).copied()) as usize,
                rss_mib: number(f.get(2).copied()),
                buffered: number(f.get(3).copied()),
                open_sessions: number(f.get(4).copied()),
                probes: number(f.get(5).copied()) as usize,
                p50_ms: number(f.get(6).copied()),
                p99_ms: number(f.get(7).copied()),
                p999_ms: number(f.get(8).copied()),
                in_use_mib: number(f.get(9).copied()),
                trims: number(f.get(10).copied()),
            }
        })
        .collect();
    let marks: Vec<Mark> = read("soak-faults.csv")?
        .lines()
        .skip(1)
        .filter_map(|line| {
            let (t, label) = line.split_once(',')?;
            let fault = Fault::CYCLE.into_iter().find(|f| f.label() == label)?;
            Some(Mark {
                t: t.parse().ok()?,
                fault,
            })
        })
        .collect();
    let path = o.out.join("soak.svg");
    std::fs::write(&path, plot(&samples, &marks, o))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(format!(
        "{} drawn from {} samples and {} faults",
        path.display(),
        samples.len(),
        marks.len()
    ))
}

/// Whether a sample's window touches a fault (from its start to two minutes after).
fn near_fault(t: f64, every: f64, marks: &[Mark]) -> bool {
    marks.iter().any(|m| t + every >= m.t && t <= m.t + 120.0)
}

#[allow(clippy::too_many_arguments)]
fn report(
    o: &SoakOptions,
    sent: u64,
    epoch: i64,
    samples: &[Sample],
    marks: &[Mark],
    arrivals: &[(i64, f64)],
    missing: usize,
    duplicates: u64,
) -> String {
    let every = o.sample_every.as_secs_f64();
    let seconds = (o.minutes * 60) as f64;
    // Early: minutes 2 to 7 (after the first beat of every session); late: the last 5.
    let early = |s: &&Sample| s.t > 120.0 && s.t <= 420.0;
    let late = |s: &&Sample| s.t > seconds - 300.0;
    let med = |f: fn(&Sample) -> f64, keep: &dyn Fn(&&Sample) -> bool| {
        let v: Vec<f64> = samples
            .iter()
            .filter(keep)
            .map(f)
            .filter(|v| v.is_finite())
            .collect();
        if v.is_empty() {
            f64::NAN
        } else {
            median(v)
        }
    };
    let calm = |s: &&Sample| !near_fault(s.t, every, marks) && s.t > 120.0;
    let p99_calm: Vec<f64> = samples
        .iter()
        .filter(calm)
        .map(|s| s.p99_ms)
        .filter(|v| v.is_finite())
        .collect();
    let max_of = |f: fn(&Sample) -> f64| samples.iter().map(f).fold(0.0, f64::max);
    let mut lines = vec![
        format!(
            "soak: {} min at {:.0} heartbeats/s over {} sessions ({} samples of {:.0} s, {} faults); files {} and {}",
            o.minutes,
            sent as f64 / seconds,
            o.sessions,
            samples.len(),
            every,
            marks.len(),
            o.out.join("soak.csv").display(),
            o.out.join("soak.svg").display(),
        ),
        format!(
            "  processor RSS (all instances): median minutes 2-7 {:.0} MiB, last 5 min {:.0} MiB, max {:.0} MiB",
            med(|s| s.rss_mib, &early),
            med(|s| s.rss_mib, &late),
            max_of(|s| s.rss_mib),
        ),
        format!(
            "  processor heap in use (allocated, not freed): median minutes 2-7 {:.0} MiB, last 5 min {:.0} MiB, max {:.0} MiB",
            med(|s| s.in_use_mib, &early),
            med(|s| s.in_use_mib, &late),
            max_of(|s| s.in_use_mib),
        ),
        format!(
            "  processor allocator trims (the live instances' counts, summed): {:.0} at the last sample, max {:.0}; one at every 5 s look would be {:.0}",
            samples.last().map_or(f64::NAN, |s| s.trims),
            max_of(|s| s.trims),
            seconds / presence_core::allocator::TRIM_PERIOD.as_secs_f64(),
        ),
        format!(
            "  stage-2 buffered events: median minutes 2-7 {:.0}, last 5 min {:.0}, max {:.0}",
            med(|s| s.buffered, &early),
            med(|s| s.buffered, &late),
            max_of(|s| s.buffered),
        ),
        format!(
            "  probe latency (beat -> read_committed ONLINE), per {every:.0} s window from 2 min on and not within 2 min after a fault ({} windows): p99 median {:.0} ms, max {:.0} ms; minutes 2-7 {:.0} ms, last 5 min {:.0} ms",
            p99_calm.len(),
            if p99_calm.is_empty() { f64::NAN } else { median(p99_calm.clone()) },
            p99_calm.iter().copied().fold(f64::NAN, f64::max),
            med(|s| s.p99_ms, &|s| early(s) && calm(s)),
            med(|s| s.p99_ms, &|s| late(s) && calm(s)),
        ),
    ];
    for m in marks {
        // Recovered: the first probe sent after the fault started is read.
        let at = epoch + (m.t * 1000.0) as i64;
        let recovered = arrivals
            .iter()
            .filter(|(arrived, latency)| *arrived as f64 - latency >= at as f64)
            .map(|(arrived, _)| (*arrived - at) as f64 / 1000.0)
            .fold(f64::NAN, f64::min);
        lines.push(format!(
            "  fault at {:.0} s, {}: probes flow again after {:.1} s",
            m.t,
            m.fault.label(),
            recovered
        ));
    }
    lines.push(format!(
        "  probes never read: {missing} (the last seconds' in flight at the end included); read twice: {duplicates}"
    ));
    lines.join("\n")
}

const LATENCY: &str = "probe latency p99 per window, ms (clipped at 4x its median)";

/// A panel: its title, what it shows of a sample, its colour.
type Series = (&'static str, fn(&Sample) -> f64, &'static str);

/// Four panels over time (RSS, heap in use, stage-2 buffered events, probe p99), faults
/// as dashed lines.
fn plot(samples: &[Sample], marks: &[Mark], o: &SoakOptions) -> String {
    const W: f64 = 900.0;
    const PANEL: f64 = 170.0;
    const LEFT: f64 = 70.0;
    const TOP: f64 = 40.0;
    let series: [Series; 4] = [
        (
            "processor resident memory, MiB (all instances)",
            |s| s.rss_mib,
            "#1f77b4",
        ),
        (
            "processor heap in use (allocated, not freed), MiB (all instances)",
            |s| s.in_use_mib,
            "#9467bd",
        ),
        ("stage-2 buffered events", |s| s.buffered, "#2ca02c"),
        (LATENCY, |s| s.p99_ms, "#d62728"),
    ];
    let t_max = (o.minutes * 60) as f64;
    let x = |t: f64| LEFT + (t / t_max).clamp(0.0, 1.0) * (W - LEFT - 20.0);
    let height = TOP + series.len() as f64 * (PANEL + 40.0) + 20.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"20\" font-size=\"14\">presence bench soak: {} min, {} heartbeats/s, {} sessions; dashed: faults</text>\n",
        o.minutes, o.rate, o.sessions
    );
    for (i, (title, value, colour)) in series.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + 40.0) + 20.0;
        let bottom = top + PANEL;
        let finite: Vec<f64> = samples
            .iter()
            .map(value)
            .filter(|v| v.is_finite())
            .collect();
        let mut v_max = finite.iter().copied().fold(0.0, f64::max).max(1.0) * 1.1;
        // Latency spikes at faults (seconds) would flatten the rest (tens of ms): the panel
        // stops at four times the median, and a clipped point is drawn at the top.
        if *title == LATENCY && !finite.is_empty() {
            v_max = v_max.min(4.0 * median(finite.clone()).max(1.0));
        }
        let y = |v: f64| bottom - (v / v_max).clamp(0.0, 1.0) * PANEL;
        let _ = writeln!(
            svg,
            "<text x=\"{LEFT}\" y=\"{:.0}\">{title}</text>\n\
             <line x1=\"{LEFT}\" y1=\"{bottom:.0}\" x2=\"{:.0}\" y2=\"{bottom:.0}\" stroke=\"black\"/>\n\
             <line x1=\"{LEFT}\" y1=\"{top:.0}\" x2=\"{LEFT}\" y2=\"{bottom:.0}\" stroke=\"black\"/>\n\
             <text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{:.0}</text>\n\
             <text x=\"{:.0}\" y=\"{bottom:.0}\" text-anchor=\"end\">0</text>\n\
             <text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{:.0} min</text>",
            top - 6.0,
            W - 20.0,
            LEFT - 4.0,
            top + 10.0,
            v_max,
            LEFT - 4.0,
            W - 20.0,
            bottom + 14.0,
            t_max / 60.0,
        );
        for m in marks {
            let _ = writeln!(
                svg,
                "<line x1=\"{0:.1}\" y1=\"{top:.0}\" x2=\"{0:.1}\" y2=\"{bottom:.0}\" stroke=\"#888\" stroke-dasharray=\"4 3\"><title>{1}</title></line>",
                x(m.t),
                m.fault.label()
            );
            if i == 0 {
                let _ = writeln!(
                    svg,
                    "<text x=\"{:.1}\" y=\"{:.0}\" font-size=\"9\" fill=\"#555\">{}</text>",
                    x(m.t) + 2.0,
                    top + 10.0,
                    m.fault.label()
                );
            }
        }
        let points: Vec<String> = samples
            .iter()
            .filter(|s| value(s).is_finite())
            .map(|s| format!("{:.1},{:.1}", x(s.t), y(value(s))))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, rss: f64) -> Sample {
        Sample {
            t,
            instances: 1,
            rss_mib: rss,
            in_use_mib: rss - 10.0,
            trims: 1.0,
            buffered: 10.0,
            open_sessions: 100.0,
            probes: 5,
            p50_ms: 20.0,
            p99_ms: 40.0,
            p999_ms: 50.0,
        }
    }

    #[test]
    fn the_plot_draws_every_sample_and_fault() {
        let o = SoakOptions {
            minutes: 1,
            rate: 100,
            sessions: 10,
            fault_every: Duration::from_secs(20),
            sample_every: Duration::from_secs(10),
            out: PathBuf::from("."),
        };
        let samples: Vec<Sample> = (1..=6)
            .map(|i| sample(i as f64 * 10.0, 100.0 + i as f64))
            .collect();
        let marks = [Mark {
            t: 20.0,
            fault: Fault::Pause,
        }];
        let svg = plot(&samples, &marks, &o);
        assert_eq!(svg.matches("<polyline").count(), 4);
        // Six points per series, one dashed line per panel for the fault.
        let first = svg
            .split("points=\"")
            .nth(1)
            .and_then(|p| p.split('"').next());
        assert_eq!(first.map(|p| p.split(' ').count()), Some(6));
        assert_eq!(svg.matches("stroke-dasharray").count(), 4);
        assert!(svg.ends_with("</svg>\n"));
    }

    #[test]
    fn windows_near_a_fault_are_not_calm() {
        let marks = [Mark {
            t: 300.0,
            fault: Fault::KillRestart,
        }];
        assert!(!near_fault(280.0, 10.0, &marks));
        assert!(near_fault(295.0, 10.0, &marks));
        assert!(near_fault(410.0, 10.0, &marks));
        assert!(!near_fault(430.0, 10.0, &marks));
    }
}
