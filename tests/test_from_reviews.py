"""`calibrate recalibrate --from-reviews`: reviewed frames kept as evidence in a real DuckDB
file become an image-labelled validation set; old vs new side by side; a new version only with
publish, recording the reviews it used; too few reviews: one line and exit 2."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from linewatch.messages import Review
from linewatch.profiles import Registry
from linewatch.settings import Settings
from result_factory import make_result
from worker_helpers import encode, plain_image, publish_mean_profile, with_square

ROOT = Path(__file__).resolve().parent.parent


def _line(tmp_path: Path, n_defects: int, n_false: int, n_samples: int):
    """A registry with a published test profile and a database whose evidence holds
    ``n_defects`` confirmed defects, ``n_false`` false calls and ``n_samples`` sampled normals."""
    from workers.sink import Sink

    reg_dir = tmp_path / "profiles"
    publish_mean_profile(reg_dir, "cap", size=64, threshold=0.2)
    s = Settings()
    settings = s.model_copy(update={"storage": s.storage.model_copy(update={"db_path": tmp_path / "lw.duckdb",
                                                                             "registry_dir": reg_dir})})
    sink = Sink(settings)
    sink.start()
    t0 = int(time.time() * 1000) - 600_000
    results, reviews = [], []
    for i in range(n_defects + n_false + n_samples):
        defect_like = i < n_defects + n_false  # false calls are frames the worker called defects
        img = plain_image(64, 128, seed=100 + i)
        if i < n_defects:
            img = with_square(img, 10 + i % 30, 12, 14, value=250)
        elif defect_like:
            img = with_square(img, 20, 20, 6, value=200)  # faint: a defect call an operator rejects
        data = encode(img, "png")
        r = make_result(i, product="cap", verdict="defect" if defect_like else "ok",
                        category="surface" if defect_like else "unknown", capture_ts_ms=t0 + i * 1000,
                        frame_id=f"cap-{i}")
        results.append(r.model_copy(update={"frame_b64": base64.b64encode(data).decode(), "frame_encoding": "png",
                                            "evidence": "defect" if defect_like else "sample"}))
        if i < n_defects:
            reviews.append(Review(frame_id=f"cap-{i}", product="cap", verdict="confirm", category="structural",
                                  reviewer="ana", reviewed_ts_ms=t0 + 10**5 + i))
        elif defect_like:
            reviews.append(Review(frame_id=f"cap-{i}", product="cap", verdict="false_call", reviewer="bo",
                                  reviewed_ts_ms=t0 + 10**5 + i))
    rec = lambda topic, k, v: SimpleNamespace(topic=topic, partition=0, offset=k, key=b"k", value=v, headers=[])  # noqa: E731
    sink.handle_batch([rec("results", k, r.to_bytes()) for k, r in enumerate(results)])
    sink.handle_batch([rec("reviews", k, r.to_bytes()) for k, r in enumerate(reviews)])
    return settings, reviews


def test_too_few_reviews_is_one_line_and_exit_2(tmp_path):
    settings, _ = _line(tmp_path, n_defects=2, n_false=1, n_samples=3)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LINEWATCH_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "linewatch.cli", "calibrate", "recalibrate", "--from-reviews",
                        "--product", "cap", "--db", str(settings.storage.db_path),
                        "--registry", str(settings.storage.registry_dir), "--publish"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "2 confirmed defect(s) (need 3)" in lines[0] and "4 normal frame(s)" in lines[0]
    assert "need 10" in lines[0]
    assert Registry(settings.storage.registry_dir).versions("cap") == [1]  # nothing published


def test_from_reviews_compares_and_publishes_only_when_asked(tmp_path):
    from calibration.from_reviews import recalibrate_from_reviews

    settings, reviews = _line(tmp_path, n_defects=6, n_false=4, n_samples=10)
    db, reg_dir = settings.storage.db_path, settings.storage.registry_dir
    dry = recalibrate_from_reviews(db, reg_dir, "cap")
    assert dry.published is None and Registry(reg_dir).versions("cap") == [1]
    assert (dry.reviewed.confirmed, dry.reviewed.false_calls, dry.reviewed.sampled_normals) == (6, 4, 10)
    table = dry.table()
    print(table)
    assert "image threshold" in table and "escape rate" in table and "false reject rate" in table
    # the faint squares were defect calls at v1: the false calls count as false rejects before
    assert dry.old_kpis["false_reject_rate"]["count"] >= 1
    assert dry.new_kpis["escape_rate"]["n"] == 6 and dry.new_kpis["false_reject_rate"]["n"] == 14
    with pytest.raises(Exception, match=r"2 confirmed defect\(s\) \(need 3\)"):  # --since leaves out older reviews
        recalibrate_from_reviews(db, reg_dir, "cap", since_ms=reviews[3].reviewed_ts_ms + 1)
    done = recalibrate_from_reviews(db, reg_dir, "cap", publish=True, created_by="eng.kim")
    assert done.published is not None and done.published.version == 2
    stored = Registry(reg_dir).read_profile("cap")
    assert stored.version == 2 and stored.parent_version == 1 and stored.created_by == "eng.kim"
    used = stored.calibration_metrics["from_reviews"]
    assert sorted(used["review_ids"]) == sorted(r.review_id for r in reviews)
    assert stored.calibration_metrics["frame_kpis"] == done.new_kpis
    assert stored.calibration_metrics["normal_scores"]["n"] == 14


def test_since_parsing():
    from calibration.cli import parse_since

    now = time.time() * 1000
    assert abs(parse_since("2h") - (now - 7_200_000)) < 5_000
    assert parse_since("1764741600123") == 1764741600123
    assert parse_since("2025-12-03T06:00:00") == 1764741600000
    with pytest.raises(Exception, match="not epoch ms"):
        parse_since("yesterday")
    assert np.isfinite(parse_since("7d"))
