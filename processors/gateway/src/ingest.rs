//! The body of `POST /v1/heartbeats`, checked field by field: pure, no I/O.
//!
//! One heartbeat is a JSON object; a batch is a JSON array of them. The same JSON with a
//! `text/plain` content type is what `navigator.sendBeacon` sends on page unload.
//!
//! ```json
//! {"session_id": "s-1", "user_id": "u-1", "facility_id": "f-1", "region_id": "eu",
//!  "kind": "BEAT", "client_sent_at": 1764320000000}
//! ```
//!
//! `kind` defaults to `BEAT`; `client_sent_at` (ms since the epoch) is optional. With tokens
//! on, `user_id`, `facility_id` and `region_id` may be left out: they come from the token,
//! and a body that names others is refused.

use std::borrow::Cow;

use presence_core::codec::check_id;
use presence_core::records::{Heartbeat, HeartbeatKind};
use serde_json::{Map, Value};

use crate::auth::{AuthError, Claims};

/// Why a body was refused. Each variant names the field and the rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("the body is not valid JSON: {0}")]
    Malformed(String),
    #[error("{field} {rule}")]
    Invalid { field: String, rule: String },
    #[error("a batch holds {count} heartbeats; at most {max} are allowed: split it")]
    TooMany { count: usize, max: usize },
    #[error(transparent)]
    Forbidden(AuthError),
}

impl Rejection {
    fn invalid(field: String, rule: impl Into<String>) -> Self {
        Rejection::Invalid {
            field,
            rule: rule.into(),
        }
    }
}

const FIELDS: &[&str] = &[
    "session_id",
    "user_id",
    "facility_id",
    "region_id",
    "kind",
    "client_sent_at",
];

/// One heartbeat as it comes in, before the rules: borrowed from the body where possible.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    facility_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    region_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    client_sent_at: Option<i64>,
}

/// Parses and checks a body. `claims` is the verified token when tokens are on.
///
/// Well-formed bodies take the typed fast path; anything it refuses is parsed again as
/// generic JSON to say which field breaks which rule.
pub fn parse(
    body: &[u8],
    claims: Option<&Claims>,
    max_batch: usize,
) -> Result<Vec<Heartbeat>, Rejection> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let fast = match first {
        Some(b'{') => serde_json::from_slice::<Wire>(body).ok().map(|w| vec![w]),
        Some(b'[') => serde_json::from_slice::<Vec<Wire>>(body)
            .ok()
            .filter(|v| !v.is_empty() && v.len() <= max_batch),
        _ => None,
    };
    let wires = match fast {
        Some(w) => w,
        None => slow_path(body, max_batch)?,
    };
    let batch = wires.len() > 1 || first == Some(&b'[');
    wires
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            build(
                w,
                &if batch {
                    format!("[{i}].")
                } else {
                    String::new()
                },
                claims,
            )
        })
        .collect()
}

/// Generic JSON, checked for shape and types field by field.
fn slow_path(body: &[u8], max_batch: usize) -> Result<Vec<Wire<'static>>, Rejection> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Rejection::Malformed(e.to_string()))?;
    match value {
        Value::Object(o) => Ok(vec![wire(&o, "")?]),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(Rejection::invalid(
                    "body".into(),
                    "is an empty batch: send at least one heartbeat",
                ));
            }
            if items.len() > max_batch {
                return Err(Rejection::TooMany {
                    count: items.len(),
                    max: max_batch,
                });
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(o) => wire(o, &format!("[{i}].")),
                    _ => Err(Rejection::invalid(
                        format!("[{i}]"),
                        "must be a heartbeat object",
                    )),
                })
                .collect()
        }
        _ => Err(Rejection::invalid(
            "body".into(),
            "must be a heartbeat object or an array of them",
        )),
    }
}

