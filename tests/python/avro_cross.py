#!/usr/bin/env python3
"""Cross-implementation check of presence's wire format with Python's fastavro.

Reads JSON lines on stdin and writes JSON lines on stdout, so the Rust tests can drive it:

  encode <schema.avsc>   each input line is a record as JSON; each output line is
                         {"hex": <single-object encoding>} written by fastavro alone
  decode <schema.avsc>   each input line is {"hex": ...} written by presence; each output line
                         is the record fastavro decoded, as JSON

Single-object encoding (Avro specification): C3 01, the 8-byte little-endian CRC-64-AVRO
fingerprint of the schema's Parsing Canonical Form, then the binary body. Nothing here
comes from presence's code: only the .avsc file.
"""
import io
import json
import sys

import fastavro
import fastavro.schema

MARKER = b"\xc3\x01"


def load(path):
    with open(path) as f:
        raw = json.load(f)
    parsed = fastavro.parse_schema(raw)
    canonical = fastavro.schema.to_parsing_canonical_form(raw)
    # fastavro renders the CRC-64-AVRO fingerprint as its little-endian bytes in hex.
    fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    return parsed, fingerprint


def encode(parsed, fingerprint, record):
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parsed, record)
    return MARKER + fingerprint + body.getvalue()


def decode(parsed, fingerprint, data):
    if data[:2] != MARKER:
        raise ValueError(f"bad marker {data[:2].hex()}")
    if data[2:10] != fingerprint:
        raise ValueError(f"fingerprint {data[2:10].hex()} is not the schema's {fingerprint.hex()}")
    body = io.BytesIO(data[10:])
    record = fastavro.schemaless_reader(body, parsed)
    if body.read():
        raise ValueError("trailing bytes")
    return record


def main():
    mode, path = sys.argv[1], sys.argv[2]
    parsed, fingerprint = load(path)
    for line in sys.stdin:
        if not line.strip():
            continue
        item = json.loads(line)
        if mode == "encode":
            out = {"hex": encode(parsed, fingerprint, item).hex()}
        elif mode == "decode":
            out = decode(parsed, fingerprint, bytes.fromhex(item["hex"]))
        else:
            sys.exit(f"unknown mode {mode}: use encode or decode")
        print(json.dumps(out, default=lambda v: int(v.timestamp() * 1000)), flush=True)


if __name__ == "__main__":
    main()
