"""Peak resident memory (VmHWM, Linux) of the model-free services while they run: `linewatch
produce` sending synthetic frames and `linewatch sink` consuming, against a throwaway broker.

    python scripts/measure_service_memory.py [--seconds 20] [--fps 20]

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
import time
from pathlib import Path

from linewatch.kafka.broker import temporary_broker


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="how long each service runs (default 20)")
    ap.add_argument("--fps", type=float, default=20.0, help="frames per second the producer sends (default 20)")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("linewatch"))
    with temporary_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers}
        subprocess.run([exe, "broker", "topics"], env=env, check=True, capture_output=True)
        produce = [exe, "produce", "-s", "synthetic:cap", "--fps", str(args.fps), "--duration", str(args.seconds)]
        sink = [exe, "sink", "--db", str(Path(tmp) / "lw.duckdb"), "--idle-timeout", str(args.seconds)]
        for name, cmd in (("produce", produce), ("sink", sink)):
            peak, rc = watch(cmd, args.seconds + 5, env)
            print(f"linewatch {name}: peak RSS {peak:.0f} MB (exit {rc})")


if __name__ == "__main__":
    main()
