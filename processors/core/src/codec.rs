//! Avro records in single-object encoding: `C3 01`, the writer schema's 8-byte little-endian
//! CRC-64-AVRO fingerprint, then the Avro binary body. Any Avro library decodes them with the
//! `.avsc` files in `schemas/` alone.
//!
//! Public topics may instead carry the Schema Registry wire format (`confluent` framing): a
//! zero byte, the writer schema's 4-byte big-endian registry id, then the same body. Readers
//! tell the two apart by the first byte and turn a registry id into a fingerprint through a
//! [`RegistryIds`] (the cache in [`crate::registry`]); from there both framings decode alike.
//!
//! The hot path encodes and decodes the current schema version by hand, straight into the
//! record type (apache-avro's generic `Value` path is several times slower). Bytes written
//! with an older released version (`schemas/history/`) are resolved against the current
//! schema by apache-avro and then read by the same hand-written reader, so there is exactly
//! one decoder per record type. Nothing here panics on input: every failure is a
//! [`CodecError`].

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::Schema;

/// The two marker bytes that open every single-object-encoded record.
pub const MARKER: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

/// The first byte of the Schema Registry wire format; the 4-byte big-endian schema id follows.
pub const CONFLUENT_MAGIC: u8 = 0;
const CONFLUENT_HEADER_LEN: usize = 5;

/// What a writer puts before the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// `C3 01` and the schema's fingerprint (the default; no registry needed).
    SingleObject,
    /// The Schema Registry wire format, with the id the registry gave the current schema.
    Confluent { id: u32 },
}

/// Registry ids resolved to schema fingerprints, for reading the `confluent` framing.
pub trait RegistryIds {
    /// The fingerprint of the schema registered under `id`; `None` while unresolved (or
    /// when the registry does not know it).
    fn fingerprint(&self, id: u32) -> Option<u64>;
}

/// For readers without a schema registry: every registry id is unresolved.
pub struct NoRegistry;

impl RegistryIds for NoRegistry {
    fn fingerprint(&self, _id: u32) -> Option<u64> {
        None
    }
}

/// The registry id of a record in the `confluent` framing; `None` for anything else.
pub fn confluent_id(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Ids (session, user, facility, region) are at most this many bytes.
pub const MAX_ID_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record of {len} bytes is shorter than the 10-byte single-object header; the producer must use Avro single-object encoding")]
    TooShort { len: usize },
    #[error("record starts with {found:02x?}, not the single-object marker c3 01; the producer must use Avro single-object encoding")]
    BadMarker { found: [u8; 2] },
    #[error("{record}: unknown schema fingerprint {fingerprint:016x}; encode with a schema from schemas/ (or add the new version to schemas/history/)")]
    UnknownSchema {
        record: &'static str,
        fingerprint: u64,
    },
    #[error("{record}: record is in the Schema Registry framing with schema id {id}, which this reader could not resolve; set schema_registry.url (PRESENCE_SCHEMA_REGISTRY__URL) to the registry the producer registered it with")]
    UnresolvedSchemaId { record: &'static str, id: u32 },
    #[error("{record}: malformed Avro body: {detail}")]
    Malformed {
        record: &'static str,
        detail: String,
    },
    #[error("{record}.{field}: {rule}")]
    InvalidField {
        record: &'static str,
        field: &'static str,
        rule: String,
    },
}

impl CodecError {
    /// A stable, low-cardinality code for metric labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            CodecError::TooShort { .. } => "too_short",
            CodecError::BadMarker { .. } => "bad_marker",
            CodecError::UnknownSchema { .. } => "unknown_schema",
            CodecError::UnresolvedSchemaId { .. } => "unresolved_schema_id",
            CodecError::Malformed { .. } => "malformed",
            CodecError::InvalidField { .. } => "invalid_field",
        }
    }
}

/// A record type with a schema in `schemas/` and a hand-written body codec for its current
/// version.
pub trait AvroRecord: Sized {
    /// Record name used in errors, e.g. `Heartbeat`.
    const NAME: &'static str;
    /// The current schema (`schemas/<name>.avsc`).
    const SCHEMA: &'static str;
    /// Every released version, oldest first; the last one is the current schema.
    const HISTORY: &'static [&'static str];

    /// Where this type's parsed [`Codec`] lives: a `static` per type (see
    /// [`codec_cell!`](crate::codec_cell)), so the hot path takes no lock.
    fn codec_cell() -> &'static OnceLock<Codec>;

    /// Appends the Avro binary body for the current schema.
    fn write_body(&self, out: &mut Vec<u8>);
    /// Reads a body written with the current schema; the reader checks for trailing bytes.
    fn read_body(r: &mut BodyReader<'_>) -> Result<Self, CodecError>;
    /// Field rules beyond the schema (lengths, ranges). Empty by default.
    fn validate(&self) -> Result<(), CodecError> {
        Ok(())
    }
}

