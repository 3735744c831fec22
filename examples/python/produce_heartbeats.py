#!/usr/bin/env python3
"""Publish heartbeats straight to presence's `heartbeats` topic, for services that report
their users' sessions without going through the gateway's HTTP API.

What the processor needs from such a producer (README, "Publish heartbeats directly"):

  - the value: a `Heartbeat` (schemas/heartbeat.avsc) in Avro single-object encoding
    (C3 01, the schema's CRC-64-AVRO fingerprint, the body), or in the Schema Registry
    framing when the processor has a registry configured;
  - the key: the session id, so that every beat of a session lands on one partition;
  - the record timestamp: when the beat happened (the event time); librdkafka stamps the
    send time, which is right for a live service;
  - a BEAT at least every 30 s while the session lives (the processor closes a session 90 s
    after its last beat), and an END when it ends (logout), which closes it at once;
  - an idempotent producer with acks=all, so a retry never doubles a beat.

One heartbeat from flags, or one per JSON line on stdin:

  python3 produce_heartbeats.py --session s1 --user u1 --facility clinic-42 --region north
  echo '{"session_id": "s1", "user_id": "u1", "facility_id": "clinic-42",
         "region_id": "north", "kind": "END"}' | python3 produce_heartbeats.py
"""
import argparse
import io
import json
import os
import sys
import time

import fastavro
import fastavro.schema
from confluent_kafka import Producer

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(HERE, "..", "..", "schemas", "heartbeat.avsc")
MARKER = b"\xc3\x01"


class HeartbeatEncoder:
    """Single-object encoding with the current heartbeat schema."""

    def __init__(self, path):
        with open(path) as f:
            raw = json.load(f)
        self.schema = fastavro.parse_schema(raw)
        canonical = fastavro.schema.to_parsing_canonical_form(raw)
        self.header = MARKER + bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))

    def encode(self, beat):
        body = io.BytesIO()
        fastavro.schemaless_writer(body, self.schema, beat)
        return self.header + body.getvalue()


def heartbeat(item):
    return {
        "session_id": item["session_id"],
        "user_id": item["user_id"],
        "facility_id": item["facility_id"],
        "region_id": item["region_id"],
        "kind": item.get("kind", "BEAT"),
        "client_sent_at": item.get("client_sent_at", int(time.time() * 1000)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092"))
    ap.add_argument("--topic", default="heartbeats")
    ap.add_argument("--schema", default=SCHEMA)
    ap.add_argument("--session")
    ap.add_argument("--user")
    ap.add_argument("--facility")
    ap.add_argument("--region")
    ap.add_argument("--end", action="store_true", help="send END (the session is over)")
    args = ap.parse_args()

    encoder = HeartbeatEncoder(args.schema)
    producer = Producer({
        "bootstrap.servers": args.bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 5,
        # librdkafka re-sends a failed request's records under a new epoch when a later
        # request in flight fails too (librdkafka #4953): one in flight never doubles a beat.
        "max.in.flight.requests.per.connection": 1,
    })
    failures = []

    def delivered(err, msg):
        if err is not None:
            failures.append(f"{msg.key()!r}: {err}")

    if args.session:
        items = [{"session_id": args.session, "user_id": args.user, "facility_id": args.facility,
                  "region_id": args.region, "kind": "END" if args.end else "BEAT"}]
    else:
        items = (json.loads(line) for line in sys.stdin if line.strip())
    sent = 0
    for item in items:
        beat = heartbeat(item)
        producer.produce(args.topic, key=beat["session_id"].encode(), value=encoder.encode(beat),
                         on_delivery=delivered)
        producer.poll(0)
        sent += 1
    # Every beat acknowledged (or failed) before exiting.
    left = producer.flush(30)
    if failures or left:
        print(f"not delivered: {failures or f'{left} still queued after 30 s'}", file=sys.stderr)
        return 1
    print(f"sent {sent} heartbeat(s) to {args.topic}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
