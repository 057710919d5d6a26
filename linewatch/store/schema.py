"""The store's schema: the DDL of every table, its migrations and the version in force.

The DDL here is the one description of the tables; the writers take their Arrow schemas
from the database it creates (see :mod:`linewatch.store.write`) rather than restating it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

from linewatch.messages import now_ms
from linewatch.store.connect import DEFAULT_WRITE_TIMEOUT_S, NotADatabase, writing

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

# Each migration: (version, description, statements). Never edit a released migration;
# append a new one. init_db applies whatever is missing, all in one transaction.
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
    (
        2,
        "evidence frames and operator reviews",
        [
            # one row per kept original frame; the bytes are a file under the evidence folder
            # (docs/review-loop.md says why files and not blobs)
            """CREATE TABLE evidence (
                frame_id VARCHAR PRIMARY KEY,
                product VARCHAR NOT NULL,
                camera VARCHAR,
                capture_ts_ms BIGINT NOT NULL,
                stored_ts_ms BIGINT NOT NULL,
                reason VARCHAR NOT NULL,
                encoding VARCHAR NOT NULL,
                bytes BIGINT NOT NULL,
                sha256 VARCHAR NOT NULL,
                file VARCHAR NOT NULL
            )""",
            # append-only: a review never updates or deletes a row, and never touches inspections;
            # review_id (made by the dashboard per submission) keys replays out
            """CREATE TABLE reviews (
                review_id VARCHAR PRIMARY KEY,
                frame_id VARCHAR NOT NULL,
                product VARCHAR NOT NULL,
                verdict VARCHAR NOT NULL,
                category VARCHAR,
                reviewer VARCHAR NOT NULL,
                note VARCHAR,
                reviewed_ts_ms BIGINT NOT NULL,
                stored_ts_ms BIGINT NOT NULL,
                kafka_partition INTEGER,
                kafka_offset BIGINT
            )""",
            # the review that counts: the latest per frame
            """CREATE VIEW latest_reviews AS
               SELECT * EXCLUDE (rn) FROM (
                 SELECT *, row_number() OVER (PARTITION BY frame_id ORDER BY reviewed_ts_ms DESC,
                                              stored_ts_ms DESC, review_id DESC) AS rn
                 FROM reviews) WHERE rn = 1""",
        ],
    ),
]

_SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY, description VARCHAR, applied_ts_ms BIGINT)"""


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The applied schema version, 0 for an empty database: what :func:`init_db` migrates
    from, and how a reader tells a database the sink has not yet created."""
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
