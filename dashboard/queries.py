"""Every query the dashboard runs, in one place: static SQL text, values only as ``?``
parameters (filters are lists bound as ``VARCHAR[]``), one short-lived read-only connection
per refresh so the sink can take the write lock between refreshes (see linewatch.store).

``load_snapshot(db, filters)`` returns everything one page render needs; the Streamlit app
only lays it out, and the tests check the numbers here against the database.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
from pydantic import BaseModel, Field

from linewatch import store
from linewatch.messages import CATEGORIES

ALL_CATEGORIES = (*CATEGORIES, "unknown")
CATEGORY_LABELS = {
    "structural": "Structural",
    "surface": "Surface",
    "contamination": "Contamination",
    "combined": "Combined",
    "unknown": "uncategorised — no categorizer in the profile, or no region to classify",
}
CATEGORY_HELP = {
    "structural": "holes, bends, missing parts",
    "surface": "scratches, dents, rust",
    "contamination": "glue, dust, dirt",
    "combined": "several kinds of defect on one frame",
    "unknown": "defects the worker could not name: the profile has no category classifier, or the frame score crossed the image threshold without a region above the pixel threshold",
}
HEALTH_LAST_N = 1000
_BUCKETS_S = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400)


class Filters(BaseModel):
    """What the user picked; every field is bound as a parameter, never formatted into SQL."""

    start_ms: int | None = Field(None, description="capture time from (inclusive), epoch ms")
    end_ms: int | None = Field(None, description="capture time to (exclusive), epoch ms")
    products: list[str] = []
    cameras: list[str] = []
    lines: list[str] = []


def _where(alias: str = "") -> str:
    """The one WHERE clause of every filtered query: fixed text, 8 parameters (see _params).
    ``alias`` is a fixed table alias from this module, never user input."""
    a = f"{alias}." if alias else ""
    return (
        f"{a}capture_ts_ms >= ? AND {a}capture_ts_ms < ? "
        f"AND (len(?::VARCHAR[]) = 0 OR list_contains(?::VARCHAR[], {a}product)) "
        f"AND (len(?::VARCHAR[]) = 0 OR list_contains(?::VARCHAR[], {a}camera)) "
        f"AND (len(?::VARCHAR[]) = 0 OR list_contains(?::VARCHAR[], {a}line))"
    )


_WHERE = _where()


def _params(f: Filters) -> list[Any]:
    return [
        f.start_ms if f.start_ms is not None else -(2**62),
        f.end_ms if f.end_ms is not None else 2**62,
        list(f.products), list(f.products),
        list(f.cameras), list(f.cameras),
        list(f.lines), list(f.lines),
    ]


@dataclass
class Snapshot:
    """Everything the page shows, read in one go."""

    read_ts_ms: int
    kpis: dict[str, Any]
    categories: pd.DataFrame  # category, label, defects, per_1000, share
    trend: pd.DataFrame  # bucket (naive UTC datetime), category ("" = no defect in it), defects, frames
    bucket_s: int
    by_product: pd.DataFrame
    by_camera: pd.DataFrame
    by_line: pd.DataFrame
    profiles: pd.DataFrame
    gallery: list[dict[str, Any]]
    health: dict[str, Any]
    alerts: list[dict[str, Any]]
    options: dict[str, list[str]] = field(default_factory=dict)
    reviews: pd.DataFrame = field(default_factory=pd.DataFrame)  # review_stats
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # profile_history


def pick_bucket_s(span_ms: int, max_buckets: int = 30) -> int:
    """A round bucket width giving at most ``max_buckets`` bars for the span."""
    for b in _BUCKETS_S:
        if span_ms / (b * 1000) <= max_buckets:
            return b
    return _BUCKETS_S[-1]


def filter_options(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """Distinct products, cameras and lines (unfiltered) for the filter widgets."""
    return {col: [r[0] for r in con.execute(sql).fetchall()] for col, sql in _DISTINCT_SQL.items()}


# literal statements: no SQL is ever assembled from a name at run time
_DISTINCT_SQL = {
    "product": "SELECT DISTINCT product FROM inspections ORDER BY 1",
    "camera": "SELECT DISTINCT camera FROM inspections ORDER BY 1",
    "line": "SELECT DISTINCT line FROM inspections ORDER BY 1",
}


def kpis(con: duckdb.DuckDBPyConnection, f: Filters) -> dict[str, Any]:
    frames, defects, first, last = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE verdict = 'defect'), min(capture_ts_ms), max(capture_ts_ms) "
        f"FROM inspections WHERE {_WHERE}",
        _params(f),
    ).fetchone()
    return {
        "frames": int(frames),
        "defects": int(defects or 0),
        "per_1000": (1000.0 * defects / frames) if frames else 0.0,
        "first_ts_ms": first,
        "last_ts_ms": last,
    }


def categories(con: duckdb.DuckDBPyConnection, f: Filters, frames: int) -> pd.DataFrame:
    """Defects per category (all five rows, zero-filled), rate per 1000 inspected frames."""
    rows = dict(
        con.execute(
            f"SELECT coalesce(category, 'unknown'), count(*) FROM inspections "
            f"WHERE verdict = 'defect' AND {_WHERE} GROUP BY 1",
            _params(f),
        ).fetchall()
    )
    total = sum(rows.values())
    data = []
    for c in ALL_CATEGORIES:
        n = int(rows.pop(c, 0))
        data.append({"category": c, "label": CATEGORY_LABELS[c], "defects": n,
                     "per_1000": 1000.0 * n / frames if frames else 0.0, "share": n / total if total else 0.0})
    for c, n in rows.items():  # a category this dashboard does not know yet: still counted
        data.append({"category": c, "label": c, "defects": int(n),
                     "per_1000": 1000.0 * n / frames if frames else 0.0, "share": n / total if total else 0.0})
    return pd.DataFrame(data)


def trend(con: duckdb.DuckDBPyConnection, f: Filters, bucket_s: int) -> pd.DataFrame:
    """Frames and defects per category per time bucket (long format)."""
    df = con.execute(
        "SELECT time_bucket(to_seconds(?::BIGINT), epoch_ms(capture_ts_ms)) AS bucket, "
        "CASE WHEN verdict = 'defect' THEN coalesce(category, 'unknown') ELSE 'ok' END AS category, "
        f"count(*) AS n FROM inspections WHERE {_WHERE} GROUP BY ALL ORDER BY 1",
        [bucket_s, *_params(f)],
    ).df()
    if df.empty:
        return pd.DataFrame(columns=["bucket", "category", "defects", "frames"])
    frames = df.groupby("bucket")["n"].sum().rename("frames")
    defects = df[df["category"] != "ok"].rename(columns={"n": "defects"})
    quiet = frames.index.difference(defects["bucket"])  # frames but no defect: a row with 0
    defects = pd.concat([defects, pd.DataFrame({"bucket": quiet, "category": "", "defects": 0})])
    out = defects.merge(frames, left_on="bucket", right_index=True, how="left")
    return out.sort_values(["bucket", "category"]).reset_index(drop=True)


def breakdown(con: duckdb.DuckDBPyConnection, f: Filters, column: str) -> pd.DataFrame:
    """Frames, defects, rate per 1000 and the top category, by product, camera or line."""
    if column not in ("product", "camera", "line"):
        raise ValueError(f"cannot break down by {column!r}")
    return con.execute(
        f"SELECT {column}, count(*) AS frames, count(*) FILTER (WHERE verdict = 'defect') AS defects, "
        "round(1000.0 * count(*) FILTER (WHERE verdict = 'defect') / count(*), 1) AS per_1000, "
        "mode(coalesce(category, 'unknown')) FILTER (WHERE verdict = 'defect') AS top_category, "
        "epoch_ms(max(capture_ts_ms)) AS last_frame "
        f"FROM inspections WHERE {_WHERE} GROUP BY 1 ORDER BY per_1000 DESC, 1",
        _params(f),
    ).df()


def profiles_in_force(con: duckdb.DuckDBPyConnection, f: Filters) -> pd.DataFrame:
    """Per product: the profile version of its latest frame (what the workers use now), its
    threshold and how it was chosen (from the registry/calibration when known)."""
    return con.execute(
        "WITH latest AS ("
        "  SELECT product, arg_max(profile_version, capture_ts_ms) AS version, "
        "         arg_max(threshold, capture_ts_ms) AS threshold, arg_max(model_kind, capture_ts_ms) AS model, "
        "         max(capture_ts_ms) AS last_ts "
        f"  FROM inspections WHERE {_WHERE} GROUP BY product) "
        "SELECT l.product, l.version, l.model, l.threshold, coalesce(p.threshold_method, '—') AS method, "
        "       p.created_at AS calibrated_at, epoch_ms(p.first_seen_ts_ms) AS in_use_since, "
        "       (SELECT count(DISTINCT version) FROM profiles q WHERE q.product = l.product) AS versions_seen "
        "FROM latest l LEFT JOIN profiles p ON p.product = l.product AND p.version = l.version "
        "ORDER BY l.product",
        _params(f),
    ).df()


def gallery(con: duckdb.DuckDBPyConnection, f: Filters, limit: int = 8) -> list[dict[str, Any]]:
    """The latest defects with their images (thumbnail, mask, heat map)."""
    rows = con.execute(
        "SELECT i.frame_id, i.product, i.camera, i.line, i.capture_ts_ms, coalesce(i.category, 'unknown'), "
        "       i.category_confidence, i.image_score, i.threshold, i.defect_area_frac, i.region_count, "
        "       d.thumbnail_jpeg, d.mask_png, d.heatmap_png "
        "FROM inspections i LEFT JOIN defect_images d USING (frame_id) "
        f"WHERE i.verdict = 'defect' AND {_where('i')} "
        "ORDER BY i.capture_ts_ms DESC, i.frame_id DESC LIMIT ?",
        [*_params(f), limit],
    ).fetchall()
    keys = ("frame_id", "product", "camera", "line", "capture_ts_ms", "category", "confidence", "score",
            "threshold", "area_frac", "regions", "thumbnail", "mask", "heatmap")
    return [dict(zip(keys, r)) for r in rows]


def health(con: duckdb.DuckDBPyConnection, now_ms: int) -> dict[str, Any]:
    """Pipeline health, unfiltered: throughput over the last minute (by time stored),
    latency over the last HEALTH_LAST_N frames, DLQ counts, time of the last frame."""
    last_min, last_capture, last_stored = con.execute(
        "SELECT count(*) FILTER (WHERE stored_ts_ms >= ?), max(capture_ts_ms), max(stored_ts_ms) FROM inspections",
        [now_ms - 60_000],
    ).fetchone()
    lat = con.execute(
        "SELECT quantile_cont(latency_ms, 0.5), quantile_cont(latency_ms, 0.99), "
        "       quantile_cont(stored_ts_ms - capture_ts_ms, 0.5), quantile_cont(stored_ts_ms - capture_ts_ms, 0.99), "
        "       count(*), list(DISTINCT worker_id ORDER BY worker_id), list(DISTINCT engine ORDER BY engine) "
        "FROM (SELECT * FROM inspections ORDER BY stored_ts_ms DESC LIMIT ?)",
        [HEALTH_LAST_N],
    ).fetchone()
    dlq_total, dlq_hour, rejected = con.execute(
        "SELECT count(*) FILTER (WHERE worker_id IS DISTINCT FROM 'sink'), "
        "       count(*) FILTER (WHERE worker_id IS DISTINCT FROM 'sink' AND stored_ts_ms >= ?), "
        "       count(*) FILTER (WHERE worker_id = 'sink' AND reason LIKE 'sink: invalid result%') FROM dlq_events",
        [now_ms - 3600_000],
    ).fetchone()
    reasons = con.execute(
        "SELECT stage, reason, count(*) AS n, epoch_ms(max(failed_ts_ms)) AS last_seen FROM dlq_events "
        "GROUP BY ALL ORDER BY n DESC LIMIT 5"
    ).df()
    return {
        "frames_per_s": (last_min or 0) / 60.0,
        "result_p50_ms": lat[0],
        "result_p99_ms": lat[1],
        "stored_p50_ms": lat[2],
        "stored_p99_ms": lat[3],
        "latency_frames": int(lat[4] or 0),
        "workers": [w for w in (lat[5] or []) if w],
        "engines": [e for e in (lat[6] or []) if e],
        "dlq_total": int(dlq_total or 0),
        "dlq_last_hour": int(dlq_hour or 0),
        "rejected_results": int(rejected or 0),
        "dlq_reasons": reasons,
        "last_capture_ts_ms": last_capture,
        "last_stored_ts_ms": last_stored,
    }


def alerts(con: duckdb.DuckDBPyConnection, f: Filters) -> list[dict[str, Any]]:
    """Alerts currently raised (the latest state per product and rule is 'raised')."""
    rows = con.execute(
        "SELECT product, kind, value, limit_value, window_frames, ts_ms, message FROM ("
        "  SELECT *, row_number() OVER (PARTITION BY product, kind ORDER BY ts_ms DESC, alert_id DESC) AS rn "
        "  FROM alerts) "
        "WHERE rn = 1 AND state = 'raised' AND (len(?::VARCHAR[]) = 0 OR list_contains(?::VARCHAR[], product)) "
        "ORDER BY ts_ms DESC",
        [list(f.products), list(f.products)],
    ).fetchall()
    keys = ("product", "kind", "value", "limit", "window_frames", "ts_ms", "message")
    return [dict(zip(keys, r)) for r in rows]


# -- one frame, reviews, exports, profile history ---------------------------------------------------
_INSPECTION_COLUMNS = (
    "frame_id", "product", "camera", "line", "seq", "capture_ts_ms", "processed_ts_ms", "stored_ts_ms", "image_score",
    "threshold", "image_threshold", "verdict", "defect_area_frac", "region_count", "category", "category_confidence",
    "profile_version", "model_kind", "engine", "worker_id", "latency_ms", "inference_ms", "width", "height")
# fixed text built once from the constant column list above; values are always bound parameters
_FRAME_SQL = "SELECT " + ", ".join(_INSPECTION_COLUMNS) + " FROM inspections WHERE frame_id = ?"
_EXPORT_COLUMNS = ", ".join("i." + c for c in _INSPECTION_COLUMNS)


def frame_detail(con: duckdb.DuckDBPyConnection, frame_id: str) -> dict[str, Any] | None:
    """Everything the detail view shows of one frame, or None when the database has no such
    frame: the inspection, its images, regions, evidence row and reviews (newest first)."""
    cur = con.execute(_FRAME_SQL, [frame_id])
    row = cur.fetchone()
    if row is None:
        return None
    out = dict(zip([d[0] for d in cur.description], row))
    img = con.execute("SELECT thumbnail_jpeg, mask_png, heatmap_png FROM defect_images WHERE frame_id = ?",
                      [frame_id]).fetchone()
    out["thumbnail"], out["mask"], out["heatmap"] = img if img else (None, None, None)
    out["regions"] = con.execute(
        "SELECT region_idx AS region, coalesce(category, 'unknown') AS category, confidence, area_px, area_frac, "
        "bbox_x, bbox_y, bbox_w, bbox_h, peak_score, mean_score FROM defect_regions WHERE frame_id = ? "
        "ORDER BY region_idx", [frame_id]).df()
    ev = con.execute("SELECT file, sha256, encoding, reason, capture_ts_ms FROM evidence WHERE frame_id = ?",
                     [frame_id]).fetchone()
    out["evidence"] = ev
    out["reviews"] = con.execute(
        "SELECT epoch_ms(reviewed_ts_ms) AS reviewed, reviewer, verdict, category, note, review_id FROM reviews "
        "WHERE frame_id = ? ORDER BY reviewed_ts_ms DESC, stored_ts_ms DESC, review_id DESC", [frame_id]).df()
    return out


def neighbours(con: duckdb.DuckDBPyConnection, f: Filters, frame_id: str) -> tuple[str | None, str | None, int, int]:
    """(newer, older, position from 1, count) of ``frame_id`` among the defect frames of the
    filters, in the gallery's order (newest first); position 0 when it is not among them."""
    row = con.execute(
        "WITH d AS (SELECT frame_id, row_number() OVER (ORDER BY capture_ts_ms DESC, frame_id DESC) AS k "
        f"           FROM inspections WHERE verdict = 'defect' AND {_WHERE}) "
        "SELECT (SELECT frame_id FROM d WHERE k = me.k - 1), (SELECT frame_id FROM d WHERE k = me.k + 1), me.k, "
        "       (SELECT count(*) FROM d) "
        "FROM (SELECT k FROM d WHERE frame_id = ? UNION ALL SELECT 0 LIMIT 1) AS me",
        [*_params(f), frame_id]).fetchone()
    newer, older, k, n = row
    return newer, older, int(k), int(n)


