//! Metrics, registered one way. Every process starts from [`registry`] (the `process_*`
//! metrics and `presence_build_info` are in it already) and registers its own with the
//! functions here: each builds the metric, registers it, and returns it. A definition that
//! the `prometheus` crate refuses (a bad name, a label set twice) or a name registered twice
//! in one registry is a programming error and panics at start-up, where tests see it.
//!
//! Names follow `presence_<thing>_<unit>`: `_total` for counters, `_seconds` for
//! durations, `_bytes` for sizes; labels come from small fixed sets, never an id.
//!
//! [`ConsumerLag`] is the one consumer-lag gauge of every consumer (processor stages,
//! notifier, sink): it follows librdkafka's statistics and drops a partition's series as
//! soon as the partition is revoked, so a dashboard never shows lag for a partition this
//! process no longer reads.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use rdkafka::statistics::Statistics;

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    if let Err(e) = registry.register(Box::new(c.clone())) {
        panic!("registering a metric failed ({e}): metric definitions are static, fix the code");
    }
    c
}

fn built<T>(r: prometheus::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("invalid metric definition ({e}): fix the code"))
}

pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, built(IntCounter::new(name, help)))
}

pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        built(IntCounterVec::new(Opts::new(name, help), labels)),
    )
}

pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, built(IntGauge::new(name, help)))
}

pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        built(IntGaugeVec::new(Opts::new(name, help), labels)),
    )
}

pub fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(registry, built(Histogram::with_opts(opts)))
}

pub fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(registry, built(HistogramVec::new(opts, labels)))
}

/// Buckets for short operations: 1 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What `presence_build_info` says: the crate version, and the commit the binary was built
/// from (`presence` sets it from its build script; `unknown` outside a git checkout).
static COMMIT: OnceLock<String> = OnceLock::new();

/// Sets the commit that [`registry`] reports in `presence_build_info`. Call once, before
/// any process starts; later calls are ignored.
pub fn set_build_commit(commit: &str) {
    let _ = COMMIT.set(commit.to_string());
}

/// A registry for one process: `process_*` (CPU, memory, file descriptors, threads, start
/// time, from `/proc/self`) and `presence_build_info{version,commit}` (always 1) are in it.
pub fn registry() -> Registry {
    let registry = Registry::new();
    register(&registry, ProcessCollector::new());
    let info = gauge_vec(
        &registry,
        "presence_build_info",
        "Always 1; the labels say which build of presence this process runs",
        &["version", "commit"],
    );
    let commit = COMMIT.get().map(String::as_str).unwrap_or("unknown");
    info.with_label_values(&[env!("CARGO_PKG_VERSION"), commit])
        .set(1);
    registry
}

/// Records not consumed yet per assigned partition, `presence_consumer_lag{stage,partition}`,
/// from librdkafka's statistics (`statistics.interval.ms`). A partition's series exists only
/// while the partition is assigned here: [`ConsumerLag::forget`] (from the revoke callback)
/// drops it at once, and a statistics report that no longer lists it as consumed drops it
/// too, so a revoked partition never shows a stale figure.
#[derive(Clone)]
pub struct ConsumerLag {
    gauge: IntGaugeVec,
    stage: &'static str,
    shown: Arc<Mutex<BTreeSet<i32>>>,
}

impl ConsumerLag {
    /// The gauge of consumer `stage` (`sessions`, `facilities`, `notifier`, `sink`). Several
    /// stages of one process share the registry's one gauge: pass the registered gauge from
    /// [`ConsumerLag::register`] to [`ConsumerLag::for_stage`].
    pub fn register(registry: &Registry) -> IntGaugeVec {
        gauge_vec(
            registry,
            "presence_consumer_lag",
            "Records not consumed yet per assigned input partition: the position behind the last stable offset",
            &["stage", "partition"],
        )
    }

    pub fn for_stage(gauge: &IntGaugeVec, stage: &'static str) -> ConsumerLag {
        ConsumerLag {
            gauge: gauge.clone(),
            stage,
            shown: Arc::default(),
        }
    }

    fn shown(&self) -> std::sync::MutexGuard<'_, BTreeSet<i32>> {
        self.shown.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From the consumer's `ClientContext::stats`. The lag is the consumer's position
    /// behind the last stable offset (`ls_offset - app_offset`: every consumer here reads
    /// committed records only), not librdkafka's `consumer_lag`, which counts from the
    /// committed offset as this consumer knows it: the processor commits through its
    /// transactional producer and starts from restored positions, so its consumers never
    /// know one.
    pub fn on_stats(&self, statistics: &Statistics) {
        self.observe(statistics.topics.values().flat_map(|t| {
            t.partitions
                .iter()
                .map(|(&p, part)| (p, position_lag(part.ls_offset, part.app_offset)))
        }));
    }

