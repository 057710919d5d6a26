"""Formatting shared by the overview and the detail view (times in UTC, durations, "how long ago")."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np


def fmt_ts(ms: int | None) -> str:
    if ms is None:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "never"
    s = max(0, (now_ms - ms) / 1000)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} days ago"


def fmt_ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    if v >= 120_000:
        return f"{v / 60_000:.0f} min"
    return f"{v / 1000:.1f} s" if v >= 1000 else f"{v:.0f} ms"