def review_stats(con: duckdb.DuckDBPyConnection, f: Filters) -> pd.DataFrame:
    """Per product, over the defect calls in the filters (the latest review of each frame
    counts): how many were reviewed, the confirmed precision of the defect calls
    (confirmed / (confirmed + false calls)) and category agreement (confirmed with the
    category the worker named / confirmed)."""
    return con.execute(
        "SELECT i.product, count(*) AS defect_calls, count(r.frame_id) AS reviewed, "
        "       count(r.frame_id) / count(*) AS reviewed_share, "
        "       count(*) FILTER (WHERE r.verdict = 'confirm') AS confirmed, "
        "       count(*) FILTER (WHERE r.verdict = 'false_call') AS false_calls, "
        "       count(*) FILTER (WHERE r.verdict = 'unsure') AS unsure, "
        "       count(*) FILTER (WHERE r.verdict = 'confirm') / nullif(count(*) FILTER (WHERE r.verdict IN "
        "           ('confirm', 'false_call')), 0) AS confirmed_precision, "
        "       count(*) FILTER (WHERE r.verdict = 'confirm' AND r.category = i.category) / "
        "           nullif(count(*) FILTER (WHERE r.verdict = 'confirm'), 0) AS category_agreement "
        "FROM inspections i LEFT JOIN latest_reviews r USING (frame_id) "
        f"WHERE i.verdict = 'defect' AND {_where('i')} GROUP BY i.product ORDER BY i.product",
        _params(f)).df()


