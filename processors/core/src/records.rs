//! The public records (`schemas/*.avsc`) as Rust types, with their hand-written body codecs
//! and field rules; and [`SessionState`], the one internal record that two processes read
//! (the processor's sessions changelog, followed by the sink).

use serde::{Deserialize, Serialize};

use crate::codec::{
    check_id, write_long, write_optional_long, write_optional_str, write_str, AvroRecord,
    BodyReader, CodecError,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HeartbeatKind {
    /// Sent every 30 s while the user is logged in.
    Beat,
    /// Sent on logout or page unload: closes the session at once.
    End,
}

impl HeartbeatKind {
    /// The Avro enum symbol, also the JSON the gateway takes.
    pub fn as_str(self) -> &'static str {
        match self {
            HeartbeatKind::Beat => "BEAT",
            HeartbeatKind::End => "END",
        }
    }
}

/// A sign of life of one session. Its event time is the Kafka record timestamp, not a field.
/// Its serde form is the gateway's JSON (`kind` as `"BEAT"`/`"END"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub session_id: String,
    pub user_id: String,
    pub facility_id: String,
    pub region_id: String,
    pub kind: HeartbeatKind,
    /// The client's clock in ms since the epoch, for diagnostics only.
    pub client_sent_at: Option<i64>,
    /// The client application's version, for diagnostics only (schema v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_version: Option<String>,
}

impl AvroRecord for Heartbeat {
    const NAME: &'static str = "Heartbeat";
    const SCHEMA: &'static str = include_str!("../../../schemas/heartbeat.avsc");
    const HISTORY: &'static [&'static str] = &[
        include_str!("../../../schemas/history/heartbeat/v1.avsc"),
        include_str!("../../../schemas/history/heartbeat/v2.avsc"),
    ];

    crate::codec_cell!();

    fn write_body(&self, out: &mut Vec<u8>) {
        write_str(out, &self.session_id);
        write_str(out, &self.user_id);
        write_str(out, &self.facility_id);
        write_str(out, &self.region_id);
        write_long(out, matches!(self.kind, HeartbeatKind::End) as i64);
        write_optional_long(out, self.client_sent_at);
        write_optional_str(out, self.client_version.as_deref());
    }

    fn read_body(r: &mut BodyReader<'_>) -> Result<Self, CodecError> {
        HeartbeatRef::read(r).map(|h| h.to_owned())
    }

    fn validate(&self) -> Result<(), CodecError> {
        self.as_ref().validate()
    }
}

/// A heartbeat borrowed from its bytes: the processor's hot path, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatRef<'a> {
    pub session_id: &'a str,
    pub user_id: &'a str,
    pub facility_id: &'a str,
    pub region_id: &'a str,
    pub kind: HeartbeatKind,
    pub client_sent_at: Option<i64>,
    pub client_version: Option<&'a str>,
}

impl<'a> HeartbeatRef<'a> {
    /// Decodes and validates bytes of the current schema version without copying; `None`
    /// for an older released version, which [`crate::codec::decode`] resolves.
    pub fn decode(bytes: &'a [u8]) -> Result<Option<HeartbeatRef<'a>>, CodecError> {
        Self::decode_framed(bytes, &crate::codec::NoRegistry)
    }

    /// [`HeartbeatRef::decode`] for either framing (`ids` resolves registry ids).
    pub fn decode_framed(
        bytes: &'a [u8],
        ids: &dyn crate::codec::RegistryIds,
    ) -> Result<Option<HeartbeatRef<'a>>, CodecError> {
        let Some(body) = crate::codec::current_body_framed::<Heartbeat>(bytes, ids)? else {
            return Ok(None);
        };
        let mut r = BodyReader::new(body, Heartbeat::NAME);
        let h = Self::read(&mut r)?;
        r.finish()?;
        h.validate()?;
        Ok(Some(h))
    }

