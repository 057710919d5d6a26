"""Evidence frames: the original bytes of kept frames, as files beside the database.

Why files and not DuckDB blobs (figures: docs/results/review-loop.md): a retention policy must
give disk space back, and DuckDB does not shrink its file when rows are deleted (freed blocks
are reused, the file stays at its high-water mark); every sink batch ends in a CHECKPOINT, so
megabytes of blobs per batch would lengthen the write lock the dashboard waits on; and a file
is readable by any tool. The table ``evidence`` is the index (one row per kept frame, with
size and SHA-256), written in the sink's transaction; the file is written (and fsynced)
*before* that transaction, so a row never names a missing file. A crash between the two leaves
an orphan file, which the replayed batch overwrites or :func:`sweep_orphans` removes.

Names are a hash of the frame id, never the id itself, so no frame id can reach outside the
folder. Retention (:func:`enforce_retention`) deletes the rows first and the files after the
commit, oldest capture first, and never a frame whose latest review is ``unsure`` (pending).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from linewatch.store.connect import DEFAULT_READ_TIMEOUT_S, DEFAULT_WRITE_TIMEOUT_S, reading, writing

log = logging.getLogger(__name__)

_EXT = {"jpeg": "jpg", "png": "png"}
# over the cap, a pass frees down to this share of it, so a line running at its cap pays one
# retention pass per ~10 % of the cap rather than one per sink batch
LOW_WATER = 0.9

# candidates oldest first with the running total, pending reviews left out; a row goes when it is
# past the age cutoff or when the bytes before it are still short of what must be freed
_RETENTION_SQL = """
SELECT frame_id, file, bytes FROM (
  SELECT e.frame_id, e.file, e.bytes, e.capture_ts_ms,
         sum(e.bytes) OVER (ORDER BY e.capture_ts_ms, e.frame_id ROWS UNBOUNDED PRECEDING) AS cum
  FROM evidence e
  WHERE NOT EXISTS (SELECT 1 FROM latest_reviews r WHERE r.frame_id = e.frame_id AND r.verdict = 'unsure')
) WHERE capture_ts_ms < ? OR cum - bytes < ?
"""
_PENDING_BYTES_SQL = """
SELECT coalesce(sum(e.bytes), 0) FROM evidence e
WHERE EXISTS (SELECT 1 FROM latest_reviews r WHERE r.frame_id = e.frame_id AND r.verdict = 'unsure')
"""


def evidence_root(db_path: Path | str, configured: Path | str | None = None) -> Path:
    """The evidence folder: ``evidence.dir`` when set, else ``<db_path>.evidence`` beside the
    database (so moving the database folder moves its evidence with it)."""
    if configured is not None:
        return Path(configured)
    db = Path(db_path)
    return db.with_name(db.name + ".evidence")


def relative_name(frame_id: str, encoding: str) -> str:
    """``ab/abcdef….jpg``: a hash of the frame id, sharded by its first byte."""
    h = hashlib.sha256(frame_id.encode("utf-8")).hexdigest()[:40]
    return f"{h[:2]}/{h}.{_EXT.get(encoding, 'bin')}"


@dataclass
class EvidenceRow:
    """One kept frame as the ``evidence`` table stores it (the file already written)."""

    frame_id: str
    product: str
    camera: str | None
    capture_ts_ms: int
    stored_ts_ms: int
    reason: str
    encoding: str
    bytes: int
    sha256: str
    file: str

    def as_row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def write_file(root: Path, frame_id: str, data: bytes, encoding: str) -> tuple[str, str]:
    """Write one frame atomically (temporary name, fsync, rename); returns (relative name,
    sha256). Rewriting the same frame (a replayed batch) replaces it with the same bytes."""
    rel = relative_name(frame_id, encoding)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rel, hashlib.sha256(data).hexdigest()


def total_bytes(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT coalesce(sum(bytes), 0) FROM evidence").fetchone()[0])


@dataclass
class Evidence:
    """A kept frame read back: its bytes and what the index says about them."""

    frame_id: str
    data: bytes
    encoding: str
    reason: str
    capture_ts_ms: int


def read_evidence(db_path: Path | str, frame_id: str, root: Path | str | None = None,
                  *, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Evidence | None:
    """The original bytes of a kept frame, or None (never kept, or removed by retention). A file
    whose SHA-256 does not match the index is treated as missing (logged), never served."""
    with reading(db_path, timeout_s) as con:
        row = con.execute("SELECT file, sha256, encoding, reason, capture_ts_ms FROM evidence WHERE frame_id = ?",
                          [frame_id]).fetchone()
    if row is None:
        return None
    return load_file(evidence_root(db_path, root), frame_id, *row)


def load_file(root: Path, frame_id: str, file: str, sha: str, encoding: str, reason: str,
              capture_ts_ms: int) -> Evidence | None:
    """Read one indexed file and check it against its SHA-256."""
    try:
        data = (Path(root) / file).read_bytes()
    except OSError as exc:
        log.warning("evidence of %s: %s", frame_id, exc)
        return None
    if hashlib.sha256(data).hexdigest() != sha:
        log.warning("evidence of %s: %s does not match its checksum; not served", frame_id, file)
        return None
    return Evidence(frame_id, data, encoding, reason, int(capture_ts_ms))


@dataclass
class RetentionResult:
    """What one retention pass did; ``over_cap`` when pending reviews alone exceed the cap."""

    deleted: int = 0
    freed_bytes: int = 0
    total_bytes: int = 0  # after the pass
    pending_bytes: int = 0
    over_cap: bool = False
    seconds: float = 0.0


def enforce_retention(db_path: Path | str, root: Path | str, *, max_age_ms: int, max_bytes: int, now_ms: int,
                      timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> RetentionResult:
    """Delete kept frames past ``max_age_ms`` and, when more than ``max_bytes`` are kept, oldest
    first down to ``LOW_WATER`` of it; frames whose latest review is ``unsure`` stay. Rows go in one transaction, files
    after it commits (a crash in between leaves orphans for :func:`sweep_orphans`)."""
    t0 = time.perf_counter()
    out = RetentionResult()
    with writing(db_path, timeout_s) as con:
        total = total_bytes(con)
        need = total - int(max_bytes * LOW_WATER) if total > max_bytes else 0
        doomed = con.execute(_RETENTION_SQL, [now_ms - max_age_ms, need]).fetchall()
        if doomed:
            con.execute("DELETE FROM evidence WHERE list_contains(?::VARCHAR[], frame_id)", [[d[0] for d in doomed]])
        out.deleted = len(doomed)
        out.freed_bytes = sum(int(d[2]) for d in doomed)
        out.total_bytes = total - out.freed_bytes
        out.pending_bytes = int(con.execute(_PENDING_BYTES_SQL).fetchone()[0])
    out.over_cap = out.total_bytes > max_bytes
    root = Path(root)
    for _, file, _ in doomed:
        try:
            (root / file).unlink(missing_ok=True)
        except OSError as exc:  # left as an orphan; the next sweep_orphans takes it
            log.warning("evidence: could not remove %s: %s", root / file, exc)
    out.seconds = time.perf_counter() - t0
    return out


def sweep_orphans(db_path: Path | str, root: Path | str, *, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> int:
    """Remove files the index does not name (a crash between a file and its row, or between a
    retention commit and its unlinks) and stray temporary files; returns how many. Run by the
    sink at start, before it writes anything, so no file of a batch in flight can be taken."""
    root = Path(root)
    if not root.is_dir():
        return 0
    with reading(db_path, timeout_s) as con:
        known = {r[0] for r in con.execute("SELECT file FROM evidence").fetchall()}
    removed = 0
    for path in root.glob("*/*"):
        rel = f"{path.parent.name}/{path.name}"
        if rel not in known and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
