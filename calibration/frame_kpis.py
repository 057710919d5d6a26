"""The frame-level figures a plant manager reads: how many defective frames the served verdict
lets through (``escape_rate``) and how many normal frames it rejects (``false_reject_rate``),
each with its counts and a Wilson 95 % interval (scipy's ``binomtest``), so that "0 escapes"
on 10 defective images reads as what it is: an upper bound near 28 %, not a guarantee."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

CONFIDENCE = 0.95


def rate_with_interval(k: int, n: int) -> dict[str, Any]:
    """``k`` of ``n`` as a rate with its Wilson interval (None where ``n`` is 0)."""
    if n == 0:
        return {"rate": None, "count": 0, "n": 0, "ci95": None}
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {"rate": round(k / n, 4), "count": int(k), "n": int(n),
            "ci95": [round(float(ci.low), 4), round(float(ci.high), 4)]}


def frame_kpis(judged_defect: Sequence[bool], anomalous: Sequence[bool]) -> dict[str, dict[str, Any]]:
    """``escape_rate``: anomalous frames judged normal; ``false_reject_rate``: normal frames
    judged defective, from the served verdicts of labelled frames."""
    judged = np.asarray(judged_defect, bool)
    truth = np.asarray(anomalous, bool)
    if judged.shape != truth.shape:
        raise ValueError(f"{judged.shape[0]} verdicts for {truth.shape[0]} labels")
    return {"escape_rate": rate_with_interval(int((truth & ~judged).sum()), int(truth.sum())),
            "false_reject_rate": rate_with_interval(int((~truth & judged).sum()), int((~truth).sum()))}


def format_kpi(name: str, kpi: dict[str, Any] | None) -> str:
    """One line, e.g. ``escape rate 2/24 = 8.3 % (95 % CI 2.3-25.8 %)``."""
    label = name.replace("_", " ")
    if not kpi or kpi.get("rate") is None:
        return f"{label}: no frames of that kind"
    lo, hi = kpi["ci95"]
    return (f"{label} {kpi['count']}/{kpi['n']} = {100 * kpi['rate']:.1f} % "
            f"(95 % CI {100 * lo:.1f}-{100 * hi:.1f} %)")