    /// Any released version: borrowed when it is the current one, otherwise resolved into
    /// `slot` and borrowed from there.
    pub fn decode_any(
        bytes: &'a [u8],
        slot: &'a mut Option<Heartbeat>,
    ) -> Result<HeartbeatRef<'a>, CodecError> {
        Self::decode_any_framed(bytes, slot, &crate::codec::NoRegistry)
    }

    /// [`HeartbeatRef::decode_any`] for either framing (`ids` resolves registry ids).
    pub fn decode_any_framed(
        bytes: &'a [u8],
        slot: &'a mut Option<Heartbeat>,
        ids: &dyn crate::codec::RegistryIds,
    ) -> Result<HeartbeatRef<'a>, CodecError> {
        match Self::decode_framed(bytes, ids)? {
            Some(h) => Ok(h),
            None => Ok(slot
                .insert(crate::codec::decode_framed::<Heartbeat>(bytes, ids)?)
                .as_ref()),
        }
    }

    /// The body of the current schema version, field by field.
    fn read(r: &mut BodyReader<'a>) -> Result<HeartbeatRef<'a>, CodecError> {
        Ok(HeartbeatRef {
            session_id: r.read_str("session_id")?,
            user_id: r.read_str("user_id")?,
            facility_id: r.read_str("facility_id")?,
            region_id: r.read_str("region_id")?,
            kind: if r.read_enum("kind", 2)? == 0 {
                HeartbeatKind::Beat
            } else {
                HeartbeatKind::End
            },
            client_sent_at: r.read_optional_long("client_sent_at")?,
            client_version: r.read_optional_str("client_version")?,
        })
    }

    /// Every id is 1 to 128 bytes without control characters.
    pub fn validate(&self) -> Result<(), CodecError> {
        check_id(Heartbeat::NAME, "session_id", self.session_id)?;
        check_id(Heartbeat::NAME, "user_id", self.user_id)?;
        check_id(Heartbeat::NAME, "facility_id", self.facility_id)?;
        check_id(Heartbeat::NAME, "region_id", self.region_id)?;
        match self.client_version {
            Some(v) => check_id(Heartbeat::NAME, "client_version", v),
            None => Ok(()),
        }
    }

    pub fn to_owned(&self) -> Heartbeat {
        Heartbeat {
            session_id: self.session_id.to_string(),
            user_id: self.user_id.to_string(),
            facility_id: self.facility_id.to_string(),
            region_id: self.region_id.to_string(),
            kind: self.kind,
            client_sent_at: self.client_sent_at,
            client_version: self.client_version.map(str::to_string),
        }
    }
}

impl Heartbeat {
    pub fn as_ref(&self) -> HeartbeatRef<'_> {
        HeartbeatRef {
            session_id: &self.session_id,
            user_id: &self.user_id,
            facility_id: &self.facility_id,
            region_id: &self.region_id,
            kind: self.kind,
            client_sent_at: self.client_sent_at,
            client_version: self.client_version.as_deref(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Online,
    Offline,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "ONLINE",
            Status::Offline => "OFFLINE",
        }
    }
}

/// One ONLINE/OFFLINE transition; the value of `facility-status`, keyed by facility id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityStatus {
    pub facility_id: String,
    pub region_id: String,
    pub status: Status,
    pub open_sessions: i32,
    /// Event time of the transition, ms since the epoch.
    pub since: i64,
    /// 1 for a facility's first transition, then +1 per transition.
    pub seq: i64,
    /// Wall-clock ms when the processor emitted it.
    pub emitted_at: i64,
    /// Event time of the facility's previous transition; `None` for its first (and in
    /// records written with schema v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_since: Option<i64>,
}

