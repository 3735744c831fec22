//! `presence loadgen`: facilities full of users, in real time. Users log in, beat every
//! `beat_interval` (± 10% jitter), log out with END or vanish without one (a closed laptop),
//! and sometimes switch facility. The same seed gives the same behaviour.
//!
//! # Layout
//!
//! - [`users`]: the users, one state machine each over injected time ([`Users`]). It is
//!   the project's only simulation of users: [`run`] drives it with the clock, and the
//!   tests' generated logs (`presence_testkit::sim::generate`) drive it with no clock.
//! - [`truth`]: the ground-truth file (`--truth`), written here and read back by the tests
//!   ([`read_truth`]) for their oracle.
//! - Here: [`Options`] (the one place the defaults live; the `presence loadgen` flags
//!   read theirs from [`Options::default`]), [`run`], and the sending edges, straight to
//!   Kafka or through the gateway (HTTP).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use presence_core::codec::encode;
use presence_core::config::Config;
use presence_core::kafka::{idempotent_producer_config, send_when_room};
use presence_core::records::Heartbeat;
use presence_core::{now_ms, Shutdown};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

pub mod truth;
pub mod users;

pub use truth::{read_truth, truth_line, SimRecord};
pub use users::{facility_id, region_of, Activity, Users};

use truth::Truth;

/// The users to simulate. [`Options::default`] is the one place the defaults are written:
/// the flags of `presence loadgen` take theirs from it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Default 50.
    pub facilities: usize,
    /// Index of the first facility (`facility-{first_facility:05}`); the run uses
    /// `facilities` from there, so two runs side by side can keep to facilities of their own.
    pub first_facility: usize,
    /// Facilities are spread round-robin over this many regions. Default 5.
    pub regions: usize,
    /// Users at each facility, their home: every session starts there. Default 4.
    pub users_per_facility: usize,
    /// Default 30 s, as browsers beat.
    pub beat_interval: Duration,
    /// Mean time logged in (default 10 min), and logged out between sessions (default
    /// 5 min); both exponentially distributed, at most ten times the mean.
    pub mean_session: Duration,
    pub mean_offline: Duration,
    /// Share of sessions that end without END (closed laptop). Default 0.3.
    pub vanish_probability: f64,
    /// Share of sessions that move to another facility once. Default 0.05.
    pub move_probability: f64,
    /// Share of logins that reuse the id of an earlier session, perhaps another user's (a
    /// client with a fixed id, or one replaying someone else's): a session of its own all
    /// the same, which must never close or move the other. Default 0.
    pub reused_id_probability: f64,
    /// The same seed gives the same users. Default 1.
    pub seed: u64,
    /// Stop after this long; `None` runs until SIGTERM.
    pub duration: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            facilities: 50,
            first_facility: 0,
            regions: 5,
            users_per_facility: 4,
            beat_interval: Duration::from_secs(30),
            mean_session: Duration::from_secs(600),
            mean_offline: Duration::from_secs(300),
            vanish_probability: 0.3,
            move_probability: 0.05,
            reused_id_probability: 0.0,
            seed: 1,
            duration: None,
        }
    }
}

#[derive(Default, Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Acknowledged by the broker (Kafka) or answered 202 (gateway).
    pub sent: u64,
    pub failed: u64,
    pub logins: u64,
    pub logouts: u64,
    pub vanished: u64,
    pub moves: u64,
    pub seconds: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loadgen summary: {} heartbeats sent in {:.1} s ({:.0}/s), {} failed; {} logins, {} logouts with END, {} vanished, {} facility moves",
            self.sent,
            self.seconds,
            self.sent as f64 / self.seconds.max(1e-9),
            self.failed,
            self.logins,
            self.logouts,
            self.vanished,
            self.moves
        )
    }
}

/// Where heartbeats go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Straight to the `heartbeats` topic; the record timestamp is the send time.
    Kafka,
    /// Through the gateway at this base URL (`http://127.0.0.1:8080`), `batch` beats per
    /// request (1: one request per beat, as browsers send), `concurrency` requests in flight.
    Http {
        base: String,
        batch: usize,
        concurrency: usize,
    },
}

/// A sending edge: counts what the far end acknowledged and what failed.
trait Transport {
    /// Sends `h` with event time `ts`; what fails is counted, not returned.
    fn send(&mut self, h: &Heartbeat, ts: i64);
    /// (acknowledged or handed over, failed) so far.
    fn progress(&self) -> (u64, u64);
    /// Waits for what is in flight; returns the final (sent, failed).
    fn finish(self: Box<Self>) -> anyhow::Result<(u64, u64)>;
}

