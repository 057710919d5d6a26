"""The worker's hot path: decode -> batch -> engine -> threshold -> mask -> regions -> result.

Kafka-free on purpose: the consumer loop (``workers.worker``) hands a batch of records in and
gets the records to publish out, so the same code is unit-tested without a broker, used by
``linewatch bench`` and by tests that compare the stream with an offline run
(``linewatch.inspection.verdict.inspect_images`` gives the verdicts the worker would give for
already-decoded frames).

What a frame goes through is the shared inspection core (``linewatch.inspection``: decode,
mask step, regions, verdict, categories), the very functions calibration uses; this module
only batches. Speed: frames are decoded into one reused uint8 NHWC buffer by a small thread
pool (OpenCV releases the GIL); the model sees the whole product group of a batch at once;
post-processing skips frames whose image score is below every threshold (the image score is
the max of the map, so they cannot have a region).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from linewatch.inspection.frames import FrameError, Stage, decode_view
from linewatch.inspection.geometry import Roi
from linewatch.evidence import keep_reason
from linewatch.inspection.verdict import _warn_once, judge
from linewatch.messages import DlqRecord, FrameHeaders, HeaderError, InspectionResult, b64, now_ms
from linewatch.profiles import Profile, ProfileError
from workers.results import categorize, render_artifacts

log = logging.getLogger(__name__)

# -- batches ----------------------------------------------------------------------------------
class RecordLike(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] | None


@dataclass(slots=True)
class Outgoing:
    """One record to publish for one consumed record (a result or a DLQ record)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    kind: Literal["ok", "defect", "dlq"]
    partition: int
    offset: int
    capture_ts_ms: int | None = None
    stage: str | None = None
    reason: str | None = None


@dataclass
class StageTimes:
    """Seconds spent per stage (for metrics and ``linewatch bench``'s split)."""

    decode: float = 0.0
    inference: float = 0.0
    post: float = 0.0
    profile: float = 0.0

    def add(self, other: "StageTimes") -> None:
        self.decode += other.decode
        self.inference += other.inference
        self.post += other.post
        self.profile += other.profile


@dataclass
class BatchOutput:
    out: list[Outgoing]
    times: StageTimes
    groups: list[tuple[str, int, str, int, float]] = field(default_factory=list)  # product, version, engine, n, seconds


class ProfileSource(Protocol):
    def get(self, product: str) -> Any:
        """A loaded profile (``.profile``, ``.engine``, ``.extent``) or ProfileError."""


@dataclass
class _Group:
    """The frames of one batch that share a loaded profile (one engine call)."""

    loaded: Any
    members: list[tuple[int, FrameHeaders]]
    images: np.ndarray | None = None  # uint8 NHWC views, decoded frames only (a slice of a reused buffer)
    good: list[int] = field(default_factory=list)  # indices into members that decoded
    dims: dict[int, tuple[int, int]] = field(default_factory=dict)  # member index -> (w, h)
    boxes: dict[int, Roi] = field(default_factory=dict)  # member index -> the frame rectangle its view shows
    maps: np.ndarray | None = None
    scores: np.ndarray | None = None
    error: BaseException | None = None
    infer_s: float = 0.0


@dataclass
class PreparedBatch:
    """A batch after headers, profile lookup and decoding; ``infer`` then ``finish`` it."""

    records: Sequence[RecordLike]
    out: list[Outgoing | None]
    groups: list[_Group]
    times: StageTimes
    slot: int