impl AvroRecord for FacilityStatus {
    const NAME: &'static str = "FacilityStatus";
    const SCHEMA: &'static str = include_str!("../../../schemas/facility_status.avsc");
    const HISTORY: &'static [&'static str] = &[
        include_str!("../../../schemas/history/facility_status/v1.avsc"),
        include_str!("../../../schemas/history/facility_status/v2.avsc"),
    ];

    crate::codec_cell!();

    fn write_body(&self, out: &mut Vec<u8>) {
        write_str(out, &self.facility_id);
        write_str(out, &self.region_id);
        write_long(out, matches!(self.status, Status::Offline) as i64);
        write_long(out, self.open_sessions as i64);
        write_long(out, self.since);
        write_long(out, self.seq);
        write_long(out, self.emitted_at);
        write_optional_long(out, self.previous_since);
    }

    fn read_body(r: &mut BodyReader<'_>) -> Result<Self, CodecError> {
        Ok(FacilityStatus {
            facility_id: r.read_string("facility_id")?,
            region_id: r.read_string("region_id")?,
            status: if r.read_enum("status", 2)? == 0 {
                Status::Online
            } else {
                Status::Offline
            },
            open_sessions: r.read_int("open_sessions")?,
            since: r.read_long("since")?,
            seq: r.read_long("seq")?,
            emitted_at: r.read_long("emitted_at")?,
            previous_since: r.read_optional_long("previous_since")?,
        })
    }

    fn validate(&self) -> Result<(), CodecError> {
        check_id(Self::NAME, "facility_id", &self.facility_id)?;
        check_id(Self::NAME, "region_id", &self.region_id)?;
        let invalid = |field, rule: &str| {
            Err(CodecError::InvalidField {
                record: Self::NAME,
                field,
                rule: rule.into(),
            })
        };
        if self.seq < 1 {
            return invalid("seq", "must be at least 1");
        }
        match self.status {
            Status::Online if self.open_sessions < 1 => {
                invalid("open_sessions", "must be at least 1 when ONLINE")
            }
            Status::Offline if self.open_sessions != 0 => {
                invalid("open_sessions", "must be 0 when OFFLINE")
            }
            _ => Ok(()),
        }
    }
}

/// The byte that follows a session's 16-byte key in the sessions changelog key of its mark:
/// stage 1's note of a quiet session's last-seen (`schemas/internal/session_mark.avsc`),
/// kept beside the session's record. Readers of the changelog that want the open sessions
/// skip these keys ([`is_session_mark_key`]).
pub const SESSION_MARK_TAG: u8 = b'Q';

/// Whether a sessions changelog key is a session mark's, not a session's.
pub fn is_session_mark_key(key: &[u8]) -> bool {
    key.len() == 17 && key[16] == SESSION_MARK_TAG
}

/// Stage-1 changelog value (`schemas/internal/session_state.avsc`), an internal record: the
/// processor writes it when a session opens or moves, and the sink reads it back to know who
/// is online (in the changelog `last_seen` is the event time of the beat that opened the
/// session or moved it, as the changelog is not written per beat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    pub session_id: String,
    /// The session's owner; empty in records of schema v1 (written before sessions had one).
    pub user_id: String,
    pub facility_id: String,
    pub region_id: String,
    pub last_seen: i64,
    pub open_offset: i64,
}

impl AvroRecord for SessionState {
    const NAME: &'static str = "SessionState";
    const SCHEMA: &'static str = include_str!("../../../schemas/internal/session_state.avsc");
    const HISTORY: &'static [&'static str] = &[
        include_str!("../../../schemas/history/session_state/v1.avsc"),
        include_str!("../../../schemas/history/session_state/v2.avsc"),
    ];

    crate::codec_cell!();

    fn write_body(&self, out: &mut Vec<u8>) {
        write_str(out, &self.session_id);
        write_str(out, &self.facility_id);
        write_str(out, &self.region_id);
        write_long(out, self.last_seen);
        write_long(out, self.open_offset);
        write_str(out, &self.user_id);
    }

    fn read_body(r: &mut BodyReader<'_>) -> Result<Self, CodecError> {
        Ok(SessionState {
            session_id: r.read_string("session_id")?,
            facility_id: r.read_string("facility_id")?,
            region_id: r.read_string("region_id")?,
            last_seen: r.read_long("last_seen")?,
            open_offset: r.read_long("open_offset")?,
            user_id: r.read_string("user_id")?,
        })
    }
}

/// A [`SessionState`] borrowed from its bytes: a restore reads one per open session, ten
/// million of them for ten million sessions, and copies none of their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionStateRef<'a> {
    pub session_id: &'a str,
    pub user_id: &'a str,
    pub facility_id: &'a str,
    pub region_id: &'a str,
    pub last_seen: i64,
    pub open_offset: i64,
}