struct KafkaTransport {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
    sent: u64,
    failed: u64,
}

impl Transport for KafkaTransport {
    fn send(&mut self, h: &Heartbeat, ts: i64) {
        if send(&self.producer, &self.topic, h, ts) {
            self.sent += 1;
        } else {
            self.failed += 1;
        }
    }
    fn progress(&self) -> (u64, u64) {
        (self.sent, self.failed)
    }
    fn finish(self: Box<Self>) -> anyhow::Result<(u64, u64)> {
        // What is still unacknowledged after this counts as failed (a broker outage longer
        // than the wait); the summary says how many.
        if let Err(e) = self.producer.flush(Duration::from_secs(120)) {
            tracing::warn!(error = %e, in_flight = self.producer.in_flight_count(), "heartbeats still unacknowledged after 120 s: counted as failed");
        }
        let lost = self.producer.in_flight_count().max(0) as u64;
        Ok((self.sent - lost, self.failed + lost))
    }
}

/// Beats queue into worker tasks that POST them to the gateway; a beat counts as sent
/// when the gateway answered 202, and only then goes into the ground truth: the truth of
/// a run through the gateway is exactly what the gateway acknowledged.
struct HttpTransport {
    runtime: tokio::runtime::Runtime,
    queue: Option<tokio::sync::mpsc::Sender<(Heartbeat, i64)>>,
    truth: Option<std::sync::Arc<std::sync::Mutex<Truth>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HttpTransport {
    fn new(
        base: &str,
        batch: usize,
        concurrency: usize,
        truth: Option<Truth>,
    ) -> anyhow::Result<HttpTransport> {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (tx, rx) =
            tokio::sync::mpsc::channel::<(Heartbeat, i64)>(concurrency * batch.max(1) * 4);
        let truth = truth.map(|t| Arc::new(std::sync::Mutex::new(t)));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let accepted = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .build()?;
        let url = format!("{}/v1/heartbeats", base.trim_end_matches('/'));
        let workers = (0..concurrency.max(1))
            .map(|_| {
                let (rx, client, url) = (rx.clone(), client.clone(), url.clone());
                let (accepted, failed) = (accepted.clone(), failed.clone());
                let truth = truth.clone();
                runtime.spawn(async move {
                    let mut beats = Vec::with_capacity(batch);
                    loop {
                        beats.clear();
                        if rx.lock().await.recv_many(&mut beats, batch.max(1)).await == 0 {
                            return;
                        }
                        let body = if batch <= 1 {
                            serde_json::to_string(&beats[0].0)
                        } else {
                            serde_json::to_string(&beats.iter().map(|(h, _)| h).collect::<Vec<_>>())
                        }
                        .unwrap_or_default();
                        let n = beats.len() as u64;
                        match client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                        {
                            Ok(r) if r.status().as_u16() == 202 => {
                                if let Some(t) = &truth {
                                    let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                                    for (h, ts) in &beats {
                                        t.write(h, *ts);
                                    }
                                }
                                accepted.fetch_add(n, Ordering::Relaxed)
                            }
                            Ok(r) => {
                                tracing::debug!(status = %r.status(), "gateway refused heartbeats");
                                failed.fetch_add(n, Ordering::Relaxed)
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "gateway unreachable");
                                failed.fetch_add(n, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Ok(HttpTransport {
            runtime,
            queue: Some(tx),
            truth,
            workers,
            accepted,
            failed,
        })
    }
}

impl Transport for HttpTransport {
    fn send(&mut self, h: &Heartbeat, ts: i64) {
        let queued = self
            .queue
            .as_ref()
            .is_some_and(|q| q.blocking_send((h.clone(), ts)).is_ok());
        if !queued {
            // The workers are gone (the runtime stopped): the beat never left.
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn progress(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.accepted.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
    fn finish(mut self: Box<Self>) -> anyhow::Result<(u64, u64)> {
        self.queue = None;
        let workers = std::mem::take(&mut self.workers);
        self.runtime.block_on(async {
            for w in workers {
                let _ = w.await;
            }
        });
        if let Some(t) = self.truth.take() {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.flush()?;
        }
        Ok(self.progress())
    }
}

/// Runs the simulation until `shutdown` or `options.duration`, sending to `target`, and
/// writes every heartbeat to `truth` if given (through the gateway: every heartbeat it
/// answered 202, with the time it was sent).
pub fn run(
    config: &Config,
    options: &Options,
    target: &Target,
    truth: Option<&std::path::Path>,
    shutdown: &Shutdown,
) -> anyhow::Result<Summary> {
    let mut truth = truth.map(Truth::create).transpose()?;
    let mut transport: Box<dyn Transport> = match target {
        Target::Kafka => {
            let producer: ThreadedProducer<DefaultProducerContext> =
                idempotent_producer_config(&config.kafka, "loadgen")
                    .set("linger.ms", "5")
                    .set("queue.buffering.max.messages", "1000000")
                    .create()?;
            // Connected before the first user acts, so that no beat is stamped long before
            // the broker has it (a late beat is a different beat to the processor).
            producer
                .client()
                .fetch_metadata(Some(&config.topics.heartbeats), Duration::from_secs(15))
                .map_err(|e| anyhow::anyhow!("cannot reach Kafka at {} for topic '{}': {e}; start the stack (make stack) and run `presence topics`", config.kafka.brokers, config.topics.heartbeats))?;
            Box::new(KafkaTransport {
                producer,
                topic: config.topics.heartbeats.clone(),
                sent: 0,
                failed: 0,
            })
        }
        Target::Http {
            base,
            batch,
            concurrency,
        } => Box::new(HttpTransport::new(
            base,
            *batch,
            *concurrency,
            truth.take(),
        )?),
    };
    let mut users = Users::new(options);
    let start = Instant::now();
    let mut progress = Progress::new(options.duration);
    while !shutdown.is_triggered() && options.duration.is_none_or(|d| start.elapsed() < d) {
        let ts = now_ms();
        users.advance(start.elapsed(), ts, |h| {
            let ts = match truth.as_mut() {
                Some(t) => {
                    let ts = t.stamp(&h, ts);
                    t.write(&h, ts);
                    ts
                }
                None => ts,
            };
            transport.send(&h, ts);
        });
        if let Some(e) = truth.as_mut().and_then(Truth::take_error) {
            anyhow::bail!("cannot write the ground-truth file: {e}");
        }
        progress.tick(start.elapsed(), transport.progress(), &users);
        let wait = users.next_due().map_or(Duration::from_millis(100), |t| {
            t.saturating_sub(start.elapsed())
        });
        if !wait.is_zero() {
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
    }
    if let Some(mut t) = truth {
        t.flush()?;
    }
    let (sent, failed) = transport.finish()?;
    let a = users.activity();
    progress.done();
    Ok(Summary {
        sent,
        failed,
        logins: a.logins,
        logouts: a.logouts,
        vanished: a.vanished,
        moves: a.moves,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The live line on stderr: a bar when the run has a duration, the rate and errors always.
struct Progress {
    duration: Option<Duration>,
    tty: bool,
    last: Instant,
    sent_at_last: u64,
}

impl Progress {
    fn new(duration: Option<Duration>) -> Progress {
        Progress {
            duration,
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            sent_at_last: 0,
        }
    }

    fn tick(&mut self, elapsed: Duration, (sent, failed): (u64, u64), users: &Users) {
        if self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        let a = users.activity();
        let rate = (sent - self.sent_at_last.min(sent)) as f64 / self.last.elapsed().as_secs_f64();
        let bar = match self.duration {
            Some(d) => {
                let done = (elapsed.as_secs_f64() / d.as_secs_f64()).min(1.0);
                let filled = (done * 20.0) as usize;
                format!(
                    "[{}{}] {:>3.0}% ",
                    "#".repeat(filled),
                    "-".repeat(20 - filled),
                    done * 100.0
                )
            }
            None => String::new(),
        };
        let line = format!(
            "loadgen {bar}{sent:>10} sent {rate:>9.0}/s  errors {failed}  online {}/{}  logins {} logouts {} vanished {} moves {}",
            users.online(), users.len(), a.logins, a.logouts, a.vanished, a.moves
        );
        if self.tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
        self.last = Instant::now();
        self.sent_at_last = sent;
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, h: &Heartbeat, ts: i64) -> bool {
    let bytes = encode(h);
    let record = BaseRecord::<[u8], [u8]>::to(topic)
        .key(h.session_id.as_bytes())
        .payload(&bytes[..])
        .timestamp(ts);
    match send_when_room(p, record, Some(Duration::from_secs(5))) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat not sent");
            false
        }
    }
}