fn wire(o: &Map<String, Value>, at: &str) -> Result<Wire<'static>, Rejection> {
    if let Some(unknown) = o.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(Rejection::invalid(
            format!("{at}{unknown}"),
            format!("is not a heartbeat field (known: {})", FIELDS.join(", ")),
        ));
    }
    let text = |field: &str| match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(Cow::Owned(s.clone()))),
        Some(other) if field == "kind" => Err(Rejection::invalid(
            format!("{at}kind"),
            format!("is {other}; it must be \"BEAT\" or \"END\""),
        )),
        Some(_) => Err(Rejection::invalid(
            format!("{at}{field}"),
            "must be a string",
        )),
    };
    let client_sent_at = match o.get("client_sent_at") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
        Some(_) => {
            return Err(Rejection::invalid(
                format!("{at}client_sent_at"),
                CLIENT_SENT_AT_RULE,
            ))
        }
    };
    Ok(Wire {
        session_id: text("session_id")?,
        user_id: text("user_id")?,
        facility_id: text("facility_id")?,
        region_id: text("region_id")?,
        kind: text("kind")?,
        client_sent_at,
    })
}

const CLIENT_SENT_AT_RULE: &str = "must be a non-negative integer (ms since the epoch)";

/// The rules, the same for both paths.
fn build(w: Wire<'_>, at: &str, claims: Option<&Claims>) -> Result<Heartbeat, Rejection> {
    let session_id = id(w.session_id.as_deref(), at, "session_id", None)?;
    let (user, facility, region) = match claims {
        Some(c) => (
            Some(c.sub.as_str()),
            Some(c.facility.as_str()),
            Some(c.region.as_str()),
        ),
        None => (None, None, None),
    };
    let user_id = id(w.user_id.as_deref(), at, "user_id", user)?;
    let facility_id = id(w.facility_id.as_deref(), at, "facility_id", facility)?;
    let region_id = id(w.region_id.as_deref(), at, "region_id", region)?;
    let kind = match w.kind.as_deref() {
        None | Some("BEAT") => HeartbeatKind::Beat,
        Some("END") => HeartbeatKind::End,
        Some(other) => {
            return Err(Rejection::invalid(
                format!("{at}kind"),
                format!("is \"{other}\"; it must be \"BEAT\" or \"END\""),
            ))
        }
    };
    if w.client_sent_at.is_some_and(|t| t < 0) {
        return Err(Rejection::invalid(
            format!("{at}client_sent_at"),
            CLIENT_SENT_AT_RULE,
        ));
    }
    Ok(Heartbeat {
        session_id,
        user_id,
        facility_id,
        region_id,
        kind,
        client_sent_at: w.client_sent_at,
        client_version: None,
    })
}

