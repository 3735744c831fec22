#!/usr/bin/env python3
"""Print facility transitions from presence's `facility-status` topic as they arrive.

A downstream service's starting point: confluent-kafka (librdkafka) reads the topic with
read_committed isolation, and each value is decoded in whichever framing the processor
writes (README, "Consume facility-status"):

  single-object (default)  C3 01, the writer schema's CRC-64-AVRO fingerprint, the Avro body:
                           decoded with fastavro and the .avsc files alone, every released
                           version (schemas/history/) resolved to the current schema
  confluent                00, a 4-byte schema id, the Avro body: decoded by confluent-kafka's
                           AvroDeserializer through the schema registry (--registry-url)

Each transition is printed as one JSON line on stdout, e.g.
  {"facility_id": "clinic-42", "region_id": "north", "status": "ONLINE", "open_sessions": 1,
   "since": 1764300000000, "seq": 7, "emitted_at": 1764300000120}
The latest record per facility is its current status (the topic is compacted); `seq` rises by
one per transition of a facility, so a consumer that stores it can drop what it has seen.

  pip install confluent-kafka[avro] fastavro
  python3 consume_facility_status.py --bootstrap-servers 127.0.0.1:9092 --from-beginning
"""
import argparse
import datetime
import glob
import io
import json
import os
import sys
import uuid

import fastavro
import fastavro.schema
from confluent_kafka import Consumer, KafkaError

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = os.path.join(HERE, "..", "..", "schemas")
MARKER = b"\xc3\x01"


def fingerprint(raw_schema):
    """CRC-64-AVRO of the Parsing Canonical Form, as the 8 little-endian bytes on the wire."""
    canonical = fastavro.schema.to_parsing_canonical_form(raw_schema)
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def load_schemas(schemas_dir):
    """The current schema, and every released version by fingerprint."""
    with open(os.path.join(schemas_dir, "facility_status.avsc")) as f:
        current = json.load(f)
    writers = {fingerprint(current): fastavro.parse_schema(current)}
    for path in sorted(glob.glob(os.path.join(schemas_dir, "history", "facility_status", "*.avsc"))):
        with open(path) as f:
            raw = json.load(f)
        writers[fingerprint(raw)] = fastavro.parse_schema(raw)
    return fastavro.parse_schema(current), writers


def plain(value):
    """timestamp-millis fields come back as datetimes: print them as epoch milliseconds."""
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    return value


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092"))
    ap.add_argument("--topic", default="facility-status")
    ap.add_argument("--group-id", default=None, help="default: a new group each run")
    ap.add_argument("--from-beginning", action="store_true", help="read the topic from its start")
    ap.add_argument("--registry-url", default=os.environ.get("SCHEMA_REGISTRY_URL"),
                    help="for the confluent framing, e.g. http://127.0.0.1:8081/apis/ccompat/v7")
    ap.add_argument("--schemas", default=SCHEMAS, help="presence's schemas/ directory")
    ap.add_argument("--max-records", type=int, default=0, help="stop after this many (0: never)")
    ap.add_argument("--timeout", type=float, default=0, help="stop after this many seconds (0: never)")
    args = ap.parse_args()

    reader, writers = load_schemas(args.schemas)
    deserializer = None
    if args.registry_url:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        registry = SchemaRegistryClient({"url": args.registry_url})
        avro_deserializer = AvroDeserializer(registry)

        def deserializer(value):
            return avro_deserializer(value, SerializationContext(args.topic, MessageField.VALUE))

    consumer = Consumer({
        "bootstrap.servers": args.bootstrap_servers,
        "group.id": args.group_id or f"facility-status-example-{uuid.uuid4()}",
        # Only transitions the processor committed (it writes them in transactions).
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest" if args.from_beginning else "latest",
        "enable.auto.commit": True,
    })
    consumer.subscribe([args.topic])
    deadline = None
    if args.timeout:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=args.timeout)
    printed = 0
    try:
        while not args.max_records or printed < args.max_records:
            if deadline and datetime.datetime.now() >= deadline:
                print(f"stopping: {args.timeout} s passed", file=sys.stderr)
                return 1 if args.max_records else 0
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    print(f"kafka: {msg.error()}", file=sys.stderr)
                continue
            value = msg.value() or b""
            if value[:2] == MARKER:
                writer = writers.get(value[2:10])
                if writer is None:
                    print(f"offset {msg.offset()}: unknown schema fingerprint {value[2:10].hex()}; "
                          "update schemas/ from presence", file=sys.stderr)
                    continue
                record = fastavro.schemaless_reader(io.BytesIO(value[10:]), writer, reader)
            elif value[:1] == b"\x00" and deserializer:
                record = deserializer(value)
            else:
                print(f"offset {msg.offset()}: not a presence record (first bytes {value[:2].hex()}); "
                      "with the confluent framing pass --registry-url", file=sys.stderr)
                continue
            print(json.dumps({k: plain(v) for k, v in record.items()}), flush=True)
            printed += 1
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