/// The parsed schemas and fingerprints of one record type, built once per process.
pub struct Codec {
    record: &'static str,
    current: Schema,
    fingerprint: u64,
    older: HashMap<u64, Schema>,
    /// An older released version this process writes instead of the current one (see
    /// [`WRITE_VERSIONS_ENV`]), with its fingerprint.
    write_as: Option<(u64, Schema)>,
    /// The text of the schema this process writes (the pinned version's, or the current):
    /// what the `confluent` framing looks up its registry id by.
    written_text: String,
}

/// Rolling upgrades and roll-backs: `PRESENCE_SCHEMA_WRITE_VERSIONS=Heartbeat=1,FacilityStatus=1`
/// makes this process write the named records with that released version (`vN` of
/// `schemas/history/<record>/`) instead of the current one, while it still reads every
/// version. Start new instances pinned to the version the running ones write, roll them all
/// out, then drop the setting (Kafka Streams' `upgrade.from` works the same way); or pin a
/// new build to the old versions before rolling back to the old build. A record type not
/// named writes its current version. The pinned path re-encodes through apache-avro, so it
/// is slower than the current one.
pub const WRITE_VERSIONS_ENV: &str = "PRESENCE_SCHEMA_WRITE_VERSIONS";

/// The version `record` is pinned to by [`WRITE_VERSIONS_ENV`], if any.
fn write_version_pin(record: &str) -> Option<usize> {
    let pins = std::env::var(WRITE_VERSIONS_ENV).ok()?;
    pins.split(',').find_map(|pin| {
        let (name, version) = pin.trim().split_once('=')?;
        if name.trim() != record {
            return None;
        }
        let version = version.trim().trim_start_matches('v');
        Some(version.parse().unwrap_or_else(|_| {
            panic!("{WRITE_VERSIONS_ENV}: {record}={version} is not a version number; write {record}=N with N a file schemas/history/{record}/vN.avsc")
        }))
    })
}

impl Codec {
    fn build<T: AvroRecord>() -> Codec {
        Self::pinned::<T>(T::HISTORY, write_version_pin(T::NAME))
    }

    #[cfg(test)]
    fn with_history<T: AvroRecord>(history: &[&str]) -> Codec {
        Self::pinned::<T>(history, None)
    }

    /// `write_version`: the released version (1-based, in `history`) to write instead of
    /// the current one.
    fn pinned<T: AvroRecord>(history: &[&str], write_version: Option<usize>) -> Codec {
        // The schemas are compiled into the binary and covered by tests, so a parse failure
        // here is a build defect, not an input error.
        let current =
            Schema::parse_str(T::SCHEMA).unwrap_or_else(|e| panic!("schemas/{}: {e}", T::NAME));
        let fingerprint = fingerprint_of(&current);
        let mut older = HashMap::new();
        let write_as = write_version.and_then(|n| {
            let text = n
                .checked_sub(1)
                .and_then(|i| history.get(i))
                .unwrap_or_else(|| {
                    panic!(
                        "{WRITE_VERSIONS_ENV}: {} has versions 1 to {}, not {n}",
                        T::NAME,
                        history.len()
                    )
                });
            let s = Schema::parse_str(text)
                .unwrap_or_else(|e| panic!("schemas/history ({}): {e}", T::NAME));
            let fp = fingerprint_of(&s);
            (fp != fingerprint).then_some((fp, s, text.to_string()))
        });
        let (write_as, written_text) = match write_as {
            Some((fp, s, text)) => (Some((fp, s)), text),
            None => (None, T::SCHEMA.to_string()),
        };
        for text in history {
            let s = Schema::parse_str(text)
                .unwrap_or_else(|e| panic!("schemas/history ({}): {e}", T::NAME));
            let fp = fingerprint_of(&s);
            if fp != fingerprint {
                older.insert(fp, s);
            }
        }
        Codec {
            record: T::NAME,
            current,
            fingerprint,
            older,
            write_as,
            written_text,
        }
    }