/// A required id: from the token when it has one (the body may repeat it, not contradict
/// it), else from the body; 1 to 128 bytes, no control characters.
fn id(
    in_body: Option<&str>,
    at: &str,
    field: &'static str,
    from_token: Option<&str>,
) -> Result<String, Rejection> {
    let value = match (from_token, in_body) {
        (Some(t), Some(b)) if t != b => {
            return Err(Rejection::Forbidden(AuthError::Mismatch {
                field,
                body: b.to_string(),
                token: t.to_string(),
            }))
        }
        (Some(t), _) => t,
        (None, Some(b)) => b,
        (None, None) => return Err(Rejection::invalid(format!("{at}{field}"), "is missing")),
    };
    check_id("Heartbeat", field, value).map_err(|e| match e {
        presence_core::codec::CodecError::InvalidField { rule, .. } => {
            Rejection::invalid(format!("{at}{field}"), rule)
        }
        other => Rejection::invalid(format!("{at}{field}"), other.to_string()),
    })?;
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    /// Any JSON value: scalars at the edges (huge and fractional numbers, any text), and
    /// objects and arrays nested a few levels deep, with heartbeat field names among the
    /// keys so that the typed fast path is reached too.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..8).prop_map(Value::Array),
                btree_map(key(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => proptest::sample::select(FIELDS).prop_map(str::to_string),
            1 => ".{0,12}",
        ]
    }

    /// Ids that pass (mostly) and ids that break each rule (empty, 129 bytes, 130 bytes of
    /// two-byte characters, control characters).
    fn id() -> impl Strategy<Value = String> {
        prop_oneof![
            40 => "[^\\p{Cc}]{1,20}",
            1 => Just(String::new()),
            1 => Just("x".repeat(129)),
            1 => Just("\u{e9}".repeat(65)),
            1 => "[a-z]{0,5}[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}][a-z]{0,5}",
        ]
    }

    /// A heartbeat-shaped object: each field mostly present with a value of the right type,
    /// sometimes of another, sometimes an unknown field beside them. User, facility and
    /// region are often those of [`token_claims`], so that bodies with a token pass too.
    fn beat() -> impl Strategy<Value = Value> {
        let session = proptest::option::weighted(
            0.97,
            prop_oneof![20 => id().prop_map(Value::String), 1 => json()],
        );
        let text = |from_token: &'static str| {
            proptest::option::weighted(
                0.9,
                prop_oneof![
                    30 => Just(Value::from(from_token)),
                    10 => id().prop_map(Value::String),
                    1 => json(),
                ],
            )
        };
        let kind = proptest::option::weighted(
            0.5,
            prop_oneof![
                8 => Just(Value::from("BEAT")),
                8 => Just(Value::from("END")),
                1 => Just(Value::from("PING")),
                1 => json(),
            ],
        );
        let sent = proptest::option::weighted(
            0.5,
            prop_oneof![
                8 => (0..i64::MAX).prop_map(Value::from),
                1 => any::<i64>().prop_map(Value::from),
                1 => json(),
            ],
        );
        let extra = proptest::option::weighted(0.1, (".{0,12}", json()));
        (session, text("u"), text("f"), text("r"), kind, sent, extra).prop_map(
            |(session, user, facility, region, kind, sent, extra)| {
                let mut o = Map::new();
                let fields = [session, user, facility, region, kind, sent];
                for (name, v) in FIELDS.iter().zip(fields) {
                    if let Some(v) = v {
                        o.insert(name.to_string(), v);
                    }
                }
                if let Some((k, v)) = extra {
                    o.insert(k, v);
                }
                Value::Object(o)
            },
        )
    }

    /// A body: one beat, a batch of them, or any JSON; then, sometimes, damaged as text
    /// (cut short, a byte replaced, invalid UTF-8 inserted, a huge number, deep nesting);
    /// two thirds are left whole.
    fn body() -> impl Strategy<Value = Vec<u8>> {
        let value = prop_oneof![
            3 => beat(),
            2 => vec(beat(), 1..6).prop_map(Value::Array),
            1 => json(),
        ];
        (value, 0u8..16, any::<usize>(), any::<u8>(), 0usize..3000).prop_map(
            |(v, damage, at, byte, depth)| {
                let mut b = serde_json::to_vec(&v).unwrap_or_default();
                let at = at % (b.len() + 1);
                match damage {
                    0 => b.truncate(at),
                    1 if at < b.len() => b[at] = byte,
                    2 => {
                        b.splice(at..at, [0xff, 0xc3, byte]);
                    }
                    3 => {
                        b.splice(at..at, *b"123456789012345678901234567890e99999");
                    }
                    4 => {
                        let mut deep = b"[".repeat(depth);
                        deep.extend_from_slice(&b);
                        deep.extend_from_slice(&b"]".repeat(depth));
                        b = deep;
                    }
                    _ => {}
                }
                b
            },
        )
    }

    /// No token, or one for user `u` of facility `f` in region `r`.
    fn token_claims() -> impl Strategy<Value = Option<Claims>> {
        proptest::option::of(Just(Claims {
            sub: "u".into(),
            facility: "f".into(),
            region: "r".into(),
            regions: vec![],
            exp: 0,
            nbf: None,
        }))
    }

    fn follows_the_rules(s: &str) -> bool {
        !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)
    }

    // 256 cases each (proptest's default, as the other property tests here).
    proptest! {
        /// Whatever a client sends, the parser answers (a batch or a rejection) and does not panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512), claims in token_claims(), max in 1usize..20) {
            let _ = parse(&bytes, claims.as_ref(), max);
        }

        /// JSON-ish bodies, whole or damaged: no panic, and whatever is accepted follows every
        /// field rule, takes its ids from the token when there is one, and comes back the same
        /// through JSON and through Avro.
        #[test]
        fn what_is_accepted_follows_the_rules_and_round_trips(body in body(), claims in token_claims(), max in 1usize..20) {
            let Ok(beats) = parse(&body, claims.as_ref(), max) else {
                return Ok(());
            };
            prop_assert!(!beats.is_empty() && beats.len() <= max);
            for h in &beats {
                for id in [&h.session_id, &h.user_id, &h.facility_id, &h.region_id] {
                    prop_assert!(follows_the_rules(id), "accepted id {:?}", id);
                }
                prop_assert!(h.client_sent_at.is_none_or(|t| t >= 0));
                if let Some(c) = &claims {
                    prop_assert_eq!((&h.user_id, &h.facility_id, &h.region_id), (&c.sub, &c.facility, &c.region));
                }
                prop_assert_eq!(&presence_core::codec::decode::<Heartbeat>(&presence_core::codec::encode(h)).unwrap(), h);
            }
            let again = parse(&serde_json::to_vec(&beats).unwrap(), claims.as_ref(), max).unwrap();
            prop_assert_eq!(again, beats);
        }
    }

    fn one(json: &str) -> Result<Vec<Heartbeat>, Rejection> {
        parse(json.as_bytes(), None, 10)
    }

    fn field_of(r: Result<Vec<Heartbeat>, Rejection>) -> String {
        match r {
            Err(Rejection::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    const OK: &str = r#"{"session_id":"s","user_id":"u","facility_id":"f","region_id":"r"}"#;

    #[test]
    fn single_and_batch() {
        let b = one(OK).unwrap();
        assert_eq!(b[0].kind, HeartbeatKind::Beat);
        assert_eq!(b[0].facility_id, "f");
        let batch = one(&format!(r#"[{OK},{{"session_id":"s2","user_id":"u","facility_id":"f","region_id":"r","kind":"END","client_sent_at":5}}]"#)).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(
            (batch[1].kind, batch[1].client_sent_at),
            (HeartbeatKind::End, Some(5))
        );
    }

    #[test]
    fn each_rule_names_its_field() {
        assert_eq!(
            field_of(one(r#"{"user_id":"u","facility_id":"f","region_id":"r"}"#)),
            "session_id"
        );
        assert_eq!(
            field_of(one(
                r#"{"session_id":"","user_id":"u","facility_id":"f","region_id":"r"}"#
            )),
            "session_id"
        );
        let long = "x".repeat(129);
        assert_eq!(
            field_of(one(&format!(
                r#"{{"session_id":"s","user_id":"{long}","facility_id":"f","region_id":"r"}}"#
            ))),
            "user_id"
        );
        assert_eq!(
            field_of(one(
                r#"{"session_id":"s","user_id":"u","facility_id":"f\u0007","region_id":"r"}"#
            )),
            "facility_id"
        );
        assert_eq!(
            field_of(one(
                r#"{"session_id":"s","user_id":"u","facility_id":"f","region_id":"r","kind":"PING"}"#
            )),
            "kind"
        );
        assert_eq!(
            field_of(one(
                r#"{"session_id":"s","user_id":"u","facility_id":"f","region_id":7}"#
            )),
            "region_id"
        );
        assert_eq!(
            field_of(one(
                r#"{"session_id":"s","user_id":"u","facility_id":"f","region_id":"r","extra":1}"#
            )),
            "extra"
        );
        assert_eq!(
            field_of(one(
                r#"{"session_id":"s","user_id":"u","facility_id":"f","region_id":"r","client_sent_at":"x"}"#
            )),
            "client_sent_at"
        );
        assert_eq!(
            field_of(one(&format!(r#"[{OK},{{"session_id":"s"}}]"#))),
            "[1].user_id"
        );
        assert_eq!(field_of(one("[]")), "body");
        assert_eq!(field_of(one("3")), "body");
        assert!(matches!(one("{nope"), Err(Rejection::Malformed(_))));
        assert!(matches!(
            parse(format!("[{OK},{OK}]").as_bytes(), None, 1),
            Err(Rejection::TooMany { count: 2, max: 1 })
        ));
    }

    #[test]
    fn ids_come_from_the_token_and_may_not_be_contradicted() {
        let claims = Claims {
            sub: "u9".into(),
            facility: "f9".into(),
            region: "r9".into(),
            regions: vec![],
            exp: 0,
            nbf: None,
        };
        let b = parse(br#"{"session_id":"s"}"#, Some(&claims), 10).unwrap();
        assert_eq!(
            (
                b[0].user_id.as_str(),
                b[0].facility_id.as_str(),
                b[0].region_id.as_str()
            ),
            ("u9", "f9", "r9")
        );
        assert!(parse(
            br#"{"session_id":"s","facility_id":"f9"}"#,
            Some(&claims),
            10
        )
        .is_ok());
        match parse(
            br#"{"session_id":"s","facility_id":"other"}"#,
            Some(&claims),
            10,
        ) {
            Err(Rejection::Forbidden(AuthError::Mismatch { field, .. })) => {
                assert_eq!(field, "facility_id")
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }
}
