"""One result -> the verdict a line controller reads, and the per-camera bookkeeping that
keeps what a bridge presents once and in order.

Why per camera: `results` is keyed by camera, so one camera's results sit in order on one
partition, but a worker rebalance replays a batch (at-least-once). The bridge drops a frame id
it already published and marks as late a verdict older than one it already presented for the
same camera: a line controller must never take a stale verdict for the current part.
"""

from __future__ import annotations

from collections import OrderedDict

from linewatch.messages import InspectionResult, Verdict


class CameraOrder:
    """What was published per camera: recent frame ids (bounded) and the newest capture time."""

    def __init__(self, remember: int = 10_000) -> None:
        self.remember = remember
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._newest: dict[str, tuple[int, int]] = {}

    def seen(self, result: InspectionResult) -> bool:
        return result.frame_id in self._ids

    def is_stale(self, result: InspectionResult) -> bool:
        """A newer verdict of this camera is already out (by capture time, then seq)."""
        newest = self._newest.get(result.camera)
        return newest is not None and (result.capture_ts_ms, result.seq) < newest

    def mark(self, result: InspectionResult) -> None:
        self._ids[result.frame_id] = None
        while len(self._ids) > self.remember:
            self._ids.popitem(last=False)
        key = (result.capture_ts_ms, result.seq)
        if key > self._newest.get(result.camera, (-1, -1)):
            self._newest[result.camera] = key


def make_verdict(result: InspectionResult, published_ts_ms: int, reject_window_ms: int, stale: bool) -> Verdict:
    """The verdict as it leaves the bridge at ``published_ts_ms``: late when the reject window
    is exceeded or a newer verdict of the camera went out first (``stale``)."""
    latency = max(0, published_ts_ms - result.capture_ts_ms)
    return Verdict(
        frame_id=result.frame_id, product=result.product, line=result.line, camera=result.camera,
        seq=result.seq, verdict=result.verdict, category=result.category, score=result.image_score,
        image_threshold=result.image_threshold, capture_ts_ms=result.capture_ts_ms,
        published_ts_ms=published_ts_ms, latency_ms=float(latency), reject_window_ms=reject_window_ms,
        late=stale or latency > reject_window_ms, profile_version=result.profile_version,
    )
