"""`linewatch demo` for real, in miniature: one product, one camera, a tiny model, free ports,
a temp home. It must start every service (broker, sink, worker, producer, dashboard), land rows
in DuckDB, serve the dashboard, and leave nothing running when it stops."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _alive(pid: int) -> bool:
    """True for a live process (a zombie counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d))
    return out


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200 and resp.read().strip() == b"ok"
    except OSError:
        return False


def test_demo_runs_the_whole_line_and_stops_cleanly(tmp_path: Path, capsys):
    from linewatch.kafka.broker import _port_answers, free_port
    from linewatch.cli.demo import DemoConfig, run_demo, summarize
    from linewatch.store import count_rows

    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    kafka_port, controller_port, dash_port = sorted(ports)
    cfg = DemoConfig(home=tmp_path / "demo", products=("brick",), cameras_per_product=1, fps=3.0,
                     frame_size=128, input_size=96, n_train=16, n_test_good=4, n_test_per_category=2,
                     model_options={"d": 16, "neighborhood": 3}, kafka_port=kafka_port, controller_port=controller_port,
                     dashboard_port=dash_port, duration_s=None, status_every_s=5.0, report=False)
    stop = threading.Event()
    box: dict = {}
    children_before = set(_children(os.getpid()))  # e.g. a session broker of other tests

    def target():
        try:
            box["summary"] = run_demo(cfg, stop_event=stop)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name="demo", daemon=True)
    t.start()
    health = f"http://127.0.0.1:{dash_port}/_stcore/health"
    saw_health = False
    rows = 0
    try:
        deadline = time.monotonic() + 420  # first run fits the profile; the box may be loaded
        while time.monotonic() < deadline and t.is_alive():
            saw_health = saw_health or _health(health)
            if cfg.db_path.exists():
                try:
                    rows = count_rows(cfg.db_path, timeout_s=10)
                except Exception:  # the schema may not exist yet
                    rows = 0
            if saw_health and rows >= 5:
                break
            time.sleep(2.0)
    finally:
        stop.set()
        t.join(180)
    assert not t.is_alive(), "run_demo did not return after the stop request"
    if "error" in box:
        raise box["error"]
    summary = box["summary"]
    out = capsys.readouterr().out

    assert saw_health, f"the dashboard never answered {health}; see {cfg.logs_dir / 'dashboard.log'}"
    assert rows >= 5, f"only {rows} rows reached DuckDB; logs in {cfg.logs_dir}"
    # every service was started, as its own process
    assert {"sink", "worker-1", "dashboard", "producer-brick"} <= set(summary.processes)
    # ... and is gone now, like the broker; the demo left no child behind
    for name, pid in summary.processes.items():
        assert not _alive(pid), f"{name} (pid {pid}) still running after the demo stopped"
    assert not _port_answers("127.0.0.1", kafka_port) and not _port_answers("127.0.0.1", dash_port)
    assert not (cfg.home / "broker" / "broker.pid").exists() or not any(
        _alive(int(p)) for p in (cfg.home / "broker" / "broker.pid").read_text().split())
    assert set(_children(os.getpid())) <= children_before

    # the figures it printed are the database's
    final = summarize(cfg.db_path)
    assert final.frames_stored >= rows and summary.frames_stored >= 5
    assert summary.latency_p50_ms is not None and summary.latency_p50_ms > 0
    assert f"demo: dashboard at http://127.0.0.1:{dash_port}" in out
    assert "demo: stopped." in out and f"{summary.frames_stored} frames stored" in out
    # a second run reuses the published profile (no refit)
    assert (cfg.registry_dir / "brick").is_dir()
