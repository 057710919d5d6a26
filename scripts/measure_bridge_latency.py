"""Capture -> MQTT and capture -> OPC UA latency at a paced camera rate, end to end through
real components: a throwaway Kafka broker, `linewatch work` on the cached bench PaDiM profile
(default batching), Debian's mosquitto, asyncua's OPC UA server, and both bridges as
`linewatch bridge mqtt|opcua` processes. Prints one JSON line with each bridge's stop figures
(capture -> acknowledged by the target, p50/p99). Figures: docs/results/latency.md.

    .venv/bin/python scripts/measure_bridge_latency.py --rate 10 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the mosquitto and OPC UA server harnesses of the tests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=10.0, help="frames/s offered by one camera (default 10)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the camera sends (default 30)")
    ap.add_argument("--threads", type=int, default=0, help="worker threads, 0 = all cores (default 0)")
    args = ap.parse_args()

    from linewatch.kafka.broker import bench_topics, free_port, temporary_broker
    from linewatch.kafka.io import ensure_topics
    from linewatch.settings import load_settings
    from mqtt_broker import Mosquitto
    from opcua_server import OpcuaTestServer
    from workers.bench import make_frames, produce_frames
    from workers.bench_latency import _child, _finish, _wait_ready
    from workers.bench_profile import BENCH_PRODUCT, fitted_profile_dir, publish_bench_profile

    n = int(round(args.rate * args.seconds))
    folder, _ = fitted_profile_dir(progress=True)
    jpegs, _ = make_frames(size=1024, model_size=256)
    with temporary_broker() as broker, tempfile.TemporaryDirectory(prefix="lw-bridge-lat-") as tmp:
        tmp = Path(tmp)
        publish_bench_profile(folder, tmp / "profiles")
        topics = bench_topics("bridgelat", frames_partitions=2)
        settings = load_settings(kafka={"bootstrap_servers": broker.bootstrap_servers}, topics=topics)
        ensure_topics(settings)
        mqtt = Mosquitto(tmp / "mosquitto", free_port())
        mqtt.start()
        opc = OpcuaTestServer(free_port())
        opc.start()
        env = {**os.environ, "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
               **{f"LINEWATCH_TOPICS__{k.upper()}": str(v) for k, v in topics.items()},
               "LINEWATCH_BRIDGE__OPCUA__USERNAME": "linewatch", "LINEWATCH_BRIDGE__OPCUA__PASSWORD": "s3cret-pw"}
        port = free_port()
        procs = {
            "worker": _child(["work", "--registry", str(tmp / "profiles"), "--threads", str(args.threads),
                              "--metrics-port", str(port), "--max-frames", str(n), "--no-create-topics"], env),
            "mqtt": _child(["bridge", "mqtt", "--port", str(mqtt.port), "--max-records", str(n), "--json"], env),
            "opcua": _child(["bridge", "opcua", "--endpoint", opc.endpoint, "--max-records", str(n), "--json"], env),
        }
        try:
            _wait_ready(port, procs["worker"])
            produce_frames(settings, jpegs, n, BENCH_PRODUCT, rate=args.rate, camera="cam1")
            out = {name: _finish(p, 120 + n / 10) for name, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
            mqtt.stop()
            opc.stop()
    figures = {"rate": args.rate, "frames": n, "cpus": os.cpu_count(), "opcua_writes_seen": len(opc.verdicts)}
    for name in ("mqtt", "opcua"):
        stdout, stderr = out[name]
        line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith("{")), None)
        figures[name] = json.loads(line) if line else {"error": stderr[-800:]}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
