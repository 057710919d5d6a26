#!/usr/bin/env python
"""Run the fault-injection suite (tests/faults, real broker + subprocess workers/sink + real
DuckDB) and print the issue-7 table: one row per scenario with frames produced, rows
written, DLQ records, missing, duplicated and time to recover.

    python scripts/faults_report.py              # run everything, then print the table
    python scripts/faults_report.py -k sink      # only matching scenarios (pytest -k)
    python scripts/faults_report.py --table-only # print the table of the last run

Each scenario writes test-artifacts/faults/<scenario>.json (the figures, plus details such as
per-fault recovery times and DLQ reasons) and keeps the services' logs under
test-artifacts/faults/logs/<scenario>/. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "test-artifacts" / "faults"
COLUMNS = ("scenario", "produced", "rows", "dlq", "missing", "duplicated", "time_to_recover")
HEAD = ("Scenario", "Frames produced", "Rows written", "DLQ records", "Missing", "Duplicated", "Time to recover")


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in rows:
        cells = [f"{r['scenario']}: {r.get('title', '')}"] + [str(r.get(c, "")) for c in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_rows() -> list[dict]:
    rows = []
    for f in sorted(OUT.glob("[0-9]*.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "produced" in r:
            rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", help="only scenarios matching this pytest -k expression")
    ap.add_argument("--table-only", action="store_true", help="print the table of the last run, run nothing")
    ap.add_argument("--basetemp", default="/tmp/linewatch-faults", help="pytest --basetemp (kept until the next run)")
    args = ap.parse_args(argv)
    rc = 0
    if not args.table_only:
        if not args.k:
            for f in OUT.glob("[0-9]*.json"):
                f.unlink()
        cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "faults"), "-m", "faults", "-q", "-rA",
               "-p", "no:cacheprovider", f"--basetemp={args.basetemp}", "-W", "ignore::DeprecationWarning"]
        if args.k:
            cmd += ["-k", args.k]
        print("$", " ".join(cmd), flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"\nfaults suite: exit {rc} in {time.monotonic() - t0:.0f} s")
    rows = load_rows()
    if not rows:
        print("no scenario figures found under", OUT)
        return rc or 1
    print()
    print(table(rows))
    cal = OUT / "6b-calibration-bad-inputs.json"
    if cal.is_file():
        d = json.loads(cal.read_text())
        print("\nCalibration with bad inputs (exit code, last stderr line):")
        for name, v in d["cases"].items():
            print(f"  {name:22s} exit {v['rc']}  {v['stderr_last']}")
        print(f"  registry before {d['registry_before']} after {d['registry_after']}")
    print(f"\ndetails: {OUT}/*.json, logs: {OUT}/logs/")
    return rc


if __name__ == "__main__":
    sys.exit(main())
