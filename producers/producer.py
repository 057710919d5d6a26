"""Camera producers: frames from sources -> the `frames` topic (docs/architecture.md).

One KafkaProducer (idempotent, acks=all) is shared by all cameras of the process; each camera
runs in its own thread with its own pacing, so one slow source never holds up another.
Per-camera order is kept because the key is the camera id (one partition per camera) and the
idempotent producer keeps order within a partition across retries.

Every delivery is checked: a frame over the message limit is reported by name and skipped;
any other delivery failure stops the producer with a clear error. SIGINT/SIGTERM stop the
cameras, flush what is in flight, and return the counts.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from linewatch.errors import UserError
from linewatch.kafka.io import (
    PendingDelivery,
    RecordTooLarge,
    describe_topics,
    make_producer,
    send_nowait,
    wait_for_broker,
)
from linewatch.messages import FrameHeaders
from linewatch.settings import Settings
from producers.sources import FrameSource, SourceFrame

log = logging.getLogger(__name__)

_ID = r"^[A-Za-z0-9_.:\-]{1,128}$"
MAX_IN_FLIGHT_PER_CAMERA = 64


class CameraConfig(BaseModel):
    """One camera of a producer process: which source, and the ids its frames carry."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    camera: str = Field(pattern=_ID)
    product: str = Field(pattern=_ID)
    line: str = Field("line-1", pattern=_ID)
    fps: float = Field(0.0, ge=0, description="target frames per second; 0 = as fast as possible")
    max_frames: int | None = Field(None, ge=1)


@dataclass
class CameraStats:
    sent: int = 0
    bytes: int = 0
    too_large: int = 0
    failed: int = 0
    last_seq: int = -1


@dataclass
class ProducerStats:
    cameras: dict[str, CameraStats] = field(default_factory=dict)
    elapsed_s: float = 0.0
    stopped_by: str = "end of sources"

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.cameras.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.cameras.values())

    @property
    def too_large(self) -> int:
        return sum(c.too_large for c in self.cameras.values())

    @property
    def fps(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        per = ", ".join(f"{cam}: {c.sent}" for cam, c in sorted(self.cameras.items()))
        return (
            f"{self.elapsed_s:7.1f}s  {self.sent} frames  {self.fps:.1f} frames/s  {self.mb_per_s:.2f} MB/s"
            f"  too large: {self.too_large}  [{per}]"
        )


# (headers, value, RecordMetadata) for every acknowledged frame; tests and benches use it
DeliveryCallback = Callable[[FrameHeaders, bytes, object], None]


@dataclass
class _Camera:
    config: CameraConfig
    source: FrameSource
    stats: CameraStats
    pending: deque = field(default_factory=deque)  # (PendingDelivery, FrameHeaders, bytes)


class FrameProducer:
    """Sends the frames of one or more cameras to the frames topic until the sources end,
    ``max_frames``/``duration_s`` are reached, or ``stop()`` (SIGINT/SIGTERM) is called."""

    def __init__(self, settings: Settings, cameras: list[tuple[CameraConfig, FrameSource]], *,
                 on_delivery: DeliveryCallback | None = None, report_every_s: float = 5.0,
                 report_to: TextIO | None = None, producer=None) -> None:
        if not cameras:
            raise UserError("no cameras to produce from")
        names = [c.camera for c, _ in cameras]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"camera ids must be unique within a producer: {', '.join(dupes)} repeated")
        self.settings = settings
        self.topic = settings.topics.frames
        self.cameras = [_Camera(cfg, src, CameraStats()) for cfg, src in cameras]
        self.on_delivery = on_delivery
        self.report_every_s = report_every_s
        self.report_to = report_to if report_to is not None else sys.stderr
        self._producer = producer
        self._own_producer = producer is None
        self._stop = threading.Event()
        self._stopped_by = "end of sources"
        self._fatal: BaseException | None = None
        self._lock = threading.Lock()
        self.stats = ProducerStats(cameras={c.config.camera: c.stats for c in self.cameras})

    # ---- control -----------------------------------------------------------------------
    def stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():
            self._stopped_by = reason
        self._stop.set()

    def _connect(self) -> None:
        """Bounded: BrokerUnavailable after kafka.connect_timeout_s; a missing topic is named."""
        if self._producer is not None:
            return
        wait_for_broker(self.settings)
        if self.topic not in describe_topics(self.settings, [self.topic]):
            user = self.settings.kafka.sasl_plain_username
            hidden = f", or the broker's ACLs hide it from user {user!r} (docs/security.md)" if user else ""
            raise UserError(
                f"topic {self.topic!r} does not exist on {self.settings.kafka.bootstrap_servers}{hidden}; "
                "create it with `linewatch broker topics`"
            )
        self._producer = make_producer(self.settings, client_id=f"{self.settings.kafka.client_id}-producer")

    # ---- per-camera thread -------------------------------------------------------------
    def _drain(self, cam: _Camera, block: bool) -> None:
        """Check finished deliveries in order; with ``block`` wait for the oldest one."""
        while cam.pending and (block or cam.pending[0][0].done()):
            pending, headers, value = cam.pending.popleft()
            self._check(cam, pending, headers, value)
            block = False

    def _check(self, cam: _Camera, pending: PendingDelivery, headers: FrameHeaders, value: bytes) -> None:
        try:
            metadata = pending.result(timeout=self.settings.kafka.request_timeout_ms / 1000 + 60)
        except RecordTooLarge as exc:
            cam.stats.too_large += 1
            log.error("%s", exc)
            return
        cam.stats.sent += 1
        cam.stats.bytes += len(value)
        cam.stats.last_seq = headers.seq
        if self.on_delivery is not None:
            self.on_delivery(headers, value, metadata)

    def _frames(self, cam: _Camera) -> Iterator[SourceFrame]:
        it = iter(cam.source)
        while not self._stop.is_set():
            try:
                yield next(it)
            except StopIteration:
                return

    def _run_camera(self, cam: _Camera, deadline: float | None) -> None:
        cfg = cam.config
        interval = 1.0 / cfg.fps if cfg.fps > 0 else 0.0
        start = time.monotonic()
        seq = 0
        try:
            for frame in self._frames(cam):
                headers = FrameHeaders(
                    frame_id=FrameHeaders.new_frame_id(cfg.camera, seq),
                    product=cfg.product, camera=cfg.camera, line=cfg.line, seq=seq,
                    capture_ts_ms=frame.capture_ts_ms, encoding=frame.encoding,
                )
                try:
                    pending = send_nowait(
                        self._producer, self.topic, frame.data, key=cfg.camera,
                        headers=headers.to_kafka(), what=f"frame {headers.frame_id} ({frame.label})",
                    )
                except RecordTooLarge as exc:
                    cam.stats.too_large += 1
                    log.error("%s", exc)
                else:
                    cam.pending.append((pending, headers, frame.data))
                seq += 1
                self._drain(cam, block=len(cam.pending) >= MAX_IN_FLIGHT_PER_CAMERA)
                if cfg.max_frames is not None and seq >= cfg.max_frames:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if interval:
                    delay = start + seq * interval - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    elif delay < -1.0:  # fell behind by more than a second: do not burst
                        start = time.monotonic() - seq * interval
            self._producer.flush(timeout=self.settings.kafka.request_timeout_ms / 1000 + 60)
            self._drain_all(cam)
        except BaseException as exc:  # recorded; the main thread stops the rest and re-raises
            with self._lock:
                if self._fatal is None:
                    self._fatal = exc
            self.stop(f"error on {cfg.camera}")
        finally:
            cam.source.close()

    def _drain_all(self, cam: _Camera) -> None:
        while cam.pending:
            self._drain(cam, block=True)

    # ---- main loop ---------------------------------------------------------------------
    def run(self, duration_s: float | None = None, handle_signals: bool = True) -> ProducerStats:
        """Produce until done; returns the counts. Raises the first fatal error (broker
        unreachable, delivery failure, unreadable source) after flushing the rest."""
        self._connect()
        deadline = time.monotonic() + duration_s if duration_s else None
        restore = self._install_signals() if handle_signals else {}
        t0 = time.monotonic()
        threads = [
            threading.Thread(target=self._run_camera, args=(cam, deadline), name=f"camera-{cam.config.camera}",
                             daemon=True)
            for cam in self.cameras
        ]
        try:
            for t in threads:
                t.start()
            next_report = t0 + self.report_every_s
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
                now = time.monotonic()
                if self.report_every_s and now >= next_report:
                    self.stats.elapsed_s = now - t0
                    print(f"[produce] {self.stats.line()}", file=self.report_to, flush=True)
                    next_report = now + self.report_every_s
        finally:
            self.stop(self._stopped_by)
            for t in threads:
                t.join()
            for sig, handler in restore.items():
                signal.signal(sig, handler)
            if self._producer is not None:
                try:
                    self._producer.flush(timeout=30)
                finally:
                    if self._own_producer:
                        self._producer.close(timeout=10)
                        self._producer = None
        self.stats.elapsed_s = time.monotonic() - t0
        self.stats.stopped_by = self._stopped_by
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        restore = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda signum, _frame: self.stop(signal.Signals(signum).name))
        return restore


