"""The drift alert: the KS distance against a calibration's normal-score reference, the
per-product evaluator's hysteresis (raised once, cleared once, no flapping, a new profile
version starts afresh, a restart neither re-raises nor forgets), the sink storing it in a real
DuckDB file, and the synthetic camera's exposure drift."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from linewatch import store
from linewatch.drift import ks_distance, reference
from linewatch.errors import UserError
from linewatch.settings import AlertSettings, Settings
from linewatch.synth.exposure import ExposureDrift
from result_factory import make_result
from workers.drift import DriftEvaluator

RNG = np.random.default_rng(3)
REF = reference(RNG.normal(1.0, 0.1, 60))


def test_ks_distance_sees_a_shift_and_a_spread():
    same = RNG.normal(1.0, 0.1, 200)
    assert ks_distance(same, REF) < 0.15
    assert ks_distance(same + 0.2, REF) > 0.6  # two standard deviations up
    assert ks_distance(RNG.normal(1.0, 0.3, 200), REF) > 0.3  # same median, wider
    assert ks_distance([], REF) == 0.0
    flat = reference([0.5] * 10)  # all ties
    assert ks_distance([0.5] * 20, flat) == 0.0 and ks_distance([0.7] * 20, flat) == 1.0


def _feed(ev: DriftEvaluator, scores, version: int = 1, t0: int = 0):
    out = []
    for k, s in enumerate(scores):
        out.extend(ev.observe("cap", version, "ok", float(s), t0 + k))
    return out


def test_evaluator_raises_once_clears_once_and_restarts_per_version():
    cfg = AlertSettings(drift_window=100, drift_raise=0.5, drift_clear=0.3)
    ev = DriftEvaluator(cfg, lambda p, v: REF)
    assert _feed(ev, RNG.normal(1.0, 0.1, 1000)) == []  # steady: nothing
    up = _feed(ev, RNG.normal(1.3, 0.1, 300))
    assert [a.state for a in up] == ["raised"] and up[0].kind == "drift" and "recalibrate?" in up[0].message
    assert ev.observe("cap", 1, "defect", 9.0, 0) == []  # defects never enter the window
    back = _feed(ev, RNG.normal(1.0, 0.1, 300))
    assert [a.state for a in back] == ["cleared"]
    # a new version starts an empty window against its own reference: nothing until it is full
    ev2 = DriftEvaluator(cfg, lambda p, v: REF if v == 1 else reference(RNG.normal(1.3, 0.1, 60)))
    assert [a.state for a in _feed(ev2, RNG.normal(1.3, 0.1, 200))] == ["raised"]
    assert [a.state for a in _feed(ev2, RNG.normal(1.3, 0.1, 150), version=2)] == ["cleared"]
    # no reference: not checked
    assert _feed(DriftEvaluator(cfg, lambda p, v: None), RNG.normal(5, 1, 300)) == []
    with pytest.raises(ValueError):
        DriftEvaluator(AlertSettings(drift_raise=0.3, drift_clear=0.3), lambda p, v: REF)
    # the defaults (own seeded draws): raised on a 1.5-sd shift, never on 3000 steady frames
    r = np.random.default_rng(5)
    ref60 = reference(r.normal(1.0, 0.1, 60))
    ev = DriftEvaluator(AlertSettings(), lambda p, v: ref60)
    assert _feed(ev, r.normal(1.0, 0.1, 3000)) == []
    assert [a.state for a in _feed(ev, r.normal(1.15, 0.1, 400))] == ["raised"]


def test_seeded_evaluator_neither_reraises_nor_forgets():
    cfg = AlertSettings(drift_window=50, drift_raise=0.5, drift_clear=0.3)
    ev = DriftEvaluator(cfg, lambda p, v: REF)
    ev.seed("cap", 1, RNG.normal(1.3, 0.1, 50), raised=True)
    assert _feed(ev, RNG.normal(1.3, 0.1, 100)) == []
    assert [a.state for a in _feed(ev, RNG.normal(1.0, 0.1, 200))] == ["cleared"]


def test_sink_stores_the_drift_alert_and_resumes_after_a_restart(tmp_path):
    from linewatch.profiles import Registry
    from worker_helpers import publish_mean_profile
    from workers.sink import Sink

    reg_dir = tmp_path / "profiles"
    publish_mean_profile(reg_dir, "cap", calibration_metrics={"normal_scores": REF})
    s = Settings()
    settings = s.model_copy(update={
        "storage": s.storage.model_copy(update={"db_path": tmp_path / "lw.duckdb", "registry_dir": reg_dir}),
        "alerts": s.alerts.model_copy(update={"drift_window": 100, "drift_raise": 0.5, "drift_clear": 0.3})})
    t0 = int(time.time() * 1000) - 10**6
    scores = [*RNG.normal(1.0, 0.1, 300), *RNG.normal(1.35, 0.1, 300)]

    def batch(lo: int, hi: int):
        return [SimpleNamespace(topic="results", partition=0, offset=k, key=b"c", headers=[],
                                value=make_result(k, product="cap", capture_ts_ms=t0 + k * 100, frame_id=f"c-{k}",
                                                  with_images=False).model_copy(update={"image_score": scores[k],
                                                                                     "image_threshold": 2.0}).to_bytes())
                for k in range(lo, hi)]

    sink = Sink(settings)
    sink.start()
    for lo in range(0, 400, 50):
        sink.handle_batch(batch(lo, lo + 50))
    restarted = Sink(settings)  # as after a SIGKILL: seeded from the database
    restarted.start()
    for lo in range(400, 600, 50):
        restarted.handle_batch(batch(lo, lo + 50))
    with store.reading(settings.storage.db_path) as con:
        rows = con.execute("SELECT kind, state, ts_ms FROM alerts WHERE kind = 'drift' ORDER BY ts_ms").fetchall()
        active = store.active_alerts(con)
    assert [r[:2] for r in rows] == [("drift", "raised")]
    assert 300 <= (rows[0][2] - t0) // 100 < 400  # raised within the window after the shift
    assert [a.kind for a in active] == ["drift"]
    assert Registry(reg_dir).read_profile("cap").calibration_metrics["normal_scores"] == REF


def test_exposure_drift_schedule():
    d = ExposureDrift.parse("10:4:2.0:5")
    assert [round(d.gain_at(i), 2) for i in (0, 9, 10, 11, 13, 14, 18, 19)] == [1, 1, 1.25, 1.5, 2, 2, 2, 1]
    img = np.full((4, 4, 3), 100, np.uint8)
    assert d.apply(img, 0) is img and int(d.apply(img, 13)[0, 0, 0]) == 200
    assert ExposureDrift.parse("0:0:0.5").gain_at(0) == 0.5
    for bad in ("1:2", "a:b:c", "-1:2:1.5", "1:2:9"):
        with pytest.raises(UserError):
            ExposureDrift.parse(bad)


def test_synthetic_source_applies_the_exposure_drift():
    import cv2

    from producers.sources import open_source

    def means(src, n):
        out = []
        for k, f in enumerate(src):
            out.append(float(cv2.imdecode(np.frombuffer(f.data, np.uint8), cv2.IMREAD_GRAYSCALE).mean()))
            if k + 1 == n:
                break
        return out

    steady = means(open_source("synthetic:cap", size=64, defect_rate=0.0, encoding="png"), 8)
    drifted = means(open_source("synthetic:cap", size=64, defect_rate=0.0, encoding="png",
                                exposure=ExposureDrift(4, 0, 1.5)), 8)
    assert drifted[:4] == steady[:4]
    assert all(d > 1.3 * s for d, s in zip(drifted[4:], steady[4:]))


def test_the_reference_is_conditioned_on_the_threshold_like_the_window():
    """A threshold that cuts into the normal scores leaves only the lower part in the window;
    against the whole reference that looks like a drift, against the conditioned one it does not."""
    rng = np.random.default_rng(11)
    ref = reference(rng.normal(1.0, 0.1, 2000))  # a large reference: the conditioning alone is measured
    pool = rng.normal(1.0, 0.1, 5000)
    thr = 1.05  # rejects ~30 % of normal frames
    judged_normal = pool[pool <= thr][:200]
    assert ks_distance(judged_normal, ref) > 0.25
    assert ks_distance(judged_normal, ref, upper=thr) < 0.1
    assert ks_distance(judged_normal - 0.05, ref, upper=thr) > 0.2
    assert ks_distance([0.1], ref, upper=0.0) == 1.0  # a threshold below every reference score
