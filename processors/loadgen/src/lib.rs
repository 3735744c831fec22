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
use presence_core::kafka::idempotent_producer_config;
use presence_core::records::{Heartbeat, HeartbeatKind};
use presence_core::sim::{facility_id, region_of};
use presence_core::{now_ms, Shutdown};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

#[derive(Debug, Clone)]
pub struct Options {
    pub facilities: usize,
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

#[derive(Default, Debug, Clone, Copy)]
pub struct Summary {
    pub sent: u64,
    pub failed: u64,
    pub logins: u64,
    pub logouts: u64,
    pub vanished: u64,
    pub moves: u64,
}

fn exp(rng: &mut StdRng, mean: Duration) -> Duration {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    mean.mul_f64(-u.ln()).min(mean * 10)
}


/// Runs the simulation against Kafka until `shutdown` or `options.duration`.
pub fn run_kafka(
    config: &Config,
    options: &Options,
    shutdown: &Shutdown,
) -> anyhow::Result<Summary> {
    let producer: ThreadedProducer<DefaultProducerContext> =
        idempotent_producer_config(&config.kafka, "loadgen")
            .set("linger.ms", "5")
            .create()?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let users = options.facilities * options.users_per_facility;
    let mut people: Vec<User> = (0..users)
        .map(|i| User {
            home: i / options.users_per_facility.max(1),
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
    let mut last_report = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut sent_at_report = 0u64;
    while !shutdown.is_triggered() && options.duration.is_none_or(|d| start.elapsed() < d) {
        let now = Instant::now();
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
                |h| send(&producer, &config.topics.heartbeats, h),
            );
            due.push(Reverse((next, i)));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            let rate = (summary.sent - sent_at_report) as f64 / last_report.elapsed().as_secs_f64();
            let online = people.iter().filter(|u| u.session.is_some()).count();
            let line = format!(
                "loadgen: {:>9} sent ({rate:>8.0}/s), {} failed, {online}/{users} users online, {} logins, {} logouts, {} vanished, {} moves",
                summary.sent, summary.failed, summary.logins, summary.logouts, summary.vanished, summary.moves
            );
            if tty {
                eprint!("\r{line}");
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{line}");
            }
            last_report = Instant::now();
            sent_at_report = summary.sent;
        }
        let wait = due
            .peek()
            .map_or(Duration::from_millis(100), |Reverse((t, _))| {
                t.saturating_duration_since(Instant::now())
            });
        std::thread::sleep(wait.min(Duration::from_millis(100)));
    }
    producer.flush(Duration::from_secs(30))?;
    if tty {
        eprintln!();
    }
    summary.failed += producer.in_flight_count().max(0) as u64;
    Ok(summary)
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
                session.facility =
                    (session.facility + 1 + rng.gen_range(0..o.facilities - 1)) % o.facilities;
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

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, h: &Heartbeat) -> bool {
    let bytes = encode(h);
    let mut record = BaseRecord::<[u8], [u8]>::to(topic)
        .key(h.session_id.as_bytes())
        .payload(&bytes[..]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match p.send(record) {
            Ok(()) => return true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if Instant::now() < deadline =>
            {
                record = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => {
                tracing::warn!(error = %e, "heartbeat not sent");
                return false;
            }
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
