"""The alert state machine (pure unit tests, no Kafka, no database)."""

from __future__ import annotations

from linewatch.messages import Alert
from linewatch.settings import AlertSettings
from workers.alerts import AlertEvaluator


def _feed(ev: AlertEvaluator, product: str, verdicts: str, t0: int = 0) -> list[Alert]:
    """verdicts as a string: 'd' defect, 'o' ok."""
    out = []
    for i, v in enumerate(verdicts):
        out += ev.observe(product, "defect" if v == "d" else "ok", t0 + i)
    return out


def test_rate_alert_raises_once_and_clears_with_hysteresis():
    ev = AlertEvaluator(AlertSettings(window_frames=10, max_defect_rate=0.3, max_consecutive_defects=50),
                        clear_fraction=0.5)
    # window not full yet: 2 defects out of 2 must not raise a rate alert
    assert _feed(ev, "w", "dd") == []
    # fill to 10 frames with 3 defects: 30 % is not above 30 %
    assert _feed(ev, "w", "ooooooo" + "d") == []  # 3/10
    assert ev.rate("w") == 0.3
    assert _feed(ev, "w", "d") == []  # the oldest 'd' leaves as a new one enters: still 3/10
    assert _feed(ev, "w", "d") == []  # same again: [o*7, d, d, d]
    raised = _feed(ev, "w", "d")  # an 'o' leaves: 4/10 -> above the limit
    assert [(a.kind, a.state) for a in raised] == [("defect_rate", "raised")]
    assert raised[0].value == 0.4 and raised[0].limit == 0.3 and raised[0].window_frames == 10
    assert "w: defect rate 40.0%" in raised[0].message
    assert _feed(ev, "w", "dd") == []  # stays raised: nothing new while the state holds
    assert [a.kind for a in ev.active()] == ["defect_rate"]
    # fall back to 20 %: below the limit but not below 0.3*0.5 = 15 % -> not cleared yet
    assert _feed(ev, "w", "oooooooo") == []
    assert ev.rate("w") == 0.2
    cleared = _feed(ev, "w", "oo")  # 0/10
    assert [(a.kind, a.state) for a in cleared] == [("defect_rate", "cleared")]
    assert ev.active() == []


def test_consecutive_defects_raise_and_clear_on_first_good_frame():
    ev = AlertEvaluator(AlertSettings(window_frames=1000, max_defect_rate=1.0, max_consecutive_defects=4))
    assert _feed(ev, "b", "dddo" + "ddd") == []  # runs of 3: below the limit
    raised = _feed(ev, "b", "d")
    assert [(a.kind, a.state, a.value) for a in raised] == [("consecutive_defects", "raised", 4.0)]
    assert _feed(ev, "b", "dddd") == []
    cleared = _feed(ev, "b", "o")
    assert [(a.kind, a.state) for a in cleared] == [("consecutive_defects", "cleared")]


def test_products_are_independent():
    ev = AlertEvaluator(AlertSettings(window_frames=10, max_defect_rate=0.5, max_consecutive_defects=3))
    out = []
    for _ in range(3):
        out += ev.observe("a", "defect", 0)
        out += ev.observe("b", "ok", 0)
    assert [(a.product, a.kind) for a in out] == [("a", "consecutive_defects")]


def test_seed_restores_state_without_emitting():
    cfg = AlertSettings(window_frames=10, max_defect_rate=0.3, max_consecutive_defects=5)
    raised = Alert(product="w", kind="defect_rate", state="raised", value=0.5, limit=0.3, window_frames=10,
                   message="up")
    ev = AlertEvaluator(cfg)
    ev.seed("w", ["defect"] * 5 + ["ok"] * 5, [raised])
    assert ev.rate("w") == 0.5 and [a.alert_id for a in ev.active()] == [raised.alert_id]
    assert ev.observe("w", "defect", 1) == []  # already raised before the restart: not raised again
    out = _feed(ev, "w", "o" * 10)
    assert [(a.kind, a.state) for a in out] == [("defect_rate", "cleared")]
