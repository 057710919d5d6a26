"""`linewatch dashboard`: ``streamlit run dashboard/app.py`` bound to 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def streamlit_command(db: Path, host: str, port: int, refresh_s: int | None = None) -> list[str]:
    """The exact command line (tests and the demo start the server the same way)."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--global.developmentMode", "false",
        "--theme.base", "light",
        "--client.toolbarMode", "viewer",
        "--",
        "--db", str(db),
    ]
    if refresh_s:
        cmd += ["--refresh", str(refresh_s)]
    return cmd


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dashboard",
        help="serve the Streamlit dashboard (defects by category, trends, gallery, health)",
        description="Serve the plant-manager dashboard over the DuckDB file the sink writes. "
        "Binds 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--db", type=Path, help="DuckDB file (default: storage.db_path setting)")
    p.add_argument("--host", help="bind address (default: dashboard.host = 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: dashboard.port)")
    p.add_argument("--refresh", type=int, help="auto-refresh seconds (default: dashboard.refresh_s)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from linewatch.settings import load_settings

    settings = load_settings()
    db = args.db or settings.storage.db_path
    host = args.host or settings.dashboard.host
    port = args.port or settings.dashboard.port
    cmd = streamlit_command(db, host, port, args.refresh or settings.dashboard.refresh_s)
    print(f"linewatch dashboard: http://{host}:{port}  (database {db}; Ctrl-C to stop)", flush=True)
    os.environ["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    # exec, not a child: SIGTERM/SIGINT from the demo or a terminal reach streamlit itself,
    # so stopping `linewatch dashboard` can never leave an orphaned server behind
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover - execv does not return
