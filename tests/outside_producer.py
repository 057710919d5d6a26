"""A camera integration written without linewatch: plain kafka-python, the documented headers
(docs/contracts.md, checked against docs/contracts/frames.headers.schema.json before sending).
Run as a subprocess by tests/test_contracts.py; imports nothing from linewatch (it checks that
itself at the end). Prints one JSON line: the frames sent and the verdict each should get."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import cv2
import jsonschema
import numpy as np
from kafka import KafkaProducer


def frame(seq: int, size: int, defect: bool) -> bytes:
    """A grey part with sensor noise; a defective one carries a bright square."""
    rng = np.random.default_rng(seq)
    img = np.clip(np.full((size, size, 3), 128.0) + rng.normal(0, 3, (size, size, 3)), 0, 255).astype(np.uint8)
    if defect:
        img[size // 3: size // 3 + size // 5, size // 4: size // 4 + size // 5] = 250
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--contracts", required=True, type=Path)
    ap.add_argument("--product", default="widget")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--bad", action="store_true", help="also send one frame whose seq header is not a number")
    args = ap.parse_args()

    index = json.loads((args.contracts / "index.json").read_text())
    schema = json.loads((args.contracts / index["topics"]["frames"]["schemas"]["headers"]).read_text())
    validator = jsonschema.Draft202012Validator(schema)

    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all", max_request_size=10_485_760)
    sent, futures = [], []
    for seq in range(args.n):
        camera = f"extcam{seq % args.cameras}"
        defect = seq % 3 == 0
        headers = {"frame_id": f"{camera}-{seq}-{uuid.uuid4().hex[:8]}", "product": args.product,
                   "camera": camera, "line": "ext-line", "seq": str(seq),
                   "capture_ts_ms": str(int(time.time() * 1000)), "encoding": "jpeg"}
        validator.validate(headers)  # what an integrator's own test would do
        futures.append(producer.send(args.topic, value=frame(seq, args.size, defect), key=camera.encode(),
                                     headers=[(k, v.encode()) for k, v in headers.items()]))
        sent.append({"frame_id": headers["frame_id"], "camera": camera, "seq": seq,
                     "verdict": "defect" if defect else "ok"})
    bad = None
    if args.bad:
        headers = {"frame_id": f"extbad-{uuid.uuid4().hex[:8]}", "product": args.product, "camera": "extcam0",
                   "line": "ext-line", "seq": "not-a-number", "capture_ts_ms": str(int(time.time() * 1000))}
        assert not validator.is_valid(headers)
        futures.append(producer.send(args.topic, value=frame(999, args.size, False), key=b"extcam0",
                                     headers=[(k, v.encode()) for k, v in headers.items()]))
        bad = headers["frame_id"]
    producer.flush()
    for f in futures:
        f.get(timeout=30)
    producer.close()
    leaked = sorted(m for m in sys.modules if m == "linewatch" or m.startswith("linewatch."))
    print(json.dumps({"sent": sent, "bad_frame_id": bad, "linewatch_modules": leaked}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
