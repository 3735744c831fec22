//! `presence`: one binary, one subcommand per process, so one image runs anywhere.

use std::path::PathBuf;
use std::process::ExitCode;

mod bench;

use clap::{Parser, Subcommand};
use presence_core::config::ConfigError;
use presence_core::{telemetry, topics, Config, Shutdown};

#[derive(Parser)]
#[command(
    name = "presence",
    version,
    about = "Real-time facility presence on Kafka"
)]
struct Cli {
    /// TOML configuration file; environment variables override it (see README).
    #[arg(long, global = true, env = "PRESENCE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP ingestion of heartbeats, live region streams and the dashboard.
    Gateway,
    /// Session windows to facility transitions, exactly-once.
    Processor,
    /// facility-status to Redis: current status and region channels.
    Notifier,
    /// facility-status to PostgreSQL: current status and history.
    Sink,
    /// Create or verify every topic; exits 1 if one exists with wrong settings.
    Topics,
    /// Simulated facilities full of users sending heartbeats (to Kafka or the gateway).
    Loadgen(LoadgenArgs),
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Benchmarks against the configured broker, on topics of their own.
    #[command(subcommand)]
    Bench(Bench),
}

/// The flags of `presence loadgen`. Their defaults are `presence_loadgen::Options`'
/// ([`loadgen_default`]), the one place they are written.
#[derive(clap::Args)]
struct LoadgenArgs {
    #[arg(long, default_value_t = loadgen_default().facilities)]
    facilities: usize,
    #[arg(long, default_value_t = loadgen_default().regions)]
    regions: usize,
    #[arg(long, default_value_t = loadgen_default().users_per_facility)]
    users_per_facility: usize,
    /// Seconds between a user's beats (browsers: 30).
    #[arg(long, default_value_t = loadgen_default().beat_interval.as_secs_f64())]
    beat_seconds: f64,
    /// Mean seconds a user stays logged in, and logged out between sessions.
    #[arg(long, default_value_t = loadgen_default().mean_session.as_secs_f64())]
    mean_session_seconds: f64,
    #[arg(long, default_value_t = loadgen_default().mean_offline.as_secs_f64())]
    mean_offline_seconds: f64,
    #[arg(long, default_value_t = loadgen_default().seed)]
    seed: u64,
    /// Stop after this many seconds (default: until SIGTERM).
    #[arg(long)]
    duration_seconds: Option<f64>,
    /// `kafka` (straight to the heartbeats topic) or the gateway's URL
    /// (`http://127.0.0.1:8080`).
    #[arg(long, default_value = "kafka")]
    target: String,
    /// Through the gateway: heartbeats per request (1 = one request per beat, as browsers).
    #[arg(long, default_value_t = 1)]
    http_batch: usize,
    /// Through the gateway: requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Write every heartbeat with its event time to this file (JSON lines), the ground
    /// truth that `presence_loadgen::read_truth` reads back and the tests' oracle
    /// (`presence_testkit::oracle`) turns into expected transitions.
    #[arg(long)]
    truth: Option<PathBuf>,
}

fn loadgen_default() -> presence_loadgen::Options {
    presence_loadgen::Options::default()
}

