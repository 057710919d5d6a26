"""The dashboard: its queries against a real DuckDB file (numbers, filters, a hostile filter
value) and the Streamlit page through Streamlit's AppTest (empty, missing and corrupt
databases, category numbers, filters, the alert banner)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dashboard import queries
from linewatch import store
from linewatch.messages import Alert
from result_factory import known_dataset, make_result, write_db

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
HOSTILE = "widget' OR 1=1; DROP TABLE inspections; --"


@pytest.fixture
def known_db(tmp_path):
    now = int(time.time() * 1000)
    db = tmp_path / "lw.duckdb"
    write_db(db, known_dataset(now))
    return db, now


def _sql_counts(db: Path, where: str = "true", params: list | None = None) -> dict[str, int]:
    with store.reading(db) as con:
        return dict(con.execute(
            f"SELECT category, count(*) FROM inspections WHERE verdict = 'defect' AND {where} GROUP BY 1",
            params or []).fetchall())


def test_snapshot_numbers_match_the_database(known_db):
    db, now = known_db
    hour = queries.Filters(start_ms=now - 3600_000)
    snap = queries.load_snapshot(db, hour)
    expected = _sql_counts(db, "capture_ts_ms >= ?", [now - 3600_000])
    got = dict(zip(snap.categories["category"], snap.categories["defects"]))
    assert got == {c: expected.get(c, 0) for c in queries.ALL_CATEGORIES}
    assert snap.kpis["frames"] == 200 and snap.kpis["defects"] == sum(expected.values())
    row = snap.categories.set_index("category").loc["surface"]
    assert row["per_1000"] == pytest.approx(1000 * expected["surface"] / 200)
    assert snap.categories.set_index("category").loc["unknown", "label"].startswith("uncategorised")
    assert set(snap.by_product["product"]) == {"widget", "bottle"}
    assert snap.by_product["frames"].sum() == 200 and snap.by_camera["frames"].sum() == 200
    assert int(snap.trend["defects"].sum()) == snap.kpis["defects"]
    assert len(snap.gallery) == 8 and all(g["thumbnail"] for g in snap.gallery)
    assert snap.gallery[0]["capture_ts_ms"] >= snap.gallery[-1]["capture_ts_ms"]
    assert list(snap.profiles["version"]) == [1, 1]
    # all time adds the 40 surface defects from 3 hours ago
    all_time = queries.load_snapshot(db, queries.Filters())
    assert all_time.categories.set_index("category").loc["surface", "defects"] == expected["surface"] + 40
    # product, camera and line filters
    bottle = queries.load_snapshot(db, queries.Filters(start_ms=now - 3600_000, products=["bottle"]))
    assert bottle.kpis["frames"] == 100
    assert dict(zip(bottle.categories["category"], bottle.categories["defects"])) == {
        c: _sql_counts(db, "capture_ts_ms >= ? AND product = 'bottle'", [now - 3600_000]).get(c, 0)
        for c in queries.ALL_CATEGORIES}
    cam2 = queries.load_snapshot(db, queries.Filters(cameras=["cam-2"], lines=["line-A"]))
    assert cam2.kpis["frames"] == 50


def test_hostile_filter_values_are_bound_not_executed(known_db):
    db, now = known_db
    for f in (queries.Filters(products=[HOSTILE]), queries.Filters(cameras=[HOSTILE], lines=["'); --"]),
              queries.Filters(products=["widget", HOSTILE])):
        snap = queries.load_snapshot(db, f)
        assert snap.kpis["frames"] == (140 if "widget" in f.products else 0)
    assert store.count_rows(db) == 240  # nothing dropped


def test_snapshot_of_an_empty_database_is_sensible(tmp_path):
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    snap = queries.load_snapshot(db, queries.Filters())
    assert snap.kpis["frames"] == 0 and snap.kpis["per_1000"] == 0
    assert list(snap.categories["defects"]) == [0] * 5
    assert snap.trend.empty and snap.gallery == [] and snap.alerts == []
    assert snap.health["dlq_total"] == 0 and snap.health["last_capture_ts_ms"] is None


# ---- the page, through Streamlit's AppTest ------------------------------------------------

def _app(db: Path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LINEWATCH_STORAGE__DB_PATH", str(db))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _category_metrics(at) -> dict[str, str]:
    labels = {v: k for k, v in queries.CATEGORY_LABELS.items()}
    return {labels[m.label]: m.value for m in at.metric if m.label in labels}


def test_page_shows_the_database_numbers_and_filters_change_them(known_db, monkeypatch):
    db, now = known_db
    at = _app(db, monkeypatch)
    expected = _sql_counts(db, "capture_ts_ms >= ?", [now - 3600_000])
    assert _category_metrics(at) == {c: f"{expected.get(c, 0):,}" for c in queries.ALL_CATEGORIES}
    assert at.title[0].value == "Line quality"
    assert any(m.label == "Frames inspected" and m.value == "200" for m in at.metric)

    at.sidebar.radio(key="time_range").set_value("All time").run()
    assert _category_metrics(at)["surface"] == f"{expected['surface'] + 40:,}"

    at.sidebar.multiselect(key="f_products").set_value(["bottle"]).run()
    bottle = _sql_counts(db, "product = 'bottle'")
    assert _category_metrics(at) == {c: f"{bottle.get(c, 0):,}" for c in queries.ALL_CATEGORIES}
    assert any(m.label == "Frames inspected" and m.value == "100" for m in at.metric)


def test_alert_banner(tmp_path, monkeypatch):
    db = tmp_path / "lw.duckdb"
    write_db(db, [make_result(i, product="bottle", verdict="defect", category="surface",
                              capture_ts_ms=int(time.time() * 1000) - 1000 + i) for i in range(12)])
    alert = Alert(product="bottle", kind="consecutive_defects", state="raised", value=12, limit=10,
                  window_frames=200, message="bottle: 12 defective frames in a row (limit 10)")
    with store.writing(db) as con:
        store.write_batch(con, [], alerts=[alert])
    at = _app(db, monkeypatch)
    banners = [e.value for e in at.error]
    assert len(banners) == 1 and "ALERT" in banners[0] and "bottle" in banners[0] and "12 in a row" in banners[0]
    cleared = alert.model_copy(update={"alert_id": "c1", "state": "cleared", "ts_ms": alert.ts_ms + 1})
    with store.writing(db) as con:
        store.write_batch(con, [], alerts=[cleared])
    at.run()
    assert not at.error


def test_page_on_an_empty_database(tmp_path, monkeypatch):
    db = tmp_path / "lw.duckdb"
    store.init_db(db)
    at = _app(db, monkeypatch)
    assert any("no frame has been inspected yet" in i.value for i in at.info)
    assert set(_category_metrics(at).values()) == {"0"}


def test_page_with_a_missing_database(tmp_path, monkeypatch):
    at = _app(tmp_path / "nowhere" / "lw.duckdb", monkeypatch)
    assert any("No linewatch database at" in w.value for w in at.warning)
    assert not at.error
    assert not (tmp_path / "nowhere").exists()


def test_page_with_a_file_that_is_not_duckdb(tmp_path, monkeypatch):
    bad = tmp_path / "lw.duckdb"
    bad.write_bytes(b"\x00garbage" * 500)
    at = _app(bad, monkeypatch)
    assert any("Cannot read the database" in e.value and "not a DuckDB database" in e.value for e in at.error)