    /// The schema this process writes: the version [`WRITE_VERSIONS_ENV`] pins, or the
    /// current one. A registry id for the `confluent` framing must be this schema's.
    pub fn written_schema(&self) -> &str {
        &self.written_text
    }

    pub fn schema(&self) -> &Schema {
        &self.current
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// The fingerprint of each released version of `T` (`HISTORY`), oldest first: which
/// version wrote a record is `bytes[2..10]` (little-endian) found in this list.
pub fn history_fingerprints<T: AvroRecord>() -> Vec<u64> {
    T::HISTORY
        .iter()
        .map(|text| {
            let s = Schema::parse_str(text)
                .unwrap_or_else(|e| panic!("schemas/history ({}): {e}", T::NAME));
            fingerprint_of(&s)
        })
        .collect()
}

/// The codec of `T`, parsed on first use.
pub fn codec<T: AvroRecord + 'static>() -> &'static Codec {
    T::codec_cell().get_or_init(Codec::build::<T>)
}

/// Implements [`AvroRecord::codec_cell`] with a `static` of its own.
#[macro_export]
macro_rules! codec_cell {
    () => {
        fn codec_cell() -> &'static ::std::sync::OnceLock<$crate::codec::Codec> {
            static CELL: ::std::sync::OnceLock<$crate::codec::Codec> = ::std::sync::OnceLock::new();
            &CELL
        }
    };
}

/// Encodes `value` (single-object encoding) into `out`, which is cleared first so that hot
/// paths can reuse one buffer.
pub fn encode_into<T: AvroRecord + 'static>(value: &T, out: &mut Vec<u8>) {
    encode_by(codec::<T>(), value, out)
}

fn encode_by<T: AvroRecord>(c: &Codec, value: &T, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&MARKER);
    out.extend_from_slice(&c.fingerprint.to_le_bytes());
    value.write_body(out);
    if let Some((fp, older)) = &c.write_as {
        if let Some(body) = rewrite_as(c, older, &out[HEADER_LEN..]) {
            out.truncate(2);
            out.extend_from_slice(&fp.to_le_bytes());
            out.extend_from_slice(&body);
        }
    }
}

/// A current-version body re-encoded with an older released version (schema resolution:
/// fields the older version lacks are dropped). `None` only if the versions were not
/// mutually readable, which `verify_history` rules out; the record then stays current.
fn rewrite_as(c: &Codec, older: &Schema, mut body: &[u8]) -> Option<Vec<u8>> {
    let value = apache_avro::from_avro_datum(&c.current, &mut body, Some(older)).ok()?;
    apache_avro::to_avro_datum(older, value).ok()
}

pub fn encode<T: AvroRecord + 'static>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(value, &mut out);
    out
}

/// Encodes `value` with the given framing.
pub fn encode_with<T: AvroRecord + 'static>(value: &T, header: Header) -> Vec<u8> {
    match header {
        Header::SingleObject => encode(value),
        Header::Confluent { id } => {
            let c = codec::<T>();
            let mut out = Vec::with_capacity(64);
            out.push(CONFLUENT_MAGIC);
            out.extend_from_slice(&id.to_be_bytes());
            value.write_body(&mut out);
            // Pinned to an older version: that version's body (and `id` is its id, see
            // `registry::header_for`), as with the single-object framing.
            if let Some((_, older)) = &c.write_as {
                if let Some(body) = rewrite_as(c, older, &out[CONFLUENT_HEADER_LEN..]) {
                    out.truncate(CONFLUENT_HEADER_LEN);
                    out.extend_from_slice(&body);
                }
            }
            out
        }
    }
}

/// Decodes and validates one single-object-encoded record of type `T`.
pub fn decode<T: AvroRecord + 'static>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_with(codec::<T>(), bytes)
}

/// Decodes and validates one record of type `T` in either framing; `ids` resolves the
/// registry ids of the `confluent` one.
pub fn decode_framed<T: AvroRecord + 'static>(
    bytes: &[u8],
    ids: &dyn RegistryIds,
) -> Result<T, CodecError> {
    decode_split(codec::<T>().split_framed(bytes, ids)?, codec::<T>())
}

fn decode_with<T: AvroRecord>(c: &Codec, bytes: &[u8]) -> Result<T, CodecError> {
    decode_split(c.split(bytes)?, c)
}