#[derive(Subcommand)]
enum Bench {
    /// Restore time of open sessions (changelog + timeout window) on one partition or
    /// several (then one after another against several at once, in the same runs).
    Restore {
        #[arg(long, default_value_t = 1_000_000)]
        sessions: usize,
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Percent of the sessions that went quiet after their first beat (still open,
        /// waiting for their timeout, as closed tabs do): their older beats are read again.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        quiet: u8,
    },
    /// Processor throughput (as a child process) against a plain consumer's ceiling on the
    /// same topic, with the processor's peak and idle resident memory.
    Throughput {
        #[arg(long, default_value_t = 2_000_000)]
        heartbeats: usize,
        /// Sessions the heartbeats are spread over (default: heartbeats / 20).
        #[arg(long)]
        sessions: Option<usize>,
        /// Processor runs (per binary); medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Another `presence` binary to compare with, run for run on the same input.
        #[arg(long)]
        against: Option<PathBuf>,
        /// Seconds the processor stays up after the drain before its idle memory is read.
        #[arg(long, default_value_t = 10)]
        idle_seconds: u64,
        /// Processor instances sharing the work (memory figures are their sum).
        #[arg(long, default_value_t = 1)]
        instances: usize,
    },
    /// Heartbeat-to-facility-status latency at a steady rate.
    Latency {
        #[arg(long, default_value_t = 20_000)]
        rate: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Seconds at the same rate before the timed run, reported apart: the background
        /// sessions open in them.
        #[arg(long, default_value_t = 5)]
        warmup_seconds: u64,
        /// Also time each probe hop by hop (two more consumers of the broker, which load it
        /// and so lengthen what they measure).
        #[arg(long)]
        hops: bool,
    },
    /// Offline detection: OFFLINE emission minus the true deadline, while sessions stop
    /// beating at a steady rate.
    Offline {
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        #[arg(long, default_value_t = 1_000)]
        stop_rate: usize,
        #[arg(long, default_value_t = 30)]
        stop_seconds: u64,
        /// The processor's session timeout in seconds (beats every third of it).
        #[arg(long, default_value_t = 30)]
        timeout_seconds: u64,
    },
    /// Failover: kill -9 of a processor instance under live load until every heartbeats
    /// partition emits again (restarted at once with the same id; taken over by a second
    /// instance).
    Failover {
        /// Background heartbeats per second (one probe per 100 on top).
        #[arg(long, default_value_t = 5_000)]
        rate: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds of load before the kill.
        #[arg(long, default_value_t = 15)]
        warm_seconds: u64,
    },
    /// A long run under steady load with a fault every few minutes (kill -9 and restart,
    /// scale 1 -> 2 -> 1, SIGSTOP past the group session): resident memory, stage-2
    /// buffered events and probe latency over time, written as CSV and SVG.
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Background heartbeats per second (one probe per 100 on top).
        #[arg(long, default_value_t = 20_000)]
        rate: usize,
        /// Background sessions, all open throughout.
        #[arg(long, default_value_t = 200_000)]
        sessions: usize,
        /// Seconds between faults.
        #[arg(long, default_value_t = 300)]
        fault_every: u64,
        /// Seconds per sample.
        #[arg(long, default_value_t = 10)]
        sample_every: u64,
        /// Directory for soak.csv, soak-faults.csv and soak.svg.
        #[arg(long, default_value = "docs/soak")]
        out: PathBuf,
        /// Only draw soak.svg again from the CSV files in --out.
        #[arg(long)]
        replot: bool,
    },
    /// Transitions per second from facility-status into PostgreSQL.
    Sink {
        #[arg(long, default_value_t = 200_000)]
        transitions: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// SSE fan-out: publish-to-receipt latency with many clients on one region.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        events: usize,
    },
}

