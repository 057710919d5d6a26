"""Writing to the store: the sink's batches, and the calibration side's profiles and runs.

Every write is idempotent: rows are keyed (frames by frame id, DLQ events by source offset,
alerts by id) and inserted with ``ON CONFLICT DO NOTHING``, so a replayed Kafka record never
makes a second row. All SQL is static text with ``?`` parameters. Batches travel as Arrow
tables registered under one fixed name; their rows come from the wire models
(:mod:`linewatch.messages`) and their types from the table itself as DuckDB reports it, so
the DDL in :mod:`linewatch.store.schema` is the only place a column is declared.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from linewatch.messages import Alert, DlqRecord, InspectionResult, Review, now_ms, unb64
from linewatch.store.connect import DEFAULT_WRITE_TIMEOUT_S, writing
from linewatch.store.evidence import EvidenceRow
from linewatch.store.schema import init_db

log = logging.getLogger(__name__)

# literal statements: no SQL is ever assembled from a table name at run time
_INSERT_SQL = {
    "inspections": "INSERT INTO inspections SELECT * FROM lw_batch ON CONFLICT DO NOTHING RETURNING frame_id",
    "defect_regions": "INSERT INTO defect_regions SELECT * FROM lw_batch ON CONFLICT DO NOTHING",
    "defect_images": "INSERT INTO defect_images SELECT * FROM lw_batch ON CONFLICT DO NOTHING",
    "dlq_events": "INSERT INTO dlq_events SELECT * FROM lw_batch ON CONFLICT DO NOTHING RETURNING source_offset",
    "evidence": "INSERT INTO evidence SELECT * FROM lw_batch ON CONFLICT DO NOTHING RETURNING bytes",
}
_BBOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
_ARROW_SCHEMAS: dict[str, pa.Schema] = {}  # see _arrow_schema

# A profile row is upserted by (product, version). Calibration is the authority on a version, so
# it also takes over ``source``; a registry sync refreshes the details but keeps the source.
_PROFILE_UPSERT = (
    "INSERT INTO profiles (product, version, threshold, image_threshold, threshold_method, model_kind, "
    "backbone, created_at, created_by, source, details_json) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?::TIMESTAMPTZ, ?, ?, ?) "
    "ON CONFLICT DO UPDATE SET threshold = excluded.threshold, image_threshold = excluded.image_threshold, "
    "threshold_method = excluded.threshold_method, model_kind = excluded.model_kind, "
    "backbone = excluded.backbone, created_at = excluded.created_at, created_by = excluded.created_by, "
    "details_json = excluded.details_json"
)
_PROFILE_UPSERT_SQL = {"calibration": _PROFILE_UPSERT + ", source = excluded.source", "registry": _PROFILE_UPSERT}


@dataclass
class DlqEvent:
    """A `frames.dlq` record as the sink stores it (the DlqRecord plus what the original
    headers said about product and camera, when they could be read)."""

    record: DlqRecord
    product: str | None = None
    camera: str | None = None


@dataclass
class WriteResult:
    """What one :func:`write_batch` did; ``inserted_ids`` is what the alert state machine must
    see (only new frames), the counts feed the sink's metrics and logs."""

    inserted_ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    dlq_inserted: int = 0
    alerts_inserted: int = 0
    reviews_inserted: int = 0
    reviews_rejected: list[tuple[Review, int, int, str]] = field(default_factory=list)  # review, partition, offset, why
    evidence_inserted: int = 0
    evidence_bytes: int = 0
    seconds: float = 0.0


def _arrow_schema(con: duckdb.DuckDBPyConnection, table: str) -> pa.Schema:
    """The table's columns, in order, as Arrow types, read from the database itself so rows
    are typed exactly as the DDL declares them without restating it.

    Cached by table name: reading it costs ~2 ms and every batch opens a new connection, and
    a table's columns are fixed by the code's migrations (every writer runs :func:`init_db`
    first, which refuses any other schema version), so every database this process writes
    agrees on them.
    """
    if table not in _ARROW_SCHEMAS:
        _ARROW_SCHEMAS[table] = con.table(table).limit(0).arrow().schema
    return _ARROW_SCHEMAS[table]


