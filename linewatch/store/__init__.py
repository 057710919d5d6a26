"""The DuckDB store: schema and migrations, the sink's writer and the dashboard's reader.

``connect`` opens the file under DuckDB's one-writer-or-many-readers lock, ``schema`` holds
the tables and their migrations, ``write`` the idempotent batch and profile writes, ``read``
the sink's restart queries. Callers use the names below: ``from linewatch import store``.
"""

from linewatch.store.connect import (DEFAULT_READ_TIMEOUT_S, DEFAULT_WRITE_TIMEOUT_S, DatabaseMissing, NotADatabase,
                                     StoreBusy, reading, writing)
from linewatch.store.evidence import (Evidence, EvidenceRow, RetentionResult, enforce_retention, evidence_root,
                                      read_evidence, sweep_orphans, write_file)
from linewatch.store.read import active_alerts, count_rows, recent_normal_scores, recent_verdicts, unpublished_alerts
from linewatch.store.schema import MIGRATIONS, SCHEMA_VERSION, init_db, schema_version
from linewatch.store.write import (DlqEvent, WriteResult, record_calibration_run, record_profile,
                                   sync_profiles_from_registry, write_batch)

__all__ = [
    "DEFAULT_READ_TIMEOUT_S", "DEFAULT_WRITE_TIMEOUT_S", "MIGRATIONS", "SCHEMA_VERSION", "DatabaseMissing",
    "DlqEvent", "Evidence", "EvidenceRow", "NotADatabase", "RetentionResult", "enforce_retention",
    "evidence_root", "read_evidence", "sweep_orphans", "write_file", "StoreBusy", "WriteResult", "active_alerts", "count_rows", "init_db",
    "reading", "recent_normal_scores", "recent_verdicts", "record_calibration_run", "record_profile", "schema_version",
    "sync_profiles_from_registry", "unpublished_alerts", "write_batch", "writing",
]