fn main() -> ExitCode {
    presence_core::allocator::bound();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e @ ConfigError::Invalid(_)) | Err(e @ ConfigError::Read { .. }) => {
            eprintln!("presence: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(&config.telemetry);
    presence_core::metrics::set_build_commit(env!("PRESENCE_COMMIT"));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("presence: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command, config));
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("presence: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::CheckConfig => {
            let shown = toml::to_string_pretty(&config.redacted())?;
            println!("# configuration is valid\n{shown}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics => {
            let report = topics::ensure(&config).await?;
            print!("{report}");
            for line in topics::register_subjects(&config).await? {
                println!("{line}");
            }
            if report.is_ok() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("presence topics: some topics exist with wrong settings; apply the fixes above, then run again");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Gateway => presence_gateway::run(config, Shutdown::on_signals())
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Processor => {
            presence_core::allocator::trim_when_idle();
            presence_processor::run(config, Shutdown::on_signals())
                .await
                .map(|_| ExitCode::SUCCESS)
        }
        Command::Notifier => presence_notifier::run(config, Shutdown::on_signals())
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Sink => presence_sink::run(config, Shutdown::on_signals())
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Bench(b) => {
            let report = match b {
                Bench::Restore {
                    sessions,
                    partitions,
                    runs,
                    quiet,
                } => {
                    presence_processor::bench::restore(&config, sessions, partitions, runs, quiet)
                        .await?
                }
                Bench::Throughput {
                    heartbeats,
                    sessions,
                    runs,
                    against,
                    idle_seconds,
                    instances,
                } => {
                    let options = presence_processor::bench::ThroughputOptions {
                        heartbeats,
                        sessions,
                        runs,
                        against,
                        idle: std::time::Duration::from_secs(idle_seconds),
                        instances,
                    };
                    presence_processor::bench::throughput(&config, &options).await?
                }
                Bench::Latency {
                    rate,
                    seconds,
                    warmup_seconds,
                    hops,
                } => {
                    presence_processor::bench::latency(&config, rate, seconds, warmup_seconds, hops)
                        .await?
                }
                Bench::Offline {
                    sessions,
                    stop_rate,
                    stop_seconds,
                    timeout_seconds,
                } => {
                    let options = presence_processor::bench::OfflineOptions {
                        sessions,
                        stop_rate,
                        stop_seconds,
                        timeout: std::time::Duration::from_secs(timeout_seconds),
                    };
                    presence_processor::bench::offline(&config, &options).await?
                }
                Bench::Failover {
                    rate,
                    runs,
                    warm_seconds,
                } => {
                    let options = presence_processor::bench::FailoverOptions {
                        rate,
                        runs,
                        warm_seconds,
                    };
                    presence_processor::bench::failover(&config, &options).await?
                }
                Bench::Soak {
                    minutes,
                    rate,
                    sessions,
                    fault_every,
                    sample_every,
                    out,
                    replot,
                } => {
                    let options = presence_processor::soak::SoakOptions {
                        minutes,
                        rate,
                        sessions,
                        fault_every: std::time::Duration::from_secs(fault_every.max(60)),
                        sample_every: std::time::Duration::from_secs(sample_every.max(1)),
                        out,
                    };
                    if replot {
                        presence_processor::soak::replot(&options)?
                    } else {
                        presence_processor::soak::soak(&config, &options).await?
                    }
                }
                Bench::Sink { transitions, runs } => {
                    bench::sink(&config, transitions, runs).await?
                }
                Bench::Fanout { clients, events } => {
                    bench::fanout(&config, clients, events).await?
                }
            };
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Loadgen(a) => {
            let options = presence_loadgen::Options {
                facilities: a.facilities,
                regions: a.regions,
                users_per_facility: a.users_per_facility,
                beat_interval: std::time::Duration::from_secs_f64(a.beat_seconds.max(0.01)),
                mean_session: std::time::Duration::from_secs_f64(a.mean_session_seconds.max(0.01)),
                mean_offline: std::time::Duration::from_secs_f64(a.mean_offline_seconds.max(0.01)),
                seed: a.seed,
                duration: a.duration_seconds.map(std::time::Duration::from_secs_f64),
                ..Default::default()
            };
            let target = if a.target == "kafka" {
                presence_loadgen::Target::Kafka
            } else if a.target.starts_with("http://") || a.target.starts_with("https://") {
                presence_loadgen::Target::Http {
                    base: a.target.clone(),
                    batch: a.http_batch.max(1),
                    concurrency: a.concurrency.max(1),
                }
            } else {
                anyhow::bail!(
                    "--target '{}' is neither 'kafka' nor an http(s):// URL of the gateway",
                    a.target
                );
            };
            let shutdown = Shutdown::on_signals();
            let truth = a.truth.clone();
            let summary = tokio::task::spawn_blocking(move || {
                presence_loadgen::run(&config, &options, &target, truth.as_deref(), &shutdown)
            })
            .await??;
            println!("{summary}");
            Ok(if summary.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