fn decode_split<T: AvroRecord>(body: Body<'_>, c: &Codec) -> Result<T, CodecError> {
    let value = match body {
        Body::Current(body) => read_all::<T>(body)?,
        Body::Older(writer, body) => read_all::<T>(&resolve_old(c, writer, body)?)?,
    };
    value.validate()?;
    Ok(value)
}

/// A record body and the schema version it was written with.
enum Body<'a> {
    Current(&'a [u8]),
    Older(&'a Schema, &'a [u8]),
}

impl Codec {
    /// Either framing: the registry id of a `confluent` record becomes its fingerprint
    /// through `ids`, then the writer's version is found as for single-object records.
    fn split_framed<'a>(
        &'a self,
        bytes: &'a [u8],
        ids: &dyn RegistryIds,
    ) -> Result<Body<'a>, CodecError> {
        let Some(id) = confluent_id(bytes) else {
            return self.split(bytes);
        };
        let fp = ids.fingerprint(id).ok_or(CodecError::UnresolvedSchemaId {
            record: self.record,
            id,
        })?;
        self.body_of(fp, &bytes[CONFLUENT_HEADER_LEN..])
    }

    /// Checks the single-object header and finds the writer's schema version.
    fn split<'a>(&'a self, bytes: &'a [u8]) -> Result<Body<'a>, CodecError> {
        if bytes.len() < HEADER_LEN {
            return Err(CodecError::TooShort { len: bytes.len() });
        }
        if bytes[..2] != MARKER {
            return Err(CodecError::BadMarker {
                found: [bytes[0], bytes[1]],
            });
        }
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[2..HEADER_LEN]);
        self.body_of(u64::from_le_bytes(fp), &bytes[HEADER_LEN..])
    }

    fn body_of<'a>(&'a self, fp: u64, body: &'a [u8]) -> Result<Body<'a>, CodecError> {
        if fp == self.fingerprint {
            Ok(Body::Current(body))
        } else if let Some(writer) = self.older.get(&fp) {
            Ok(Body::Older(writer, body))
        } else {
            Err(CodecError::UnknownSchema {
                record: self.record,
                fingerprint: fp,
            })
        }
    }
}

/// For zero-copy readers of hot records: the body if `bytes` carries the current version
/// of `T`, `None` if an older released version (decode it with [`decode`]), an error for
/// anything else.
pub fn current_body<T: AvroRecord + 'static>(bytes: &[u8]) -> Result<Option<&[u8]>, CodecError> {
    current_body_framed::<T>(bytes, &NoRegistry)
}

/// [`current_body`] for either framing.
pub fn current_body_framed<'a, T: AvroRecord + 'static>(
    bytes: &'a [u8],
    ids: &dyn RegistryIds,
) -> Result<Option<&'a [u8]>, CodecError> {
    match codec::<T>().split_framed(bytes, ids)? {
        Body::Current(body) => Ok(Some(body)),
        Body::Older(..) => Ok(None),
    }
}

fn read_all<T: AvroRecord>(body: &[u8]) -> Result<T, CodecError> {
    let mut r = BodyReader {
        buf: body,
        pos: 0,
        record: T::NAME,
    };
    let v = T::read_body(&mut r)?;
    if r.pos != body.len() {
        return Err(r.malformed(format!(
            "{} trailing bytes after the record",
            body.len() - r.pos
        )));
    }
    Ok(v)
}

/// An old version's body, resolved to the current schema and re-encoded with it.
fn resolve_old(c: &Codec, writer: &Schema, mut body: &[u8]) -> Result<Vec<u8>, CodecError> {
    let malformed = |e: apache_avro::Error| CodecError::Malformed {
        record: c.record,
        detail: e.to_string(),
    };
    let value =
        apache_avro::from_avro_datum(writer, &mut body, Some(&c.current)).map_err(malformed)?;
    if !body.is_empty() {
        return Err(CodecError::Malformed {
            record: c.record,
            detail: format!("{} trailing bytes after the record", body.len()),
        });
    }
    apache_avro::to_avro_datum(&c.current, value).map_err(malformed)
}

/// CRC-64-AVRO (the Avro specification's Rabin fingerprint) of a schema's Parsing
/// Canonical Form.
pub fn fingerprint_of(schema: &Schema) -> u64 {
    crc64_avro(canonical_form(schema).as_bytes())
}