def camera_configs(
    n_sources: int,
    *,
    product: str | None,
    line: str,
    cameras: list[str] | None,
    count: int | None,
    fps: float,
    max_frames: int | None,
    default_products: list[str | None],
) -> list[tuple[int, CameraConfig]]:
    """Pair sources with camera ids: ``(source index, config)`` per camera.

    - one source and ``--camera`` given K times (or ``--cameras K``): K cameras on that source;
    - K sources and K camera ids: paired in order;
    - no ids: ``cam-1``, ``cam-2``, ... one per source (times ``count``).
    """
    if count is not None and count < 1:
        raise UserError(f"--cameras {count}: must be at least 1")
    ids = list(cameras or [])
    if ids and count:
        raise UserError("give either --camera (repeatable) or --cameras N, not both")
    pairs: list[tuple[int, str]] = []
    if ids:
        if n_sources == 1:
            pairs = [(0, cid) for cid in ids]
        elif len(ids) == n_sources:
            pairs = list(enumerate(ids))
        else:
            raise UserError(f"{len(ids)} --camera ids for {n_sources} sources: give one per source, or one source")
    else:
        per = count or 1
        pairs = [(s, f"cam-{s * per + k + 1}") for s in range(n_sources) for k in range(per)]
    out: list[tuple[int, CameraConfig]] = []
    for src, cid in pairs:
        prod = product or default_products[src]
        if prod is None:
            raise UserError("--product is required for folder, video, camera and stream sources")
        try:
            out.append((src, CameraConfig(camera=cid, product=prod, line=line, fps=fps, max_frames=max_frames)))
        except ValidationError as exc:
            err = exc.errors()[0]
            field_name = ".".join(str(p) for p in err.get("loc", ()))
            value = {"camera": cid, "product": prod, "line": line}.get(field_name, "")
            raise UserError(f"invalid {field_name} {value!r}: {err.get('msg')} (letters, digits, _ . : - only)") from None
    return out
