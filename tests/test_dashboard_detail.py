"""The defect detail view, the review statistics, the CSV export and the profile history:
queries against a real DuckDB file, the page through Streamlit's AppTest (the detail of a
frame with its original kept as evidence, previous/next, a review refused for an empty
reviewer, a review that cannot reach the broker said so and nothing written)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pandas as pd
import pytest

from dashboard import queries
from linewatch import store
from linewatch.messages import Review
from result_factory import images, make_result, write_db

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


@pytest.fixture
def reviewed_db(tmp_path):
    """12 frames of 'cap' (every 3rd a defect), the newest defect kept as evidence, three
    reviews: f-9 confirmed (worker said surface, operator says contamination), f-6 false call,
    f-3 confirmed twice (the latest, surface, counts)."""
    now = int(time.time() * 1000)
    db = tmp_path / "lw.duckdb"
    results = [make_result(i, product="cap", verdict="defect" if i % 3 == 0 else "ok",
                           category="surface" if i % 3 == 0 else "unknown", capture_ts_ms=now - 60_000 + i * 1000,
                           frame_id=f"f-{i}") for i in range(12)]
    write_db(db, results)
    thumb, _, _ = images(9, size=200)
    rel, sha = store.write_file(store.evidence_root(db), "f-9", thumb, "jpeg")
    ev = store.EvidenceRow(frame_id="f-9", product="cap", camera="cam-1", capture_ts_ms=results[9].capture_ts_ms,
                           stored_ts_ms=now, reason="defect", encoding="jpeg", bytes=len(thumb), sha256=sha, file=rel)
    reviews = [Review(frame_id="f-9", product="cap", verdict="confirm", category="contamination", reviewer="ana",
                      reviewed_ts_ms=now - 3000),
               Review(frame_id="f-6", product="cap", verdict="false_call", reviewer="bo", reviewed_ts_ms=now - 2000),
               Review(frame_id="f-3", product="cap", verdict="confirm", category="structural", reviewer="bo",
                      reviewed_ts_ms=now - 1500),
               Review(frame_id="f-3", product="cap", verdict="confirm", category="surface", reviewer="ana",
                      reviewed_ts_ms=now - 1000)]
    with store.writing(db) as con:
        con.execute("INSERT INTO evidence SELECT * FROM (SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    list(ev.as_row().values()))
        store.write_batch(con, [], reviews=[(r, 0, k) for k, r in enumerate(reviews)])
    return db, now


def test_detail_neighbours_stats_and_export(reviewed_db):
    db, now = reviewed_db
    f = queries.Filters(start_ms=now - 3600_000)
    with store.reading(db) as con:
        d = queries.frame_detail(con, "f-9")
        assert queries.frame_detail(con, "nope") is None
        nb = queries.neighbours(con, f, "f-6")
        first = queries.neighbours(con, f, "f-9")
        outside = queries.neighbours(con, f, "f-1")  # not a defect
        stats = queries.review_stats(con, f)
    assert d["verdict"] == "defect" and d["evidence"][3] == "defect" and len(d["regions"]) == 1
    assert list(d["reviews"]["verdict"]) == ["confirm"] and d["reviews"]["category"][0] == "contamination"
    assert nb == ("f-9", "f-3", 2, 4) and first == (None, "f-6", 1, 4) and outside[2] == 0
    row = stats.iloc[0].to_dict()
    assert (row["defect_calls"], row["reviewed"], row["confirmed"], row["false_calls"]) == (4, 3, 2, 1)
    assert row["reviewed_share"] == pytest.approx(0.75)
    assert row["confirmed_precision"] == pytest.approx(2 / 3)
    assert row["category_agreement"] == pytest.approx(0.5)  # f-3 agrees (latest: surface), f-9 does not
    csv = pd.read_csv(io.BytesIO(queries.inspections_csv(db, f)))
    assert len(csv) == 12 and set(csv.loc[csv.frame_id == "f-3", "review_category"]) == {"surface"}
    assert len(pd.read_csv(io.BytesIO(queries.inspections_csv(db, queries.Filters(products=["other"]))))) == 0


def _app(db: Path, monkeypatch, frame: str | None = None, **env):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LINEWATCH_STORAGE__DB_PATH", str(db))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    at = AppTest.from_file(APP, default_timeout=60)
    if frame:
        at.query_params["frame"] = frame
    at.run()
    assert not at.exception, at.exception
    return at


def test_detail_page_shows_the_frame_and_refuses_or_keeps_reviews(reviewed_db, monkeypatch):
    db, now = reviewed_db
    at = _app(db, monkeypatch, "f-9", LINEWATCH_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1",
              LINEWATCH_DASHBOARD__REVIEW_TIMEOUT_S="2")
    assert at.header[0].value == "Frame f-9"
    assert any(m.label == "Image score" for m in at.metric)
    assert at.get("image")[0].proto.imgs[0].caption.startswith("original frame · 200×200")
    assert any("defect 1 of 4" in c.value for c in at.caption)
    at.toggle(key="show-heat").set_value(True).run()
    assert not at.exception
    # an empty reviewer: refused on the page, nothing sent
    at.radio(key="verdict-f-9").set_value("false_call")
    at.button[[b.label for b in at.button].index("Submit review")].click().run()
    assert any("reviewer" in e.value for e in at.error), [e.value for e in at.error]
    # the broker is down: said so, the review is kept on the page, the database has no new row
    at.text_input(key="reviewer-f-9").set_value("ana")
    at.button[[b.label for b in at.button].index("Submit review")].click().run()
    assert any("broker did not acknowledge" in e.value for e in at.error), [e.value for e in at.error]
    assert any("Not yet sent" in w.value for w in at.warning)
    assert store.count_rows(db, "reviews") == 4
    # older -> f-6
    at.button[[b.label for b in at.button].index("Older →")].click().run()
    assert at.header[0].value == "Frame f-6"
    # back to the overview, then a frame id typed in the sidebar, then back again
    at.button(key="detail-back").click().run()
    assert not at.header or not at.header[0].value.startswith("Frame")
    at.sidebar.text_input(key="f_open_frame").input("f-3").run()
    assert at.header[0].value == "Frame f-3" and at.sidebar.text_input(key="f_open_frame").value == ""
    at.button(key="detail-back").click().run()
    assert not at.header or not at.header[0].value.startswith("Frame")


def test_unknown_frame_and_overview_panels(reviewed_db, monkeypatch):
    from linewatch.profiles import Profile

    db, _ = reviewed_db
    # one version known from results only (no details), one recorded by calibration: the history mixes both
    with store.writing(db) as con:
        store.write_batch(con, [make_result(99, product="pcb", frame_id="p-99", capture_ts_ms=int(time.time() * 1000))])
    store.record_profile(db, Profile(product="cap", version=2, model_kind="padim", backbone="efficientnet-lite0",
                                     input_size=256, threshold=0.5, threshold_method="normal_quantile",
                                     created_by="eng.kim", calibration_metrics={"from_reviews": {
                                         "confirmed": 3, "false_calls": 1, "sampled_normals": 12,
                                         "review_ids": ["a", "b", "c", "d"]}}))
    at = _app(db, monkeypatch, "no-such-frame")
    assert any("No frame 'no-such-frame'" in e.value for e in at.error)
    at = _app(db, monkeypatch)
    subheaders = [s.value for s in at.subheader]
    assert "Reviews of defect calls" in subheaders and "Profile version history" in subheaders
    assert any(b.label == "Details" for b in at.button)
    history = at.table[-1].value
    assert "eng.kim" in history.to_string() and "3 confirmed + 1 false calls + 12 sampled" in history.to_string()


def test_drift_banner(reviewed_db, monkeypatch):
    from linewatch.messages import Alert

    db, now = reviewed_db
    with store.writing(db) as con:
        store.write_batch(con, [], alerts=[Alert(product="cap", kind="drift", state="raised", value=0.62, limit=0.5,
                                                 window_frames=200, ts_ms=now - 1000, message="cap: scores drifting")])
    at = _app(db, monkeypatch)
    assert any("scores drifting: recalibrate?" in w.value and "0.62" in w.value for w in at.warning)
