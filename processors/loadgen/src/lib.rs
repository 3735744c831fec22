//! `presence loadgen`: facilities full of users, in real time. Users log in, beat every
//! `beat_interval` (± 10% jitter), log out with END or vanish without one (a closed laptop),
//! and sometimes switch facility. The same seed gives the same behaviour.
//!
//! # Layout
//!
//! Everything is here: [`Options`], the per-user state machine ([`User`]) driven by a
//! deadline-ordered heap, and the Kafka producer edge. Sending through the gateway (HTTP)
//! comes with the gateway (issue #4).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use presence_core::codec::encode;
use presence_core::config::Config;
use presence_core::kafka::{idempotent_producer_config, send_when_room};
use presence_core::records::{Heartbeat, HeartbeatKind};
use presence_core::sim::{facility_id, region_of};
use presence_core::{now_ms, Shutdown};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

#[derive(Debug, Clone)]
pub struct Options {
    pub facilities: usize,
    /// Index of the first facility (`facility-{first_facility:05}`); the run uses
    /// `facilities` from there, so two runs side by side can keep to facilities of their own.
    pub first_facility: usize,
    pub regions: usize,
    pub users_per_facility: usize,
    /// Default 30 s, as browsers beat.
    pub beat_interval: Duration,
    /// Mean time logged in, and logged out between sessions.
    pub mean_session: Duration,
    pub mean_offline: Duration,
    /// Share of sessions that end without END (closed laptop). Default 0.3.
    pub vanish_probability: f64,
    /// Share of sessions that move to another facility once. Default 0.05.
    pub move_probability: f64,
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
            seed: 1,
            duration: None,
        }
    }
}

/// One simulated user: logged out until `next`, or logged in with a session.
struct User {
    home: usize,
    session: Option<Session>,
    sessions_started: u64,
}

