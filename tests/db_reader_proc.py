"""A separate process that reads the DuckDB file continuously, the way the dashboard does,
until a stop file appears; writes what it saw as JSON. Used by the reading-while-writing
tests (DuckDB locks are per process, so the reader must be another process)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(db: str, out: str, stop_file: str, use_dashboard: str = "1") -> None:
    from linewatch import store

    counts: list[int] = []
    errors: list[str] = []
    read_ms: list[float] = []
    missing = 0
    stop = Path(stop_file)
    while True:
        final = stop.exists()
        t0 = time.perf_counter()
        try:
            if use_dashboard == "1":
                from dashboard import queries

                snap = queries.load_snapshot(db, queries.Filters())
                counts.append(int(snap.kpis["frames"]))
            else:
                with store.reading(db) as con:
                    counts.append(int(con.execute("SELECT count(*) FROM inspections").fetchone()[0]))
            read_ms.append((time.perf_counter() - t0) * 1000)
        except store.DatabaseMissing:
            missing += 1
        except Exception as exc:  # anything here would reach the user: record it
            errors.append(f"{type(exc).__name__}: {exc}")
        if final:
            break
        time.sleep(0.01)
    Path(out).write_text(json.dumps({"counts": counts, "errors": errors, "read_ms": read_ms, "missing": missing}))


if __name__ == "__main__":
    main(*sys.argv[1:])
