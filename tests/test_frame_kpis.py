"""Frame KPIs against a hand-computed case, and in the one-shot calibration's metrics."""

from __future__ import annotations

import pytest

from calibration.frame_kpis import format_kpi, frame_kpis, rate_with_interval


def test_escape_and_false_reject_rates_by_hand():
    # 10 defective frames, 3 judged normal (escapes); 8 normal frames, 1 judged defective
    truth = [True] * 10 + [False] * 8
    judged = [False] * 3 + [True] * 7 + [True] + [False] * 7
    k = frame_kpis(judged, truth)
    esc, fr = k["escape_rate"], k["false_reject_rate"]
    assert (esc["count"], esc["n"], esc["rate"]) == (3, 10, 0.3)
    assert (fr["count"], fr["n"], fr["rate"]) == (1, 8, 0.125)
    # Wilson 95 %: p = 0.3, n = 10, z = 1.96 -> centre (p + z^2/2n) / (1 + z^2/n), half-width
    # z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 0.3555 -+ 0.2477
    assert esc["ci95"] == pytest.approx([0.1078, 0.6032], abs=1e-4)
    assert format_kpi("escape_rate", esc) == "escape rate 3/10 = 30.0 % (95 % CI 10.8-60.3 %)"


def test_zero_escapes_on_few_frames_still_has_an_upper_bound_and_no_frames_is_none():
    zero = rate_with_interval(0, 10)
    assert zero["rate"] == 0.0 and zero["ci95"][0] == 0.0 and zero["ci95"][1] == pytest.approx(0.2775, abs=1e-4)
    assert rate_with_interval(0, 0) == {"rate": None, "count": 0, "n": 0, "ci95": None}
    with pytest.raises(ValueError):
        frame_kpis([True], [True, False])
