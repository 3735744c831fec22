//! The internal records (`schemas/internal/*.avsc`: stage 1 → stage 2 events and both
//! changelogs) checked against their schema files with another implementation, apache-avro,
//! as the public records are: what our codec writes, apache-avro's generic reader decodes
//! with the `.avsc` alone, field by field; what apache-avro writes from the `.avsc`, our
//! codec reads back as the same record. The schema is read from the file here, not from
//! the codec, so a struct that drifts from its file fails.

use apache_avro::types::Value;
use apache_avro::Schema;
use presence_core::codec::{decode, encode, AvroRecord};
use presence_processor::records::{
    CloseReason, FacilityState, SessionEvent, SessionEventKind, SessionMark, SessionState,
};
use presence_testkit::repo_root;
use proptest::prelude::*;

/// Single-object header: two marker bytes and the 8-byte fingerprint.
const HEADER: usize = 10;

fn schema_file(name: &str) -> Schema {
    let path = repo_root().join("schemas/internal").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Schema::parse_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Our bytes decoded by apache-avro against the file, and apache-avro's bytes of `expected`
/// (written against the file) decoded by our codec.
fn check<T>(file: &str, ours: &T, expected: Value)
where
    T: AvroRecord + PartialEq + std::fmt::Debug + 'static,
{
    let schema = schema_file(file);
    let bytes = encode(ours);
    let theirs = apache_avro::from_avro_datum(&schema, &mut &bytes[HEADER..], None)
        .unwrap_or_else(|e| panic!("apache-avro cannot read our {file} bytes: {e}"));
    assert_eq!(
        theirs, expected,
        "apache-avro reads our {file} bytes differently"
    );

    let resolved = expected
        .clone()
        .resolve(&schema)
        .unwrap_or_else(|e| panic!("{expected:?} is not a value of {file}: {e}"));
    let mut framed = bytes[..HEADER].to_vec();
    framed.extend(
        apache_avro::to_avro_datum(&schema, resolved)
            .unwrap_or_else(|e| panic!("apache-avro cannot write {file}: {e}")),
    );
    assert_eq!(&framed, &bytes, "apache-avro writes {file} differently");
    assert_eq!(
        &decode::<T>(&framed).expect("our codec reads apache-avro's bytes"),
        ours
    );
}

fn session_event_value(e: &SessionEvent) -> Value {
    let (index, symbol) = match e.kind {
        SessionEventKind::Opened => (0, "OPENED"),
        SessionEventKind::Closed => (1, "CLOSED"),
        SessionEventKind::Watermark => (2, "WATERMARK"),
    };
    Value::Record(vec![
        ("kind".into(), Value::Enum(index, symbol.into())),
        ("source_partition".into(), Value::Int(e.source_partition)),
        ("source_seq".into(), Value::Long(e.source_seq)),
        ("at".into(), Value::TimestampMillis(e.at)),
        ("facility_id".into(), Value::String(e.facility_id.clone())),
        ("region_id".into(), Value::String(e.region_id.clone())),
        (
            "close_reason".into(),
            match e.close_reason {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(r) => {
                    let (i, symbol) = match r {
                        CloseReason::End => (0, "END"),
                        CloseReason::Timeout => (1, "TIMEOUT"),
                        CloseReason::Moved => (2, "MOVED"),
                    };
                    Value::Union(1, Box::new(Value::Enum(i, symbol.into())))
                }
            },
        ),
    ])
}

fn session_state_value(s: &SessionState) -> Value {
    Value::Record(vec![
        ("session_id".into(), Value::String(s.session_id.clone())),
        ("facility_id".into(), Value::String(s.facility_id.clone())),
        ("region_id".into(), Value::String(s.region_id.clone())),
        ("last_seen".into(), Value::TimestampMillis(s.last_seen)),
        ("open_offset".into(), Value::Long(s.open_offset)),
        ("user_id".into(), Value::String(s.user_id.clone())),
    ])
}

fn facility_state_value(f: &FacilityState) -> Value {
    Value::Record(vec![
        ("facility_id".into(), Value::String(f.facility_id.clone())),
        ("region_id".into(), Value::String(f.region_id.clone())),
        ("open_sessions".into(), Value::Int(f.open_sessions)),
        ("online".into(), Value::Boolean(f.online)),
        ("seq".into(), Value::Long(f.seq)),
        ("since".into(), Value::TimestampMillis(f.since)),
        (
            "pending_offline_since".into(),
            match f.pending_offline_since {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(t) => Value::Union(1, Box::new(Value::TimestampMillis(t))),
            },
        ),
        (
            "last_event_at".into(),
            match f.last_event_at {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(t) => Value::Union(1, Box::new(Value::TimestampMillis(t))),
            },
        ),
    ])
}

fn close_reason() -> impl Strategy<Value = Option<CloseReason>> {
    proptest::option::of(prop_oneof![
        Just(CloseReason::End),
        Just(CloseReason::Timeout),
        Just(CloseReason::Moved),
    ])
}

fn kind() -> impl Strategy<Value = SessionEventKind> {
    prop_oneof![
        Just(SessionEventKind::Opened),
        Just(SessionEventKind::Closed),
        Just(SessionEventKind::Watermark),
    ]
}

// 256 cases each (proptest's default). Text includes any Unicode; numbers span their types.
proptest! {
    #[test]
    fn session_events_match_their_schema_file(kind in kind(), source_partition in any::<i32>(), source_seq in any::<i64>(), at in any::<i64>(), facility_id in ".{0,40}", region_id in ".{0,20}", close_reason in close_reason()) {
        let e = SessionEvent { kind, source_partition, source_seq, at, facility_id, region_id, close_reason };
        check("session_event.avsc", &e, session_event_value(&e));
    }

    #[test]
    fn session_states_match_their_schema_file(session_id in ".{0,40}", user_id in ".{0,40}", facility_id in ".{0,40}", region_id in ".{0,20}", last_seen in any::<i64>(), open_offset in any::<i64>()) {
        let s = SessionState { session_id, user_id, facility_id, region_id, last_seen, open_offset };
        check("session_state.avsc", &s, session_state_value(&s));
    }

    #[test]
    fn facility_states_match_their_schema_file(facility_id in ".{0,40}", region_id in ".{0,20}", open_sessions in any::<i32>(), online in any::<bool>(), seq in any::<i64>(), since in any::<i64>(), pending in proptest::option::of(any::<i64>()), last_event_at in proptest::option::of(any::<i64>())) {
        let f = FacilityState { facility_id, region_id, open_sessions, online, seq, since, pending_offline_since: pending, last_event_at };
        check("facility_state.avsc", &f, facility_state_value(&f));
    }

    #[test]
    fn session_marks_match_their_schema_file(last_seen in any::<i64>(), offset in any::<i64>()) {
        let m = SessionMark { last_seen, offset };
        let expected = Value::Record(vec![
            ("last_seen".into(), Value::TimestampMillis(last_seen)),
            ("offset".into(), Value::Long(offset)),
        ]);
        check("session_mark.avsc", &m, expected);
    }
}

/// The codec's schema for each record is the file's (the same canonical form), so that the
/// fingerprint in every header names the file.
#[test]
fn each_codec_uses_its_schema_file() {
    for (file, ours) in [
        ("session_event.avsc", SessionEvent::SCHEMA),
        ("session_state.avsc", SessionState::SCHEMA),
        ("facility_state.avsc", FacilityState::SCHEMA),
        ("session_mark.avsc", SessionMark::SCHEMA),
    ] {
        let ours = Schema::parse_str(ours).expect("our schema parses");
        assert_eq!(
            ours.canonical_form(),
            schema_file(file).canonical_form(),
            "{file}"
        );
    }
}
