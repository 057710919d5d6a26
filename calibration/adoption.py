"""The rules that decide whether a calibrated stage is switched on for a product.

``clears``: the paired per-image gain over the stage off must exceed both ``MIN_GAIN`` and twice
its standard error. It judges what moves a product away from a default (the model's own
setting) and what is measured on held-out folds (the learned region extent): with a dozen or two
anomalous validation images a plain best-of-N on the mean picks noise.

``improves``: the mean paired gain must exceed ``MIN_GAIN``. It judges the mask step, whose
settings are searched on the very validation images that judge it: the search-and-adopt
procedure as a whole is what earned its place, on held-out images of every product
(docs/results/ablation-synthetic.md), and asking each product's 16 validation images for 2 SE
on top switched off a step that gains on its test images (docs/calibration.md, step 4).
"""

from __future__ import annotations

import numpy as np

MIN_GAIN = 0.005  # mean per-image IoU a stage must add, at least


def _paired(gain: np.ndarray) -> tuple[float, float, str] | str:
    """(mean, standard error, figures) of paired gains, or why there are too few to judge."""
    g = np.asarray(gain, np.float64).ravel()
    if len(g) < 2:
        return f"gain {g.mean() if len(g) else 0.0:+.4f} on {len(g)} image(s): too few to judge"
    se = float(g.std(ddof=1) / np.sqrt(len(g)))
    return float(g.mean()), se, f"gain {g.mean():+.4f} +- {se:.4f}"


def clears(gain: np.ndarray) -> tuple[bool, str]:
    """Whether the paired gains (stage on minus off, one per image) clear the bar, and the figures."""
    p = _paired(gain)
    if isinstance(p, str):
        return False, p
    mean, se, figures = p
    return mean > max(MIN_GAIN, 2 * se), figures


def improves(gain: np.ndarray) -> tuple[bool, str]:
    """Whether the mean paired gain (stage on minus off, one per image) exceeds ``MIN_GAIN``, and
    the figures (the standard error is reported, not required)."""
    p = _paired(gain)
    if isinstance(p, str):
        return False, p
    mean, _se, figures = p
    return mean > MIN_GAIN, figures
