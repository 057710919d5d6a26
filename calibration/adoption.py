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


def clears(gain: np.ndarray) -> tuple[bool, str]:
    """Whether the paired gains (stage on minus off, one per image) clear the bar, and the figures."""
    g = np.asarray(gain, np.float64).ravel()
    if len(g) < 2:
        return False, f"gain {g.mean() if len(g) else 0.0:+.4f} on {len(g)} image(s): too few to judge"
    se = float(g.std(ddof=1) / np.sqrt(len(g)))
    ok = float(g.mean()) > max(MIN_GAIN, 2 * se)
    return ok, f"gain {g.mean():+.4f} +- {se:.4f}"


def improves(gain: np.ndarray) -> tuple[bool, str]:
    """Whether the mean paired gain (stage on minus off, one per image) exceeds ``MIN_GAIN``, and
    the figures (the standard error is reported, not required)."""
    g = np.asarray(gain, np.float64).ravel()
    if len(g) < 2:
        return False, f"gain {g.mean() if len(g) else 0.0:+.4f} on {len(g)} image(s): too few to judge"
    se = float(g.std(ddof=1) / np.sqrt(len(g)))
    return float(g.mean()) > MIN_GAIN, f"gain {g.mean():+.4f} +- {se:.4f}"