    /// `(partition, lag)`: a partition with a known lag is set; every other one (-1: not
    /// fetched here; absent) is dropped.
    pub fn observe(&self, lags: impl IntoIterator<Item = (i32, i64)>) {
        let mut now = BTreeSet::new();
        for (p, lag) in lags {
            if p >= 0 && lag >= 0 {
                now.insert(p);
                self.gauge
                    .with_label_values(&[self.stage, &p.to_string()])
                    .set(lag);
            }
        }
        let mut shown = self.shown();
        for gone in shown.difference(&now) {
            let _ = self
                .gauge
                .remove_label_values(&[self.stage, &gone.to_string()]);
        }
        *shown = now;
    }

    /// The partition is no longer assigned here: its series goes.
    pub fn forget(&self, partition: i32) {
        self.shown().remove(&partition);
        let _ = self
            .gauge
            .remove_label_values(&[self.stage, &partition.to_string()]);
    }

    /// Every partition of this stage goes (the consumer is closed or rebuilt).
    pub fn forget_all(&self) {
        let all = std::mem::take(&mut *self.shown());
        for p in all {
            let _ = self
                .gauge
                .remove_label_values(&[self.stage, &p.to_string()]);
        }
    }
}

/// Records between a consumer's position (`app_offset`, the next offset it hands to the
/// application) and the last stable offset; -1 while either is unknown (-1001 in librdkafka's
/// statistics: a partition this consumer does not fetch).
fn position_lag(ls_offset: i64, app_offset: i64) -> i64 {
    if ls_offset >= 0 && app_offset >= 0 {
        (ls_offset - app_offset).max(0)
    } else {
        -1
    }
}

/// The standard `process_*` metrics (the names Prometheus' own client libraries use), read
/// from `/proc/self` at each scrape. On a system without `/proc` it reports nothing.
#[derive(Clone)]
pub struct ProcessCollector {
    descs: Vec<Desc>,
    cpu: prometheus::Counter,
    open_fds: IntGauge,
    max_fds: IntGauge,
    virtual_bytes: IntGauge,
    resident_bytes: IntGauge,
    start_time: prometheus::Gauge,
    threads: IntGauge,
    allocator_allocated: IntGauge,
    allocator_trims: prometheus::IntCounter,
}

impl ProcessCollector {
    pub fn new() -> ProcessCollector {
        let cpu = built(prometheus::Counter::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        ));
        let open_fds = built(IntGauge::new(
            "process_open_fds",
            "Number of open file descriptors.",
        ));
        let max_fds = built(IntGauge::new(
            "process_max_fds",
            "Maximum number of open file descriptors.",
        ));
        let virtual_bytes = built(IntGauge::new(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        ));
        let resident_bytes = built(IntGauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        ));
        let start_time = built(prometheus::Gauge::new(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
        ));
        let threads = built(IntGauge::new(
            "process_threads",
            "Number of OS threads in the process.",
        ));
        let allocator_allocated = built(IntGauge::new(
            "presence_allocator_allocated_bytes",
            "Bytes allocated through the C allocator and not freed: the heap this process uses. Resident memory above it is code, stacks and free memory the allocator holds.",
        ));
        let allocator_trims = built(prometheus::IntCounter::new(
            "presence_allocator_trims_total",
            "Times the allocator's trim thread gave free memory back to the system (the processor's: once what it holds beyond its heap grew 32 MiB past where the last trim left it).",
        ));
        let mut descs = Vec::new();
        for c in [
            &cpu as &dyn Collector,
            &open_fds,
            &max_fds,
            &virtual_bytes,
            &resident_bytes,
            &start_time,
            &threads,
            &allocator_allocated,
            &allocator_trims,
        ] {
            descs.extend(c.desc().into_iter().cloned());
        }
        ProcessCollector {
            descs,
            cpu,
            open_fds,
            max_fds,
            virtual_bytes,
            resident_bytes,
            start_time,
            threads,
            allocator_allocated,
            allocator_trims,
        }
    }

    fn sample(&self) -> Option<()> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let s = ProcStat::parse(&stat)?;
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as i64;
        let cpu = (s.utime + s.stime) as f64 / ticks;
        let delta = cpu - self.cpu.get();
        if delta > 0.0 {
            self.cpu.inc_by(delta);
        }
        self.virtual_bytes.set(s.vsize as i64);
        self.resident_bytes.set(s.rss_pages * page);
        self.threads.set(s.threads);
        self.allocator_allocated
            .set(crate::allocator::allocated().min(i64::MAX as usize) as i64);
        let trims = crate::allocator::trims();
        if trims > self.allocator_trims.get() {
            self.allocator_trims
                .inc_by(trims - self.allocator_trims.get());
        }
        if self.start_time.get() == 0.0 {
            let boot = std::fs::read_to_string("/proc/stat")
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
            self.start_time.set(boot + s.start_ticks as f64 / ticks);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            self.max_fds.set(limit.rlim_cur.min(i64::MAX as u64) as i64);
        }
        Some(())
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector::new()
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if self.sample().is_none() {
            return Vec::new();
        }
        let mut families = Vec::new();
        for c in [
            &self.cpu as &dyn Collector,
            &self.open_fds,
            &self.max_fds,
            &self.virtual_bytes,
            &self.resident_bytes,
            &self.start_time,
            &self.threads,
            &self.allocator_allocated,
            &self.allocator_trims,
        ] {
            families.extend(c.collect());
        }
        families
    }
}

