"""An exposure/lighting drift for the synthetic camera: from frame ``start`` the image gain
moves linearly from 1 to ``gain`` over ``ramp`` frames, stays there for ``hold`` frames (0 =
for good) and then returns to 1 at once, as when a lamp ages and is then replaced.

In the core because the synthetic producer (``linewatch produce --exposure-drift``) and the
drift figures (``workers/bench_drift.py``) must drift frames identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from linewatch.errors import UserError


@dataclass(frozen=True)
class ExposureDrift:
    start: int
    ramp: int
    gain: float
    hold: int = 0

    @classmethod
    def parse(cls, spec: str) -> "ExposureDrift":
        """``START:RAMP:GAIN[:HOLD]`` in frames, e.g. ``600:100:1.4`` or ``600:100:0.6:900``."""
        parts = spec.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            start, ramp, gain = int(parts[0]), int(parts[1]), float(parts[2])
            hold = int(parts[3]) if len(parts) == 4 else 0
        except ValueError:
            raise UserError(f"--exposure-drift {spec!r}: expected START:RAMP:GAIN[:HOLD] (frames, frames, "
                            "gain, frames), e.g. 600:100:1.4") from None
        if start < 0 or ramp < 0 or hold < 0 or not 0 < gain <= 4:
            raise UserError(f"--exposure-drift {spec!r}: frames must be >= 0 and the gain within (0, 4]")
        return cls(start, ramp, gain, hold)

    def gain_at(self, index: int) -> float:
        if index < self.start:
            return 1.0
        k = index - self.start
        if self.hold and k >= self.ramp + self.hold:
            return 1.0
        if k >= self.ramp or self.ramp == 0:
            return self.gain
        return 1.0 + (self.gain - 1.0) * (k + 1) / self.ramp

    def apply(self, rgb: np.ndarray, index: int) -> np.ndarray:
        g = self.gain_at(index)
        if g == 1.0:
            return rgb
        return np.clip(rgb.astype(np.float32) * g, 0, 255).astype(np.uint8)
