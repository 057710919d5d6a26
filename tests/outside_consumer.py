"""An MES-side reader written without linewatch: plain kafka-python reads every record of a
topic from the beginning to its end offsets and validates each against the published schemas
(docs/contracts/, the jsonschema package). Run as a subprocess by tests/test_contracts.py;
imports nothing from linewatch (it checks that itself). Prints one JSON line: counts, the
coordinates of every invalid record, and the verdict per frame id."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jsonschema
from kafka import KafkaConsumer, TopicPartition


def load(contracts: Path, topic_key: str) -> dict[str, jsonschema.Draft202012Validator]:
    index = json.loads((contracts / "index.json").read_text())
    files = index["topics"][topic_key]["schemas"]
    return {what: jsonschema.Draft202012Validator(json.loads((contracts / f).read_text())) for what, f in files.items()}


def check_result(rec, v: dict) -> dict:
    value = json.loads(rec.value)
    v["value"].validate(value)
    v["headers"].validate({k: b.decode("utf-8") for k, b in rec.headers})
    if rec.key.decode("utf-8") != value["camera"]:
        raise ValueError(f"key {rec.key!r} is not the camera {value['camera']!r}")
    return {"frame_id": value["frame_id"], "camera": value["camera"], "seq": value["seq"],
            "verdict": value["verdict"], "category": value["category"], "schema_version": value["schema_version"]}


def check_dlq(rec, v: dict) -> dict:
    headers = dict(rec.headers)
    if "dlq" not in headers:
        raise ValueError("no dlq header")
    info = json.loads(headers["dlq"])
    v["headers.dlq"].validate(info)
    return {"frame_id": info["frame_id"], "stage": info["stage"], "reason": info["reason"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--contracts", required=True, type=Path)
    ap.add_argument("--kind", choices=("results", "frames.dlq"), default="results")
    ap.add_argument("--min", type=int, default=1, help="wait until the topic holds at least this many records")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    validators = load(args.contracts, args.kind)
    check = check_result if args.kind == "results" else check_dlq

    consumer = KafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False, group_id=None,
                             max_partition_fetch_bytes=10_485_760)
    deadline = time.monotonic() + args.timeout
    parts = consumer.partitions_for_topic(args.topic) or set()
    while not parts and time.monotonic() < deadline:
        time.sleep(0.2)
        consumer.topics()
        parts = consumer.partitions_for_topic(args.topic) or set()
    tps = [TopicPartition(args.topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    while sum(consumer.end_offsets(tps).values()) < args.min and time.monotonic() < deadline:
        time.sleep(0.2)
    end = consumer.end_offsets(tps)
    records, valid, invalid = 0, [], []
    while any(consumer.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            for rec in batch:
                records += 1
                try:
                    valid.append(check(rec, validators))
                except (jsonschema.ValidationError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                    invalid.append({"partition": rec.partition, "offset": rec.offset,
                                    "error": " ".join(str(getattr(exc, "message", exc)).split())[:300]})
    consumer.close()
    leaked = sorted(m for m in sys.modules if m == "linewatch" or m.startswith("linewatch."))
    print(json.dumps({"records": records, "valid": valid, "invalid": invalid, "linewatch_modules": leaked}))
    return 0 if not invalid else 1


if __name__ == "__main__":
    sys.exit(main())
