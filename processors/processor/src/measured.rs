//! A process measured from outside, as an operator sees it: benchmarks run the processor (or
//! the sink) as a child process (`presence processor`, this binary or another build given to
//! compare with) on a config file of the benchmark's own, and sample its resident memory from
//! `/proc/<pid>/status`: `VmRSS` (now) every 20 ms, `VmHWM` (the kernel's peak).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use presence_core::config::Config;

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS` when read.
    pub rss_kib: u64,
    /// `VmHWM`: the highest `VmRSS` over the process's life.
    pub hwm_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        };
        Some(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

/// `config` as TOML without the settings that are at their defaults, so that an older build
/// given to compare with (`--against`), which refuses keys it does not know, reads it too
/// as long as the benchmark leaves the newer settings alone.
fn config_text(config: &Config) -> anyhow::Result<String> {
    fn strip(value: &mut toml::Value, default: &toml::Value) {
        if let (toml::Value::Table(t), toml::Value::Table(d)) = (value, default) {
            t.retain(|k, v| d.get(k) != Some(v));
            for (k, v) in t.iter_mut() {
                if let Some(d) = d.get(k) {
                    strip(v, d);
                }
            }
            t.retain(|_, v| !matches!(v, toml::Value::Table(t) if t.is_empty()));
        }
    }
    let mut value = toml::Value::try_from(config)?;
    strip(&mut value, &toml::Value::try_from(Config::default())?);
    Ok(toml::to_string(&value)?)
}

/// KiB as MiB, for reports.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Which `presence` subcommand runs.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Processor,
    Sink,
}

/// A `presence processor` (or `sink`) child process. Stopped with SIGTERM (a clean shutdown)
/// by [`Processor::stop`], killed when dropped otherwise.
pub struct Processor {
    child: Child,
    config_file: PathBuf,
    /// Highest `VmRSS` sampled since start or the last [`Processor::reset_peak`], KiB.
    peak: Arc<AtomicU64>,
    stop_sampler: Arc<AtomicBool>,
    /// Its `/metrics`, `/healthz`, `/readyz`.
    pub ops: SocketAddr,
}

/// This binary, to run the processor as it is built now.
pub fn this_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("cannot find this program's path to start the processor: {e}"))
}

/// A free loopback port for the child's ops endpoints.
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

impl Processor {
    /// Starts `binary processor` on `config` (written to a private file, since it may hold
    /// secrets) with ops endpoints on a free port, and waits until it is ready. Settings in
    /// this process's environment are not passed on: the file is the whole config.
    pub fn start(binary: &Path, config: &Config, ready_within: Duration) -> anyhow::Result<Self> {
        Self::start_as(Role::Processor, binary, config, ready_within)
    }

    /// [`Processor::start`] for any [`Role`].
    pub fn start_as(
        role: Role,
        binary: &Path,
        config: &Config,
        ready_within: Duration,
    ) -> anyhow::Result<Self> {
        let mut config = config.clone();
        let ops = free_port()?;
        let command_name = match role {
            Role::Processor => {
                config.processor.ops_listen = ops;
                "processor"
            }
            Role::Sink => {
                config.sink.ops_listen = ops;
                "sink"
            }
        };
        // Unique per child: instances started together share the millisecond.
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let config_file = std::env::temp_dir().join(format!(
            "presence-bench-{}-{}-{}.toml",
            std::process::id(),
            presence_core::now_ms(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&config_file)?;
            f.write_all(config_text(&config)?.as_bytes())?;
        }
        let mut command = Command::new(binary);
        command.arg(command_name).arg("--config").arg(&config_file);
        for (name, _) in std::env::vars() {
            if name.starts_with("PRESENCE_")
                || name.starts_with("KAFKA_")
                || name == "REDIS_URL"
                || name == "DATABASE_URL"
            {
                command.env_remove(name);
            }
        }
        let child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {} processor: {e}", binary.display()))?;
        let peak = Arc::new(AtomicU64::new(0));
        let stop_sampler = Arc::new(AtomicBool::new(false));
        {
            let (pid, peak, stop) = (child.id(), peak.clone(), stop_sampler.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match Memory::of(pid) {
                        Some(m) => {
                            peak.fetch_max(m.rss_kib, Ordering::Relaxed);
                        }
                        None => return,
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        let mut p = Processor {
            child,
            config_file,
            peak,
            stop_sampler,
            ops,
        };
        let deadline = Instant::now() + ready_within;
        loop {
            if let Some(status) = p.child.try_wait()? {
                anyhow::bail!("{command_name} exited with {status} before it was ready");
            }
            if p.get("/readyz").is_some_and(|(code, _)| code == 200) {
                return Ok(p);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{command_name} was not ready within {ready_within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Memory now, with the sampled peak since start or the last reset.
    pub fn memory(&self) -> (Memory, u64) {
        (
            Memory::of(self.pid()).unwrap_or_default(),
            self.peak.load(Ordering::Relaxed),
        )
    }

    /// Starts a new window for the sampled peak.
    pub fn reset_peak(&self) {
        self.peak.store(0, Ordering::Relaxed);
    }

    /// (status code, body) of a GET on the ops port.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.ops, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((code, body))
    }

    /// The sum of a metric's samples on the child's `/metrics` (all label sets).
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metric_having(name, "")
    }

    /// The sum of a metric's samples whose line contains `having` (a label, `stage="sessions"`).
    pub fn metric_having(&self, name: &str, having: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        let values: Vec<f64> = body
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter(|l| l.contains(having))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// kill -9, and reaps it.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits (up to a minute) for the clean shutdown; memory just before.
    pub fn stop(mut self) -> anyhow::Result<Memory> {
        let before = Memory::of(self.pid()).unwrap_or_default();
        // SAFETY: kill(2) with our own child's pid and a valid signal number.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "the processor exited with {status} on SIGTERM"
                );
                return Ok(before);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the processor did not stop within a minute of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        self.stop_sampler.store(true, Ordering::Relaxed);
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.config_file);
    }
}
