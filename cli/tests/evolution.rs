//! Schema evolution end to end: every evolving record has a released v2 (a field added with a
//! default, `schemas/history/<record>/v2.avsc`). Old producers' heartbeats (v1) and upgraded
//! ones' (v2) share the input; the processor runs first pinned to write v1
//! (`PRESENCE_SCHEMA_WRITE_VERSIONS`, as during a rolling upgrade), is killed, restarts on
//! v2 and restores from the v1 changelogs and the v1 session events in flight, is killed
//! again, and finishes pinned to v1 once more (a roll-back) over v2 changelogs and events.
//! The whole `facility-status` topic, read to its end offsets, must equal the oracle's, and
//! each topic the processor writes must hold records of both versions, so every reader met
//! every version.
//!
//! What this cannot show: an old *binary* reading v2 records. That direction is proven
//! record by record against the older schemas with apache-avro
//! (`every_released_version_reads_the_current_records` in core's `records.rs`,
//! `internal_v1_and_v2_records_read_each_other` in the processor's).

// `serial()` holds a std mutex across awaits on purpose: each test owns its runtime, and the
// guard only keeps the heavy end-to-end tests of this binary from running at once.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use presence_core::codec::{
    encode, history_fingerprints, write_long, write_optional_long, write_str, AvroRecord, MARKER,
};
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind};
use presence_processor::records::{FacilityState, SessionEvent};
use presence_testkit::oracle::oracle;
use presence_testkit::sim::{generate, SimConfig};
use rdkafka::message::Message;
use support::*;

const TIMEOUT_MS: u64 = 3_005;

/// Every evolving record written as v1 (SessionState stays on its current v2: its v1 has no
/// owner, and restoring such records is `ownership.rs`'s subject).
const PIN_V1: &str = "Heartbeat=1,FacilityStatus=1,SessionEvent=1,FacilityState=1";

/// A heartbeat as a producer that only knows v1 writes it: v1's fingerprint and v1's body,
/// written here field by field from `schemas/history/heartbeat/v1.avsc`, not by the codec.
fn heartbeat_v1(h: &Heartbeat) -> Vec<u8> {
    static V1: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let v1 = V1.get_or_init(|| history_fingerprints::<Heartbeat>()[0]);
    let mut out = MARKER.to_vec();
    out.extend_from_slice(&v1.to_le_bytes());
    write_str(&mut out, &h.session_id);
    write_str(&mut out, &h.user_id);
    write_str(&mut out, &h.facility_id);
    write_str(&mut out, &h.region_id);
    write_long(&mut out, (h.kind == HeartbeatKind::End) as i64);
    write_optional_long(&mut out, h.client_sent_at);
    out
}