impl<'a> SessionStateRef<'a> {
    /// Decodes bytes of the current schema version without copying; `None` for an older
    /// released version, which [`crate::codec::decode`] resolves.
    pub fn decode(bytes: &'a [u8]) -> Result<Option<SessionStateRef<'a>>, CodecError> {
        let Some(body) =
            crate::codec::current_body_framed::<SessionState>(bytes, &crate::codec::NoRegistry)?
        else {
            return Ok(None);
        };
        let mut r = BodyReader::new(body, SessionState::NAME);
        let state = SessionStateRef {
            session_id: r.read_str("session_id")?,
            facility_id: r.read_str("facility_id")?,
            region_id: r.read_str("region_id")?,
            last_seen: r.read_long("last_seen")?,
            open_offset: r.read_long("open_offset")?,
            user_id: r.read_str("user_id")?,
        };
        r.finish()?;
        Ok(Some(state))
    }
}

impl SessionState {
    pub fn borrowed(&self) -> SessionStateRef<'_> {
        SessionStateRef {
            session_id: &self.session_id,
            user_id: &self.user_id,
            facility_id: &self.facility_id,
            region_id: &self.region_id,
            last_seen: self.last_seen,
            open_offset: self.open_offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{codec, decode, encode, fingerprint_of, MARKER};
    use apache_avro::schema_compatibility::SchemaCompatibility;
    use apache_avro::types::Value;
    use apache_avro::Schema;
    use proptest::prelude::*;

    fn beat() -> Heartbeat {
        Heartbeat {
            session_id: "s-1".into(),
            user_id: "u-1".into(),
            facility_id: "f-1".into(),
            region_id: "r-1".into(),
            kind: HeartbeatKind::Beat,
            client_sent_at: Some(1_700_000_000_123),
            client_version: None,
        }
    }

    fn status() -> FacilityStatus {
        FacilityStatus {
            facility_id: "f-1".into(),
            region_id: "r-1".into(),
            status: Status::Online,
            open_sessions: 3,
            since: 1_700_000_000_000,
            seq: 7,
            emitted_at: 1_700_000_000_050,
            previous_since: None,
        }
    }

    /// The reference implementation's bytes for the same heartbeat.
    fn generic_heartbeat_bytes(h: &Heartbeat) -> Vec<u8> {
        let schema = codec::<Heartbeat>().schema();
        let value = Value::Record(vec![
            ("session_id".into(), Value::String(h.session_id.clone())),
            ("user_id".into(), Value::String(h.user_id.clone())),
            ("facility_id".into(), Value::String(h.facility_id.clone())),
            ("region_id".into(), Value::String(h.region_id.clone())),
            (
                "kind".into(),
                Value::Enum(
                    matches!(h.kind, HeartbeatKind::End) as u32,
                    format!("{:?}", h.kind).to_uppercase(),
                ),
            ),
            (
                "client_sent_at".into(),
                match h.client_sent_at {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(t) => Value::Union(1, Box::new(Value::TimestampMillis(t))),
                },
            ),
            (
                "client_version".into(),
                match &h.client_version {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(v) => Value::Union(1, Box::new(Value::String(v.clone()))),
                },
            ),
        ]);
        let mut w = apache_avro::GenericSingleObjectWriter::new_with_capacity(schema, 128).unwrap();
        let mut out = Vec::new();
        w.write_value(value, &mut out).unwrap();
        out
    }

    #[test]
    fn heartbeat_bytes_equal_the_reference_implementation() {
        // Bodies only: apache-avro's header carries its own fingerprint, which differs from
        // the specification's for logical types (see codec::canonical_form).
        for h in [
            beat(),
            Heartbeat {
                kind: HeartbeatKind::End,
                client_sent_at: None,
                client_version: None,
                ..beat()
            },
            Heartbeat {
                client_version: Some("web-2.1".into()),
                ..beat()
            },
        ] {
            let theirs = generic_heartbeat_bytes(&h);
            let ours = encode(&h);
            assert_eq!(ours[10..], theirs[10..]);
            assert_eq!(ours[..2], theirs[..2]);
        }
    }

    #[test]
    fn facility_status_round_trips_and_matches_generic_decode() {
        let s = status();
        let bytes = encode(&s);
        assert_eq!(decode::<FacilityStatus>(&bytes).unwrap(), s);
        let schema = codec::<FacilityStatus>().schema();
        let v = apache_avro::from_avro_datum(schema, &mut &bytes[10..], None).unwrap();
        let Value::Record(fields) = v else {
            panic!("not a record")
        };
        assert_eq!(fields[2].1, Value::Enum(0, "ONLINE".into()));
        assert_eq!(fields[5].1, Value::Long(7));
    }

    #[test]
    fn header_errors_are_typed() {
        let bytes = encode(&beat());
        assert_eq!(
            decode::<Heartbeat>(&bytes[..5]),
            Err(CodecError::TooShort { len: 5 })
        );
        let mut bad = bytes.clone();
        bad[0] = 0;
        assert!(matches!(
            decode::<Heartbeat>(&bad),
            Err(CodecError::BadMarker { .. })
        ));
        let mut other = bytes.clone();
        other[2] ^= 0xff;
        let e = decode::<Heartbeat>(&other).unwrap_err();
        assert_eq!(e.code(), "unknown_schema");
        // A FacilityStatus is not a Heartbeat: its fingerprint is unknown to the heartbeat codec.
        assert_eq!(
            decode::<Heartbeat>(&encode(&status())).unwrap_err().code(),
            "unknown_schema"
        );
    }

    #[test]
    fn body_errors_are_typed() {
        let bytes = encode(&beat());
        let truncated = &bytes[..bytes.len() - 2];
        assert_eq!(
            decode::<Heartbeat>(truncated).unwrap_err().code(),
            "malformed"
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        let e = decode::<Heartbeat>(&trailing).unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
        let mut bad_enum = encode(&Heartbeat {
            client_sent_at: None,
            client_version: None,
            ..beat()
        });
        let kind_at = bad_enum.len() - 3; // kind, client_sent_at's null, client_version's null
        bad_enum[kind_at] = 4; // zigzag 2: a third symbol that does not exist
        assert!(decode::<Heartbeat>(&bad_enum)
            .unwrap_err()
            .to_string()
            .contains("enum index 2"));
        let mut bad_utf8 = encode(&beat());
        bad_utf8[11] = 0xff; // first byte of session_id
        assert!(decode::<Heartbeat>(&bad_utf8)
            .unwrap_err()
            .to_string()
            .contains("UTF-8"));
    }

    #[test]
    fn the_borrowed_reader_agrees_with_the_owned_one() {
        for h in [
            beat(),
            Heartbeat {
                kind: HeartbeatKind::End,
                client_sent_at: None,
                client_version: None,
                ..beat()
            },
        ] {
            let bytes = encode(&h);
            assert_eq!(HeartbeatRef::decode(&bytes).unwrap(), Some(h.as_ref()));
        }
        let bad = encode(&Heartbeat {
            region_id: "a\u{7}".into(),
            ..beat()
        });
        assert_eq!(
            HeartbeatRef::decode(&bad).unwrap_err().code(),
            "invalid_field"
        );
        let mut trailing = encode(&beat());
        trailing.push(1);
        assert_eq!(
            HeartbeatRef::decode(&trailing).unwrap_err().code(),
            "malformed"
        );
    }

    #[test]
    fn field_rules_are_enforced_on_decode() {
        let h = Heartbeat {
            facility_id: String::new(),
            ..beat()
        };
        let e = decode::<Heartbeat>(&encode(&h)).unwrap_err();
        assert_eq!(e.to_string(), "Heartbeat.facility_id: must not be empty");
        let s = FacilityStatus {
            open_sessions: 0,
            ..status()
        };
        assert_eq!(
            decode::<FacilityStatus>(&encode(&s)).unwrap_err().code(),
            "invalid_field"
        );
    }

    // 256 cases each (proptest's default).
    proptest! {
        /// Every public decoder (the owned one, stage 1's zero-copy one) on the body alone
        /// and behind each record type's header.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = MARKER.to_vec();
            bytes.extend_from_slice(&codec::<Heartbeat>().fingerprint().to_le_bytes());
            bytes.extend_from_slice(&body);
            let _ = decode::<Heartbeat>(&bytes);
            let _ = decode::<FacilityStatus>(&body);
            for b in [&bytes, &body] {
                let mut slot = None;
                let _ = HeartbeatRef::decode_any(b, &mut slot);
            }
            let mut status = MARKER.to_vec();
            status.extend_from_slice(&codec::<FacilityStatus>().fingerprint().to_le_bytes());
            status.extend_from_slice(&body);
            let _ = decode::<FacilityStatus>(&status);
        }

        /// A valid heartbeat's bytes, cut short or with one byte replaced: the owned and the
        /// zero-copy decoder never panic and agree on what they read.
        #[test]
        fn damaged_heartbeats_never_panic(s in "[a-z0-9-]{1,20}", t in any::<Option<i64>>(), at in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()) {
            let h = Heartbeat { session_id: s.clone(), user_id: s.clone(), facility_id: s.clone(), region_id: s,
                kind: HeartbeatKind::End, client_sent_at: t, client_version: None };
            let mut bytes = encode(&h);
            let at = at % bytes.len();
            if cut { bytes.truncate(at) } else { bytes[at] = byte }
            let mut slot = None;
            let borrowed = HeartbeatRef::decode_any(&bytes, &mut slot).map(|r| r.to_owned());
            prop_assert_eq!(borrowed, decode::<Heartbeat>(&bytes));
        }

        #[test]
        fn any_valid_heartbeat_round_trips(s in "[a-z0-9-]{1,40}", f in "[^\\p{Cc}]{1,30}", end in any::<bool>(), t in any::<Option<i64>>()) {
            let h = Heartbeat { session_id: s.clone(), user_id: s, facility_id: f.clone(), region_id: f,
                kind: if end { HeartbeatKind::End } else { HeartbeatKind::Beat }, client_sent_at: t, client_version: None };
            prop_assert_eq!(decode::<Heartbeat>(&encode(&h)).unwrap(), h);
        }
    }

    fn history_dir(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../schemas/history")
            .join(name)
    }

    #[test]
    fn schema_history_is_complete_and_full_transitive() {
        crate::codec::verify_history::<Heartbeat>(&history_dir("heartbeat")).unwrap();
        crate::codec::verify_history::<FacilityStatus>(&history_dir("facility_status")).unwrap();
    }

    /// A `doc` is not part of a schema's identity (the Parsing Canonical Form drops it):
    /// heartbeat.avsc documented the session-ownership rule on `user_id` with no new
    /// version, and its records kept v1's fingerprint; v2 added a field, which is one.
    #[test]
    fn a_doc_change_is_not_a_new_version() {
        let v1 = Heartbeat::HISTORY[0];
        let redocumented = v1.replace("Opaque session id", "An opaque session id");
        assert_ne!(redocumented, v1, "the docs differ");
        assert!(Heartbeat::SCHEMA.contains("A session is the pair (user_id, session_id)"));
        let fp = |text: &str| fingerprint_of(&Schema::parse_str(text).unwrap());
        assert_eq!(fp(&redocumented), fp(v1));
        assert_ne!(fp(Heartbeat::SCHEMA), fp(v1), "v2 added client_version");
        assert_eq!(fp(Heartbeat::SCHEMA), fp(Heartbeat::HISTORY[1]));
    }

    /// A record written with every released version decodes with the current reader, with
    /// its unions on the null branch and on the other one.
    #[test]
    fn every_released_version_still_decodes() {
        for branch in [0, 1] {
            for text in Heartbeat::HISTORY {
                let writer = Schema::parse_str(text).unwrap();
                let bytes = single_object(&writer, &sample_value(&writer, branch));
                let h = decode::<Heartbeat>(&bytes).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(h.session_id, "sample");
                assert_eq!(h.client_sent_at, (branch == 1).then_some(1));
                let has_version = writer.canonical_form().contains("client_version");
                assert_eq!(
                    h.client_version.as_deref(),
                    (branch == 1 && has_version).then_some("sample")
                );
            }
            for text in FacilityStatus::HISTORY {
                let writer = Schema::parse_str(text).unwrap();
                let bytes = single_object(&writer, &sample_value(&writer, branch));
                let s = decode::<FacilityStatus>(&bytes).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(s.facility_id, "sample");
                let has_previous = writer.canonical_form().contains("previous_since");
                assert_eq!(s.previous_since, (branch == 1 && has_previous).then_some(1));
            }
        }
    }

    /// FULL compatibility the other way: what the current version writes, every older
    /// released version reads (an old consumer, or a processor rolled back), with the
    /// fields it knows unchanged.
    #[test]
    fn every_released_version_reads_the_current_records() {
        use apache_avro::types::Value;
        let h = Heartbeat {
            client_version: Some("web-2.1".into()),
            ..beat()
        };
        let s = FacilityStatus {
            previous_since: Some(1_699_999_000_000),
            ..status()
        };
        let field = |v: &Value, name: &str| -> Value {
            let Value::Record(fields) = v else {
                panic!("not a record: {v:?}")
            };
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no field {name}"))
        };
        let current = |text: &str| Schema::parse_str(text).unwrap();
        for text in Heartbeat::HISTORY {
            let reader = Schema::parse_str(text).unwrap();
            let bytes = encode(&h);
            let v = apache_avro::from_avro_datum(
                &current(Heartbeat::SCHEMA),
                &mut &bytes[10..],
                Some(&reader),
            )
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(field(&v, "session_id"), Value::String("s-1".into()));
            assert_eq!(field(&v, "kind"), Value::Enum(0, "BEAT".into()));
        }
        for text in FacilityStatus::HISTORY {
            let reader = Schema::parse_str(text).unwrap();
            let bytes = encode(&s);
            let v = apache_avro::from_avro_datum(
                &current(FacilityStatus::SCHEMA),
                &mut &bytes[10..],
                Some(&reader),
            )
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(field(&v, "seq"), Value::Long(7));
            assert_eq!(
                field(&v, "emitted_at"),
                Value::TimestampMillis(1_700_000_000_050)
            );
        }
    }

    /// The compatibility check rejects what FULL_TRANSITIVE forbids, so the test above can fail.
    #[test]
    fn an_incompatible_evolution_is_caught() {
        let v1 = Schema::parse_str(FacilityStatus::SCHEMA).unwrap();
        let without_default = FacilityStatus::SCHEMA.replacen(
            "\"fields\": [",
            "\"fields\": [{\"name\": \"added\", \"type\": \"string\"},",
            1,
        );
        let v2 = Schema::parse_str(&without_default).unwrap();
        assert!(
            SchemaCompatibility::can_read(&v1, &v2).is_err(),
            "a field without default must not be readable from old data"
        );
        let with_default = FacilityStatus::SCHEMA.replacen(
            "\"fields\": [",
            "\"fields\": [{\"name\": \"added\", \"type\": \"string\", \"default\": \"\"},",
            1,
        );
        let v2 = Schema::parse_str(&with_default).unwrap();
        assert!(SchemaCompatibility::can_read(&v1, &v2).is_ok());
        assert!(SchemaCompatibility::can_read(&v2, &v1).is_ok());
        // And an old-version record of such an evolution would decode through resolution:
        assert_ne!(fingerprint_of(&v1), fingerprint_of(&v2));
    }

    /// A value of the given (record) schema with recognisable contents: "sample" strings,
    /// the first enum symbol, 1 for numbers (positive, so field rules hold), unions on
    /// their variant `branch` (0: null; past the last, the last).
    fn sample_value(schema: &Schema, branch: usize) -> Value {
        use apache_avro::schema::{RecordSchema, UnionSchema};
        match schema {
            Schema::Record(RecordSchema { fields, .. }) => Value::Record(
                fields
                    .iter()
                    .map(|f| (f.name.clone(), sample_value(&f.schema, branch)))
                    .collect(),
            ),
            Schema::String => Value::String("sample".into()),
            Schema::Enum(e) => Value::Enum(0, e.symbols[0].clone()),
            Schema::Int => Value::Int(1),
            Schema::Long => Value::Long(1),
            Schema::TimestampMillis => Value::TimestampMillis(1),
            Schema::Union(u) => {
                let u: &UnionSchema = u;
                let i = branch.min(u.variants().len() - 1);
                Value::Union(i as u32, Box::new(sample_value(&u.variants()[i], branch)))
            }
            Schema::Null => Value::Null,
            other => panic!("sample_value: extend for {other:?}"),
        }
    }

    /// The body from apache-avro, the header per the specification (not apache-avro's
    /// writer: see codec::canonical_form).
    fn single_object(schema: &Schema, value: &Value) -> Vec<u8> {
        let mut out = MARKER.to_vec();
        out.extend_from_slice(&fingerprint_of(schema).to_le_bytes());
        out.extend(apache_avro::to_avro_datum(schema, value.clone()).unwrap());
        out
    }
}
