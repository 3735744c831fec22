//! The processor's internal records (`schemas/internal/*.avsc`): what stage 1 tells stage 2,
//! and what each stage's changelog holds.

use presence_core::codec::{
    write_bool, write_long, write_optional_long, write_str, AvroRecord, BodyReader, CodecError,
};
/// Stage 1's changelog value lives in `presence-core`: the sink reads the changelog too.
pub use presence_core::records::SessionState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionEventKind {
    Opened,
    Closed,
    Watermark,
}

/// Why a session closed (`SessionEvent.close_reason`, schema v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The user's END (logout, page unload).
    End,
    /// `session_timeout` passed after its last beat.
    Timeout,
    /// A beat named another facility: closed here, opened there.
    Moved,
}

/// Stage 1 → stage 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEvent {
    pub kind: SessionEventKind,
    pub source_partition: i32,
    pub source_seq: i64,
    pub at: i64,
    pub facility_id: String,
    pub region_id: String,
    /// Set on CLOSED (schema v2); `None` otherwise and in records written with v1.
    pub close_reason: Option<CloseReason>,
}

impl AvroRecord for SessionEvent {
    const NAME: &'static str = "SessionEvent";
    const SCHEMA: &'static str = include_str!("../../../schemas/internal/session_event.avsc");
    const HISTORY: &'static [&'static str] = &[
        include_str!("../../../schemas/history/session_event/v1.avsc"),
        include_str!("../../../schemas/history/session_event/v2.avsc"),
    ];

    presence_core::codec_cell!();

    fn write_body(&self, out: &mut Vec<u8>) {
        let kind = match self.kind {
            SessionEventKind::Opened => 0,
            SessionEventKind::Closed => 1,
            SessionEventKind::Watermark => 2,
        };
        write_long(out, kind);
        write_long(out, self.source_partition as i64);
        write_long(out, self.source_seq);
        write_long(out, self.at);
        write_str(out, &self.facility_id);
        write_str(out, &self.region_id);
        match self.close_reason {
            None => write_long(out, 0),
            Some(reason) => {
                write_long(out, 1);
                write_long(
                    out,
                    match reason {
                        CloseReason::End => 0,
                        CloseReason::Timeout => 1,
                        CloseReason::Moved => 2,
                    },
                );
            }
        }
    }

    fn read_body(r: &mut BodyReader<'_>) -> Result<Self, CodecError> {
        Ok(SessionEvent {
            kind: match r.read_enum("kind", 3)? {
                0 => SessionEventKind::Opened,
                1 => SessionEventKind::Closed,
                _ => SessionEventKind::Watermark,
            },
            source_partition: r.read_int("source_partition")?,
            source_seq: r.read_long("source_seq")?,
            at: r.read_long("at")?,
            facility_id: r.read_string("facility_id")?,
            region_id: r.read_string("region_id")?,
            close_reason: match r.read_enum("close_reason", 2)? {
                0 => None,
                _ => Some(match r.read_enum("close_reason", 3)? {
                    0 => CloseReason::End,
                    1 => CloseReason::Timeout,
                    _ => CloseReason::Moved,
                }),
            },
        })
    }
}

/// Stage-2 changelog value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FacilityState {
    pub facility_id: String,
    pub region_id: String,
    pub open_sessions: i32,
    pub online: bool,
    pub seq: i64,
    pub since: i64,
    pub pending_offline_since: Option<i64>,
    /// Event time of the last session event applied (schema v2; `None` in v1 records).
    pub last_event_at: Option<i64>,
}

impl AvroRecord for FacilityState {
    const NAME: &'static str = "FacilityState";
    const SCHEMA: &'static str = include_str!("../../../schemas/internal/facility_state.avsc");
    const HISTORY: &'static [&'static str] = &[
        include_str!("../../../schemas/history/facility_state/v1.avsc"),
        include_str!("../../../schemas/history/facility_state/v2.avsc"),
    ];

    presence_core::codec_cell!();

    fn write_body(&self, out: &mut Vec<u8>) {
        write_str(out, &self.facility_id);
        write_str(out, &self.region_id);
        write_long(out, self.open_sessions as i64);
        write_bool(out, self.online);
        write_long(out, self.seq);
        write_long(out, self.since);
        write_optional_long(out, self.pending_offline_since);
        write_optional_long(out, self.last_event_at);
    }

    fn read_body(r: &mut BodyReader<'_>) -> Result<Self, CodecError> {
        Ok(FacilityState {
            facility_id: r.read_string("facility_id")?,
            region_id: r.read_string("region_id")?,
            open_sessions: r.read_int("open_sessions")?,
            online: r.read_bool("online")?,
            seq: r.read_long("seq")?,
            since: r.read_long("since")?,
            pending_offline_since: r.read_optional_long("pending_offline_since")?,
            last_event_at: r.read_optional_long("last_event_at")?,
        })
    }
}

