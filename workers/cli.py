"""``linewatch work`` and ``linewatch sink``: thin shells over ``workers.worker.run_worker`` and
``workers.sink.run_sink``."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_work(subparsers)
    _register_sink(subparsers)


def _register_work(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "work", help="run an inspection worker: frames -> anomaly maps -> results",
        description="Consume `frames` as a member of the worker group, run each product's "
        "profile and publish one result (or DLQ record) per frame. Settings come from "
        "LINEWATCH_* env vars / linewatch.toml; flags override them. SIGTERM or Ctrl-C "
        "finishes the current batch, commits and leaves the group.")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (kafka.bootstrap_servers)")
    p.add_argument("--registry", help="profile registry folder (storage.registry_dir)")
    p.add_argument("--group-id", help="consumer group (worker.group_id)")
    p.add_argument("--max-batch", type=int, help="records per micro-batch (worker.max_batch)")
    p.add_argument("--max-wait-ms", type=int, help="longest wait to fill a batch (worker.max_wait_ms)")
    p.add_argument("--engine", choices=["auto", "tensorrt", "onnxruntime", "torch"], help="worker.engine")
    p.add_argument("--threads", type=int, help="engine/decoder threads, 0 = all cores (worker.threads)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port on 127.0.0.1, 0 = off (worker.metrics_port)")
    p.add_argument("--worker-id", help="id reported in results and the DLQ (default host-pid-random)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames (for benchmarks)")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    p.add_argument("--no-overlap", action="store_true",
                   help="one batch at a time (default: the engine runs batch k while k+1 is decoded)")
    p.add_argument("--json", action="store_true", help="print the final stats as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from linewatch.settings import load_settings
    from workers.worker import run_worker

    overrides: dict = {}
    worker = {k: v for k, v in {
        "group_id": args.group_id, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
        "engine": args.engine, "threads": args.threads, "metrics_port": args.metrics_port,
    }.items() if v is not None}
    if worker:
        overrides["worker"] = worker
    if args.bootstrap_servers:
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap_servers}
    if args.registry:
        overrides["storage"] = {"registry_dir": args.registry}
    settings = load_settings(**overrides)
    stats = run_worker(settings, worker_id=args.worker_id, max_frames=args.max_frames,
                       create_topics=not args.no_create_topics, overlap=not args.no_overlap)
    summary = {
        "worker_id": stats.worker_id, "frames": stats.frames, "results": stats.results,
        "defects": stats.defects, "dlq": stats.dlq, "batches": stats.batches, "replays": stats.replays,
        "elapsed_s": round(stats.elapsed_s, 3), "frames_per_s": round(stats.frames_per_s, 1),
        "engines": stats.engines, "stage_s": {k: round(v, 3) for k, v in stats.stage_s.items()},
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"worker {stats.worker_id}: {stats.frames} frames ({stats.results} results, {stats.defects} defects, "
              f"{stats.dlq} DLQ) in {stats.elapsed_s:.1f}s = {stats.frames_per_s:.1f} frames/s")
    return 0


def _register_sink(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sink",
        help="write inspection results (and DLQ events) from Kafka into DuckDB",
        description="Consume `results` and `frames.dlq` into the DuckDB file (the only writer), "
        "raise/clear defect-rate alerts on the `alerts` topic. Stops cleanly on SIGTERM/Ctrl-C.",
    )
    p.add_argument("--db", type=Path, help="DuckDB file (default: storage.db_path setting)")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default: kafka.bootstrap_servers)")
    p.add_argument("--group-id", help="consumer group (default: sink.group_id)")
    p.add_argument("--max-records", type=int, help="stop after this many records (default: run until stopped)")
    p.add_argument("--idle-timeout", type=float, help="stop after this many seconds without records (default: wait forever)")
    p.set_defaults(func=_run_sink)


def _run_sink(args: argparse.Namespace) -> int:
    from linewatch.settings import load_settings
    from workers.sink import run_sink

    settings = load_settings()
    section_updates = {
        "storage": {"db_path": args.db} if args.db else {},
        "kafka": {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {},
        "sink": {"group_id": args.group_id} if args.group_id else {},
    }
    for section, values in section_updates.items():
        if values:  # model_copy keeps secrets and everything env/TOML set for the section
            settings = settings.model_copy(update={section: getattr(settings, section).model_copy(update=values)})
    stop = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"linewatch sink: {settings.topics.results} -> {settings.storage.db_path} (Ctrl-C to stop)", flush=True)
    stats = run_sink(settings, stop_event=stop, max_records=args.max_records, idle_timeout_s=args.idle_timeout)
    print(json.dumps(stats.as_dict()), flush=True)
    return 0
