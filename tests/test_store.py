"""The DuckDB store on a real file: schema/migrations, idempotent batches, bad files, lock
retry across processes, and reading while another process writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from linewatch import store
from linewatch.errors import UserError
from linewatch.messages import Alert
from result_factory import make_result

ROOT = Path(__file__).resolve().parent.parent


def _batch(start: int, n: int, defect_every: int = 3) -> list:
    return [
        make_result(i, verdict="defect" if i % defect_every == 0 else "ok",
                    category="surface" if i % defect_every == 0 else "unknown", capture_ts_ms=1_764_000_000_000 + i)
        for i in range(start, start + n)
    ]


def test_init_creates_schema_and_is_idempotent(tmp_path):
    db = tmp_path / "lw.duckdb"
    assert store.init_db(db) == store.SCHEMA_VERSION
    assert store.init_db(db) == store.SCHEMA_VERSION  # re-run: nothing applied twice
    with store.reading(db) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == len(store.MIGRATIONS)
    assert {"inspections", "defect_regions", "defect_images", "profiles", "calibration_runs", "alerts",
            "dlq_events", "evidence", "reviews", "latest_reviews", "schema_version"} <= tables


def test_write_batch_is_idempotent_and_stores_images_only_for_defects(tmp_path):
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    results = _batch(0, 30)
    with store.writing(db) as con:
        wr = store.write_batch(con, results + results[:5])  # duplicates inside the batch too
    assert len(wr.inserted_ids) == 30 and wr.duplicates == 5
    with store.writing(db) as con:  # a replayed batch
        wr2 = store.write_batch(con, results)
    assert wr2.inserted_ids == [] and wr2.duplicates == 30
    assert store.count_rows(db) == 30
    defects = sum(r.verdict == "defect" for r in results)
    assert store.count_rows(db, "defect_images") == defects
    assert store.count_rows(db, "defect_regions") == defects
    with store.reading(db) as con:
        thumb, mask, heat = con.execute(
            "SELECT thumbnail_jpeg, mask_png, heatmap_png FROM defect_images LIMIT 1").fetchone()
        assert thumb[:2] == b"\xff\xd8" and mask[:4] == b"\x89PNG" and heat[:4] == b"\x89PNG"
        row = con.execute("SELECT product, camera, line, verdict, region_count, profile_version, kafka_partition "
                          "FROM inspections WHERE frame_id = ?", [results[0].frame_id]).fetchone()
        assert row == ("widget", "cam-1", "line-A", "defect", 1, 1, 0)
        assert con.execute("SELECT product, version, source FROM profiles").fetchall() == [("widget", 1, "results")]


def test_failed_transaction_writes_nothing(tmp_path):
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    with pytest.raises(RuntimeError):
        with store.writing(db) as con:
            store.write_batch(con, _batch(0, 10))
            raise RuntimeError("crash mid-batch")
    assert store.count_rows(db) == 0


def test_not_a_duckdb_file_is_a_clear_user_error(tmp_path):
    bad = tmp_path / "notes.duckdb"
    bad.write_bytes(b"this is a text file, not a database\n" * 200)
    with pytest.raises(UserError) as exc:
        store.init_db(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "not a DuckDB database" in msg and "\n" not in msg
    with pytest.raises(store.NotADatabase):
        with store.reading(bad):
            pass
    with pytest.raises(store.NotADatabase, match="directory"):
        store.init_db(tmp_path)


def test_missing_database_for_a_reader(tmp_path):
    with pytest.raises(store.DatabaseMissing, match="no database yet"):
        with store.reading(tmp_path / "nope.duckdb"):
            pass
    assert not (tmp_path / "nope.duckdb").exists()  # a reader never creates the file


def test_newer_schema_is_refused(tmp_path):
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    con = duckdb.connect(str(db))
    con.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", [store.SCHEMA_VERSION + 5])
    con.close()
    with pytest.raises(store.NotADatabase, match="newer than this linewatch"):
        store.init_db(db)


def test_hostile_values_are_data_not_sql(tmp_path):
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    evil = "x'); DROP TABLE inspections; --"
    r = make_result(1, verdict="defect", category="surface", frame_id="f-1")
    r = r.model_copy(update={"worker_id": evil, "engine": evil})
    with store.writing(db) as con:
        store.write_batch(con, [r], alerts=[Alert(product=evil, kind="defect_rate", state="raised", value=0.5,
                                                 limit=0.25, window_frames=10, message=evil)])
    with store.reading(db) as con:
        assert con.execute("SELECT worker_id FROM inspections").fetchone()[0] == evil
        assert store.active_alerts(con)[0].product == evil


def test_alert_bookkeeping_and_recent_verdicts(tmp_path):
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    a1 = Alert(product="widget", kind="defect_rate", state="raised", value=0.5, limit=0.25, window_frames=10,
               ts_ms=1, message="up")
    a2 = Alert(product="widget", kind="defect_rate", state="cleared", value=0.1, limit=0.25, window_frames=10,
               ts_ms=2, message="down")
    a3 = Alert(product="bottle", kind="consecutive_defects", state="raised", value=10, limit=10,
               window_frames=10, ts_ms=3, message="run")
    with store.writing(db) as con:
        store.write_batch(con, _batch(0, 12), alerts=[a1, a2, a3])
    with store.reading(db) as con:
        assert [a.alert_id for a in store.active_alerts(con)] == [a3.alert_id]
        assert {a.alert_id for a in store.unpublished_alerts(con)} == {a1.alert_id, a2.alert_id, a3.alert_id}
        verdicts = store.recent_verdicts(con, 5)
    assert verdicts == {"widget": ["ok", "ok", "defect", "ok", "ok"]}  # frames 7..11, oldest first
    with store.writing(db) as con:
        store.write_batch(con, [], published_alert_ids=[a1.alert_id, a3.alert_id])
    with store.reading(db) as con:
        assert [a.alert_id for a in store.unpublished_alerts(con)] == [a2.alert_id]


def test_record_profile_and_calibration_run(tmp_path):
    from linewatch.profiles import Profile

    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    with store.writing(db) as con:  # the sink saw v2 in results first
        store.write_batch(con, [make_result(1, profile_version=2, capture_ts_ms=1000)])
    p = Profile(product="widget", version=2, model_kind="padim", backbone="efficientnet-lite0", input_size=256,
                threshold=0.42, threshold_method="iou")
    store.record_profile(db, p)
    store.record_calibration_run(db, run_id="r1", product="widget", status="published", version=2,
                                 model_kind="padim", threshold_method="iou", threshold=0.42,
                                 metrics={"pixel_auroc": 0.97})
    with store.reading(db) as con:
        row = con.execute("SELECT threshold, threshold_method, source, first_seen_ts_ms FROM profiles "
                          "WHERE product = 'widget' AND version = 2").fetchone()
        run = con.execute("SELECT status, metrics_json FROM calibration_runs WHERE run_id = 'r1'").fetchone()
    assert row == (0.42, "iou", "calibration", 1000)
    assert run[0] == "published" and json.loads(run[1]) == {"pixel_auroc": 0.97}


_HOLD_WRITER = textwrap.dedent(
    """
    import sys, time
    from linewatch import store
    with store.writing(sys.argv[1]) as con:
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


