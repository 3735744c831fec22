//! Scale-out under live load: heartbeats are produced in real time while a second processor
//! instance joins the group (partitions move to it, their state restored from the
//! changelogs) and later stops (SIGTERM; its partitions move back). The whole
//! `facility-status` topic, read to its end offsets once both stages consumed everything,
//! must be the oracle's: nothing lost or doubled across either hand-over.
//!
//! Live records are stamped 2 s ahead of the wall clock (the processor allows 60 s), so
//! that a partition that is caught up never has its stream time pushed past a record that
//! is still on its way: every open and close then happens at a record's own timestamp or a
//! deadline, which the oracle can predict.

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::{Duration, Instant};

use presence_core::codec::encode;
use presence_core::records::{Heartbeat, HeartbeatKind};
use presence_testkit::oracle::{oracle_placed, OracleConfig, Placed};
use presence_testkit::sim::{facility_id, region_of, SimRecord};
use rand::{Rng, SeedableRng};
use support::*;

const TIMEOUT_MS: i64 = 3_000;
const AHEAD_MS: i64 = 2_000;
const PARTITIONS: i32 = 3;
/// How long the load runs; the second instance joins at a third and leaves at two thirds.
const LOAD: Duration = Duration::from_secs(36);

/// One live session: beats every 300 ms from `start` for `life`, then END or silence.
struct Live {
    id: String,
    user: String,
    facility: usize,
    partition: i32,
    start: Duration,
    life: Duration,
    ends: bool,
    next: Duration,
    done: bool,
}

async fn metric(ops: u16, name: &str) -> f64 {
    let Ok(page) = reqwest::get(format!("http://127.0.0.1:{ops}/metrics")).await else {
        return 0.0;
    };
    page.text()
        .await
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_joins_and_leaves_under_live_load() {
    let _one = serial();
    let seed = test_seed();
    let started = Instant::now();
    let c = setup(TIMEOUT_MS as u64).await;
    let _cleanup = Cleanup::new(&c);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sessions: Vec<Live> = (0..60)
        .map(|i| Live {
            id: format!("live-{seed}-{i}"),
            user: format!("user-{}", i % 17),
            facility: rng.gen_range(0..12),
            partition: rng.gen_range(0..PARTITIONS),
            start: Duration::from_millis(rng.gen_range(0..LOAD.as_millis() as u64 * 3 / 4)),
            life: Duration::from_millis(rng.gen_range(1_000..8_000)),
            ends: rng.gen_bool(0.5),
            next: Duration::ZERO,
            done: false,
        })
        .collect();
    for s in &mut sessions {
        s.next = s.start;
    }
    let reader = StatusReader::new(&c);
    let fast = ("PRESENCE_PROCESSOR__COMMIT_INTERVAL", "50ms");
    let a = watched_processor(&c, "a", &[fast]);
    // Ready before the load starts: a partition not yet restored is not caught up.
    let warm = Placed {
        partition: 0,
        record: SimRecord {
            ts: now_ms() + AHEAD_MS,
            heartbeat: beat("warm-up", "warm", 99, HeartbeatKind::End),
        },
        wall: None,
    };
    let mut log: Vec<Placed> = vec![warm.clone()];
    produce_encoded(&c, &[encoded(&warm)]).await;
    wait_consumed_to_end(&c, Duration::from_secs(60));

    let ops_b = presence_testkit::free_port();
    let listen_b = format!("127.0.0.1:{ops_b}");
    let mut b = None;
    let mut joined = false;
    let load_start = Instant::now();
    while load_start.elapsed() < LOAD {
        presence_testkit::check_processes();
        let t = load_start.elapsed();
        if !joined && t >= LOAD / 3 {
            joined = true;
            b = Some(watched_processor(
                &c,
                "b",
                &[fast, ("PRESENCE_PROCESSOR__OPS_LISTEN", &listen_b)],
            ));
            eprintln!("seed {seed}: b joins at {t:?}");
        }
        if t >= LOAD * 2 / 3 {
            if let Some(mut p) = b.take() {
                let processed = metric(ops_b, "presence_heartbeats_processed_total").await;
                assert!(
                    processed > 0.0,
                    "seed {seed}: b processed no heartbeat in its {:?}: it never got partitions",
                    LOAD / 3
                );
                terminate(&mut p);
                eprintln!("seed {seed}: b ({processed} heartbeats processed) leaves at {t:?}");
            }
        }
        let mut batch = Vec::new();
        for s in sessions.iter_mut().filter(|s| !s.done && s.next <= t) {
            let over = s.next >= s.start + s.life;
            if over {
                s.done = true;
                if !s.ends {
                    continue;
                }
            }
            let kind = if over {
                HeartbeatKind::End
            } else {
                HeartbeatKind::Beat
            };
            s.next += Duration::from_millis(300);
            batch.push(Placed {
                partition: s.partition,
                record: SimRecord {
                    ts: now_ms() + AHEAD_MS,
                    heartbeat: beat(&s.id, &s.user, s.facility, kind),
                },
                wall: None,
            });
        }
        if !batch.is_empty() {
            let records: Vec<Encoded> = batch.iter().map(encoded).collect();
            produce_encoded(&c, &records).await;
            log.extend(batch);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(joined && b.is_none(), "b has joined and left");
    let expected = oracle_placed(
        &log,
        &OracleConfig {
            timeout_ms: TIMEOUT_MS,
            flap_hold_ms: 0,
            reject_after: i64::MAX,
            max_future_ms: i64::MAX,
        },
    );
    eprintln!(
        "seed {seed}: {} heartbeats live, {} transitions expected",
        log.len(),
        expected.len()
    );
    // Every session closes at its deadline, at most a timeout and the lead after the load.
    finish(&c, &expected, reader, vec![a], &format!("seed {seed}"));
    eprintln!("seed {seed}: done in {:?}", started.elapsed());
}

fn beat(session: &str, user: &str, facility: usize, kind: HeartbeatKind) -> Heartbeat {
    Heartbeat {
        session_id: session.into(),
        user_id: user.into(),
        facility_id: facility_id(facility),
        region_id: region_of(facility, 3),
        kind,
        client_sent_at: None,
        client_version: None,
    }
}

fn encoded(p: &Placed) -> Encoded {
    Encoded {
        key: p.record.heartbeat.session_id.clone(),
        value: encode(&p.record.heartbeat),
        ts: p.record.ts,
        partition: Some(p.partition),
    }
}
