"""Opening the DuckDB file: the lock/retry layer that every reader and writer goes through.

DuckDB lets one process open a file read-write *or* many processes open it read-only, never
both (a read-only open fails with "Could not set lock on file" while a writer holds it, and a
writer open fails the same way while any reader holds it). So nobody keeps the file open:

- the writer (only the sink, plus ``record_profile``/``record_calibration_run`` from the
  calibration side) opens, writes one batch in one transaction, CHECKPOINTs and closes;
- readers (the dashboard) open ``read_only=True``, run their queries and close;
- both sides retry a lock conflict with short jittered backoff, so a lock error never
  reaches the user; they give up only after ``timeout_s`` with :class:`StoreBusy`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from linewatch.errors import UserError

DEFAULT_WRITE_TIMEOUT_S = 60.0
DEFAULT_READ_TIMEOUT_S = 10.0


class StoreBusy(RuntimeError):
    """The database stayed locked by another process for longer than the timeout."""


class DatabaseMissing(UserError):
    """No database file yet (the sink has not written anything)."""


class NotADatabase(UserError):
    """The path exists but is not a DuckDB database (or is a newer schema than this code)."""


def _is_lock_error(exc: BaseException) -> bool:
    """Whether an open failed only because another process holds the file (worth a retry);
    DuckDB reports this as a generic IOException, so the message is all there is to go on."""
    text = str(exc).lower()
    return "lock" in text and ("could not set" in text or "conflicting" in text)


def _check_file(path: Path) -> None:
    """Refuse a directory up front: DuckDB's own error for it is obscure and not a lock error."""
    if path.exists() and path.is_dir():
        raise NotADatabase(f"{path}: is a directory, not a DuckDB database file")


def _pending_marker(path: Path) -> Path:
    """The file a waiting writer touches so that readers hold back (see :func:`_open`)."""
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
    missing = f"{path}: no database yet (start `linewatch sink` to create it)"
    if read_only and not path.exists():
        raise DatabaseMissing(missing)
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
                        raise DatabaseMissing(missing) from None
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