@pytest.mark.integration
def test_reader_waits_for_a_writer_in_another_process(tmp_path):
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_WRITER, str(db), "1.5"], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(store.StoreBusy, match="still locked"):
            with store.reading(db, timeout_s=0.3):
                pass
        t0 = time.monotonic()
        with store.reading(db, timeout_s=10) as con:  # retries until the writer is gone
            assert con.execute("SELECT count(*) FROM inspections").fetchone()[0] == 0
        assert time.monotonic() - t0 > 0.5
    finally:
        proc.wait(timeout=20)


@pytest.mark.integration
def test_reading_while_another_process_writes(tmp_path):
    """Store level (no Kafka): 40 batches written by this process, one transaction each,
    while a dashboard-like reader process reads continuously. No error may reach the reader,
    its counts never go down, and the final count is exact."""
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    out, stop = tmp_path / "reader.json", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, str(ROOT / "tests" / "db_reader_proc.py"), str(db), str(out),
                               str(stop), "1"], cwd=ROOT)
    try:
        time.sleep(1.5)  # let the reader start reading
        for b in range(40):
            with store.writing(db) as con:
                store.write_batch(con, _batch(b * 25, 25))
            time.sleep(0.02)
        stop.touch()
        assert reader.wait(timeout=60) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
    seen = json.loads(out.read_text())
    assert seen["errors"] == []
    counts = seen["counts"]
    assert len(counts) >= 10
    assert all(a <= b for a, b in zip(counts, counts[1:])), "counts went backwards"
    assert counts[-1] == 1000 == store.count_rows(db)


def test_a_version_1_database_migrates_to_evidence_and_reviews(tmp_path, monkeypatch):
    """A database the previous release made (schema 1, with rows) gains the evidence and reviews
    tables, keeps its rows, and the sink's writes work on it."""
    from linewatch.store import schema

    db = tmp_path / "old.duckdb"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 1)
    assert schema.init_db(db) == 1
    with store.writing(db) as con:
        store.write_batch(con, _batch(0, 5))
    monkeypatch.undo()
    assert store.init_db(db) == 2
    with store.reading(db) as con:
        assert con.execute("SELECT count(*) FROM inspections").fetchone()[0] == 5
        assert con.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM latest_reviews").fetchone()[0] == 0
        assert [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()] == [1, 2]
