"""``linewatch bench latency``: capture -> result and capture -> DuckDB latency at offered frame
rates, against the worker's and the sink's batching settings, on real components.

One throwaway broker; per (setting, rate) cell fresh tagged topics, a ``linewatch work`` child
(the bench PaDiM profile, preloaded: its ``/ready`` is awaited before the first frame) and a
``linewatch sink`` child writing a fresh DuckDB file. Frames (1024 px JPEGs of the synthetic
line) are sent at the offered rate, each stamped with its capture time when it is sent.

- capture -> result: the broker timestamp of the result record (the worker's producer stamps it
  when it sends the result) minus the frame's capture time;
- capture -> DuckDB: ``stored_ts_ms`` of the inspection row minus its capture time;
- the sink's write rate: a second sink drains a topic pre-filled with result records (copies of
  the cell's real results with new frame ids), rows / (last - first ``stored_ts_ms``).

A rate above what the worker can serve shows as a latency that grows with the run (the queue),
which the table marks "over capacity". Figures and the chosen defaults: docs/results/latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from linewatch.errors import UserError


@dataclass(frozen=True)
class Batching:
    """One column of the table: the worker's and the sink's batch-closing settings."""

    name: str
    worker_max_wait_ms: int
    worker_quiet_ms: int | None
    sink_max_wait_ms: int
    sink_quiet_ms: int | None

    def env(self) -> dict[str, str]:
        # quiet_ms = max_wait_ms switches the quiet gap off in effect (the old fixed wait)
        return {"LINEWATCH_WORKER__MAX_WAIT_MS": str(self.worker_max_wait_ms),
                "LINEWATCH_WORKER__QUIET_MS": str(self.worker_quiet_ms if self.worker_quiet_ms is not None
                                                  else self.worker_max_wait_ms),
                "LINEWATCH_SINK__MAX_WAIT_MS": str(self.sink_max_wait_ms),
                "LINEWATCH_SINK__QUIET_MS": str(self.sink_quiet_ms if self.sink_quiet_ms is not None
                                                else self.sink_max_wait_ms)}


def default_batchings() -> list[Batching]:
    """The fixed waits before (worker 50 ms, sink 500 ms) and the quiet-gap defaults now."""
    from linewatch.settings import SinkSettings, WorkerSettings

    w, s = WorkerSettings(), SinkSettings()
    return [Batching("fixed waits (50 / 500 ms)", 50, None, 500, None),
            Batching(f"quiet gap ({w.quiet_ms} / {s.quiet_ms} ms)", w.max_wait_ms, w.quiet_ms, s.max_wait_ms,
                     s.quiet_ms)]


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def _wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited {proc.returncode} before it was ready: {_log_of(proc)[-1500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"worker not ready after {timeout_s:.0f} s")


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A `linewatch` child. Its log goes to a file, not a pipe: a pipe nobody reads until the
    child exits fills up (64 kB) and blocks a chatty child mid-run."""
    launcher = Path(sys.executable).with_name("linewatch")
    log = tempfile.NamedTemporaryFile("w+", prefix="lw-child-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(launcher), *args], env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    log.close()
    return proc


def _log_of(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    return path.read_text(errors="replace") if path is not None and path.exists() else ""


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    """(stdout, log) of a child once it exits; SIGTERM after ``timeout_s``."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    log = _log_of(proc)
    proc.log_path.unlink(missing_ok=True)  # type: ignore[attr-defined]
    return out or "", log


def _db_latencies(db: Path) -> list[float]:
    from linewatch.store.connect import reading

    with reading(db) as con:
        rows = con.execute("SELECT stored_ts_ms - capture_ts_ms FROM inspections").fetchall()
    return [float(r[0]) for r in rows]


def measure_cell(broker: Any, registry: Path, jpegs: list[bytes], batching: Batching, rate: float,
                 duration_s: float, product: str, tag: str, threads: int) -> dict[str, Any]:
    """One (batching, rate) cell: figures of the two latencies and the worker's batch sizes."""
    from linewatch.kafka.broker import bench_topics, free_port
    from linewatch.kafka.io import ensure_topics
    from linewatch.settings import load_settings
    from workers.bench import produce_frames, read_results

    topics = bench_topics(tag, frames_partitions=2)
    settings = load_settings(kafka={"bootstrap_servers": broker.bootstrap_servers}, topics=topics,
                             storage={"registry_dir": registry})
    ensure_topics(settings)
    env = {**os.environ, **batching.env(), "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           **{f"LINEWATCH_TOPICS__{k.upper()}": str(v) for k, v in topics.items()}}
    n = max(2, int(round(rate * duration_s)))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lw-latency-") as tmp:
        db = Path(tmp) / "latency.duckdb"
        worker = _child(["work", "--registry", str(registry), "--group-id", f"lat-w-{tag}", "--threads", str(threads),
                         "--metrics-port", str(port), "--max-frames", str(n), "--no-create-topics", "--json"], env)
        sink = _child(["sink", "--db", str(db), "--group-id", f"lat-s-{tag}", "--max-records", str(n)], env)
        try:
            _wait_ready(port, worker)
            ids = produce_frames(settings, jpegs, n, product, rate=rate, camera="latcam")
            wsum, werr = _finish(worker, 120 + n / 10)
            _finish(sink, 120)
        finally:
            for p in (worker, sink):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = read_results(settings, n, timeout_s=30)
        by_id = {r["frame_id"]: (r, ts) for r, ts in results}
        to_result = [ts - r["capture_ts_ms"] for r, ts in by_id.values()]
        to_db = _db_latencies(db) if db.exists() else []
    summary = next((json.loads(ln) for ln in wsum.splitlines() if ln.startswith("{")), {})
    # over capacity: the worker needed clearly longer than the camera to get through the frames
    # (the queue grew during the run and drained after it)
    last_capture = max((by_id[f][0]["capture_ts_ms"] for f in ids if f in by_id), default=0)
    last_result = max((ts for _, ts in by_id.values()), default=0)
    growing = bool(by_id and last_result - last_capture > max(2000.0, 250.0 * duration_s))
    return {"batching": batching.name, "rate": rate, "frames": n, "results": len(by_id), "rows": len(to_db),
            "sample_results": [r for r, _ in list(by_id.values())[:32]],
            "missing": len(set(ids) - set(by_id)),
            "result_p50_ms": _pct(to_result, 50), "result_p99_ms": _pct(to_result, 99),
            "db_p50_ms": _pct(to_db, 50), "db_p99_ms": _pct(to_db, 99),
            "mean_batch": round(summary["frames"] / summary["batches"], 2) if summary.get("batches") else None,
            "over_capacity": growing,
            **({"worker_log": werr.strip()[-1500:]} if worker.returncode or len(by_id) < n else {})}


def measure_sink_rate(broker: Any, batching: Batching, n_rows: int, tag: str,
                      samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows/s one sink writes draining ``n_rows`` pre-filled result records: copies of real
    results ``samples`` (thumbnails, masks and heat maps included) under new frame ids."""
    from linewatch.kafka.broker import bench_topics
    from linewatch.kafka.io import ensure_topics, make_producer, send_nowait
    from linewatch.settings import load_settings

    if not samples:
        return {"batching": batching.name, "rows": 0, "rows_per_s": None,
                "reason": "no results of the latency cells to copy"}
    topics = bench_topics(tag, frames_partitions=2)
    settings = load_settings(kafka={"bootstrap_servers": broker.bootstrap_servers}, topics=topics)
    ensure_topics(settings)
    producer = make_producer(settings, client_id="linewatch-bench-latency-results", linger_ms=20)
    pending = []
    for i in range(n_rows):
        rec = {**samples[i % len(samples)], "frame_id": f"sinkrate-{tag}-{i:07d}", "seq": i}
        pending.append(send_nowait(producer, settings.topics.results, json.dumps(rec).encode(), key=b"latcam"))
    producer.flush()
    for p in pending:
        p.result(timeout=60)
    producer.close(timeout=5)
    env = {**os.environ, **batching.env(), "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           **{f"LINEWATCH_TOPICS__{k.upper()}": str(v) for k, v in topics.items()}}
    with tempfile.TemporaryDirectory(prefix="lw-sinkrate-") as tmp:
        db = Path(tmp) / "rate.duckdb"
        proc = _child(["sink", "--db", str(db), "--group-id", f"rate-{tag}", "--max-records", str(n_rows)], env)
        _finish(proc, 300)
        from linewatch.store.connect import reading

        with reading(db) as con:
            rows, lo, hi = con.execute("SELECT count(*), min(stored_ts_ms), max(stored_ts_ms) FROM inspections").fetchone()
    span = max((hi or 0) - (lo or 0), 1) / 1000.0
    return {"batching": batching.name, "rows": rows, "rows_per_s": round(rows / span, 0)}


def bench_latency(bootstrap_servers: str | None = None, *, rates: list[float], duration_s: float = 20.0,
                  batchings: list[Batching] | None = None, sink_rows: int = 20_000, threads: int = 0,
                  progress: bool = True, frame_size: int = 1024, input_size: int = 256, fit_images: int = 60,
                  options: dict[str, Any] | None = None, cache: Path | None = None) -> dict[str, Any]:
    """The whole table (library entry point of ``linewatch bench latency``). ``bootstrap_servers``
    None: a throwaway broker; the profile is the cached bench PaDiM (``workers.bench``)."""
    import contextlib
    from types import SimpleNamespace

    from linewatch.kafka.broker import temporary_broker
    from workers.bench import load_average, make_frames
    from workers.bench_profile import BENCH_PRODUCT, fitted_profile_dir, publish_bench_profile

    batchings = batchings or default_batchings()
    folder, _ = fitted_profile_dir(input_size=input_size, fit_images=fit_images, options=options,
                                   progress=progress, cache=cache)
    jpegs, _ = make_frames(size=frame_size, model_size=input_size)
    cells, sink_rates = [], []
    with contextlib.ExitStack() as stack:
        broker = (SimpleNamespace(bootstrap_servers=bootstrap_servers) if bootstrap_servers
                  else stack.enter_context(temporary_broker()))
        registry = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lw-latency-reg-")))
        publish_bench_profile(folder, registry)
        run = os.urandom(3).hex()  # topics and groups of this run only (a shared broker may hold others)
        for bi, b in enumerate(batchings):
            for rate in rates:
                if progress:
                    print(f"[bench latency] {b.name} at {rate:g} frames/s for {duration_s:g} s", file=sys.stderr, flush=True)
                cells.append(measure_cell(broker, registry, jpegs, b, rate, duration_s, BENCH_PRODUCT,
                                          f"lat{run}b{bi}r{int(rate)}", threads))
            if sink_rows:
                samples = [r for c in cells for r in c.pop("sample_results", [])]
                if progress:
                    print(f"[bench latency] {b.name}: sink write rate over {sink_rows} rows", file=sys.stderr, flush=True)
                sink_rates.append(measure_sink_rate(broker, b, sink_rows, f"rate{run}b{bi}", samples))
    for c in cells:
        c.pop("sample_results", None)
    return {"cells": cells, "sink": sink_rates, "duration_s": duration_s, "cpus": os.cpu_count(),
            "load_average": load_average()}


def format_latency(res: dict[str, Any]) -> str:
    lines = ["| batching | offered frames/s | capture->result p50 / p99 ms | capture->DuckDB p50 / p99 ms | "
             "mean worker batch | results / frames |",
             "|---|---|---|---|---|---|"]
    for c in res["cells"]:
        flag = " (over capacity: the queue grows)" if c["over_capacity"] else ""
        lines.append(f"| {c['batching']} | {c['rate']:g}{flag} | {c['result_p50_ms']} / {c['result_p99_ms']} | "
                     f"{c['db_p50_ms']} / {c['db_p99_ms']} | {c['mean_batch']} | {c['results']} / {c['frames']} |")
    if res["sink"]:
        lines += ["", "| batching | one sink, rows/s (drain of a pre-filled topic) |", "|---|---|"]
        lines += [f"| {s['batching']} | {s['rows_per_s']:.0f} ({s['rows']} rows) |" if s["rows_per_s"]
                  else f"| {s['batching']} | not measured: {s.get('reason')} |" for s in res["sink"]]
    lines.append(f"\n{res['duration_s']:g} s per cell, {res['cpus']} CPUs, load average {res['load_average']}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--rates: not a comma-separated list of numbers: {args.rates!r}") from None
    if not rates or min(rates) <= 0:
        raise UserError("--rates: give at least one rate above 0")
    res = bench_latency(rates=rates, duration_s=args.duration, sink_rows=args.sink_rows, threads=args.threads,
                        progress=not args.quiet)
    print(json.dumps(res, indent=2) if args.json else format_latency(res))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="capture->result and capture->DuckDB p50/p99 at offered frame rates",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="10,100,500", help="offered frames/s, comma-separated (default 10,100,500)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of frames per cell (default 20)")
    p.add_argument("--sink-rows", type=int, default=20_000,
                   help="rows of the sink write-rate drain per batching, 0 = skip (default 20000)")
    p.add_argument("--threads", type=int, default=0, help="worker.threads, 0 = all cores (default 0)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    p.add_argument("--json-out", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_run)