class BatchProcessor:
    """Turns a batch of consumed records into result/DLQ records. One per worker thread.

    ``process`` = ``prepare`` (headers, profile, decode into a reused buffer) -> ``infer`` (the
    engine; may run in another thread) -> ``finish`` (thresholds, regions, results). The worker
    overlaps them across two batches, so ``prepare`` takes a buffer ``slot`` (0 or 1): the
    images of the batch in the engine are never overwritten by the next batch's decoding.
    """

    def __init__(self, profiles: ProfileSource, *, worker_id: str, results_topic: str, dlq_topic: str,
                 max_frame_pixels: int, thumbnail_size: int = 256, decode_threads: int = 2,
                 clock_ms: Callable[[], int] = now_ms, evidence_rate: float = 0.0,
                 evidence_max_bytes: int = 0, camera_roi: dict[str, str] | None = None):
        self.profiles = profiles
        self.worker_id = worker_id
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self.max_frame_pixels = max_frame_pixels
        self.thumbnail_size = thumbnail_size
        self.clock_ms = clock_ms
        # original frame bytes ride on the result of every defect frame and of a hashed sample of
        # normal ones (linewatch.evidence); ``evidence_max_bytes`` (0 = no limit) keeps base64
        # growth from pushing a result over the Kafka message limit: such a frame goes without
        self.evidence_rate = evidence_rate
        self.evidence_max_bytes = evidence_max_bytes
        # 'camera' or 'camera/product' -> the ROI this camera sees the product in (WorkerSettings.camera_roi)
        self.camera_roi = {k: Roi.parse(v) for k, v in (camera_roi or {}).items()}
        self._pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="decode") \
            if decode_threads > 1 else None
        self._buffers: dict[tuple[int, int, int], np.ndarray] = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _buffer(self, slot: int, hw: tuple[int, int], n: int) -> np.ndarray:
        buf = self._buffers.get((slot, *hw))
        if buf is None or buf.shape[0] < n:
            buf = np.empty((max(n, 16), *hw, 3), np.uint8)
            self._buffers[(slot, *hw)] = buf
        return buf

    def roi_for(self, camera: str, product: str) -> Roi | None:
        """This camera's ROI override for the product, if settings give one."""
        return self.camera_roi.get(f"{camera}/{product}") or self.camera_roi.get(camera)

    def dlq(self, rec: RecordLike, stage: Stage, reason: str, frame_id: str | None = None) -> Outgoing:
        record = DlqRecord(frame_id=frame_id, reason=reason[:500], stage=stage, worker_id=self.worker_id,
                           source_topic=rec.topic, source_partition=rec.partition, source_offset=rec.offset)
        headers = [(k, v if v is not None else b"") for k, v in (rec.headers or [])]
        headers.append(record.to_header())
        return Outgoing(self.dlq_topic, rec.key, rec.value or b"", headers, "dlq", rec.partition, rec.offset,
                        stage=stage, reason=record.reason)

    def process(self, records: Sequence[RecordLike]) -> BatchOutput:
        """Every record gets exactly one Outgoing, in input order."""
        prepared = self.prepare(records)
        self.infer(prepared)
        return self.finish(prepared)

    # -- phase 1: headers, profiles, decoding ----------------------------------------------------
    def prepare(self, records: Sequence[RecordLike], slot: int = 0) -> PreparedBatch:
        times = StageTimes()
        out: list[Outgoing | None] = [None] * len(records)
        by_profile: dict[int, _Group] = {}
        t0 = time.perf_counter()
        for i, rec in enumerate(records):
            try:
                hdr = FrameHeaders.from_kafka(list(rec.headers or []))
            except HeaderError as exc:
                out[i] = self.dlq(rec, "headers", str(exc), frame_id=FrameHeaders.frame_id_of(rec.headers))
                continue
            except Exception as exc:  # a poison record must not stop the partition
                out[i] = self.dlq(rec, "headers", f"unreadable headers: {type(exc).__name__}: {exc}")
                continue
            try:
                loaded = self.profiles.get(hdr.product)
            except ProfileError as exc:
                out[i] = self.dlq(rec, "profile", str(exc), hdr.frame_id)
                continue
            except Exception as exc:
                log.exception("profile lookup for %s failed", hdr.product)
                out[i] = self.dlq(rec, "profile", f"{type(exc).__name__}: {exc}", hdr.frame_id)
                continue
            group = by_profile.get(id(loaded))
            if group is None:
                group = by_profile[id(loaded)] = _Group(loaded, [])
            group.members.append((i, hdr))
        times.profile = time.perf_counter() - t0
        groups = list(by_profile.values())
        t1 = time.perf_counter()
        # one buffer per view size for the whole batch; each group gets its own slice
        need: dict[tuple[int, int], int] = {}
        for g in groups:
            hw = g.loaded.profile.framing.view_hw
            need[hw] = need.get(hw, 0) + len(g.members)
        used: dict[tuple[int, int], int] = dict.fromkeys(need, 0)
        for g in groups:
            hw = g.loaded.profile.framing.view_hw
            buf = self._buffer(slot, hw, need[hw])
            lo = used[hw]
            used[hw] += len(g.members)
            self._decode_group(records, g, buf[lo : lo + len(g.members)], out)
        times.decode = time.perf_counter() - t1
        return PreparedBatch(records, out, groups, times, slot)

    def _decode_group(self, records: Sequence[RecordLike], g: _Group, buf: np.ndarray,
                      out: list[Outgoing | None]) -> None:
        framing = g.loaded.profile.framing
        members = g.members

        def work(j: int) -> tuple[int, int, Roi] | FrameError:
            i, hdr = members[j]
            try:
                _, w, h, box = decode_view(records[i].value or b"", framing, self.max_frame_pixels, hdr.encoding,
                                           out=buf[j], roi=self.roi_for(hdr.camera, hdr.product))
                return w, h, box
            except FrameError as exc:
                return exc
            except Exception as exc:  # decoder bug or OOM on one frame: that frame only
                return FrameError("decode", f"{type(exc).__name__}: {exc}")

        if self._pool is not None and len(members) > 1:
            decoded = list(self._pool.map(work, range(len(members))))
        else:
            decoded = [work(j) for j in range(len(members))]
        for j, d in enumerate(decoded):
            if isinstance(d, FrameError):
                i, hdr = members[j]
                out[i] = self.dlq(records[i], d.stage, d.reason, hdr.frame_id)
            else:
                g.good.append(j)
                g.dims[j] = d[:2]
                g.boxes[j] = d[2]
        if g.good:
            g.images = buf if len(g.good) == len(members) else buf[g.good]

    # -- phase 2: the engine ---------------------------------------------------------------------
    def infer(self, prepared: PreparedBatch) -> None:
        """Run each group's engine (safe to call from another thread: touches only ``prepared``)."""
        for g in prepared.groups:
            if g.images is None:
                continue
            t = time.perf_counter()
            framing = g.loaded.profile.framing
            try:
                # the tiles of every frame of the group go through the engine as one batch
                maps, scores = g.loaded.engine.run(framing.tile(g.images))
                g.maps, g.scores = (maps, scores) if framing.identity else framing.stitch(maps)
            except Exception as exc:  # the group goes to the DLQ with the reason; we go on
                log.exception("engine %s failed on %d frames of %s", g.loaded.engine.name, len(g.good),
                              g.loaded.profile.product)
                g.error = exc
            g.infer_s = time.perf_counter() - t
            prepared.times.inference += g.infer_s

    # -- phase 3: post-processing and results ----------------------------------------------------
    def finish(self, prepared: PreparedBatch) -> BatchOutput:
        records, out = prepared.records, prepared.out
        t0 = time.perf_counter()
        summary = []
        for g in prepared.groups:
            profile: Profile = g.loaded.profile
            engine = g.loaded.engine.name
            if g.images is None or g.error is not None or g.maps is None or g.scores is None:
                exc = g.error
                for j in g.good:
                    i, hdr = g.members[j]
                    out[i] = self.dlq(records[i], "inference", f"{type(exc).__name__}: {exc}", hdr.frame_id)
                summary.append((profile.product, profile.version, engine, 0, g.infer_s))
                continue
            infer_ms = g.infer_s * 1000.0
            for k, j in enumerate(g.good):
                i, hdr = g.members[j]
                w, h = g.dims[j]
                score = float(g.scores[k])
                if not np.isfinite(score):
                    out[i] = self.dlq(records[i], "inference", f"engine returned a non-finite score ({score})",
                                      hdr.frame_id)
                    continue
                try:
                    out[i] = self._result(records[i], hdr, g.loaded, engine, g.images[k], g.maps[k],
                                          score, w, h, infer_ms, g.boxes[j])
                except Exception as exc:  # never a poison pill: this frame to the DLQ, the rest go on
                    log.exception("post-processing failed for %s", hdr.frame_id)
                    out[i] = self.dlq(records[i], "other", f"post-processing: {type(exc).__name__}: {exc}",
                                      hdr.frame_id)
            summary.append((profile.product, profile.version, engine, len(g.good), g.infer_s))
        prepared.times.post += time.perf_counter() - t0
        assert all(o is not None for o in out)
        return BatchOutput(out, prepared.times, summary)  # type: ignore[arg-type]

    def _result(self, rec: RecordLike, hdr: FrameHeaders, loaded: Any, engine: str, image: np.ndarray,
                amap: np.ndarray, score: float, w: int, h: int, infer_ms: float, box: Roi) -> Outgoing:
        profile: Profile = loaded.profile
        fv = judge(amap, score, profile, box.w, box.h, image, loaded.extent, (box.x, box.y))
        category, confidence = "unknown", 0.0
        mask_b = thumb_b = heat_b = None
        if fv.verdict == "defect":
            category, confidence = categorize(profile, image, amap, fv)
            mask_b, thumb_b, heat_b = render_artifacts(image, amap, fv.mask, profile.threshold,
                                                       self.thumbnail_size)
        reason = keep_reason(hdr.frame_id, fv.verdict, self.evidence_rate)
        raw = rec.value or b""
        if reason is not None and self.evidence_max_bytes and len(raw) > self.evidence_max_bytes:
            _warn_once(f"evidence-size:{hdr.camera}", "frames of %s are too large to keep as evidence (%d bytes > %d)",
                       hdr.camera, len(raw), self.evidence_max_bytes)
            reason = None
        processed = self.clock_ms()
        result = InspectionResult(
            frame_id=hdr.frame_id, product=hdr.product, camera=hdr.camera, line=hdr.line, seq=hdr.seq,
            capture_ts_ms=hdr.capture_ts_ms, processed_ts_ms=processed,
            image_score=fv.image_score, threshold=float(profile.threshold),
            image_threshold=float(profile.effective_image_threshold), verdict=fv.verdict,
            defect_area_frac=fv.defect_area_frac, regions=fv.regions,
            category=category, category_confidence=confidence,  # type: ignore[arg-type]
            background=profile.background, profile_version=profile.version, model_kind=profile.model_kind,
            engine=engine, worker_id=self.worker_id,
            latency_ms=max(0.0, float(processed - hdr.capture_ts_ms)), inference_ms=infer_ms,
            kafka_partition=rec.partition, kafka_offset=rec.offset, width=w, height=h,
            mask_png_b64=b64(mask_b), thumbnail_jpeg_b64=b64(thumb_b), heatmap_png_b64=b64(heat_b),
            frame_b64=b64(raw) if reason else None, frame_encoding=hdr.encoding if reason else None,
            evidence=reason,  # type: ignore[arg-type]
        )
        # keyed by camera, like `frames`: one camera's results stay in order on one partition,
        # which a bridge presenting verdicts to the line relies on (docs/contracts.md)
        return Outgoing(self.results_topic, hdr.camera.encode("utf-8"), result.to_bytes(),
                        [("schema_version", str(result.schema_version).encode()),
                         ("product", hdr.product.encode()), ("frame_id", hdr.frame_id.encode()),
                         ("camera", hdr.camera.encode())],
                        fv.verdict, rec.partition, rec.offset, capture_ts_ms=hdr.capture_ts_ms)
