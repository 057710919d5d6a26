#!/usr/bin/env python3
"""Container health checks for the linewatch images (stdlib only, so it runs even when the
application's own imports are broken, and it costs milliseconds).

    linewatch-healthcheck http URL
        healthy when URL answers 200 (worker: the Prometheus endpoint; dashboard:
        Streamlit's /_stcore/health).
    linewatch-healthcheck process SUBCOMMAND [--kafka]
        healthy when a ``linewatch SUBCOMMAND`` process is alive in the container and, with
        --kafka, at least one bootstrap server from LINEWATCH_KAFKA__BOOTSTRAP_SERVERS accepts
        a TCP connection (producer and sink have no HTTP endpoint; a process that lost its
        broker is reported unhealthy instead of silently idling).

Exit 0 = healthy, 1 = unhealthy (Docker's convention); the reason goes to stdout, which
``docker inspect`` shows.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 3.0


def check_http(url: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local URL)
            return resp.status == 200, f"{url} -> {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url} -> {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url} -> {exc}"


def find_process(subcommand: str, proc: Path = Path("/proc")) -> int | None:
    """pid of a live ``linewatch <subcommand>`` process (console script or ``-m linewatch.cli``)."""
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        is_linewatch = any(Path(a).name == "linewatch" or a.startswith("linewatch.cli") for a in args)
        if is_linewatch and subcommand in args:
            return int(entry.name)
    return None


def check_kafka(servers: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    errors = []
    for server in (s.strip() for s in servers.split(",") if s.strip()):
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
                return True, f"kafka {server} reachable"
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {exc}")
    return False, "no bootstrap server reachable (" + "; ".join(errors or ["none configured"]) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="linewatch-healthcheck", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    http = sub.add_parser("http")
    http.add_argument("url")
    proc = sub.add_parser("process")
    proc.add_argument("subcommand")
    proc.add_argument("--kafka", action="store_true")
    args = parser.parse_args(argv)

    if args.kind == "http":
        ok, why = check_http(args.url)
    else:
        pid = find_process(args.subcommand)
        ok, why = pid is not None, (f"linewatch {args.subcommand} pid {pid}" if pid else
                                    f"no 'linewatch {args.subcommand}' process")
        if ok and args.kafka:
            ok, why = check_kafka(os.environ.get("LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
