//! The wire format against an independent implementation: Python's fastavro, given only the
//! `.avsc` files, decodes what we write and writes what we decode.

use presence_core::codec::{decode, encode};
use presence_core::records::{FacilityStatus, Heartbeat, HeartbeatKind, Status};
use presence_testkit::{fastavro, hex};
use serde_json::{json, Value};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn heartbeats() -> Vec<Heartbeat> {
    vec![
        Heartbeat {
            session_id: "sess-1".into(),
            user_id: "user-ü".into(),
            facility_id: "clinic-42".into(),
            region_id: "north".into(),
            kind: HeartbeatKind::Beat,
            client_sent_at: Some(1_764_300_000_123),
            client_version: Some("web-2.1".into()),
        },
        Heartbeat {
            session_id: "x".repeat(128),
            user_id: "u".into(),
            facility_id: "f".into(),
            region_id: "r".into(),
            kind: HeartbeatKind::End,
            client_sent_at: None,
            client_version: None,
        },
    ]
}

fn heartbeat_json(h: &Heartbeat) -> Value {
    json!({
        "session_id": h.session_id, "user_id": h.user_id, "facility_id": h.facility_id, "region_id": h.region_id,
        "kind": if h.kind == HeartbeatKind::End { "END" } else { "BEAT" }, "client_sent_at": h.client_sent_at,
        "client_version": h.client_version,
    })
}

#[test]
fn python_decodes_heartbeats_we_write() {
    let hs = heartbeats();
    let input: Vec<Value> = hs.iter().map(|h| json!({"hex": hex(&encode(h))})).collect();
    let decoded = fastavro("decode", "heartbeat.avsc", &input);
    let expected: Vec<Value> = hs.iter().map(heartbeat_json).collect();
    assert_eq!(decoded, expected);
}

#[test]
fn we_decode_heartbeats_python_writes() {
    let hs = heartbeats();
    let input: Vec<Value> = hs.iter().map(heartbeat_json).collect();
    let written = fastavro("encode", "heartbeat.avsc", &input);
    for (h, w) in hs.iter().zip(&written) {
        let bytes = unhex(w["hex"].as_str().unwrap());
        assert_eq!(bytes, encode(h), "byte-identical to ours");
        assert_eq!(&decode::<Heartbeat>(&bytes).unwrap(), h);
    }
}

#[test]
fn facility_status_crosses_both_ways() {
    let s = FacilityStatus {
        facility_id: "clinic-42".into(),
        region_id: "north".into(),
        status: Status::Offline,
        open_sessions: 0,
        since: 1_764_300_000_000,
        seq: 12,
        emitted_at: 1_764_300_000_210,
        previous_since: Some(1_764_299_000_000),
    };
    let as_json = json!({"facility_id": "clinic-42", "region_id": "north", "status": "OFFLINE", "open_sessions": 0,
        "since": 1_764_300_000_000i64, "seq": 12, "emitted_at": 1_764_300_000_210i64,
        "previous_since": 1_764_299_000_000i64});
    let decoded = fastavro(
        "decode",
        "facility_status.avsc",
        &[json!({"hex": hex(&encode(&s))})],
    );
    assert_eq!(decoded, vec![as_json.clone()]);
    let written = fastavro("encode", "facility_status.avsc", &[as_json]);
    let bytes = unhex(written[0]["hex"].as_str().unwrap());
    assert_eq!(decode::<FacilityStatus>(&bytes).unwrap(), s);
}