def inspections_csv(db: Path | str, f: Filters, timeout_s: float = store.DEFAULT_READ_TIMEOUT_S) -> bytes:
    """The filtered inspections (with each frame's latest review) as CSV, for the export button."""
    with store.reading(db, timeout_s=timeout_s) as con:
        df = con.execute(
            "SELECT " + _EXPORT_COLUMNS + ", "
            "r.verdict AS review, r.category AS review_category, r.reviewer "
            "FROM inspections i LEFT JOIN latest_reviews r USING (frame_id) "
            f"WHERE {_where('i')} ORDER BY i.capture_ts_ms, i.frame_id", _params(f)).df()
    return df.to_csv(index=False).encode("utf-8")


def profile_history(con: duckdb.DuckDBPyConnection, products: list[str]) -> pd.DataFrame:
    """Every recorded version per product, newest first: when, who, how the threshold was set,
    the thresholds, the frame KPIs and what it was calibrated from (the audit trail)."""
    df = con.execute(
        "SELECT product, version, created_at, created_by, threshold_method AS method, threshold, image_threshold, "
        "       details_json FROM profiles "
        "WHERE len(?::VARCHAR[]) = 0 OR list_contains(?::VARCHAR[], product) ORDER BY product, version DESC",
        [list(products), list(products)]).df()
    import json

    def kpis(text: Any) -> tuple[str, str, str]:
        d = json.loads(text) if isinstance(text, str) and text else {}  # NULL (a version seen in results only): NaN
        m = d.get("calibration_metrics") or {}
        src = m.get("from_reviews")
        basis = (f"{src['confirmed']} confirmed + {src['false_calls']} false calls + {src['sampled_normals']} "
                 f"sampled normal frames ({len(src.get('review_ids', []))} reviews)") if src else (d.get("notes") or "")
        fk = m.get("frame_kpis") or m.get("test") or {}
        def rate(k: str) -> str:
            v = fk.get(k) or {}
            return f"{100 * v['rate']:.1f} %" if isinstance(v, dict) and v.get("rate") is not None else "—"
        return rate("escape_rate"), rate("false_reject_rate"), basis

    cols = [kpis(t) for t in df["details_json"]] if len(df) else []
    df["escape"] = [c[0] for c in cols]
    df["false_reject"] = [c[1] for c in cols]
    df["basis"] = [c[2] for c in cols]
    return df.drop(columns=["details_json"])


