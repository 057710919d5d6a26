"""Reading the store: the sink's restart state (alerts, recent verdicts) and row counts.

The dashboard's own queries live in ``dashboard/queries.py``; these are the ones the sink
needs to resume where it stopped, plus a count that tests and the demo share.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from linewatch.messages import Alert
from linewatch.store.connect import DEFAULT_READ_TIMEOUT_S, reading

_ALERT_COLUMNS = 'alert_id, product, kind, state, value, limit_value AS "limit", window_frames, ts_ms, message'

# literal statements: no SQL is ever assembled from a table name at run time
_COUNT_SQL = {
    "inspections": "SELECT count(*) FROM inspections",
    "defect_regions": "SELECT count(*) FROM defect_regions",
    "defect_images": "SELECT count(*) FROM defect_images",
    "profiles": "SELECT count(*) FROM profiles",
    "calibration_runs": "SELECT count(*) FROM calibration_runs",
    "alerts": "SELECT count(*) FROM alerts",
    "dlq_events": "SELECT count(*) FROM dlq_events",
    "evidence": "SELECT count(*) FROM evidence",
    "reviews": "SELECT count(*) FROM reviews",
}


def _alerts(con: duckdb.DuckDBPyConnection, sql: str) -> list[Alert]:
    """Run a query that selects ``_ALERT_COLUMNS`` and build Alerts from it by column name, so
    the two alert queries below cannot disagree on the mapping."""
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [Alert(**dict(zip(names, row))) for row in cur.fetchall()]


def unpublished_alerts(con: duckdb.DuckDBPyConnection) -> list[Alert]:
    """Alerts stored but not yet confirmed on the `alerts` topic (the sink died in between)."""
    return _alerts(con, "SELECT " + _ALERT_COLUMNS + " FROM alerts WHERE NOT published ORDER BY ts_ms")


def recent_verdicts(con: duckdb.DuckDBPyConnection, window: int) -> dict[str, list[str]]:
    """The last ``window`` verdicts per product, oldest first (seeds the alert state machine)."""
    rows = con.execute(
        "SELECT product, verdict FROM ("
        "  SELECT product, verdict, capture_ts_ms, frame_id, row_number() OVER "
        "    (PARTITION BY product ORDER BY capture_ts_ms DESC, frame_id DESC) AS rn FROM inspections"
        ") WHERE rn <= ? ORDER BY product, capture_ts_ms, frame_id",
        [window],
    ).fetchall()
    out: dict[str, list[str]] = {}
    for product, verdict in rows:
        out.setdefault(product, []).append(verdict)
    return out


def recent_normal_scores(con: duckdb.DuckDBPyConnection, window: int) -> dict[str, tuple[int, list[float]]]:
    """Per product, the profile version of its latest frame and the image scores of up to
    ``window`` latest normal-judged frames of that version, oldest first (seeds the drift alert)."""
    rows = con.execute(
        "WITH v AS (SELECT product, arg_max(profile_version, capture_ts_ms) AS version FROM inspections GROUP BY 1) "
        "SELECT product, version, image_score FROM ("
        "  SELECT i.product, i.profile_version AS version, i.image_score, i.capture_ts_ms, i.frame_id, "
        "         row_number() OVER (PARTITION BY i.product ORDER BY i.capture_ts_ms DESC, i.frame_id DESC) AS rn "
        "  FROM inspections i JOIN v ON v.product = i.product AND v.version = i.profile_version "
        "  WHERE i.verdict = 'ok') WHERE rn <= ? ORDER BY product, capture_ts_ms, frame_id",
        [window],
    ).fetchall()
    out: dict[str, tuple[int, list[float]]] = {}
    for product, version, score in rows:
        out.setdefault(product, (int(version), []))[1].append(float(score))
    return out


def active_alerts(con: duckdb.DuckDBPyConnection) -> list[Alert]:
    """Per (product, kind), the latest alert if it is 'raised': what is still wrong on the line."""
    return _alerts(
        con,
        "SELECT " + _ALERT_COLUMNS + " FROM ("
        "  SELECT *, row_number() OVER (PARTITION BY product, kind ORDER BY ts_ms DESC, alert_id DESC) AS rn "
        "  FROM alerts) WHERE rn = 1 AND state = 'raised' ORDER BY ts_ms DESC",
    )


def count_rows(path: Path | str, table: str = "inspections", timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> int:
    """Row count of one of the store's own tables (tests, the demo, the fault suite)."""
    sql = _COUNT_SQL.get(table)
    if sql is None:
        raise ValueError(f"unknown table {table!r}")
    with reading(path, timeout_s) as con:
        return int(con.execute(sql).fetchone()[0])