/// The fields of `/proc/self/stat` (proc(5)) the collector reports.
#[derive(Debug, PartialEq)]
struct ProcStat {
    utime: u64,
    stime: u64,
    threads: i64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: i64,
}

impl ProcStat {
    /// The command name (field 2) is in parentheses and may hold spaces and parentheses:
    /// the fields are counted from after its last `)`.
    fn parse(stat: &str) -> Option<ProcStat> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[0] is field 3 (state); field n is f[n - 3].
        let field = |n: usize| f.get(n - 3).copied();
        Some(ProcStat {
            utime: field(14)?.parse().ok()?,
            stime: field(15)?.parse().ok()?,
            threads: field(20)?.parse().ok()?,
            start_ticks: field(22)?.parse().ok()?,
            vsize: field(23)?.parse().ok()?,
            rss_pages: field(24)?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 25 0 0 20 0 7 0 123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            ProcStat::parse(line),
            Some(ProcStat {
                utime: 150,
                stime: 25,
                threads: 7,
                start_ticks: 123456,
                vsize: 987654321,
                rss_pages: 2048,
            })
        );
        assert_eq!(ProcStat::parse("garbage"), None);
        assert_eq!(ProcStat::parse("1 (x) S 1 2"), None);
    }

    #[test]
    fn registry_has_process_metrics_and_build_info() {
        let text = encode(&registry());
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "presence_build_info{commit=\"",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(
            rss > 1_000_000.0,
            "a test process holds more than 1 MB: {rss}"
        );
    }

    #[test]
    #[should_panic(expected = "registering a metric failed")]
    fn a_name_registered_twice_is_a_programming_error() {
        let r = Registry::new();
        counter(&r, "presence_twice_total", "x");
        counter(&r, "presence_twice_total", "x");
    }

    #[test]
    fn lag_series_go_with_their_partition() {
        let r = Registry::new();
        let gauge = ConsumerLag::register(&r);
        let lag = ConsumerLag::for_stage(&gauge, "sink");
        lag.observe([(0, 5), (1, 7), (-1, 0)]);
        let text = encode(&r);
        assert!(
            text.contains("presence_consumer_lag{partition=\"0\",stage=\"sink\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("presence_consumer_lag{partition=\"1\",stage=\"sink\"} 7"),
            "{text}"
        );
        assert!(!text.contains("partition=\"-1\""), "{text}");
        lag.forget(1);
        assert!(!encode(&r).contains("partition=\"1\""));
        // No longer fetched (-1): gone.
        lag.observe([(0, -1), (2, 3)]);
        let text = encode(&r);
        assert!(!text.contains("partition=\"0\""), "{text}");
        assert!(text.contains("partition=\"2\""), "{text}");
        lag.forget_all();
        assert!(!encode(&r).contains("presence_consumer_lag{"));
    }

    #[test]
    fn lag_is_the_position_behind_the_last_stable_offset() {
        assert_eq!(position_lag(120, 100), 20);
        assert_eq!(position_lag(100, 100), 0);
        // A commit marker read past the last stable offset: never negative.
        assert_eq!(position_lag(100, 101), 0);
        assert_eq!(position_lag(100, -1001), -1, "not fetched yet");
        assert_eq!(position_lag(-1001, 5), -1, "end unknown");
    }

    fn encode(r: &Registry) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }
}
