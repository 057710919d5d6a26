"""The DuckDB store: schema, migrations, the sink's writer and the dashboard's reader.

DuckDB lets one process open a file read-write *or* many processes open it read-only, never
both (a read-only open fails with "Could not set lock on file" while a writer holds it, and a
writer open fails the same way while any reader holds it). So nobody keeps the file open:

- the writer (only the sink, plus ``record_profile``/``record_calibration_run`` from the
  calibration side) opens, writes one batch in one transaction, CHECKPOINTs and closes;
- readers (the dashboard) open ``read_only=True``, run their queries and close;
- both sides retry a lock conflict with short jittered backoff, so a lock error never
  reaches the user; they give up only after ``timeout_s`` with :class:`StoreBusy`.

Every write is idempotent: inspections are keyed by frame id and inserted with
``ON CONFLICT DO NOTHING``, so a replayed Kafka record never makes a second row. All SQL is
static text with ``?`` parameters; batches travel as Arrow tables registered under fixed names.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from linewatch.errors import UserError
from linewatch.messages import Alert, DlqRecord, InspectionResult, now_ms, unb64

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_WRITE_TIMEOUT_S = 60.0
DEFAULT_READ_TIMEOUT_S = 10.0


class StoreBusy(RuntimeError):
    """The database stayed locked by another process for longer than the timeout."""


class DatabaseMissing(UserError):
    """No database file yet (the sink has not written anything)."""


class NotADatabase(UserError):
    """The path exists but is not a DuckDB database (or is a newer schema than this code)."""


# --------------------------------------------------------------------------------------
# schema and migrations

# Each migration: (version, description, statements). Never edit a released migration;
# append a new one. The sink applies whatever is missing, in one transaction per step.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "initial schema",
        [
            """CREATE TABLE inspections (
                frame_id VARCHAR PRIMARY KEY,
                product VARCHAR NOT NULL,
                camera VARCHAR NOT NULL,
                line VARCHAR NOT NULL,
                seq BIGINT,
                capture_ts_ms BIGINT NOT NULL,
                processed_ts_ms BIGINT,
                stored_ts_ms BIGINT NOT NULL,
                image_score DOUBLE,
                threshold DOUBLE,
                image_threshold DOUBLE,
                verdict VARCHAR NOT NULL,
                defect_area_frac DOUBLE,
                region_count INTEGER,
                category VARCHAR,
                category_confidence DOUBLE,
                background BOOLEAN,
                profile_version INTEGER,
                model_kind VARCHAR,
                engine VARCHAR,
                worker_id VARCHAR,
                latency_ms DOUBLE,
                inference_ms DOUBLE,
                kafka_partition INTEGER,
                kafka_offset BIGINT,
                width INTEGER,
                height INTEGER,
                result_schema INTEGER
            )""",
            """CREATE TABLE defect_regions (
                frame_id VARCHAR NOT NULL,
                region_idx INTEGER NOT NULL,
                area_px BIGINT,
                area_frac DOUBLE,
                bbox_x INTEGER, bbox_y INTEGER, bbox_w INTEGER, bbox_h INTEGER,
                peak_score DOUBLE,
                mean_score DOUBLE,
                category VARCHAR,
                confidence DOUBLE,
                PRIMARY KEY (frame_id, region_idx)
            )""",
            """CREATE TABLE defect_images (
                frame_id VARCHAR PRIMARY KEY,
                product VARCHAR,
                capture_ts_ms BIGINT,
                thumbnail_jpeg BLOB,
                mask_png BLOB,
                heatmap_png BLOB
            )""",
            """CREATE TABLE profiles (
                product VARCHAR NOT NULL,
                version INTEGER NOT NULL,
                threshold DOUBLE,
                image_threshold DOUBLE,
                threshold_method VARCHAR,
                model_kind VARCHAR,
                backbone VARCHAR,
                created_at TIMESTAMPTZ,
                created_by VARCHAR,
                first_seen_ts_ms BIGINT,
                source VARCHAR,
                details_json VARCHAR,
                PRIMARY KEY (product, version)
            )""",
            """CREATE TABLE calibration_runs (
                run_id VARCHAR PRIMARY KEY,
                product VARCHAR NOT NULL,
                version INTEGER,
                model_kind VARCHAR,
                threshold_method VARCHAR,
                threshold DOUBLE,
                started_ts_ms BIGINT,
                finished_ts_ms BIGINT,
                status VARCHAR,
                metrics_json VARCHAR,
                notes VARCHAR
            )""",
            """CREATE TABLE alerts (
                alert_id VARCHAR PRIMARY KEY,
                product VARCHAR NOT NULL,
                kind VARCHAR NOT NULL,
                state VARCHAR NOT NULL,
                value DOUBLE,
                limit_value DOUBLE,
                window_frames INTEGER,
                ts_ms BIGINT NOT NULL,
                message VARCHAR,
                published BOOLEAN NOT NULL DEFAULT false
            )""",
            """CREATE TABLE dlq_events (
                source_topic VARCHAR NOT NULL,
                source_partition INTEGER NOT NULL,
                source_offset BIGINT NOT NULL,
                frame_id VARCHAR,
                product VARCHAR,
                camera VARCHAR,
                reason VARCHAR,
                stage VARCHAR,
                worker_id VARCHAR,
                failed_ts_ms BIGINT,
                stored_ts_ms BIGINT,
                PRIMARY KEY (source_topic, source_partition, source_offset)
            )""",
        ],
    ),
]

_SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY, description VARCHAR, applied_ts_ms BIGINT)"""


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("could not set" in text or "conflicting" in text)


