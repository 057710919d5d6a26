"""Peak resident memory (VmHWM, Linux) of the model-free services while they run: `linewatch
produce` sending synthetic frames, and `linewatch sink` twice: at the line's pace (results
published at ``--fps`` while it runs) and draining a backlog of ``--results`` records pre-filled
on `results` (one in four a defect with thumbnail, mask and heat map, built by
tests/result_factory.py), against a throwaway broker.

    python scripts/measure_service_memory.py [--seconds 20] [--fps 20] [--results 5000]

Why a script and not a test: memory depends on the machine and its libraries; the tests only
check that these processes never import torch (tests/test_imports.py). Figures go to
docs/results/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from linewatch.kafka.broker import temporary_broker
from linewatch.kafka.io import make_producer, send_nowait
from linewatch.settings import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from result_factory import make_result  # noqa: E402 - the tests' realistic result records


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def watch(cmd: list[str], seconds: float, env: dict[str, str]) -> tuple[float, int | None]:
    """Run ``cmd`` for up to ``seconds`` (SIGTERM after), sampling its peak RSS twice a second."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, start = 0.0, time.monotonic()
    while time.monotonic() - start < seconds and proc.poll() is None:
        peak = max(peak, peak_rss_mb(proc.pid))
        time.sleep(0.5)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)
    return peak, proc.returncode


def _records(start: int, n: int):
    cats = ("structural", "surface", "contamination", "combined")
    for i in range(start, start + n):
        defect = i % 4 == 0
        yield make_result(i, verdict="defect" if defect else "ok",
                          category=cats[i // 4 % 4] if defect else "unknown", frame_id=f"mem-{i:07d}")


def publish(bootstrap_servers: str, start: int, n: int, fps: float | None = None) -> None:
    """``n`` result records on `results` (``fps`` None: as fast as possible), all delivered."""
    settings = load_settings(kafka={"bootstrap_servers": bootstrap_servers})
    producer = make_producer(settings, client_id="measure-service-memory", linger_ms=20)
    pending, t0 = [], time.monotonic()
    for k, r in enumerate(_records(start, n)):
        if fps:
            time.sleep(max(0.0, t0 + k / fps - time.monotonic()))
        pending.append(send_nowait(producer, settings.topics.results, r.to_bytes(), key=r.camera))
    producer.flush()
    for p in pending:
        p.result(timeout=60)
    producer.close(timeout=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="how long each service runs (default 20)")
    ap.add_argument("--fps", type=float, default=20.0, help="frames (results) per second the producer (the feeder of the paced sink) sends (default 20)")
    ap.add_argument("--results", type=int, default=5000,
                    help="backlog of result records the second sink run drains (default 5000)")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("linewatch"))
    with temporary_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers}
        subprocess.run([exe, "broker", "topics"], env=env, check=True, capture_output=True)
        produce = [exe, "produce", "-s", "synthetic:cap", "--fps", str(args.fps), "--duration", str(args.seconds)]
        peak, rc = watch(produce, args.seconds + 5, env)
        print(f"linewatch produce ({args.fps:g} frames/s): peak RSS {peak:.0f} MB (exit {rc})")

        sink = [exe, "sink", "--db", str(Path(tmp) / "lw.duckdb"), "--idle-timeout", "5"]
        paced = int(args.fps * args.seconds)
        feeder = threading.Thread(target=publish, args=(broker.bootstrap_servers, 0, paced, args.fps))
        feeder.start()
        peak, rc = watch(sink, args.seconds + 10, env)
        feeder.join()
        print(f"linewatch sink ({args.fps:g} results/s for {args.seconds:g} s): peak RSS {peak:.0f} MB (exit {rc})")

        publish(broker.bootstrap_servers, paced, args.results)
        peak, rc = watch(sink, args.seconds + 10, env)
        print(f"linewatch sink (draining {args.results} results): peak RSS {peak:.0f} MB (exit {rc})")

if __name__ == "__main__":
    main()