/// Stage-1 changelog value under a session's mark key
/// ([`crate::sessions::mark_key_bytes`]): the last-seen of a quiet session as of
/// a heartbeats offset ([`crate::window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionMark {
    pub last_seen: i64,
    pub offset: i64,
}

impl AvroRecord for SessionMark {
    const NAME: &'static str = "SessionMark";
    const SCHEMA: &'static str = include_str!("../../../schemas/internal/session_mark.avsc");
    const HISTORY: &'static [&'static str] = &[include_str!(
        "../../../schemas/history/session_mark/v1.avsc"
    )];

    presence_core::codec_cell!();

    fn write_body(&self, out: &mut Vec<u8>) {
        write_long(out, self.last_seen);
        write_long(out, self.offset);
    }

    fn read_body(r: &mut BodyReader<'_>) -> Result<Self, CodecError> {
        Ok(SessionMark {
            last_seen: r.read_long("last_seen")?,
            offset: r.read_long("offset")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use presence_core::codec::{decode, encode, fingerprint_of, verify_history, AvroRecord};
    use presence_core::records::SessionStateRef;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// The single-object headers a record of `T` may carry: every released version's
    /// fingerprint (the older ones go through apache-avro's schema resolution).
    fn headers<T: AvroRecord>() -> Vec<Vec<u8>> {
        T::HISTORY
            .iter()
            .chain([&T::SCHEMA])
            .map(|text| {
                let schema = apache_avro::Schema::parse_str(text).unwrap();
                let mut h = presence_core::codec::MARKER.to_vec();
                h.extend_from_slice(&fingerprint_of(&schema).to_le_bytes());
                h
            })
            .collect()
    }

    /// `bytes` alone, and behind each valid header of `T`: an error or a record, never a panic.
    fn decode_everywhere<T: AvroRecord + 'static>(bytes: &[u8]) {
        let _ = decode::<T>(bytes);
        for mut h in headers::<T>() {
            h.extend_from_slice(bytes);
            let _ = decode::<T>(&h);
        }
    }

    /// A body that is a valid record's, then damaged: cut short, one byte replaced, or
    /// bytes appended; near-valid bodies reach deeper into each reader than random ones.
    fn damaged(valid: Vec<u8>, how: u8, at: usize, byte: u8, tail: Vec<u8>) -> Vec<u8> {
        let mut b = valid[10..].to_vec();
        let at = at % (b.len() + 1);
        match how {
            0 => b.truncate(at),
            1 if at < b.len() => b[at] = byte,
            _ => b.extend_from_slice(&tail),
        }
        b
    }

    fn session_event() -> impl Strategy<Value = SessionEvent> {
        (
            0u8..3,
            any::<i32>(),
            any::<i64>(),
            any::<i64>(),
            ".{0,8}",
            ".{0,8}",
            0u8..4,
        )
            .prop_map(
                |(k, source_partition, source_seq, at, facility_id, region_id, reason)| {
                    SessionEvent {
                        kind: [
                            SessionEventKind::Opened,
                            SessionEventKind::Closed,
                            SessionEventKind::Watermark,
                        ][k as usize],
                        source_partition,
                        source_seq,
                        at,
                        facility_id,
                        region_id,
                        close_reason: [
                            None,
                            Some(CloseReason::End),
                            Some(CloseReason::Timeout),
                            Some(CloseReason::Moved),
                        ][reason as usize],
                    }
                },
            )
    }

    fn session_state() -> impl Strategy<Value = SessionState> {
        (
            ".{0,8}",
            ".{0,8}",
            ".{0,8}",
            ".{0,8}",
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(session_id, user_id, facility_id, region_id, last_seen, open_offset)| {
                    SessionState {
                        session_id,
                        user_id,
                        facility_id,
                        region_id,
                        last_seen,
                        open_offset,
                    }
                },
            )
    }

    fn facility_state() -> impl Strategy<Value = FacilityState> {
        (
            ".{0,8}",
            ".{0,8}",
            any::<i32>(),
            any::<bool>(),
            any::<i64>(),
            any::<i64>(),
            any::<Option<i64>>(),
            any::<Option<i64>>(),
        )
            .prop_map(
                |(facility_id, region_id, open_sessions, online, seq, since, pending, last)| {
                    FacilityState {
                        facility_id,
                        region_id,
                        open_sessions,
                        online,
                        seq,
                        since,
                        pending_offline_since: pending,
                        last_event_at: last,
                    }
                },
            )
    }

    // 256 cases each (proptest's default, as the other property tests here).
    proptest! {
        /// A changelog or stage-1 topic holding garbage (another producer, a torn write, a
        /// future version) cannot crash a processor: every decoder, every schema version,
        /// answers with an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..96)) {
            decode_everywhere::<SessionEvent>(&bytes);
            decode_everywhere::<SessionState>(&bytes);
            decode_everywhere::<FacilityState>(&bytes);
            decode_everywhere::<SessionMark>(&bytes);
            let _ = crate::sessions::key_from_bytes(&bytes);
            let _ = crate::sessions::mark_key_from_bytes(&bytes);
        }

        /// Damaged versions of valid bodies, behind every version's header: no panic, and
        /// every record of the current version comes back as it was written.
        #[test]
        fn damaged_records_never_panic_and_whole_ones_round_trip(
            e in session_event(), s in session_state(), f in facility_state(),
            m in (any::<i64>(), any::<i64>()).prop_map(|(last_seen, offset)| SessionMark { last_seen, offset }),
            how in 0u8..3, at in any::<usize>(), byte in any::<u8>(), tail in vec(any::<u8>(), 1..16),
        ) {
            prop_assert_eq!(decode::<SessionMark>(&encode(&m)).unwrap(), m);
            decode_everywhere::<SessionMark>(&damaged(encode(&m), how, at, byte, tail.clone()));
            prop_assert_eq!(&decode::<SessionEvent>(&encode(&e)).unwrap(), &e);
            prop_assert_eq!(&decode::<SessionState>(&encode(&s)).unwrap(), &s);
            prop_assert_eq!(&decode::<FacilityState>(&encode(&f)).unwrap(), &f);
            decode_everywhere::<SessionEvent>(&damaged(encode(&e), how, at, byte, tail.clone()));
            decode_everywhere::<SessionState>(&damaged(encode(&s), how, at, byte, tail.clone()));
            decode_everywhere::<FacilityState>(&damaged(encode(&f), how, at, byte, tail));
        }

        /// Any record of schema v1 (before sessions had owners) decodes, through schema
        /// resolution, to the same session with an empty owner.
        #[test]
        fn any_v1_session_state_decodes_without_an_owner(s in session_state()) {
            let mut bytes = headers::<SessionState>().swap_remove(0);
            for text in [&s.session_id, &s.facility_id, &s.region_id] {
                presence_core::codec::write_str(&mut bytes, text);
            }
            presence_core::codec::write_long(&mut bytes, s.last_seen);
            presence_core::codec::write_long(&mut bytes, s.open_offset);
            prop_assert_eq!(decode::<SessionState>(&bytes).unwrap(), SessionState { user_id: String::new(), ..s });
            // The restore's borrowed reader leaves older versions to the resolving decoder.
            prop_assert_eq!(SessionStateRef::decode(&bytes).unwrap(), None);
        }

        /// The restore's borrowed reader reads what the resolving decoder reads from a record
        /// of the current version, whole or damaged, and refuses what it refuses.
        #[test]
        fn the_borrowed_session_state_reader_agrees_with_the_decoder(
            s in session_state(), how in 0u8..3, at in any::<usize>(), byte in any::<u8>(),
            tail in vec(any::<u8>(), 1..16),
        ) {
            let whole = encode(&s);
            prop_assert_eq!(SessionStateRef::decode(&whole).unwrap(), Some(s.borrowed()));
            let mut bytes = whole[..10].to_vec();
            bytes.extend(damaged(whole, how, at, byte, tail));
            match (SessionStateRef::decode(&bytes), decode::<SessionState>(&bytes)) {
                (Ok(Some(borrowed)), Ok(owned)) => prop_assert_eq!(borrowed, owned.borrowed()),
                (Err(_), Err(_)) => {}
                (borrowed, owned) => prop_assert!(false, "borrowed {borrowed:?}, decoder {owned:?}"),
            }
        }
    }

    fn history(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../schemas/history")
            .join(name)
    }

    #[test]
    fn internal_schemas_keep_their_history() {
        verify_history::<SessionEvent>(&history("session_event")).unwrap();
        verify_history::<SessionState>(&history("session_state")).unwrap();
        verify_history::<FacilityState>(&history("facility_state")).unwrap();
        verify_history::<SessionMark>(&history("session_mark")).unwrap();
    }

    /// A changelog record written by schema v1 (before sessions had owners) still decodes,
    /// with an empty user id, which restore reads as "owner not known yet".
    #[test]
    fn a_v1_session_state_decodes_without_an_owner() {
        use apache_avro::types::Value;
        let v1 = apache_avro::Schema::parse_str(SessionState::HISTORY[0]).unwrap();
        let value = Value::Record(vec![
            ("session_id".into(), Value::String("s".into())),
            ("facility_id".into(), Value::String("f".into())),
            ("region_id".into(), Value::String("r".into())),
            ("last_seen".into(), Value::TimestampMillis(7)),
            ("open_offset".into(), Value::Long(42)),
        ]);
        let mut bytes = presence_core::codec::MARKER.to_vec();
        bytes.extend_from_slice(&presence_core::codec::fingerprint_of(&v1).to_le_bytes());
        bytes.extend(apache_avro::to_avro_datum(&v1, value).unwrap());
        let s = decode::<SessionState>(&bytes).unwrap();
        assert_eq!(
            s,
            SessionState {
                session_id: "s".into(),
                user_id: String::new(),
                facility_id: "f".into(),
                region_id: "r".into(),
                last_seen: 7,
                open_offset: 42,
            }
        );
        assert_ne!(
            bytes[2..10],
            encode(&s)[2..10],
            "v1 and v2 differ on the wire"
        );
    }

    /// `value` as a processor writing the older version `v` (1-based) writes it: the
    /// current body resolved to that version by apache-avro (which is also what a reader
    /// of that version does with current bytes), behind its fingerprint.
    fn as_version<T: AvroRecord + 'static>(value: &T, v: usize) -> Vec<u8> {
        let current = apache_avro::Schema::parse_str(T::SCHEMA).unwrap();
        let old = apache_avro::Schema::parse_str(T::HISTORY[v - 1]).unwrap();
        let bytes = encode(value);
        let resolved =
            apache_avro::from_avro_datum(&current, &mut &bytes[10..], Some(&old)).unwrap();
        let mut out = presence_core::codec::MARKER.to_vec();
        out.extend_from_slice(&fingerprint_of(&old).to_le_bytes());
        out.extend(apache_avro::to_avro_datum(&old, resolved).unwrap());
        out
    }

    /// v2 of the session events and the facility changelog added one field each: their v2
    /// records read back through v1 readers (FULL), and v1 records decode with the new
    /// field's default.
    #[test]
    fn internal_v1_and_v2_records_read_each_other() {
        let closed = SessionEvent {
            kind: SessionEventKind::Closed,
            source_partition: 1,
            source_seq: 2,
            at: 3,
            facility_id: "f".into(),
            region_id: "r".into(),
            close_reason: Some(CloseReason::Timeout),
        };
        let v1 = as_version(&closed, 1);
        assert_ne!(v1[2..10], encode(&closed)[2..10]);
        assert_eq!(
            decode::<SessionEvent>(&v1).unwrap(),
            SessionEvent {
                close_reason: None,
                ..closed.clone()
            }
        );
        assert_eq!(
            decode::<SessionEvent>(&as_version(&closed, 2)).unwrap(),
            closed
        );
        let state = FacilityState {
            facility_id: "f".into(),
            region_id: "r".into(),
            open_sessions: 0,
            online: true,
            seq: 3,
            since: 1,
            pending_offline_since: Some(4),
            last_event_at: Some(4),
        };
        assert_eq!(
            decode::<FacilityState>(&as_version(&state, 1)).unwrap(),
            FacilityState {
                last_event_at: None,
                ..state.clone()
            }
        );
        assert_eq!(
            decode::<FacilityState>(&as_version(&state, 2)).unwrap(),
            state
        );
    }

    #[test]
    fn internal_records_round_trip() {
        let e = SessionEvent {
            kind: SessionEventKind::Watermark,
            source_partition: 3,
            source_seq: 9,
            at: 5,
            facility_id: String::new(),
            region_id: String::new(),
            close_reason: None,
        };
        assert_eq!(decode::<SessionEvent>(&encode(&e)).unwrap(), e);
        let closed = SessionEvent {
            kind: SessionEventKind::Closed,
            facility_id: "f".into(),
            region_id: "r".into(),
            close_reason: Some(CloseReason::Moved),
            ..e
        };
        assert_eq!(decode::<SessionEvent>(&encode(&closed)).unwrap(), closed);
        let s = SessionState {
            session_id: "s".into(),
            user_id: "u".into(),
            facility_id: "f".into(),
            region_id: "r".into(),
            last_seen: 7,
            open_offset: 42,
        };
        assert_eq!(decode::<SessionState>(&encode(&s)).unwrap(), s);
        let f = FacilityState {
            facility_id: "f".into(),
            region_id: "r".into(),
            open_sessions: 2,
            online: true,
            seq: 3,
            since: 1,
            pending_offline_since: Some(4),
            last_event_at: Some(5),
        };
        assert_eq!(decode::<FacilityState>(&encode(&f)).unwrap(), f);
    }
}
