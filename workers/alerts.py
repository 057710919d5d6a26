"""Alert evaluation: a per-product state machine fed with every new verdict.

It runs inside the sink because the sink sees every result exactly once (after the
idempotent insert), so a replayed Kafka record never counts twice. Two rules per product:

- ``defect_rate``: over the last ``window_frames`` verdicts (evaluated once the window is
  full), raised when the defect rate exceeds ``max_defect_rate``; cleared when it falls back
  below ``max_defect_rate * clear_fraction`` (hysteresis, so a rate hovering at the limit
  does not flap).
- ``consecutive_defects``: raised when ``max_consecutive_defects`` defects arrive in a row;
  cleared by the first good frame.

Each transition yields one :class:`linewatch.messages.Alert`; nothing is emitted while a
state holds. The state can be seeded from the database on restart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from linewatch.messages import Alert
from linewatch.settings import AlertSettings

CLEAR_FRACTION = 0.8


@dataclass
class _ProductState:
    window: deque[bool]
    defects_in_window: int = 0
    run: int = 0
    rate_alert: bool = False
    run_alert: bool = False
    last: dict[str, Alert] = field(default_factory=dict)


class AlertEvaluator:
    """Feed verdicts in capture order with :meth:`observe`; get the transitions back."""

    def __init__(self, cfg: AlertSettings, clear_fraction: float | None = None) -> None:
        self.cfg = cfg
        frac = clear_fraction if clear_fraction is not None else getattr(cfg, "clear_fraction", CLEAR_FRACTION)
        if not 0 < frac <= 1:
            raise ValueError(f"alerts.clear_fraction must be in (0, 1], got {frac}")
        self.clear_rate = cfg.max_defect_rate * frac
        self._state: dict[str, _ProductState] = {}

    def _get(self, product: str) -> _ProductState:
        st = self._state.get(product)
        if st is None:
            st = self._state[product] = _ProductState(window=deque(maxlen=self.cfg.window_frames))
        return st

    def seed(self, product: str, verdicts: Iterable[str], active: Iterable[Alert] = ()) -> None:
        """Restore the window from stored verdicts (oldest first) and the raised alerts,
        without emitting anything: after a restart the sink neither re-raises nor forgets."""
        st = self._get(product)
        for v in verdicts:
            self._push(st, v == "defect")
        for a in active:
            if a.product != product or a.state != "raised":
                continue
            st.last[a.kind] = a
            if a.kind == "defect_rate":
                st.rate_alert = True
            else:
                st.run_alert = True

    @staticmethod
    def _push(st: _ProductState, defect: bool) -> None:
        if len(st.window) == st.window.maxlen and st.window[0]:
            st.defects_in_window -= 1
        st.window.append(defect)
        st.defects_in_window += int(defect)
        st.run = st.run + 1 if defect else 0

    def rate(self, product: str) -> float | None:
        st = self._state.get(product)
        if st is None or not st.window:
            return None
        return st.defects_in_window / len(st.window)

    def active(self) -> list[Alert]:
        """The alerts currently raised, all products."""
        return [a for st in self._state.values() for a in st.last.values() if a.state == "raised"]

    def observe(self, product: str, verdict: str, ts_ms: int) -> list[Alert]:
        """One new verdict; returns the alerts raised or cleared by it (usually none)."""
        st = self._get(product)
        self._push(st, verdict == "defect")
        out: list[Alert] = []
        n = self.cfg.window_frames
        if len(st.window) >= n:
            rate = st.defects_in_window / len(st.window)
            if not st.rate_alert and rate > self.cfg.max_defect_rate:
                st.rate_alert = True
                out.append(self._emit(st, product, "defect_rate", "raised", rate, self.cfg.max_defect_rate, ts_ms,
                                      f"{product}: defect rate {rate:.1%} over the last {n} frames "
                                      f"exceeds the limit {self.cfg.max_defect_rate:.1%}"))
            elif st.rate_alert and rate < self.clear_rate:
                st.rate_alert = False
                out.append(self._emit(st, product, "defect_rate", "cleared", rate, self.cfg.max_defect_rate, ts_ms,
                                      f"{product}: defect rate back to {rate:.1%} over the last {n} frames"))
        limit = self.cfg.max_consecutive_defects
        if not st.run_alert and st.run >= limit:
            st.run_alert = True
            out.append(self._emit(st, product, "consecutive_defects", "raised", st.run, limit, ts_ms,
                                  f"{product}: {st.run} defective frames in a row (limit {limit})"))
        elif st.run_alert and st.run == 0:
            st.run_alert = False
            out.append(self._emit(st, product, "consecutive_defects", "cleared", 0, limit, ts_ms,
                                  f"{product}: run of defects ended (a good frame arrived)"))
        return out

    def _emit(self, st: _ProductState, product: str, kind: str, state: str, value: float, limit: float,
              ts_ms: int, message: str) -> Alert:
        alert = Alert(product=product, kind=kind, state=state, value=float(value), limit=float(limit),
                      window_frames=self.cfg.window_frames, ts_ms=ts_ms, message=message)
        st.last[kind] = alert
        return alert
