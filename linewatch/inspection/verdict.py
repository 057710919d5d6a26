"""Regions and the verdict: threshold the mask step's map, label its regions, apply the learned
extent, decide ok/defect. The same function offline (calibration, evaluation, reports) and in
the worker, so a frame gets one verdict wherever it is judged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

from linewatch.messages import Region

if TYPE_CHECKING:
    from linewatch.inspection.extent import ExtentModel
    from linewatch.profiles import Profile

log = logging.getLogger(__name__)


@dataclass(slots=True)
class FrameVerdict:
    """What post-processing found in one frame (mask and labels are view-size, region boxes frame
    pixels)."""

    image_score: float
    verdict: Literal["ok", "defect"]
    regions: list[Region]
    defect_area_frac: float
    mask: np.ndarray | None = None  # uint8 0/255 at view size, kept regions only
    labels: np.ndarray | None = None  # int32 component labels at view size (kept ones > 0)


def find_regions(amap: np.ndarray, threshold: float, min_region_px: int, width: int, height: int,
                 origin: tuple[int, int] = (0, 0)) -> tuple[list[Region], np.ndarray, np.ndarray]:
    """Connected regions of ``amap >= threshold`` (8-connectivity) with at least
    ``min_region_px`` map pixels. The map covers the ``width`` x ``height`` frame rectangle at
    ``origin`` (the ROI; the whole frame by default). Returns (regions with boxes/areas in
    original-frame pixels, mask uint8 0/255 of the kept regions, labels int32 renumbered 1..k
    for the kept regions)."""
    return regions_of_mask(amap >= threshold, amap, min_region_px, width, height, origin)


def regions_of_mask(binary: np.ndarray, amap: np.ndarray, min_region_px: int, width: int, height: int,
                    origin: tuple[int, int] = (0, 0)) -> tuple[list[Region], np.ndarray, np.ndarray]:
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
            bbox=(origin[0] + x0, origin[1] + y0, max(1, x1 - x0), max(1, y1 - y0)),
            peak_score=float(vals.max()),
            mean_score=float(vals.mean(dtype=np.float64)),
        ))
    return regions, mask, kept_labels


def judge(amap: np.ndarray, score: float, profile: Profile, width: int, height: int,
          image: np.ndarray | None = None, extent: ExtentModel | None = None,
          origin: tuple[int, int] = (0, 0)) -> FrameVerdict:
    """Threshold one map and decide the verdict.

    Rule (the same offline and in the stream): a frame is a defect when its image score
    reaches the image threshold and, unless an explicit ``image_threshold`` is set, at least
    one region of ``min_region_px`` map pixels survives. With an explicit image threshold the
    image score alone decides (regions are still reported when there are any).
    Regions come from the profile's ``MaskStep`` (its colour cue needs ``image``, the
    view-size RGB frame) and then, when given, the learned region ``extent`` (reshapes the
    regions, never adds one). The image score stays the raw map's max. ``width`` x ``height``
    at ``origin`` is the frame rectangle the map covers (the ROI), so boxes are frame pixels.
    """
    thr = float(profile.threshold)
    img_thr = float(profile.effective_image_threshold)
    score = float(score)
    step = profile.mask_step
    if step.needs_image and image is None:
        _warn_once(f"mask:{profile.product}:{profile.version}", "profile %s v%s asks for the colour cue "
                   "but no frame was given: regions from the plain map", profile.product, profile.version)
    seg = None
    top = score  # the raw map's max; the cue may lower it, refinement keeps it
    if step.needs_image and image is not None:
        seg = step.apply(amap, image)
        top = float(seg.max())
    if top < thr and score < img_thr:  # nothing reaches either threshold: nothing to segment
        return FrameVerdict(score, "ok", [], 0.0)
    if top >= thr:
        if seg is None:
            seg = step.apply(amap, None)
        regions, mask, labels = find_regions(seg, thr, profile.min_region_px, width, height, origin)
        if extent is not None and regions and image is not None:
            served = extent.apply(amap, image, seg >= thr, thr)
            regions, mask, labels = regions_of_mask(served, seg, profile.min_region_px, width, height, origin)
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


_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def inspect_images(images_rgb: np.ndarray, maps: np.ndarray, scores: np.ndarray, profile: Profile,
                   extent: ExtentModel | None = None) -> list[FrameVerdict]:
    """The worker's verdicts for already-decoded views and their (stitched) maps: the offline
    reference the stream is compared with. Boxes are frame pixels of ``Profile.frame_box``."""
    box = profile.frame_box
    return [judge(maps[k], float(scores[k]), profile, box.w, box.h, images_rgb[k], extent, (box.x, box.y))
            for k in range(len(images_rgb))]