def _check_file(path: Path) -> None:
    if path.exists() and path.is_dir():
        raise NotADatabase(f"{path}: is a directory, not a DuckDB database file")


def _pending_marker(path: Path) -> Path:
    return path.with_name(path.name + ".write-pending")


def _writer_waiting(marker: Path) -> bool:
    """A writer is queued for the lock (a marker touched within the last 2 s; a stale one
    left by a killed writer is ignored)."""
    try:
        return time.time() - marker.stat().st_mtime < 2.0
    except OSError:
        return False


def _open(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """Open with retry on lock conflicts only; other errors become one-line UserErrors.

    Writer priority: a writer that finds the file locked touches ``<db>.write-pending``;
    readers do not start a new read while it is fresh, so the sink waits for at most the
    reads already in flight however many dashboards are open.
    """
    path = Path(path)
    _check_file(path)
    if read_only and not path.exists():
        raise DatabaseMissing(f"{path}: no database yet (start `linewatch sink` to create it)")
    marker = _pending_marker(path)
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    flagged = False
    try:
        while True:
            if read_only and _writer_waiting(marker) and time.monotonic() < deadline:
                time.sleep(0.01 + 0.01 * random.random())
                continue
            try:
                return duckdb.connect(str(path), read_only=read_only)
            except duckdb.Error as exc:
                if not _is_lock_error(exc):
                    text = " ".join(str(exc).split())
                    if read_only and "does not exist" in text.lower():
                        raise DatabaseMissing(f"{path}: no database yet (start `linewatch sink` to create it)") from None
                    if "not a valid duckdb database" in text.lower():
                        raise NotADatabase(f"{path}: not a DuckDB database ({text})") from None
                    raise NotADatabase(f"{path}: cannot open as a DuckDB database ({text})") from None
                if time.monotonic() >= deadline:
                    raise StoreBusy(f"{path}: still locked by another process after {timeout_s:.0f}s") from None
                if not read_only:
                    try:
                        marker.touch()
                        flagged = True
                    except OSError:  # read-only directory: no priority, still correct
                        pass
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 1.5, 0.05 if not read_only else 0.1)
    finally:
        if flagged:
            marker.unlink(missing_ok=True)