def load_snapshot(
    db: Path | str,
    filters: Filters,
    *,
    gallery_size: int = 8,
    now_ms: int | None = None,
    timeout_s: float = store.DEFAULT_READ_TIMEOUT_S,
) -> Snapshot:
    """Read everything for one render through one read-only connection, held for a few ms.

    Raises store.DatabaseMissing / store.NotADatabase (shown as a message on the page) and
    store.StoreBusy when the sink held the lock for longer than ``timeout_s``.
    """
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    with store.reading(db, timeout_s=timeout_s) as con:
        if store.schema_version(con) == 0:
            raise store.DatabaseMissing(f"{db}: the database has no linewatch tables yet (start `linewatch sink`)")
        k = kpis(con, filters)
        start = filters.start_ms if filters.start_ms is not None else (k["first_ts_ms"] or now)
        end = filters.end_ms if filters.end_ms is not None else max(now, (k["last_ts_ms"] or now) + 1)
        bucket_s = pick_bucket_s(max(1, end - start))
        return Snapshot(
            read_ts_ms=now,
            kpis=k,
            categories=categories(con, filters, k["frames"]),
            trend=trend(con, filters, bucket_s),
            bucket_s=bucket_s,
            by_product=breakdown(con, filters, "product"),
            by_camera=breakdown(con, filters, "camera"),
            by_line=breakdown(con, filters, "line"),
            profiles=profiles_in_force(con, filters),
            gallery=gallery(con, filters, gallery_size),
            health=health(con, now),
            alerts=alerts(con, filters),
            options=filter_options(con),
            reviews=review_stats(con, filters),
            history=profile_history(con, filters.products),
        )
