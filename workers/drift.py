"""The drift alert: per product, the image scores of the last ``alerts.drift_window`` frames
judged normal against the normal validation scores of the profile that judged them
(``linewatch.drift``), raised at a KS distance of ``alerts.drift_raise`` and cleared at
``alerts.drift_clear`` (hysteresis, so a distance hovering at one limit does not flap).

It runs in the sink beside :mod:`workers.alerts`, for the same reason: the sink sees every
result exactly once. Only normal-judged frames enter the window (defects are what the line is
for; a drift is the normal frames moving). A new profile version empties the product's window:
its scores are judged against its own reference, so a recalibration after a drift clears the
alert once the new window is full and close to the new reference. A profile without a
reference (calibrated before references were kept) is not checked; that is logged once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from linewatch.drift import ks_distance
from linewatch.messages import Alert
from linewatch.settings import AlertSettings

log = logging.getLogger(__name__)

ReferenceLoader = Callable[[str, int], dict | None]


@dataclass
class _State:
    version: int | None = None
    window: deque[float] = field(default_factory=deque)
    raised: bool = False
    last: float | None = None  # the latest distance (for logs and tests)
    since_eval: int = 0


class DriftEvaluator:
    """Feed results in capture order with :meth:`observe`; get raised/cleared alerts back."""

    def __init__(self, cfg: AlertSettings, reference: ReferenceLoader) -> None:
        if cfg.drift_clear >= cfg.drift_raise:
            raise ValueError(f"alerts.drift_clear ({cfg.drift_clear}) must be below alerts.drift_raise "
                             f"({cfg.drift_raise})")
        self.cfg = cfg
        # the distance is computed every 1/20 of a window (10 frames at the default 200), not per
        # frame: it costs ~0.1-0.4 ms and runs inside the sink's write transaction
        self._every = max(1, cfg.drift_window // 20)
        self._load = reference
        self._refs: dict[tuple[str, int], dict | None] = {}
        self._state: dict[str, _State] = {}

    def _ref(self, product: str, version: int) -> dict | None:
        key = (product, version)
        if key not in self._refs:
            try:
                self._refs[key] = self._load(product, version)
            except Exception as exc:  # an unreadable registry must not stop the sink
                log.warning("drift: no reference for %s v%s: %s", product, version, exc)
                self._refs[key] = None
            if self._refs[key] is None:
                log.info("drift: %s v%s has no normal-score reference; not checked", product, version)
        return self._refs[key]

    def _get(self, product: str, version: int) -> _State:
        st = self._state.setdefault(product, _State())
        if st.version != version:
            st.version = version
            st.window = deque(maxlen=self.cfg.drift_window)
            st.since_eval = self._every  # the first full window is judged at once
        return st

    def seed(self, product: str, version: int, scores: Iterable[float], raised: bool) -> None:
        """Restore after a restart (oldest first), emitting nothing."""
        st = self._get(product, version)
        st.window.extend(float(s) for s in scores)
        st.raised = raised

    def distance(self, product: str) -> float | None:
        st = self._state.get(product)
        return None if st is None else st.last

    def observe(self, product: str, version: int, verdict: str, score: float, ts_ms: int,
                image_threshold: float | None = None) -> list[Alert]:
        """One result; ``image_threshold`` (the result's) conditions the reference the way the
        verdict conditioned the window (``linewatch.drift.ks_distance``)."""
        if verdict != "ok":
            return []
        ref = self._ref(product, version)
        st = self._get(product, version)
        if ref is None:
            return []
        st.window.append(float(score))
        st.since_eval += 1
        if len(st.window) < self.cfg.drift_window or st.since_eval < self._every:
            return []
        st.since_eval = 0
        d = st.last = ks_distance(st.window, ref, image_threshold)
        n = self.cfg.drift_window
        if not st.raised and d >= self.cfg.drift_raise:
            st.raised = True
            return [self._alert(product, "raised", d, ts_ms,
                                f"{product}: scores drifting: the last {n} normal frames are {d:.2f} (KS) from the "
                                f"calibration's normal scores (v{version}, limit {self.cfg.drift_raise:.2f}); "
                                "recalibrate?")]
        if st.raised and d <= self.cfg.drift_clear:
            st.raised = False
            return [self._alert(product, "cleared", d, ts_ms,
                                f"{product}: scores back in line: KS {d:.2f} over the last {n} normal frames (v{version})")]
        return []

    def _alert(self, product: str, state: str, value: float, ts_ms: int, message: str) -> Alert:
        return Alert(product=product, kind="drift", state=state, value=value, limit=self.cfg.drift_raise,
                     window_frames=self.cfg.drift_window, ts_ms=ts_ms, message=message)
