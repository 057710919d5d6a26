"""The worker's hot path: decode -> batch -> engine -> threshold -> mask -> regions -> result.

Kafka-free on purpose: the consumer loop (``workers.worker``) hands a batch of records in and
gets the records to publish out, so the same code is unit-tested without a broker, used by
``linewatch bench`` and by tests that compare the stream with an offline run
(``inspect_images`` gives the verdicts the worker would give for already-decoded frames).

Speed (issue 6): JPEGs are decoded straight to about the model's size with libjpeg's DCT
scaling (``IMREAD_REDUCED_COLOR_2/4/8``), into one reused uint8 NHWC buffer, by a small
thread pool (OpenCV releases the GIL); the model sees the whole product group of a batch at
once; post-processing runs on the small model-size map and skips frames whose image score is
below every threshold (the image score is the max of the map, so they cannot have a region).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from linewatch.messages import (
    DlqRecord,
    FrameHeaders,
    HeaderError,
    InspectionResult,
    Region,
    b64,
    now_ms,
)
from linewatch.profiles import Profile, ProfileError, mask_step

log = logging.getLogger(__name__)

Stage = Literal["headers", "decode", "profile", "inference", "publish", "other"]

_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG ext) and CC (DAC) are not SOFs.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_HAS_RGB_FLAG = hasattr(cv2, "IMREAD_COLOR_RGB")  # OpenCV >= 5 decodes straight to RGB


class FrameError(ValueError):
    """A frame cannot be processed; ``stage`` and the message go to the DLQ record."""

    def __init__(self, stage: Stage, reason: str):
        super().__init__(reason)
        self.stage: Stage = stage
        self.reason = reason


# -- decoding ---------------------------------------------------------------------------------
def frame_format(data: bytes) -> Literal["jpeg", "png"]:
    """The codec from the magic bytes (the header's ``encoding`` is checked against it)."""
    if not data:
        raise FrameError("decode", "empty frame (0 bytes)")
    if data[:2] == _JPEG_MAGIC:
        return "jpeg"
    if data[:8] == _PNG_MAGIC:
        return "png"
    raise FrameError("decode", f"not a JPEG or PNG (starts with {bytes(data[:8]).hex()})")


def _jpeg_dims(data: bytes) -> tuple[int, int]:
    """Width and height from the first SOF segment, without decoding anything."""
    n = len(data)
    i = 2
    while i < n:
        if data[i] != 0xFF:
            raise FrameError("decode", f"corrupt JPEG: no marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            continue
        if marker in (0xD9, 0xDA):  # EOI / SOS before any frame header
            raise FrameError("decode", "corrupt JPEG: no frame header before the scan")
        if i + 2 > n:
            break
        seg_len = int.from_bytes(data[i : i + 2], "big")
        if seg_len < 2:
            raise FrameError("decode", f"corrupt JPEG: segment length {seg_len} at byte {i}")
        if marker in _SOF_MARKERS:
            if i + 7 > n:
                break
            h = int.from_bytes(data[i + 3 : i + 5], "big")
            w = int.from_bytes(data[i + 5 : i + 7], "big")
            return w, h
        i += seg_len
    raise FrameError("decode", "truncated JPEG: ends before its frame header")


def _png_dims(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise FrameError("decode", "corrupt PNG: no IHDR chunk")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def frame_dims(data: bytes, max_pixels: int) -> tuple[Literal["jpeg", "png"], int, int]:
    """(format, width, height) from the header alone; refuses decompression bombs and
    truncated files before any pixel is decoded."""
    fmt = frame_format(data)
    w, h = _jpeg_dims(data) if fmt == "jpeg" else _png_dims(data)
    if w <= 0 or h <= 0:
        raise FrameError("decode", f"{fmt.upper()} declares an empty size {w}x{h}")
    if w * h > max_pixels:
        raise FrameError("decode", f"{fmt.upper()} declares {w}x{h} = {w * h} pixels, over the "
                                   f"limit of {max_pixels} (decompression bomb?)")
    # libjpeg fills a truncated scan with grey and returns "success": check the end marker.
    if fmt == "jpeg":
        tail = bytes(data[-64:]).rstrip(b"\x00")
        if not tail.endswith(b"\xff\xd9"):
            raise FrameError("decode", "truncated JPEG: no end-of-image marker")
    elif b"IEND" not in bytes(data[-16:]):
        raise FrameError("decode", "truncated PNG: no IEND chunk")
    return fmt, w, h


def _reduced_flag(w: int, h: int, size: int) -> tuple[int, int]:
    """The largest libjpeg DCT scale (1/8, 1/4, 1/2) that stays at or above the model size."""
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if w // factor >= size and h // factor >= size:
            return factor, flag
    return 1, cv2.IMREAD_COLOR


def _rgb(flag: int) -> int:
    return (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB if _HAS_RGB_FLAG else flag


def decode_frame(data: bytes, size: int, max_pixels: int, encoding: str | None = None,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """Decode ``data`` to an RGB uint8 ``size`` x ``size`` image (written into ``out`` when
    given); returns (image, original width, original height). Raises FrameError.

    The frame is squashed to the square model input, as calibration does (``resize_rgb``).
    """
    fmt, w, h = frame_dims(data, max_pixels)
    if encoding is not None and encoding != fmt:
        raise FrameError("decode", f"header says encoding={encoding} but the data is {fmt.upper()}")
    flag = cv2.IMREAD_COLOR
    if fmt == "jpeg":
        _, flag = _reduced_flag(w, h, size)
    buf = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(buf, _rgb(flag))
    except cv2.error as exc:
        raise FrameError("decode", f"{fmt.upper()} decoder failed: {' '.join(str(exc).split())[:200]}") from None
    if img is None or img.ndim != 3 or img.shape[2] != 3:
        raise FrameError("decode", f"undecodable {fmt.upper()} ({len(data)} bytes)")
    if not _HAS_RGB_FLAG:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return resize_rgb(img, size, out), w, h


def resize_rgb(img: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Squash an RGB image to size x size (area when shrinking, linear when enlarging)."""
    if img.shape[0] == size and img.shape[1] == size:
        if out is None:
            return img
        out[...] = img
        return out
    interp = cv2.INTER_AREA if img.shape[0] >= size and img.shape[1] >= size else cv2.INTER_LINEAR
    if out is None:
        return cv2.resize(img, (size, size), interpolation=interp)
    cv2.resize(img, (size, size), dst=out, interpolation=interp)
    return out


# -- engines ----------------------------------------------------------------------------------
class Engine(Protocol):
    name: str

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC RGB -> (maps float32 NHW, scores float32 N)."""


class ModelEngine:
    """``model.predict`` behind the Engine interface: the fallback when workers.engines is
    absent or refuses the model."""

    def __init__(self, model: Any, max_batch: int = 16):
        self.model = model
        self.max_batch = max_batch
        self.name = "torch-cpu"

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict(images, batch_size=self.max_batch)


# -- post-processing --------------------------------------------------------------------------
@dataclass(slots=True)
class FrameVerdict:
    """What post-processing found in one frame (map coordinates are model-size)."""

    image_score: float
    verdict: Literal["ok", "defect"]
    regions: list[Region]
    defect_area_frac: float
    mask: np.ndarray | None = None  # uint8 0/255 at model size, kept regions only
    labels: np.ndarray | None = None  # int32 component labels at model size (kept ones > 0)


def refine_map(amap: np.ndarray, fraction: float, window: int) -> np.ndarray:
    """Peak-relative refinement of one non-negative anomaly map (the same function offline).

    Why: PaDiM's stride-4..16 features spread a defect's response well beyond the defect, so a
    single global threshold cuts a strong defect's blob far too wide. A pixel is kept only when
    it reaches ``fraction`` x the map's maximum within its ``window`` x ``window``
    neighbourhood (a local "fraction of peak" rule, like full-width-at-half-maximum); others
    drop to the map's minimum, so ``refined >= threshold`` is the refined mask for any
    threshold above that minimum. Each local peak -- and so the image score -- is unchanged.
    ``fraction <= 0`` returns ``amap`` itself.
    """
    if fraction <= 0:
        return amap
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (int(window), int(window)))
    local_max = cv2.dilate(amap, kernel, borderType=cv2.BORDER_REPLICATE)
    return np.where(amap >= np.float32(fraction) * local_max, amap, amap.min()).astype(amap.dtype, copy=False)


def guide_map(amap: np.ndarray, image_rgb: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Guided filter (He, Sun & Tang 2010) of the map, guided by the frame's grey image.

    Why: the map is made on a stride-4..16 feature grid and upsampled, so its edges are soft
    and misplaced; the filter makes it locally linear in the image, so region edges snap to
    the image's edges (a defect is usually a change in colour or texture). Written with
    ``cv2.boxFilter`` because this OpenCV build has no ``cv2.ximgproc``. The result never
    goes below the map's minimum. ``radius <= 0`` returns ``amap`` itself.
    """
    if radius <= 0:
        return amap
    grey = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2GRAY)
    if grey.shape != amap.shape:
        grey = cv2.resize(grey, (amap.shape[1], amap.shape[0]), interpolation=cv2.INTER_AREA)
    guide = grey.astype(np.float32) * np.float32(1 / 255)
    p = amap.astype(np.float32, copy=False)
    k = (2 * int(radius) + 1, 2 * int(radius) + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = box(guide), box(p)
    cov_ip = box(guide * p) - mean_i * mean_p
    var_i = box(guide * guide) - mean_i * mean_i
    a = cov_ip / (var_i + np.float32(eps))
    b = mean_p - a * mean_i
    return np.maximum(box(a) * guide + box(b), p.min())


CUE_REL = 0.5  # pixels whose map value is below this fraction of the frame's peak are "normal material"
CUE_VAR_FLOOR = 4.0  # Lab units^2 added to the local variance: sensor noise never counts as a change


def colour_cue(amap: np.ndarray, image_rgb: np.ndarray, window: int, peak: float | None = None) -> np.ndarray:
    """Per-pixel colour distance to the frame's own normal material nearby.

    For each pixel: the RMS over the L, a, b channels of its z-score against the mean and
    variance of the pixels in the surrounding ``window`` x ``window`` box that the map calls
    normal (map < ``CUE_REL`` x its maximum). Box sums make it O(pixels) whatever the window.
    It needs no normal images and no alignment: the reference is the part itself, around the
    defect, so rotation and position jitter do not matter. Near 1 on normal material, several
    units on foreign colour, a hole, a bright scratch or a stain. ``peak``: the frame's map
    maximum when ``amap`` is a crop of it (the "normal" cut-off is the whole frame's).
    """
    img = np.ascontiguousarray(image_rgb)
    if img.shape[:2] != amap.shape:
        img = cv2.resize(img, (amap.shape[1], amap.shape[0]), interpolation=cv2.INTER_AREA)
    lab = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32), (0, 0), 1.0)
    w = (amap < np.float32(CUE_REL) * (amap.max() if peak is None else peak)).astype(np.float32)
    k = (int(window), int(window))

    def box(x: np.ndarray) -> np.ndarray:  # all channels in one call
        return cv2.boxFilter(x, cv2.CV_32F, k, normalize=False, borderType=cv2.BORDER_REFLECT)

    wx = lab * w[..., None]
    sw = box(w)[..., None] + np.float32(1e-3)
    m = box(wx) / sw
    v = np.maximum(box(wx * lab) / sw - m * m, 0) + np.float32(CUE_VAR_FLOOR)
    d = lab - m
    return np.sqrt((d * d / v).sum(axis=2) * np.float32(1 / 3))


def cue_map(amap: np.ndarray, image_rgb: np.ndarray, scale: float, floor: float, window: int,
            sigma: float = 0.0) -> np.ndarray:
    """The anomaly map weighted by the pixel colour cue: ``amap * (floor + (1 - floor) * s)``,
    ``s = 1 - exp(-(cue / scale)^2)`` in [0, 1), with ``1 - s`` Gaussian-blurred by ``sigma``
    pixels when ``sigma > 0``.

    Why: PaDiM's map is made on a stride-4..16 grid and spreads beyond the defect; pixels inside
    that blur which look like the normal material around them are damped towards ``floor`` x
    their value, pixels that differ in colour keep it. ``floor`` bounds the damping, so a defect
    with no colour change (a bend, a dent) is weakened, never erased. Per pixel, the damping
    follows the material's own grain: the few normal pixels far from their local mean keep their
    full score (speckle that becomes stray regions), and the grain inside a scratch or stain
    punches holes into it; blurring the damping factor (``sigma`` ~ 3 px, below a defect's
    width) makes it a statement about the neighbourhood, which keeps a defect whole and still
    damps the map's wide skirt.
    ``scale <= 0``: off.
    """
    if scale <= 0 or floor >= 1:
        return amap
    c = colour_cue(amap, image_rgb, window) * np.float32(1 / scale)
    keep = cv2.exp(-(c * c))  # 1 - s
    if sigma > 0:
        keep = cv2.GaussianBlur(keep, (0, 0), float(sigma), borderType=cv2.BORDER_REFLECT)
    return (amap * (np.float32(1.0) - np.float32(1 - floor) * keep)).astype(amap.dtype, copy=False)


def segmentation_map(amap: np.ndarray, image_rgb: np.ndarray | None, *, refine_fraction: float = 0.0,
                     refine_window: int = 33, guide_radius: int = 0, guide_eps: float = 1e-3,
                     cue_scale: float = 0.0, cue_floor: float = 0.5, cue_window: int = 33,
                     cue_sigma: float = 0.0) -> np.ndarray:
    """The map that is thresholded into regions: ``cue_map`` and ``guide_map`` (each when on and
    the frame is given) then ``refine_map``. Offline calibration/evaluation call this very
    function."""
    if image_rgb is not None:
        amap = cue_map(amap, image_rgb, cue_scale, cue_floor, cue_window, cue_sigma)
        if guide_radius > 0:
            amap = guide_map(amap, image_rgb, guide_radius, guide_eps)
    return refine_map(amap, refine_fraction, refine_window)


def find_regions(amap: np.ndarray, threshold: float, min_region_px: int, width: int, height: int,
                 ) -> tuple[list[Region], np.ndarray, np.ndarray]:
    """Connected regions of ``amap >= threshold`` (8-connectivity) with at least
    ``min_region_px`` map pixels. Returns (regions with boxes/areas in original-frame pixels,
    mask uint8 0/255 of the kept regions, labels int32 renumbered 1..k for the kept regions)."""
    return regions_of_mask(amap >= threshold, amap, min_region_px, width, height)


def regions_of_mask(binary: np.ndarray, amap: np.ndarray, min_region_px: int, width: int, height: int,
                    ) -> tuple[list[Region], np.ndarray, np.ndarray]:
    """``find_regions`` for a given bool mask (the learned extent's); scores read from ``amap``."""
    mh, mw = amap.shape
    raw = np.ascontiguousarray(binary, dtype=bool).view(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(raw, connectivity=8, ltype=cv2.CV_32S)
    if n <= 1:
        return [], np.zeros((mh, mw), np.uint8), np.zeros((mh, mw), np.int32)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= max(min_region_px, 1)) + 1
    lut = np.zeros(n, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    kept_labels = lut[labels]
    mask = (kept_labels > 0).view(np.uint8) * np.uint8(255)
    if not len(keep):
        return [], mask, kept_labels
    sx, sy = width / mw, height / mh
    total = float(mh * mw)
    regions: list[Region] = []
    for lab in keep.tolist():
        x, y, bw, bh, area = (int(v) for v in stats[lab])
        # peak/mean on the region's own bounding box: touches only its pixels' neighbourhood
        vals = amap[y : y + bh, x : x + bw][labels[y : y + bh, x : x + bw] == lab]
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = min(width, int(np.ceil((x + bw) * sx))), min(height, int(np.ceil((y + bh) * sy)))
        regions.append(Region(
            area_px=int(round(area * sx * sy)),
            area_frac=min(1.0, area / total),
            bbox=(x0, y0, max(1, x1 - x0), max(1, y1 - y0)),
            peak_score=float(vals.max()),
            mean_score=float(vals.mean(dtype=np.float64)),
        ))
    return regions, mask, kept_labels


def judge(amap: np.ndarray, score: float, profile: Profile, width: int, height: int,
          image: np.ndarray | None = None) -> FrameVerdict:
    """Threshold one map and decide the verdict.

    Rule (the same offline and in the stream): a frame is a defect when its image score
    reaches the image threshold and, unless an explicit ``image_threshold`` is set, at least
    one region of ``min_region_px`` map pixels survives. With an explicit image threshold the
    image score alone decides (regions are still reported when there are any).
    Regions come from ``segmentation_map`` with the profile's colour cue and guided filter (both
    need ``image``, the model-size RGB frame) and peak-relative refinement -- all off by
    default -- exactly as the offline evaluation does -- and, when the profile has one, the learned
    region extent (``workers.extent``: reshapes the regions, never adds one). The image score
    stays the raw map's max.
    """
    thr = float(profile.threshold)
    img_thr = float(profile.effective_image_threshold)
    score = float(score)
    seg = None
    top = score  # the raw map's max; refinement keeps it, the guided filter may move it
    if profile.guide_radius > 0 or profile.cue_scale > 0:
        if image is None:
            _warn_once(f"guide:{profile.product}:{profile.version}", "profile %s v%s asks for the guided "
                       "filter / colour cue but no frame was given: regions from the plain map", profile.product,
                       profile.version)
        else:
            seg = segmentation_map(amap, image, **mask_step(profile))
            top = float(seg.max())
    if top < thr and score < img_thr:  # nothing reaches either threshold: nothing to segment
        return FrameVerdict(score, "ok", [], 0.0)
    if top >= thr:
        if seg is None:
            seg = refine_map(amap, profile.refine_fraction, profile.refine_window)
        regions, mask, labels = find_regions(seg, thr, profile.min_region_px, width, height)
        if profile.extent and regions and image is not None:
            from workers.extent import apply_extent  # imports this module

            served = apply_extent(profile.extent, amap, image, seg >= thr, thr)
            regions, mask, labels = regions_of_mask(served, seg, profile.min_region_px, width, height)
    else:
        regions, mask, labels = [], None, None
    if profile.image_threshold is None:
        defect = score >= img_thr and bool(regions)
    else:
        defect = score >= img_thr
    if not defect:
        return FrameVerdict(score, "ok", [], 0.0)
    if mask is None:  # image-level defect below the pixel threshold: an empty mask
        mask = np.zeros(amap.shape, np.uint8)
        labels = np.zeros(amap.shape, np.int32)
    area = min(1.0, sum(r.area_frac for r in regions))
    return FrameVerdict(score, "defect", regions, area, mask, labels)


def heatmap_bgr(amap: np.ndarray, threshold: float) -> np.ndarray:
    """JET colour map with the threshold at mid-scale (so red = well above threshold)."""
    if threshold > 0:
        scaled = amap * (128.0 / threshold)
    else:
        lo, hi = float(amap.min()), float(amap.max())
        scaled = (amap - lo) * (255.0 / max(hi - lo, 1e-6))
    return cv2.applyColorMap(np.clip(scaled, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)


def render_artifacts(image_rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray, threshold: float,
                     size: int) -> tuple[bytes, bytes, bytes]:
    """(mask PNG, thumbnail JPEG, heat map PNG): mask and thumbnail at most ``size`` pixels on
    a side, the heat map at most ``size // 2`` (it is a blurred map; a smaller PNG costs a third
    of the deflate time, which dominated post-processing of defect frames)."""
    def fit(img: np.ndarray, side: int, interp: int) -> np.ndarray:
        return img if img.shape[0] <= side else cv2.resize(img, (side, side), interpolation=interp)

    ok1, mask_png = cv2.imencode(".png", fit(mask, size, cv2.INTER_NEAREST), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    thumb = cv2.cvtColor(fit(image_rgb, size, cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    ok2, thumb_jpg = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 85])
    small_map = fit(amap, max(32, size // 2), cv2.INTER_AREA)
    ok3, heat_png = cv2.imencode(".png", heatmap_bgr(small_map, threshold), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not (ok1 and ok2 and ok3):
        raise FrameError("other", "could not encode result images")
    return mask_png.tobytes(), thumb_jpg.tobytes(), heat_png.tobytes()


# -- categories -------------------------------------------------------------------------------
def categorize(profile: Profile, image_rgb: np.ndarray, amap: np.ndarray, fv: FrameVerdict,
               ) -> tuple[str, float]:
    """Fill region categories and return the frame's (category, confidence).

    Delegates to ``linewatch.categorize.categorize_frame`` when the profile carries a
    categorizer; "unknown" otherwise or when categorisation fails (never drops the frame).
    """
    if profile.categorizer is None or not fv.regions:
        return "unknown", 0.0
    try:
        from linewatch.categorize import categorize_frame
    except ImportError:
        return "unknown", 0.0
    try:
        out = categorize_frame(profile=profile, image=image_rgb, amap=amap, labels=fv.labels,
                               regions=fv.regions)
    except Exception as exc:  # a categoriser bug must not lose the inspection
        _warn_once(f"categorize:{profile.product}:{profile.version}",
                   "categorisation failed for %s v%s: %s", profile.product, profile.version, exc)
        return "unknown", 0.0
    regions, category, confidence = _unpack_categories(out, fv.regions)
    fv.regions = regions
    return category, confidence


def _unpack_categories(out: Any, regions: list[Region]) -> tuple[list[Region], str, float]:
    """``linewatch.categorize.FrameCategories`` (regions/category/confidence attributes); a
    plain (category, confidence) pair is accepted too."""
    if isinstance(out, tuple) and len(out) == 2:
        return regions, str(out[0]), float(out[1])
    cat = str(getattr(out, "category", "unknown"))
    conf = float(getattr(out, "confidence", 0.0))
    got = list(getattr(out, "regions", None) or [])
    return (got if len(got) == len(regions) else regions), cat, conf


_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


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
        """A loaded profile (``.profile``, ``.engine``) or ProfileError."""


@dataclass
class _Group:
    """The frames of one batch that share a loaded profile (one engine call)."""

    loaded: Any
    members: list[tuple[int, FrameHeaders]]
    images: np.ndarray | None = None  # uint8 NHWC, decoded frames only (a view of a reused buffer)
    good: list[int] = field(default_factory=list)  # indices into members that decoded
    dims: dict[int, tuple[int, int]] = field(default_factory=dict)  # member index -> (w, h)
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
                 clock_ms: Callable[[], int] = now_ms):
        self.profiles = profiles
        self.worker_id = worker_id
        self.results_topic = results_topic
        self.dlq_topic = dlq_topic
        self.max_frame_pixels = max_frame_pixels
        self.thumbnail_size = thumbnail_size
        self.clock_ms = clock_ms
        self._pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="decode") \
            if decode_threads > 1 else None
        self._buffers: dict[tuple[int, int], np.ndarray] = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _buffer(self, slot: int, size: int, n: int) -> np.ndarray:
        buf = self._buffers.get((slot, size))
        if buf is None or buf.shape[0] < n:
            buf = np.empty((max(n, 16), size, size, 3), np.uint8)
            self._buffers[(slot, size)] = buf
        return buf

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
                out[i] = self.dlq(rec, "headers", str(exc))
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
        # one buffer per input size for the whole batch; each group gets its own slice
        need: dict[int, int] = {}
        for g in groups:
            need[g.loaded.profile.input_size] = need.get(g.loaded.profile.input_size, 0) + len(g.members)
        used: dict[int, int] = dict.fromkeys(need, 0)
        for g in groups:
            size = g.loaded.profile.input_size
            buf = self._buffer(slot, size, need[size])
            lo = used[size]
            used[size] += len(g.members)
            self._decode_group(records, g, buf[lo : lo + len(g.members)], out)
        times.decode = time.perf_counter() - t1
        return PreparedBatch(records, out, groups, times, slot)

    def _decode_group(self, records: Sequence[RecordLike], g: _Group, buf: np.ndarray,
                      out: list[Outgoing | None]) -> None:
        size = g.loaded.profile.input_size
        members = g.members

        def work(j: int) -> tuple[int, int] | FrameError:
            i, hdr = members[j]
            try:
                _, w, h = decode_frame(records[i].value or b"", size, self.max_frame_pixels, hdr.encoding, out=buf[j])
                return w, h
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
                g.dims[j] = d
        if g.good:
            g.images = buf if len(g.good) == len(members) else buf[g.good]

    # -- phase 2: the engine ---------------------------------------------------------------------
    def infer(self, prepared: PreparedBatch) -> None:
        """Run each group's engine (safe to call from another thread: touches only ``prepared``)."""
        for g in prepared.groups:
            if g.images is None:
                continue
            t = time.perf_counter()
            try:
                g.maps, g.scores = g.loaded.engine.run(g.images)
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
                    out[i] = self._result(records[i], hdr, profile, engine, g.images[k], g.maps[k],
                                          score, w, h, infer_ms)
                except Exception as exc:  # never a poison pill: this frame to the DLQ, the rest go on
                    log.exception("post-processing failed for %s", hdr.frame_id)
                    out[i] = self.dlq(records[i], "other", f"post-processing: {type(exc).__name__}: {exc}",
                                      hdr.frame_id)
            summary.append((profile.product, profile.version, engine, len(g.good), g.infer_s))
        prepared.times.post += time.perf_counter() - t0
        assert all(o is not None for o in out)
        return BatchOutput(out, prepared.times, summary)  # type: ignore[arg-type]

    def _result(self, rec: RecordLike, hdr: FrameHeaders, profile: Profile, engine: str, image: np.ndarray,
                amap: np.ndarray, score: float, w: int, h: int, infer_ms: float) -> Outgoing:
        fv = judge(amap, score, profile, w, h, image)
        category, confidence = "unknown", 0.0
        mask_b = thumb_b = heat_b = None
        if fv.verdict == "defect":
            category, confidence = categorize(profile, image, amap, fv)
            mask_b, thumb_b, heat_b = render_artifacts(image, amap, fv.mask, profile.threshold,
                                                       self.thumbnail_size)
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
        )
        return Outgoing(self.results_topic, hdr.frame_id.encode("utf-8"), result.to_bytes(),
                        [("schema_version", str(result.schema_version).encode()),
                         ("product", hdr.product.encode())],
                        fv.verdict, rec.partition, rec.offset, capture_ts_ms=hdr.capture_ts_ms)


def inspect_images(images_rgb: np.ndarray, engine: Engine, profile: Profile, width: int | None = None,
                   height: int | None = None) -> list[FrameVerdict]:
    """The worker's verdicts for already-decoded model-size frames (offline reference)."""
    maps, scores = engine.run(images_rgb)
    w = width or profile.input_size
    h = height or profile.input_size
    return [judge(maps[k], float(scores[k]), profile, w, h, images_rgb[k]) for k in range(len(images_rgb))]
