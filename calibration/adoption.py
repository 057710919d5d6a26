"""The one rule that decides whether a calibrated stage is switched on for a product.

Every optional stage (the mask step, the model's own setting, the learned region extent) is
judged the same way: its paired per-image gain over the stage off must exceed both ``MIN_GAIN``
and twice its standard error. With a dozen or two anomalous validation images a plain
best-of-N on the mean picks noise; a real gain clears the bar easily (docs/calibration.md).
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