def _insert_returning(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> list[tuple]:
    """Insert ``rows`` into one of the store's tables as one Arrow scan (far faster than one
    parameterized INSERT per row), skipping keys already stored; returns the RETURNING rows.

    A column no row names would silently become NULL, so that is refused: a renamed model
    field must fail here, not empty a column. Keys that are not columns are left out.
    """
    schema = _arrow_schema(con, table)
    if missing := set(schema.names) - rows[0].keys():
        raise ValueError(f"{table}: rows lack column(s) {sorted(missing)}")
    con.register("lw_batch", pa.Table.from_pylist(rows, schema=schema))
    try:
        return con.execute(_INSERT_SQL[table]).fetchall()
    finally:
        con.unregister("lw_batch")


def write_batch(
    con: duckdb.DuckDBPyConnection,
    results: Sequence[InspectionResult],
    *,
    dlq: Sequence[DlqEvent] = (),
    alerts: Sequence[Alert] = (),
    published_alert_ids: Sequence[str] = (),
    evidence: Sequence[EvidenceRow] = (),
    reviews: Sequence[tuple[Review, int, int]] = (),
) -> WriteResult:
    """Write one batch inside the caller's transaction (see :func:`writing`).

    Idempotent: results already stored (same frame id) are skipped, together with their
    regions and images; ``inserted_ids`` lists only the frames that are new, which is what
    the alert state machine must see. Returns counts.
    """
    t0 = time.perf_counter()
    out = WriteResult()
    stored = now_ms()
    unique: dict[str, InspectionResult] = {}
    for r in results:
        unique.setdefault(r.frame_id, r)
    out.duplicates = len(results) - len(unique)
    if unique:
        # columns named as the model's fields are copied; the other three are derived here
        fields = set(_arrow_schema(con, "inspections").names) & InspectionResult.model_fields.keys()
        rows = [
            {**r.model_dump(include=fields), "stored_ts_ms": stored, "region_count": len(r.regions),
             "result_schema": r.schema_version}
            for r in unique.values()
        ]
        new_ids = {row[0] for row in _insert_returning(con, "inspections", rows)}
        out.inserted_ids = [fid for fid in unique if fid in new_ids]
        out.duplicates += len(unique) - len(new_ids)
        new = [unique[fid] for fid in out.inserted_ids]
        regions = [
            {**g.model_dump(exclude={"bbox"}), **dict(zip(_BBOX_COLUMNS, g.bbox)), "frame_id": r.frame_id,
             "region_idx": i}
            for r in new
            for i, g in enumerate(r.regions)
        ]
        if regions:
            _insert_returning(con, "defect_regions", regions)
        images = [
            {"frame_id": r.frame_id, "product": r.product, "capture_ts_ms": r.capture_ts_ms,
             "thumbnail_jpeg": unb64(r.thumbnail_jpeg_b64), "mask_png": unb64(r.mask_png_b64),
             "heatmap_png": unb64(r.heatmap_png_b64)}
            for r in new
            if r.verdict == "defect" and (r.thumbnail_jpeg_b64 or r.mask_png_b64 or r.heatmap_png_b64)
        ]
        if images:
            _insert_returning(con, "defect_images", images)
        kept = [e.as_row() for e in evidence if e.frame_id in new_ids]
        if kept:
            sizes = _insert_returning(con, "evidence", kept)
            out.evidence_inserted = len(sizes)
            out.evidence_bytes = sum(int(s[0]) for s in sizes)
        seen_profiles: dict[tuple[str, int], tuple[float, float, str, int]] = {}
        for r in sorted(new, key=lambda r: r.capture_ts_ms, reverse=True):  # earliest wins
            seen_profiles[(r.product, r.profile_version)] = (r.threshold, r.image_threshold, r.model_kind, r.capture_ts_ms)
        for (product, version), (thr, ithr, kind, ts) in seen_profiles.items():
            con.execute(
                "INSERT INTO profiles (product, version, threshold, image_threshold, model_kind, "
                "first_seen_ts_ms, source) VALUES (?, ?, ?, ?, ?, ?, 'results') "
                "ON CONFLICT DO UPDATE SET first_seen_ts_ms = "
                "coalesce(least(profiles.first_seen_ts_ms, excluded.first_seen_ts_ms), excluded.first_seen_ts_ms)",
                [product, version, thr, ithr, kind, ts],
            )
    if dlq:
        events = {(e.record.source_topic, e.record.source_partition, e.record.source_offset): e for e in dlq}
        rows = [
            {**e.record.model_dump(), "product": e.product, "camera": e.camera, "stored_ts_ms": stored}
            for e in events.values()
        ]
        out.dlq_inserted = len(_insert_returning(con, "dlq_events", rows))
    if reviews:
        _write_reviews(con, reviews, stored, out)
    for a in alerts:
        n = con.execute(
            "INSERT INTO alerts (alert_id, product, kind, state, value, limit_value, window_frames, ts_ms, "
            "message, published) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, false) ON CONFLICT DO NOTHING RETURNING alert_id",
            [a.alert_id, a.product, a.kind, a.state, a.value, a.limit, a.window_frames, a.ts_ms, a.message],
        ).fetchall()
        out.alerts_inserted += len(n)
    if published_alert_ids:
        con.execute(
            "UPDATE alerts SET published = true WHERE list_contains(?::VARCHAR[], alert_id)",
            [list(published_alert_ids)],
        )
    out.seconds = time.perf_counter() - t0
    return out


def _write_reviews(con: duckdb.DuckDBPyConnection, reviews: Sequence[tuple[Review, int, int]], stored: int,
                   out: WriteResult) -> None:
    """Append reviews (with their `reviews` partition and offset), each once by review_id. A
    review of a frame the database does not hold, or naming another product than the frame's,
    is not stored: it is returned in ``out.reviews_rejected`` for the sink to dead-letter."""
    ids = sorted({r.frame_id for r, _, _ in reviews})
    known = dict(con.execute("SELECT frame_id, product FROM inspections WHERE list_contains(?::VARCHAR[], frame_id)",
                             [ids]).fetchall())
    rows = []
    for r, partition, offset in reviews:
        if r.frame_id not in known:
            out.reviews_rejected.append((r, partition, offset, f"review {r.review_id}: unknown frame id {r.frame_id!r}"))
        elif known[r.frame_id] != r.product:
            out.reviews_rejected.append((r, partition, offset, f"review {r.review_id}: frame {r.frame_id} is "
                                         f"{known[r.frame_id]!r}, not {r.product!r}"))
        else:
            rows.append([r.review_id, r.frame_id, r.product, r.verdict, r.category, r.reviewer, r.note,
                         r.reviewed_ts_ms, stored, partition, offset])
    for row in rows:  # a handful per batch: plain parameterized inserts
        out.reviews_inserted += len(con.execute(
            "INSERT INTO reviews VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING review_id",
            row).fetchall())


# --------------------------------------------------------------------------------------
# the calibration side


def _upsert_profile(con: duckdb.DuckDBPyConnection, data: dict[str, Any], source: str, details: Sequence[str]) -> None:
    """One profile row from a profile's JSON fields; shared by calibration and registry sync so
    the two cannot drift apart. ``details`` are the fields kept, as JSON, in ``details_json``."""
    con.execute(
        _PROFILE_UPSERT_SQL[source],
        [
            data["product"], int(data.get("version", 0)), data.get("threshold"), data.get("image_threshold"),
            data.get("threshold_method"), data.get("model_kind"), data.get("backbone"), data.get("created_at"),
            data.get("created_by"), source, json.dumps({k: data.get(k) for k in details}, default=str),
        ],
    )


def record_profile(
    path: Path | str,
    profile: Any,
    *,
    timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
) -> None:
    """Record a published profile (a ``linewatch.profiles.Profile`` or a dict of its fields).

    Upserts by (product, version): calibration details overwrite what the sink inferred
    from results, but the first time the version was seen in results is kept.
    """
    data = profile.model_dump(mode="json") if hasattr(profile, "model_dump") else dict(profile)
    init_db(path, timeout_s)
    with writing(path, timeout_s) as con:
        _upsert_profile(con, data, "calibration",
                        ("thresholds", "threshold_reason", "calibration_metrics", "background", "notes"))


def record_calibration_run(
    path: Path | str,
    *,
    run_id: str,
    product: str,
    status: str,
    version: int | None = None,
    model_kind: str | None = None,
    threshold_method: str | None = None,
    threshold: float | None = None,
    started_ts_ms: int | None = None,
    finished_ts_ms: int | None = None,
    metrics: dict[str, Any] | None = None,
    notes: str = "",
    timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
) -> None:
    """Record (or update, by run_id) one calibration run: what was fitted and how it scored,
    kept next to the profiles so a version's history, failed runs included, stays queryable."""
    init_db(path, timeout_s)
    with writing(path, timeout_s) as con:
        con.execute(
            "INSERT INTO calibration_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO UPDATE SET version = excluded.version, model_kind = excluded.model_kind, "
            "threshold_method = excluded.threshold_method, threshold = excluded.threshold, "
            "finished_ts_ms = excluded.finished_ts_ms, status = excluded.status, "
            "metrics_json = excluded.metrics_json, notes = excluded.notes",
            [
                run_id, product, version, model_kind, threshold_method, threshold,
                started_ts_ms if started_ts_ms is not None else now_ms(), finished_ts_ms, status,
                json.dumps(metrics or {}, default=str), notes,
            ],
        )


def sync_profiles_from_registry(path: Path | str, registry_dir: Path | str, *, timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> int:
    """Record every published version found in the profile registry; returns how many.

    Lets the dashboard show how each threshold was chosen even when calibration ran on
    another machine. A corrupt profile is skipped (the workers DLQ its frames anyway).
    """
    from linewatch.profiles import ProfileError, Registry

    root = Path(registry_dir)
    if not root.is_dir():
        return 0
    reg = Registry(root)
    found = []
    for product in reg.products():
        for version in reg.versions(product):
            try:
                found.append(reg.read_profile(product, version))
            except (ProfileError, OSError, ValueError) as exc:
                log.warning("registry %s: skipping %s v%s: %s", root, product, version, exc)
    if not found:
        return 0
    init_db(path, timeout_s)
    with writing(path, timeout_s) as con:
        for p in found:
            _upsert_profile(con, p.model_dump(mode="json"), "registry",
                            ("thresholds", "threshold_reason", "background", "calibration_metrics", "notes"))
    return len(found)