/// How many records of `topic` (read to its end offsets, tombstones left out) each
/// released version of `T` wrote: `[v1, v2, ...]`; a record of no released version fails.
fn versions_in<T: AvroRecord>(c: &presence_core::config::Config, topic: &str) -> Vec<usize> {
    let fps = history_fingerprints::<T>();
    let mut count = vec![0; fps.len()];
    for m in presence_testkit::read_to_end(c, topic, Duration::from_secs(60)) {
        let Some(v) = m.payload() else { continue };
        let fp = v
            .get(2..10)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes);
        let version = fp.and_then(|fp| fps.iter().position(|&f| f == fp));
        let Some(i) = version else {
            panic!(
                "{topic}/{}@{}: {} record of no released version",
                m.partition(),
                m.offset(),
                T::NAME
            )
        };
        count[i] += 1;
    }
    count
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_and_v2_records_through_an_upgrade_and_a_roll_back() {
    let _one = serial();
    let seed = test_seed();
    let started = Instant::now();
    let c = setup(TIMEOUT_MS).await;
    let _cleanup = Cleanup::new(&c);
    let log = generate(&SimConfig::compressed(
        seed,
        1_000,
        60,
        now_ms() - 6 * 3_600_000,
    ));
    let expected = oracle(&log, TIMEOUT_MS as i64);
    // The first half of the log as old clients send it (v1), the rest from upgraded ones (v2,
    // with the field v2 added).
    let half = log.len() / 2;
    let records: Vec<Encoded> = log
        .iter()
        .enumerate()
        .map(|(i, r)| Encoded {
            key: r.heartbeat.session_id.clone(),
            value: if i < half {
                heartbeat_v1(&r.heartbeat)
            } else {
                encode(&Heartbeat {
                    client_version: Some("web-2.0".into()),
                    ..r.heartbeat.clone()
                })
            },
            ts: r.ts,
            partition: None,
        })
        .collect();
    // The hand-written v1 bytes are what the codec reads as v1 (v2's field at its default).
    let first = &log[0].heartbeat;
    assert_eq!(
        presence_core::codec::decode::<Heartbeat>(&heartbeat_v1(first)),
        Ok(first.clone())
    );
    assert_ne!(heartbeat_v1(first)[2..10], encode(first)[2..10]);
    produce_encoded(&c, &records).await;
    let n = expected.len();
    eprintln!(
        "seed {seed}: {} heartbeats, {n} transitions expected",
        log.len()
    );
    let mut reader = StatusReader::new(&c);
    let fast = ("PRESENCE_PROCESSOR__COMMIT_INTERVAL", "20ms");
    let pinned = [("PRESENCE_SCHEMA_WRITE_VERSIONS", PIN_V1), fast];
    let current = [fast];
    // (what, environment, kill once the output has passed this many transitions). The
    // second kill leaves half the output to come: at two thirds, a restart that replayed
    // the rest in one burst had finished it before the kill landed (a CI dry run of e7b325a,
    // whose restores skip a watermark query).
    type Env<'a> = &'a [(&'a str, &'a str)];
    let phases: [(&str, Env, usize); 2] =
        [("pinned to v1", &pinned, n / 4), ("on v2", &current, n / 2)];
    let mut committed = 0;
    for (what, env, mark) in phases {
        let mut p = watched_processor(&c, "a", env);
        let progressed = reader.read_until(Duration::from_secs(120), |s| {
            s.len() > committed && s.len() >= mark
        });
        assert!(
            progressed,
            "seed {seed}, {what}: output stuck at {} (mark {mark}) for 120 s",
            reader.seen.len()
        );
        kill9(&mut p);
        committed = check_committed_at_kill(&c, &expected, &format!("seed {seed}, {what}"));
        eprintln!(
            "seed {seed}: {what} killed with {committed} of {n} transitions committed at {:?}",
            started.elapsed()
        );
    }
    let p = watched_processor(&c, "a", &pinned);
    finish(
        &c,
        &expected,
        reader,
        vec![p],
        &format!("seed {seed}, rolled back to v1"),
    );

    // Every topic the processor writes holds both versions: each phase wrote its own, and
    // each restore read the other's.
    for (topic, versions) in [
        (
            c.topics.facility_status.clone(),
            versions_in::<FacilityStatus>(&c, &c.topics.facility_status),
        ),
        (
            c.topics.session_transitions(),
            versions_in::<SessionEvent>(&c, &c.topics.session_transitions()),
        ),
        (
            c.topics.facilities_changelog(),
            versions_in::<FacilityState>(&c, &c.topics.facilities_changelog()),
        ),
    ] {
        assert!(
            versions.iter().all(|&k| k > 0),
            "seed {seed}: {topic} should hold records of every version, holds {versions:?}"
        );
    }
    // v2's FacilityStatus field: the facility's previous transition's event time.
    let since: HashMap<(String, i64), i64> = expected
        .iter()
        .map(|e| ((e.facility_id.clone(), e.seq), e.since))
        .collect();
    let v2 = history_fingerprints::<FacilityStatus>()[1];
    let mut checked: BTreeMap<bool, usize> = BTreeMap::new();
    for m in presence_testkit::read_to_end(&c, &c.topics.facility_status, Duration::from_secs(60)) {
        let bytes = m.payload().unwrap_or_default();
        if bytes.get(2..10) != Some(&v2.to_le_bytes()[..]) {
            continue;
        }
        let s: FacilityStatus = presence_core::codec::decode(bytes).expect("decodes");
        let want = since.get(&(s.facility_id.clone(), s.seq - 1)).copied();
        assert_eq!(
            s.previous_since, want,
            "seed {seed}: previous_since of {} seq {}",
            s.facility_id, s.seq
        );
        *checked.entry(want.is_some()).or_default() += 1;
    }
    assert!(
        checked.get(&true).is_some_and(|&k| k > 0),
        "seed {seed}: no v2 status with a previous transition was checked: {checked:?}"
    );
    eprintln!("seed {seed}: done in {:?}", started.elapsed());
}