/// The specification's Parsing Canonical Form. apache-avro 0.21 strips `logicalType` but
/// leaves the primitive as an object (`{"type":"long"}`), where the specification's
/// [PRIMITIVES] rule (and Java, fastavro) write `"long"`; its fingerprints therefore differ
/// from every other implementation for schemas with logical types. In canonical form an
/// object whose only attribute is `type` can only be such a primitive, so it is unwrapped
/// here. The Python cross-implementation test pins this down.
pub fn canonical_form(schema: &Schema) -> String {
    let mut form = schema.canonical_form();
    for p in [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ] {
        form = form.replace(&format!("{{\"type\":\"{p}\"}}"), &format!("\"{p}\""));
    }
    form
}

pub fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: OnceLock<[u64; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *slot = fp;
        }
        t
    });
    data.iter().fold(EMPTY, |fp, &b| {
        (fp >> 8) ^ table[((fp ^ b as u64) & 0xff) as usize]
    })
}

// ---- Avro binary primitives -------------------------------------------------------------

pub fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub fn write_str(out: &mut Vec<u8>, s: &str) {
    write_long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over one record body. Every read checks bounds.
pub struct BodyReader<'a> {
    buf: &'a [u8],
    pos: usize,
    record: &'static str,
}

impl<'a> BodyReader<'a> {
    pub fn new(buf: &'a [u8], record: &'static str) -> BodyReader<'a> {
        BodyReader {
            buf,
            pos: 0,
            record,
        }
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.malformed(format!(
                "{} trailing bytes after the record",
                self.buf.len() - self.pos
            )))
        }
    }

    fn malformed(&self, detail: String) -> CodecError {
        CodecError::Malformed {
            record: self.record,
            detail,
        }
    }

    pub fn read_long(&mut self, field: &str) -> Result<i64, CodecError> {
        // One byte: every string length under 64 and most enum indexes and counts.
        if let Some(&b) = self.buf.get(self.pos).filter(|&&b| b < 0x80) {
            self.pos += 1;
            return Ok(((b >> 1) as i64) ^ -((b & 1) as i64));
        }
        let mut n: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(
                    self.malformed(format!("{field}: truncated varint at byte {}", self.pos))
                );
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(self.malformed(format!("{field}: varint longer than 64 bits")));
            }
            n |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
            shift += 7;
        }
    }

    pub fn read_int(&mut self, field: &str) -> Result<i32, CodecError> {
        let v = self.read_long(field)?;
        i32::try_from(v)
            .map_err(|_| self.malformed(format!("{field}: {v} does not fit an Avro int")))
    }

    pub fn read_str(&mut self, field: &str) -> Result<&'a str, CodecError> {
        let len = self.read_long(field)?;
        let len = usize::try_from(len)
            .map_err(|_| self.malformed(format!("{field}: negative string length {len}")))?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.malformed(format!(
                    "{field}: string of {len} bytes runs past the end of the record"
                ))
            })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        if printable_ascii(bytes) {
            // SAFETY: ASCII is valid UTF-8.
            return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
        }
        std::str::from_utf8(bytes).map_err(|_| self.malformed(format!("{field}: not valid UTF-8")))
    }

    pub fn read_string(&mut self, field: &str) -> Result<String, CodecError> {
        self.read_str(field).map(str::to_owned)
    }

    /// An enum's symbol index, checked against the number of symbols.
    pub fn read_enum(&mut self, field: &str, symbols: usize) -> Result<usize, CodecError> {
        let i = self.read_long(field)?;
        usize::try_from(i)
            .ok()
            .filter(|&i| i < symbols)
            .ok_or_else(|| {
                self.malformed(format!("{field}: enum index {i} out of range 0..{symbols}"))
            })
    }

    pub fn read_bool(&mut self, field: &str) -> Result<bool, CodecError> {
        match self.buf.get(self.pos) {
            Some(&b @ (0 | 1)) => {
                self.pos += 1;
                Ok(b == 1)
            }
            Some(&b) => {
                Err(self.malformed(format!("{field}: boolean byte {b} is neither 0 nor 1")))
            }
            None => Err(self.malformed(format!("{field}: truncated boolean"))),
        }
    }

    /// `["null", string]`.
    pub fn read_optional_str(&mut self, field: &str) -> Result<Option<&'a str>, CodecError> {
        match self.read_long(field)? {
            0 => Ok(None),
            1 => self.read_str(field).map(Some),
            i => Err(self.malformed(format!("{field}: union branch {i} out of range 0..2"))),
        }
    }

    /// `["null", long]`.
    pub fn read_optional_long(&mut self, field: &str) -> Result<Option<i64>, CodecError> {
        match self.read_long(field)? {
            0 => Ok(None),
            1 => self.read_long(field).map(Some),
            i => Err(self.malformed(format!("{field}: union branch {i} out of range 0..2"))),
        }
    }
}