struct Session {
    id: String,
    facility: usize,
    ends_at: Instant,
    moves_at: Option<Instant>,
    vanishes: bool,
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

fn exp(rng: &mut StdRng, mean: Duration) -> Duration {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    mean.mul_f64(-u.ln()).min(mean * 10)
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
    fn send(&mut self, h: &Heartbeat, ts: i64) -> bool;
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
    fn send(&mut self, h: &Heartbeat, ts: i64) -> bool {
        let ok = send(&self.producer, &self.topic, h, ts);
        if ok {
            self.sent += 1;
        } else {
            self.failed += 1;
        }
        ok
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
                                        t.write_or_remember(h, *ts);
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
    fn send(&mut self, h: &Heartbeat, ts: i64) -> bool {
        self.queue
            .as_ref()
            .is_some_and(|q| q.blocking_send((h.clone(), ts)).is_ok())
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

/// The ground truth: every heartbeat with its event time, as JSON lines that
/// [`presence_core::sim::read_truth`] reads back for the oracle. Exact in Kafka mode (the
/// record timestamp is this time); through the gateway, the gateway's receive time is a
/// few ms later.
///
/// So that the truth orders every facility's events without ties, event times are then
/// even milliseconds, strictly increasing per facility (a beat that moves a session counts
/// for both facilities): with an odd session timeout, no expiry falls on a beat's instant.
struct Truth {
    out: std::io::BufWriter<std::fs::File>,
    /// The first write error (through the gateway, lines are written by the workers).
    error: Option<std::io::Error>,
    last_at_facility: std::collections::HashMap<String, i64>,
    facility_of_session: std::collections::HashMap<String, String>,
}

impl Truth {
    fn create(path: &std::path::Path) -> anyhow::Result<Truth> {
        let file = std::fs::File::create(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the ground-truth file {}: {e}",
                path.display()
            )
        })?;
        Ok(Truth {
            out: std::io::BufWriter::new(file),
            error: None,
            last_at_facility: Default::default(),
            facility_of_session: Default::default(),
        })
    }

    /// The event time for `h` sent at `now`: even, and after every earlier event of the
    /// facilities it touches.
    fn stamp(&mut self, h: &Heartbeat, now: i64) -> i64 {
        let previous = match h.kind {
            HeartbeatKind::Beat => self
                .facility_of_session
                .insert(h.session_id.clone(), h.facility_id.clone()),
            HeartbeatKind::End => self.facility_of_session.remove(&h.session_id),
        };
        let touched = [
            Some(h.facility_id.clone()),
            previous.filter(|p| *p != h.facility_id),
        ];
        let mut ts = now - now.rem_euclid(2);
        for f in touched.iter().flatten() {
            if let Some(last) = self.last_at_facility.get(f) {
                ts = ts.max(last + 2);
            }
        }
        for f in touched.into_iter().flatten() {
            self.last_at_facility.insert(f, ts);
        }
        ts
    }

    fn write(&mut self, h: &Heartbeat, ts: i64) -> std::io::Result<()> {
        writeln!(self.out, "{}", presence_core::sim::truth_line(h, ts))
    }

    fn write_or_remember(&mut self, h: &Heartbeat, ts: i64) {
        if let Err(e) = self.write(h, ts) {
            self.error.get_or_insert(e);
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(e) = self.error.take() {
            anyhow::bail!("cannot write the ground-truth file: {e}");
        }
        self.out.flush()?;
        Ok(())
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
    let mut rng = StdRng::seed_from_u64(options.seed);
    let users = options.facilities * options.users_per_facility;
    let mut people: Vec<User> = (0..users)
        .map(|i| User {
            home: options.first_facility + i / options.users_per_facility.max(1),
            session: None,
            sessions_started: 0,
        })
        .collect();
    let start = Instant::now();
    // Everyone starts logged out and logs in within the first mean_offline.
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> = (0..users)
        .map(|i| Reverse((start + exp(&mut rng, options.mean_offline / 4), i)))
        .collect();
    let mut summary = Summary::default();
    let mut progress = Progress::new(options.duration);
    let mut truth_error = None;
    while !shutdown.is_triggered() && options.duration.is_none_or(|d| start.elapsed() < d) {
        let now = Instant::now();
        let ts = now_ms();
        while let Some(Reverse((t, i))) = due.peek().copied() {
            if t > now {
                break;
            }
            due.pop();
            let next = step(
                &mut people[i],
                i,
                options,
                &mut rng,
                now,
                &mut summary,
                |h| {
                    let ts = match truth.as_mut() {
                        Some(t) => {
                            let ts = t.stamp(h, ts);
                            if let Err(e) = t.write(h, ts) {
                                truth_error.get_or_insert(e);
                            }
                            ts
                        }
                        None => ts,
                    };
                    transport.send(h, ts)
                },
            );
            due.push(Reverse((next, i)));
        }
        if let Some(e) = truth_error.take() {
            anyhow::bail!("cannot write the ground-truth file: {e}");
        }
        let online = || people.iter().filter(|u| u.session.is_some()).count();
        progress.tick(
            start.elapsed(),
            transport.progress(),
            online,
            users,
            &summary,
        );
        let wait = due
            .peek()
            .map_or(Duration::from_millis(100), |Reverse((t, _))| {
                t.saturating_duration_since(Instant::now())
            });
        if !wait.is_zero() {
            std::thread::sleep(wait.min(Duration::from_millis(100)));
        }
    }
    if let Some(mut t) = truth {
        t.flush()?;
    }
    let (sent, failed) = transport.finish()?;
    summary.sent = sent;
    summary.failed = failed;
    summary.seconds = start.elapsed().as_secs_f64();
    progress.done();
    Ok(summary)
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

    fn tick(
        &mut self,
        elapsed: Duration,
        (sent, failed): (u64, u64),
        online: impl Fn() -> usize,
        users: usize,
        s: &Summary,
    ) {
        if self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
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
            "loadgen {bar}{sent:>10} sent {rate:>9.0}/s  errors {failed}  online {}/{users}  logins {} logouts {} vanished {} moves {}",
            online(), s.logins, s.logouts, s.vanished, s.moves
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

/// Advances one user at `now`, sending what it sends; returns when it acts next.
fn step(
    u: &mut User,
    index: usize,
    o: &Options,
    rng: &mut StdRng,
    now: Instant,
    s: &mut Summary,
    mut send: impl FnMut(&Heartbeat) -> bool,
) -> Instant {
    let mut emit = |session: &Session, kind: HeartbeatKind, s: &mut Summary| {
        let h = Heartbeat {
            session_id: session.id.clone(),
            user_id: format!("user-{index:07}"),
            facility_id: facility_id(session.facility),
            region_id: region_of(session.facility, o.regions),
            kind,
            client_sent_at: Some(now_ms()),
            client_version: None,
        };
        if send(&h) {
            s.sent += 1;
        } else {
            s.failed += 1;
        }
    };
    let jittered = |rng: &mut StdRng| o.beat_interval.mul_f64(rng.gen_range(0.9..1.1));
    match u.session.take() {
        None => {
            u.sessions_started += 1;
            let session = Session {
                id: format!("s{}-{index}-{}", o.seed, u.sessions_started),
                facility: u.home,
                ends_at: now + exp(rng, o.mean_session),
                moves_at: rng
                    .gen_bool(o.move_probability)
                    .then(|| now + exp(rng, o.mean_session / 2)),
                vanishes: rng.gen_bool(o.vanish_probability),
            };
            s.logins += 1;
            emit(&session, HeartbeatKind::Beat, s);
            u.session = Some(session);
            now + jittered(rng)
        }
        Some(mut session) if now >= session.ends_at => {
            if session.vanishes {
                s.vanished += 1;
            } else {
                s.logouts += 1;
                emit(&session, HeartbeatKind::End, s);
            }
            session.facility = u.home;
            now + exp(rng, o.mean_offline)
        }
        Some(mut session) => {
            if session.moves_at.is_some_and(|m| now >= m) && o.facilities > 1 {
                let from = session.facility - o.first_facility;
                session.facility = o.first_facility
                    + (from + 1 + rng.gen_range(0..o.facilities - 1)) % o.facilities;
                session.moves_at = None;
                s.moves += 1;
            }
            emit(&session, HeartbeatKind::Beat, s);
            let next = now + jittered(rng);
            let next = next.min(session.ends_at.max(now + Duration::from_millis(1)));
            u.session = Some(session);
            next
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run_steps(seed: u64) -> Vec<(String, String, HeartbeatKind)> {
        let o = Options {
            seed,
            mean_session: Duration::from_secs(60),
            mean_offline: Duration::from_secs(30),
            move_probability: 0.5,
            ..Options::default()
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let mut users: Vec<User> = (0..20)
            .map(|i| User {
                home: i / 4,
                session: None,
                sessions_started: 0,
            })
            .collect();
        let t0 = Instant::now();
        let mut due: BinaryHeap<Reverse<(Instant, usize)>> =
            (0..20).map(|i| Reverse((t0, i))).collect();
        let mut sent = Vec::new();
        let mut s = Summary::default();
        for _ in 0..2_000 {
            let Reverse((t, i)) = due.pop().unwrap();
            let next = step(&mut users[i], i, &o, &mut rng, t, &mut s, |h| {
                sent.push((h.session_id.clone(), h.facility_id.clone(), h.kind));
                true
            });
            due.push(Reverse((next, i)));
        }
        assert!(
            s.logins > 20 && s.logouts > 0 && s.vanished > 0 && s.moves > 0,
            "{s:?}"
        );
        sent
    }

    #[test]
    fn a_seed_replays_the_same_behaviour() {
        assert_eq!(run_steps(5), run_steps(5));
        assert_ne!(run_steps(5), run_steps(6));
    }

    #[test]
    fn sessions_end_with_end_or_silence_and_never_beat_after_end() {
        let sent = run_steps(7);
        let mut ended = std::collections::HashSet::new();
        for (session, _, kind) in &sent {
            assert!(!ended.contains(session), "beat after END for {session}");
            if *kind == HeartbeatKind::End {
                ended.insert(session.clone());
            }
        }
        assert!(!ended.is_empty());
    }
}
