"""`linewatch sink`: a thin shell over :func:`workers.sink.run_sink`."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sink",
        help="write inspection results (and DLQ events) from Kafka into DuckDB",
        description="Consume `results` and `frames.dlq` into the DuckDB file (the only writer), "
        "raise/clear defect-rate alerts on the `alerts` topic. Stops cleanly on SIGTERM/Ctrl-C.",
    )
    p.add_argument("--db", type=Path, help="DuckDB file (default: storage.db_path setting)")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (default: kafka.bootstrap_servers)")
    p.add_argument("--group-id", help="consumer group (default: sink.group_id)")
    p.add_argument("--max-records", type=int, help="stop after this many records")
    p.add_argument("--idle-timeout", type=float, help="stop after this many seconds without records")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
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