pub fn write_optional_long(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => write_long(out, 0),
        Some(v) => {
            write_long(out, 1);
            write_long(out, v);
        }
    }
}

pub fn write_optional_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => write_long(out, 0),
        Some(v) => {
            write_long(out, 1);
            write_str(out, v);
        }
    }
}

pub fn write_bool(out: &mut Vec<u8>, v: bool) {
    out.push(v as u8);
}

/// Checks a record type's schema history (for tests): every file in
/// `schemas/history/<dir>/` is registered in `HISTORY` in version order, the current schema
/// is the newest version (a schema change without a new version file fails), and every pair
/// of versions can read each other's data (FULL_TRANSITIVE).
pub fn verify_history<T: AvroRecord>(history_dir: &std::path::Path) -> Result<(), String> {
    use apache_avro::schema_compatibility::SchemaCompatibility;
    let version = |p: &std::path::Path| -> u32 {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.trim_start_matches('v').parse().ok())
            .unwrap_or(u32::MAX)
    };
    let mut files: Vec<_> = std::fs::read_dir(history_dir)
        .map_err(|e| format!("{}: {e}", history_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort_by_key(|p| version(p));
    let on_disk: Vec<String> = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    if on_disk
        .iter()
        .map(String::as_str)
        .ne(T::HISTORY.iter().copied())
    {
        return Err(format!(
            "{} and {}::HISTORY differ: register every vN.avsc, oldest first",
            history_dir.display(),
            T::NAME
        ));
    }
    let parse = |s: &str| Schema::parse_str(s).map_err(|e| format!("{}: {e}", T::NAME));
    let current = parse(T::SCHEMA)?;
    let all = T::HISTORY
        .iter()
        .map(|s| parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let newest = all
        .last()
        .ok_or_else(|| format!("{}: empty history", T::NAME))?;
    if canonical_form(&current) != canonical_form(newest) {
        return Err(format!(
            "{}: the current schema changed without a new version in {}",
            T::NAME,
            history_dir.display()
        ));
    }
    for (i, a) in all.iter().enumerate() {
        for (j, b) in all.iter().enumerate() {
            SchemaCompatibility::can_read(a, b).map_err(|e| {
                format!(
                    "{}: v{} data is unreadable with v{}: {e}",
                    T::NAME,
                    i + 1,
                    j + 1
                )
            })?;
        }
    }
    Ok(())
}

/// Whether every byte is printable ASCII (0x20 to 0x7e): what ids and names almost always
/// are, checked in one pass without branching per byte (a restore reads tens of millions of
/// ids, and UTF-8 validation then the control-character scan were ~10% of its CPU).
fn printable_ascii(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .fold(true, |ok, &b| ok & (b.wrapping_sub(0x20) < 0x5f))
}

/// Control characters (C0, DEL, C1), with a byte-wise fast path for ASCII ids.
fn has_control(value: &str) -> bool {
    if value.is_ascii() {
        value.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        value.chars().any(char::is_control)
    }
}

/// The rule every id follows: 1 to 128 bytes, no control characters.
pub fn check_id(record: &'static str, field: &'static str, value: &str) -> Result<(), CodecError> {
    if !value.is_empty() && value.len() <= MAX_ID_BYTES && printable_ascii(value.as_bytes()) {
        return Ok(());
    }
    let rule = if value.is_empty() {
        "must not be empty".to_string()
    } else if value.len() > MAX_ID_BYTES {
        format!(
            "is {} bytes; at most {MAX_ID_BYTES} are allowed",
            value.len()
        )
    } else if has_control(value) {
        "must not contain control characters".to_string()
    } else {
        return Ok(());
    };
    Err(CodecError::InvalidField {
        record,
        field,
        rule,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_matches_apache_avro_rabin_where_it_follows_the_spec() {
        let no_logical_types = r#"{"type":"record","name":"R","fields":[{"name":"a","type":["null","long"]},{"name":"e","type":{"type":"enum","name":"E","symbols":["X"]}}]}"#;
        for text in ["\"int\"", "\"string\"", no_logical_types] {
            let schema = Schema::parse_str(text).unwrap();
            let theirs = schema.fingerprint::<apache_avro::rabin::Rabin>().bytes;
            assert_eq!(
                fingerprint_of(&schema).to_le_bytes().to_vec(),
                theirs,
                "{text}"
            );
        }
    }

    /// Bytes of an older version go through schema resolution: a Heartbeat written before
    /// `client_sent_at` existed decodes with that field's default.
    #[test]
    fn an_older_version_is_resolved_to_the_current_schema() {
        use crate::records::Heartbeat;
        let v0 = Heartbeat::SCHEMA.replace(
            r#"{"name": "client_sent_at", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}], "default": null,"#,
            r#"{"name": "unused_doc_holder", "type": "null", "default": null,"#,
        );
        assert_ne!(
            v0,
            Heartbeat::SCHEMA,
            "the test must really change the schema"
        );
        let writer = Schema::parse_str(&v0).unwrap();
        let codec = Codec::with_history::<Heartbeat>(&[&v0, Heartbeat::SCHEMA]);
        let mut body = Vec::new();
        for s in ["s", "u", "f", "r"] {
            write_str(&mut body, s);
        }
        write_long(&mut body, 1); // END
        let mut bytes = MARKER.to_vec();
        bytes.extend_from_slice(&fingerprint_of(&writer).to_le_bytes());
        bytes.extend_from_slice(&body);
        let h: Heartbeat = decode_with(&codec, &bytes).unwrap();
        assert_eq!(h.kind, crate::records::HeartbeatKind::End);
        assert_eq!(h.client_sent_at, None);
        // Without the old version registered, the same bytes are an unknown schema.
        assert_eq!(
            decode_with::<Heartbeat>(&Codec::build::<Heartbeat>(), &bytes)
                .unwrap_err()
                .code(),
            "unknown_schema"
        );
    }

    /// Pinned to v1 (a rolling upgrade or a roll-back), a v2 heartbeat is written with v1's
    /// fingerprint and body: v2's field is dropped, everything else read back as it was.
    #[test]
    fn a_pinned_codec_writes_the_older_version() {
        use crate::records::{Heartbeat, HeartbeatKind};
        let h = Heartbeat {
            session_id: "s".into(),
            user_id: "u".into(),
            facility_id: "f".into(),
            region_id: "r".into(),
            kind: HeartbeatKind::End,
            client_sent_at: Some(5),
            client_version: Some("web-2.1".into()),
        };
        let v1 = Codec::pinned::<Heartbeat>(Heartbeat::HISTORY, Some(1));
        let current = Codec::pinned::<Heartbeat>(Heartbeat::HISTORY, None);
        let mut old = Vec::new();
        encode_by(&v1, &h, &mut old);
        let v1_schema = Schema::parse_str(Heartbeat::HISTORY[0]).unwrap();
        assert_eq!(old[2..10], fingerprint_of(&v1_schema).to_le_bytes());
        assert!(
            apache_avro::from_avro_datum(&v1_schema, &mut &old[10..], None).is_ok(),
            "a v1 reader reads it"
        );
        let back: Heartbeat = decode_with(&current, &old).unwrap();
        assert_eq!(
            back,
            Heartbeat {
                client_version: None,
                ..h.clone()
            }
        );
        let mut new = Vec::new();
        encode_by(&current, &h, &mut new);
        assert_eq!(new[2..10], current.fingerprint().to_le_bytes());
        assert_eq!(decode_with::<Heartbeat>(&current, &new).unwrap(), h);
    }

    /// Registry ids of a fixed map, for framing tests.
    struct Ids(Vec<(u32, u64)>);

    impl RegistryIds for Ids {
        fn fingerprint(&self, id: u32) -> Option<u64> {
            self.0.iter().find(|(i, _)| *i == id).map(|(_, fp)| *fp)
        }
    }

    #[test]
    fn both_framings_decode_to_the_same_record_and_the_first_byte_tells_them_apart() {
        use crate::records::{Heartbeat, HeartbeatKind, HeartbeatRef};
        let h = Heartbeat {
            session_id: "s".into(),
            user_id: "u".into(),
            facility_id: "f".into(),
            region_id: "r".into(),
            kind: HeartbeatKind::End,
            client_sent_at: Some(7),
            client_version: None,
        };
        let confluent = encode_with(&h, Header::Confluent { id: 0x0102_0304 });
        assert_eq!(
            &confluent[..5],
            &[0, 1, 2, 3, 4],
            "magic byte, big-endian id"
        );
        assert_eq!(&confluent[5..], &encode(&h)[HEADER_LEN..], "the same body");
        assert_eq!(confluent_id(&confluent), Some(0x0102_0304));
        assert_eq!(confluent_id(&encode(&h)), None);
        assert_eq!(encode_with(&h, Header::SingleObject), encode(&h));

        let ids = Ids(vec![(0x0102_0304, codec::<Heartbeat>().fingerprint())]);
        assert_eq!(decode_framed::<Heartbeat>(&confluent, &ids).unwrap(), h);
        assert_eq!(decode_framed::<Heartbeat>(&encode(&h), &ids).unwrap(), h);
        assert_eq!(
            HeartbeatRef::decode_framed(&confluent, &ids).unwrap(),
            Some(h.as_ref())
        );
        // Unresolved: the error says to configure the registry.
        let e = decode_framed::<Heartbeat>(&confluent, &NoRegistry).unwrap_err();
        assert_eq!(e.code(), "unresolved_schema_id");
        assert!(e.to_string().contains("schema_registry.url"), "{e}");
        // An id resolved to a schema that is none of ours.
        let e = decode_framed::<Heartbeat>(&confluent, &Ids(vec![(0x0102_0304, 42)])).unwrap_err();
        assert_eq!(e.code(), "unknown_schema");
        // Single-object-only readers keep refusing the registry framing.
        assert_eq!(
            decode::<Heartbeat>(&confluent).unwrap_err().code(),
            "bad_marker"
        );
        // Too short for an id: not the registry framing.
        assert_eq!(confluent_id(&[0, 1, 2]), None);
    }

    #[test]
    fn logical_types_are_canonicalised_as_their_primitive() {
        let s = Schema::parse_str(r#"{"type":"record","name":"R","fields":[{"name":"t","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#).unwrap();
        assert_eq!(
            canonical_form(&s),
            r#"{"name":"R","type":"record","fields":[{"name":"t","type":"long"}]}"#
        );
        // fastavro's CRC-64-AVRO of "int", as the little-endian bytes single-object encoding uses.
        assert_eq!(
            fingerprint_of(&Schema::parse_str("\"int\"").unwrap()).to_le_bytes(),
            [0x8f, 0x5c, 0x39, 0x3f, 0x1a, 0xd5, 0x75, 0x72]
        );
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [
            0i64,
            -1,
            1,
            63,
            -64,
            64,
            i32::MAX as i64,
            i32::MIN as i64,
            i64::MAX,
            i64::MIN,
        ] {
            let mut out = Vec::new();
            write_long(&mut out, v);
            let mut r = BodyReader {
                buf: &out,
                pos: 0,
                record: "t",
            };
            assert_eq!(r.read_long("x").unwrap(), v);
            assert_eq!(r.pos, out.len());
        }
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let bytes = [0xffu8; 11];
        let mut r = BodyReader {
            buf: &bytes,
            pos: 0,
            record: "t",
        };
        assert!(matches!(
            r.read_long("x"),
            Err(CodecError::Malformed { .. })
        ));
    }

    #[test]
    fn ids_follow_the_rule() {
        assert!(check_id("R", "f", "abc").is_ok());
        assert!(check_id("R", "f", "").is_err());
        assert!(check_id("R", "f", &"x".repeat(129)).is_err());
        assert!(check_id("R", "f", &"x".repeat(128)).is_ok());
        assert!(check_id("R", "f", "caf\u{e9}").is_ok());
        assert!(
            check_id("R", "f", "a\u{85}b").is_err(),
            "C1 controls count too"
        );
        assert!(check_id("R", "f", "a\u{7f}").is_err());
        assert!(check_id("R", "f", "a\u{1f}").is_err());
        assert!(check_id("R", "f", " ~").is_ok());
        assert!(printable_ascii(b" azAZ09~"));
        for b in (0u8..0x20).chain([0x7f, 0x80, 0xc2, 0xff]) {
            assert!(!printable_ascii(&[b'a', b]), "byte {b:#x}");
        }
        let e = check_id("R", "f", "a\nb").unwrap_err();
        assert_eq!(e.to_string(), "R.f: must not contain control characters");
    }
}
