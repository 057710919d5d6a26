"""Score drift: how far the image scores of recent frames judged normal have moved from the
normal validation scores the profile was calibrated on.

Calibration writes the reference (``reference(scores)``: the normal validation image scores as
quantiles on a fixed grid, in ``calibration_metrics["normal_scores"]``) and the sink compares
each product's sliding window against it (``ks_distance``); both go through this one module so
the reference is read the way it was written. Why a KS distance on the quantile function rather
than a mean shift: a lighting change can widen the normal scores without moving their median,
and the KS distance (largest gap between the two cumulative distributions, 0..1) sees both, is
scale-free (scores of different model families are not comparable) and needs no model of the
score distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GRID = tuple(np.round(np.linspace(0.0, 1.0, 41), 3).tolist())  # quantile levels of the reference


def reference(scores: Sequence[float]) -> dict | None:
    """The reference of a set of normal validation image scores (None when there are none)."""
    s = np.asarray(scores, float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    return {"n": int(s.size), "levels": list(GRID), "quantiles": [float(q) for q in np.quantile(s, GRID)]}


def reference_cdf(ref: dict, x: np.ndarray) -> np.ndarray:
    """The reference's cumulative distribution at ``x``: linear between its quantiles, 0 below
    the smallest and 1 above the largest."""
    q = np.asarray(ref["quantiles"], float)
    levels = np.asarray(ref["levels"], float)
    q, idx = np.unique(q, return_index=True)  # equal quantiles (ties): keep the lowest level, then step
    lv = levels[idx]
    if q.size == 1:
        return (x >= q[0]).astype(float)
    out = np.interp(x, q, lv)
    out[x < q[0]] = 0.0
    out[x >= q[-1]] = 1.0
    return out


def ks_distance(window: Sequence[float], ref: dict, upper: float | None = None) -> float:
    """Largest gap between the window's empirical distribution and the reference's (0..1).

    ``upper``: the image threshold, when the window holds only frames judged normal (scores at
    or below it). The reference is then taken on the same condition (its distribution below
    ``upper``, rescaled), so normal validation images the threshold would reject do not read as
    a drift that was there from the start."""
    w = np.sort(np.asarray(window, float))
    n = w.size
    if n == 0:
        return 0.0
    q = np.unique(np.asarray(ref["quantiles"], float))
    if q.size == 1:  # every reference score equal (a degenerate set): the share of the window elsewhere
        return float(np.mean(w != q[0]))
    f = reference_cdf(ref, w)
    if upper is not None:
        top = float(reference_cdf(ref, np.asarray([upper], float))[0])
        if top <= 0:  # the threshold is below every reference score: nothing normal to compare with
            return 1.0
        f = np.minimum(f, top) / top
    above = np.arange(1, n + 1) / n - f  # the empirical CDF just after each point
    below = f - np.arange(0, n) / n  # and just before it
    return float(max(above.max(), below.max(), 0.0))