@contextmanager
def reading(path: Path | str, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-only connection; close it quickly so the sink can write."""
    con = _open(Path(path), read_only=True, timeout_s=timeout_s)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def writing(path: Path | str, timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-write connection: one transaction, then CHECKPOINT and close.

    The body runs inside BEGIN/COMMIT; an exception rolls back and nothing is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _open(path, read_only=False, timeout_s=timeout_s)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    finally:
        con.close()


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The applied schema version, 0 for an empty database."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def init_db(path: Path | str, timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> int:
    """Create or migrate the schema; returns the version now in force.

    Raises NotADatabase (a UserError) for a file that is not DuckDB or whose schema is newer
    than this code understands, so `linewatch sink` stops at start with one clear line.
    """
    path = Path(path)
    with writing(path, timeout_s) as con:
        con.execute(_SCHEMA_TABLE)
        current = schema_version(con)
        if current > SCHEMA_VERSION:
            raise NotADatabase(
                f"{path}: schema version {current} is newer than this linewatch ({SCHEMA_VERSION}); upgrade linewatch"
            )
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            for sql in statements:
                con.execute(sql)
            con.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)", [version, description, now_ms()]
            )
            log.info("store %s: applied migration %d (%s)", path, version, description)
            current = version
    return current


# --------------------------------------------------------------------------------------
# writing batches

_INSPECTION_SCHEMA = pa.schema(
    [
        ("frame_id", pa.string()),
        ("product", pa.string()),
        ("camera", pa.string()),
        ("line", pa.string()),
        ("seq", pa.int64()),
        ("capture_ts_ms", pa.int64()),
        ("processed_ts_ms", pa.int64()),
        ("stored_ts_ms", pa.int64()),
        ("image_score", pa.float64()),
        ("threshold", pa.float64()),
        ("image_threshold", pa.float64()),
        ("verdict", pa.string()),
        ("defect_area_frac", pa.float64()),
        ("region_count", pa.int32()),
        ("category", pa.string()),
        ("category_confidence", pa.float64()),
        ("background", pa.bool_()),
        ("profile_version", pa.int32()),
        ("model_kind", pa.string()),
        ("engine", pa.string()),
        ("worker_id", pa.string()),
        ("latency_ms", pa.float64()),
        ("inference_ms", pa.float64()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("result_schema", pa.int32()),
    ]
)
_REGION_SCHEMA = pa.schema(
    [
        ("frame_id", pa.string()),
        ("region_idx", pa.int32()),
        ("area_px", pa.int64()),
        ("area_frac", pa.float64()),
        ("bbox_x", pa.int32()),
        ("bbox_y", pa.int32()),
        ("bbox_w", pa.int32()),
        ("bbox_h", pa.int32()),
        ("peak_score", pa.float64()),
        ("mean_score", pa.float64()),
        ("category", pa.string()),
        ("confidence", pa.float64()),
    ]
)
_IMAGE_SCHEMA = pa.schema(
    [
        ("frame_id", pa.string()),
        ("product", pa.string()),
        ("capture_ts_ms", pa.int64()),
        ("thumbnail_jpeg", pa.binary()),
        ("mask_png", pa.binary()),
        ("heatmap_png", pa.binary()),
    ]
)
_DLQ_SCHEMA = pa.schema(
    [
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("frame_id", pa.string()),
        ("product", pa.string()),
        ("camera", pa.string()),
        ("reason", pa.string()),
        ("stage", pa.string()),
        ("worker_id", pa.string()),
        ("failed_ts_ms", pa.int64()),
        ("stored_ts_ms", pa.int64()),
    ]
)


@dataclass
class DlqEvent:
    """A `frames.dlq` record as the sink stores it (the DlqRecord plus what the original
    headers said about product and camera, when they could be read)."""

    record: DlqRecord
    product: str | None = None
    camera: str | None = None


@dataclass
class WriteResult:
    inserted_ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    dlq_inserted: int = 0
    alerts_inserted: int = 0
    seconds: float = 0.0


def _insert_returning(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table, sql: str) -> list[tuple]:
    con.register(name, table)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.unregister(name)


def write_batch(
    con: duckdb.DuckDBPyConnection,
    results: Sequence[InspectionResult],
    *,
    dlq: Sequence[DlqEvent] = (),
    alerts: Sequence[Alert] = (),
    published_alert_ids: Sequence[str] = (),
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
        rows = [
            {
                "frame_id": r.frame_id,
                "product": r.product,
                "camera": r.camera,
                "line": r.line,
                "seq": r.seq,
                "capture_ts_ms": r.capture_ts_ms,
                "processed_ts_ms": r.processed_ts_ms,
                "stored_ts_ms": stored,
                "image_score": r.image_score,
                "threshold": r.threshold,
                "image_threshold": r.image_threshold,
                "verdict": r.verdict,
                "defect_area_frac": r.defect_area_frac,
                "region_count": len(r.regions),
                "category": r.category,
                "category_confidence": r.category_confidence,
                "background": r.background,
                "profile_version": r.profile_version,
                "model_kind": r.model_kind,
                "engine": r.engine,
                "worker_id": r.worker_id,
                "latency_ms": r.latency_ms,
                "inference_ms": r.inference_ms,
                "kafka_partition": r.kafka_partition,
                "kafka_offset": r.kafka_offset,
                "width": r.width,
                "height": r.height,
                "result_schema": r.schema_version,
            }
            for r in unique.values()
        ]
        inserted = _insert_returning(
            con,
            "lw_batch_inspections",
            pa.Table.from_pylist(rows, schema=_INSPECTION_SCHEMA),
            "INSERT INTO inspections SELECT * FROM lw_batch_inspections ON CONFLICT DO NOTHING RETURNING frame_id",
        )
        new_ids = {row[0] for row in inserted}
        out.inserted_ids = [fid for fid in unique if fid in new_ids]
        out.duplicates += len(unique) - len(new_ids)
        new = [unique[fid] for fid in out.inserted_ids]
        regions = [
            {
                "frame_id": r.frame_id,
                "region_idx": i,
                "area_px": g.area_px,
                "area_frac": g.area_frac,
                "bbox_x": g.bbox[0],
                "bbox_y": g.bbox[1],
                "bbox_w": g.bbox[2],
                "bbox_h": g.bbox[3],
                "peak_score": g.peak_score,
                "mean_score": g.mean_score,
                "category": g.category,
                "confidence": g.confidence,
            }
            for r in new
            for i, g in enumerate(r.regions)
        ]
        if regions:
            _insert_returning(
                con,
                "lw_batch_regions",
                pa.Table.from_pylist(regions, schema=_REGION_SCHEMA),
                "INSERT INTO defect_regions SELECT * FROM lw_batch_regions ON CONFLICT DO NOTHING",
            )
        images = [
            {
                "frame_id": r.frame_id,
                "product": r.product,
                "capture_ts_ms": r.capture_ts_ms,
                "thumbnail_jpeg": unb64(r.thumbnail_jpeg_b64),
                "mask_png": unb64(r.mask_png_b64),
                "heatmap_png": unb64(r.heatmap_png_b64),
            }
            for r in new
            if r.verdict == "defect"
            and (r.thumbnail_jpeg_b64 or r.mask_png_b64 or r.heatmap_png_b64)
        ]
        if images:
            _insert_returning(
                con,
                "lw_batch_images",
                pa.Table.from_pylist(images, schema=_IMAGE_SCHEMA),
                "INSERT INTO defect_images SELECT * FROM lw_batch_images ON CONFLICT DO NOTHING",
            )
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
        rows = [
            {
                "source_topic": e.record.source_topic,
                "source_partition": e.record.source_partition,
                "source_offset": e.record.source_offset,
                "frame_id": e.record.frame_id,
                "product": e.product,
                "camera": e.camera,
                "reason": e.record.reason,
                "stage": e.record.stage,
                "worker_id": e.record.worker_id,
                "failed_ts_ms": e.record.failed_ts_ms,
                "stored_ts_ms": stored,
            }
            for e in {
                (e.record.source_topic, e.record.source_partition, e.record.source_offset): e for e in dlq
            }.values()
        ]
        out.dlq_inserted = len(
            _insert_returning(
                con,
                "lw_batch_dlq",
                pa.Table.from_pylist(rows, schema=_DLQ_SCHEMA),
                "INSERT INTO dlq_events SELECT * FROM lw_batch_dlq ON CONFLICT DO NOTHING RETURNING source_offset",
            )
        )
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


def unpublished_alerts(con: duckdb.DuckDBPyConnection) -> list[Alert]:
    """Alerts stored but not yet confirmed on the `alerts` topic (the sink died in between)."""
    rows = con.execute(
        "SELECT alert_id, product, kind, state, value, limit_value, window_frames, ts_ms, message "
        "FROM alerts WHERE NOT published ORDER BY ts_ms"
    ).fetchall()
    return [
        Alert(
            alert_id=r[0], product=r[1], kind=r[2], state=r[3], value=r[4], limit=r[5],
            window_frames=r[6], ts_ms=r[7], message=r[8],
        )
        for r in rows
    ]


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


def active_alerts(con: duckdb.DuckDBPyConnection) -> list[Alert]:
    """Per (product, kind), the latest alert if it is 'raised'."""
    rows = con.execute(
        "SELECT alert_id, product, kind, state, value, limit_value, window_frames, ts_ms, message FROM ("
        "  SELECT *, row_number() OVER (PARTITION BY product, kind ORDER BY ts_ms DESC, alert_id DESC) AS rn "
        "  FROM alerts) WHERE rn = 1 AND state = 'raised' ORDER BY ts_ms DESC"
    ).fetchall()
    return [
        Alert(
            alert_id=r[0], product=r[1], kind=r[2], state=r[3], value=r[4], limit=r[5],
            window_frames=r[6], ts_ms=r[7], message=r[8],
        )
        for r in rows
    ]


# --------------------------------------------------------------------------------------
# the calibration side


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
        con.execute(
            "INSERT INTO profiles (product, version, threshold, image_threshold, threshold_method, model_kind, "
            "backbone, created_at, created_by, source, details_json) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?::TIMESTAMPTZ, ?, 'calibration', ?) "
            "ON CONFLICT DO UPDATE SET threshold = excluded.threshold, image_threshold = excluded.image_threshold, "
            "threshold_method = excluded.threshold_method, model_kind = excluded.model_kind, "
            "backbone = excluded.backbone, created_at = excluded.created_at, created_by = excluded.created_by, "
            "source = 'calibration', details_json = excluded.details_json",
            [
                data["product"],
                int(data.get("version", 0)),
                data.get("threshold"),
                data.get("image_threshold"),
                data.get("threshold_method"),
                data.get("model_kind"),
                data.get("backbone"),
                data.get("created_at"),
                data.get("created_by"),
                json.dumps(
                    {k: data.get(k) for k in ("thresholds", "threshold_reason", "calibration_metrics", "background")},
                    default=str,
                ),
            ],
        )


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
    """Record (or update, by run_id) one calibration run: what was fitted and how it scored."""
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
            data = p.model_dump(mode="json")
            con.execute(
                "INSERT INTO profiles (product, version, threshold, image_threshold, threshold_method, model_kind, "
                "backbone, created_at, created_by, source, details_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?::TIMESTAMPTZ, ?, 'registry', ?) "
                "ON CONFLICT DO UPDATE SET threshold_method = excluded.threshold_method, "
                "backbone = excluded.backbone, created_at = excluded.created_at, created_by = excluded.created_by, "
                "threshold = excluded.threshold, image_threshold = excluded.image_threshold, "
                "model_kind = excluded.model_kind, details_json = excluded.details_json",
                [
                    data["product"], data["version"], data["threshold"], data.get("image_threshold"),
                    data["threshold_method"], data["model_kind"], data.get("backbone"), data.get("created_at"),
                    data.get("created_by"),
                    json.dumps({k: data.get(k) for k in ("thresholds", "threshold_reason", "background")}, default=str),
                ],
            )
    return len(found)


def count_rows(path: Path | str, table: str = "inspections", timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> int:
    """Row count of one of the store's own tables (tests, the demo, the fault suite)."""
    sql = _COUNT_SQL.get(table)
    if sql is None:
        raise ValueError(f"unknown table {table!r}")
    with reading(path, timeout_s) as con:
        return int(con.execute(sql).fetchone()[0])


# literal statements: no SQL is ever assembled from a table name at run time
_COUNT_SQL = {
    "inspections": "SELECT count(*) FROM inspections",
    "defect_regions": "SELECT count(*) FROM defect_regions",
    "defect_images": "SELECT count(*) FROM defect_images",
    "profiles": "SELECT count(*) FROM profiles",
    "calibration_runs": "SELECT count(*) FROM calibration_runs",
    "alerts": "SELECT count(*) FROM alerts",
    "dlq_events": "SELECT count(*) FROM dlq_events",
}
