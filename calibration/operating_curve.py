"""The operating curve of the frame verdict: escape rate against false-reject rate as the image
threshold moves, and the image threshold for a target escape rate.

Why: a plant manager does not choose a Youden point, they choose how many defective frames may
get through. The curve shows what each escape rate costs in rejected good frames; a target
escape rate places the image threshold at the lowest false-reject point of the *validation*
curve that meets it, and the test split then says what it really gave (with its interval).

What a validation set can show: with ``n`` defective validation images, even zero escapes
leaves the escape rate uncertain up to the Wilson upper bound of 0 of ``n`` at the frame
KPIs' confidence (``z^2 / (n + z^2)``). A target below that bound cannot be demonstrated on this set whatever the
threshold, so it is refused with the number of defective images it would need (the Wilson rule,
stricter than the 1/n rule of thumb, and the same interval the frame KPIs report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from calibration.frame_kpis import CONFIDENCE
from linewatch.errors import UserError


def _z() -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + CONFIDENCE / 2))


def smallest_demonstrable_escape_rate(n_defective: int) -> float:
    """The Wilson upper bound of 0 escapes out of ``n_defective``: no lower target can be shown."""
    if n_defective <= 0:
        return 1.0
    z2 = _z() ** 2
    return z2 / (n_defective + z2)


def defective_images_needed(target: float) -> int:
    """How many defective validation images a target escape rate needs (Wilson rule)."""
    z2 = _z() ** 2
    return int(math.ceil(z2 * (1.0 - target) / target - 1e-9))


def check_target_supported(target: float, n_defective: int, where: str | object) -> None:
    """UserError (one line naming ``where``) when ``target`` is outside (0, 1) or smaller than
    what ``n_defective`` validation images can demonstrate."""
    if not 0.0 < target < 1.0:
        raise UserError(f"--target-escape-rate {target:g}: must be within (0, 1)")
    floor = smallest_demonstrable_escape_rate(n_defective)
    if target < floor:
        raise UserError(f"{where}: --target-escape-rate {target:g} cannot be shown with {n_defective} defective "
                        f"validation image(s): even 0 escapes leaves a Wilson 95 % upper bound of "
                        f"{100 * floor:.1f} %; needs at least {defective_images_needed(target)} defective validation "
                        "images (or a higher target)")


def operating_curve(scores: Sequence[float], anomalous: Sequence[bool]) -> list[dict[str, Any]]:
    """Every distinct operating point of the image threshold (a frame is defective when its
    score reaches the threshold), from the lowest threshold (everything rejected) to above the
    highest score (nothing rejected): threshold, escapes / defective, false rejects / normal."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(anomalous, bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    n_def, n_norm = int(y.sum()), int((~y).sum())
    cands = np.unique(s)
    top = float(cands[-1]) + max(1e-6, 1e-6 * abs(float(cands[-1]))) if cands.size else 1.0
    out = []
    for t in [*cands.tolist(), top]:
        flagged = s >= t
        esc = int((y & ~flagged).sum())
        fr = int((~y & flagged).sum())
        out.append({"threshold": float(t), "escapes": esc, "n_defective": n_def, "false_rejects": fr,
                    "n_normal": n_norm, "escape_rate": esc / n_def if n_def else None,
                    "false_reject_rate": fr / n_norm if n_norm else None})
    return out


def threshold_for_escape_rate(scores: Sequence[float], anomalous: Sequence[bool],
                              target: float) -> tuple[float, str]:
    """The image threshold with the lowest validation false-reject rate whose validation escape
    rate is at most ``target``, placed halfway down to the next lower score so the validation
    verdicts it gives are those of the point and the line gets some margin. Returns (threshold,
    reason with the validation figures)."""
    from calibration.frame_kpis import rate_with_interval

    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(anomalous, bool).ravel()
    n_def = int(y.sum())
    if n_def == 0 or y.all():
        raise UserError("--target-escape-rate needs both defective and normal validation images")
    allowed = int(math.floor(target * n_def + 1e-9))  # escapes the target permits on validation
    d = np.sort(s[y])
    t = float(d[allowed])  # the (allowed+1)-th lowest defect score: the allowed ones lie below it
    below = s[s < t]
    if below.size:
        t = 0.5 * (t + float(below.max()))
    flagged = s >= t
    esc = rate_with_interval(int((y & ~flagged).sum()), n_def)
    fr = rate_with_interval(int((~y & flagged).sum()), int((~y).sum()))
    return t, (f"target escape rate {target:g}: validation escapes {esc['count']}/{esc['n']} "
               f"(95 % CI {100 * esc['ci95'][0]:.1f}-{100 * esc['ci95'][1]:.1f} %), false rejects "
               f"{fr['count']}/{fr['n']} at the lowest false-reject point that meets it")


def curve_table(points: list[dict[str, Any]], max_rows: int = 25) -> list[dict[str, Any]]:
    """The Pareto front of the curve (each escape rate at its lowest false-reject rate, kept only
    where it buys fewer false rejects than every lower escape rate), thinned
    evenly to ``max_rows`` for a readable table (metrics.json keeps every point)."""
    best: dict[int, dict[str, Any]] = {}
    for p in points:
        k = p["escapes"]
        if k not in best or p["false_rejects"] < best[k]["false_rejects"]:
            best[k] = p
    rows, lowest = [], None
    for k in sorted(best):  # the front: more escapes only where they buy fewer false rejects
        if lowest is None or best[k]["false_rejects"] < lowest:
            rows.append(best[k])
            lowest = best[k]["false_rejects"]
    if len(rows) > max_rows:
        idx = np.unique(np.linspace(0, len(rows) - 1, max_rows).round().astype(int))
        rows = [rows[i] for i in idx]
    return rows
