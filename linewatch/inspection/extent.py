"""Learned region extent: the last step of the mask step, reshaping the detector's regions.

Why: PaDiM's regions at the calibrated threshold cover most defects only in part (mean per-image
IoU about 0.6 on the synthetic line); a categorizer that sees part of a scratch or half a hole
describes the wrong shape and colour. The validation images calibration already has come with
true masks, so a per-product pixel classifier (a small random forest, stored as JSON like the
categorizer) learns, in a band around the thresholded regions, which pixels belong to the
defect -- from the map's level and local peak ratio, the colour cue, the distance to the
thresholded region and the local lightness structure. It never adds a region the threshold did
not find: a component is kept only when it overlaps a thresholded region, and a thresholded
region the forest would erase keeps its thresholded shape, so the frame verdict is unchanged.

The same ``ExtentModel.apply`` runs offline (calibration, evaluation, categorizer training) and
in the worker (``linewatch.inspection.verdict.judge``), so the served masks are the calibrated
ones. The forest itself is a scikit-learn estimator stored beside the weights
(``linewatch.inspection.forest``); the profile keeps only its settings (``ExtentSettings``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from linewatch.inspection.mask import CUE_WINDOW, colour_cue

log = logging.getLogger(__name__)

EXTENT_FEATURES = ("map_rel", "map_local_peak", "map_frame_peak", "cue", "cue_blur", "inside", "signed_dist",
                   "grad_L", "L_minus_median")
STRIDE = 2  # the forest reads every STRIDE-th pixel each way (ExtentModel.apply)
ZONE_PX = 24  # the band (model-size pixels) around the thresholded regions where the forest decides
DIST_CAP = 32.0
PEAK_WINDOW = 33
MEDIAN_WINDOW = 31
# model-size pixels kept around the zone when the features are computed on a crop: more than any
# feature's window reaches (the colour cue 4 + 16 px, blurred by 12 more; the local peak 16 px)
CROP_MARGIN = 40


def _disk(r: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def extent_zone(mask: np.ndarray, zone: int = ZONE_PX) -> np.ndarray:
    """The pixels the forest decides: within ``zone`` pixels of a thresholded region."""
    return cv2.dilate(np.asarray(mask, np.uint8), _disk(int(zone))) > 0


def extent_features(raw_map: np.ndarray, image_rgb: np.ndarray, mask: np.ndarray, threshold: float,
                    peak: float | None = None) -> np.ndarray:
    """(H, W, len(EXTENT_FEATURES)) float32 pixel features (model size).

    The map enters relative to the product's threshold and to its own peaks, so one forest reads
    every frame of the product on the same scale; the colour cue is the worker's own
    (``linewatch.inspection.mask.colour_cue``: z-score against the normal material around the pixel).
    ``peak``: the whole frame's map maximum when ``raw_map`` is a crop of it (``apply_extent``).
    """
    a = np.asarray(raw_map, np.float32)
    top = float(a.max()) if peak is None else float(peak)
    img = np.ascontiguousarray(image_rgb)
    if img.shape[:2] != a.shape:
        img = cv2.resize(img, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
    m = (np.asarray(mask) > 0).astype(np.uint8)
    rel = a * np.float32(1.0 / max(float(threshold), 1e-12))
    local = cv2.dilate(a, cv2.getStructuringElement(cv2.MORPH_RECT, (PEAK_WINDOW, PEAK_WINDOW)),
                       borderType=cv2.BORDER_REPLICATE)
    cue = colour_cue(a, img, CUE_WINDOW, top)
    d_in = cv2.distanceTransform(m, cv2.DIST_L2, 3)
    d_out = cv2.distanceTransform(1 - m, cv2.DIST_L2, 3)
    L = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)[..., 0]
    Lf = L.astype(np.float32)
    grad = cv2.GaussianBlur(cv2.magnitude(cv2.Sobel(Lf, cv2.CV_32F, 1, 0), cv2.Sobel(Lf, cv2.CV_32F, 0, 1)), (0, 0), 2)
    med = cv2.medianBlur(L, MEDIAN_WINDOW).astype(np.float32)
    return np.stack([rel, a / (local + np.float32(1e-6)), a / np.float32(max(top, 1e-6)), cue,
                     cv2.GaussianBlur(cue, (0, 0), 3), m.astype(np.float32),
                     np.minimum(d_out, DIST_CAP) - np.minimum(d_in, DIST_CAP), grad, Lf - med], axis=-1)


class ExtentSettings(BaseModel):
    """What the profile records of a learned extent; the forest is the file ``forest_file`` in the
    version folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: tuple[str, ...] = EXTENT_FEATURES
    zone: int = Field(ZONE_PX, ge=1)
    cutoff: float = Field(0.4, gt=0.0, lt=1.0, description="P(defect) a pixel needs")
    stride: int = Field(STRIDE, ge=1)
    forest_file: str = "extent.skops"
    reason: str = ""


@dataclass
class ExtentModel:
    """A learned extent ready to apply: its settings and its fitted forest (``predict_proba``)."""

    settings: ExtentSettings
    forest: Any

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ExtentModel":
        """From the profile's ``extent`` dict: ``ExtentSettings`` fields plus the fitted forest
        under "classifier" (as ``calibration.extent_fit.fit_extent`` gives it, or as loaded)."""
        return cls(ExtentSettings(**{k: v for k, v in params.items() if k != "classifier"}), params["classifier"])

    def apply(self, raw_map: np.ndarray, image_rgb: np.ndarray, mask: np.ndarray, threshold: float,
              crop: bool = True) -> np.ndarray:
        """The served mask (bool, model size) from the thresholded ``mask``.

        Components of (P(defect) >= cutoff) inside the zone that overlap a thresholded region, plus
        every thresholded region the forest left without any such pixel (so no detection is lost).
        ``crop``: compute the pixel features on the zone's bounding box (plus ``CROP_MARGIN``) only:
        the same result for less CPU than the whole frame (False: the whole frame).
        """
        st = self.settings
        m = np.asarray(mask) > 0
        if not m.any():
            return m
        if tuple(st.features) != EXTENT_FEATURES:  # fitted by another linewatch version: its forest reads other columns
            if not getattr(self, "_warned", False):
                self._warned = True
                log.warning("region extent fitted on features %s, this version computes %s: serving the thresholded "
                            "regions; recalibrate the product", list(st.features), list(EXTENT_FEATURES))
            return m
        k = st.stride
        a = np.asarray(raw_map, np.float32)
        img = np.ascontiguousarray(image_rgb)
        if img.shape[:2] != a.shape:
            img = cv2.resize(img, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
        full = np.zeros(m.shape, bool)
        # the features on the zone's bounding box plus a margin only (every mask pixel lies inside:
        # the zone holds the mask); its origin on the stride grid, so the forest reads the same pixels
        zone = extent_zone(m, st.zone)
        box = _crop(zone, k) if crop else (slice(None), slice(None))
        m, zone = np.ascontiguousarray(m[box]), np.ascontiguousarray(zone[box])
        feats = extent_features(a[box], img[box], m, threshold, peak=float(a.max()))
        if k == 1:
            prob = np.zeros(m.shape, np.float32)
            prob[zone] = self._p_defect(feats[zone])
        else:  # every k-th pixel each way, then bilinear back: k^2 fewer forest walks, the map is smooth anyway
            sub = zone[::k, ::k]
            coarse = np.zeros(sub.shape, np.float32)
            coarse[sub] = self._p_defect(feats[::k, ::k][sub])
            prob = cv2.resize(coarse, (m.shape[1], m.shape[0]), interpolation=cv2.INTER_LINEAR)
        cand = (zone & (prob >= st.cutoff)).view(np.uint8)
        n, lab = cv2.connectedComponents(cand, connectivity=8)
        hit = np.zeros(n, bool)
        hit[np.unique(lab[m])] = True
        hit[0] = False
        out = hit[lab]
        # thresholded regions with no kept pixel keep their own shape
        n_m, lab_m = cv2.connectedComponents(m.view(np.uint8), connectivity=8)
        covered = np.zeros(n_m, bool)
        covered[np.unique(lab_m[out])] = True
        covered[0] = True
        full[box] = out | ~covered[lab_m]
        return full

    def _p_defect(self, rows: np.ndarray) -> np.ndarray:
        if not len(rows):
            return np.zeros(0, np.float32)
        return self.forest.predict_proba(rows.astype(np.float32, copy=False))[:, 1]


def _crop(zone: np.ndarray, k: int) -> tuple[slice, slice]:
    """The zone's bounding box grown by ``CROP_MARGIN``, its start and size multiples of ``k`` (the
    coarse grid and its interpolation back are then the whole frame's)."""
    x, y, w, h = cv2.boundingRect(zone.view(np.uint8))
    rows, cols = zone.shape
    y0, x0 = max(0, y - CROP_MARGIN) // k * k, max(0, x - CROP_MARGIN) // k * k
    y1 = min(rows, y0 + -(-(y + h + CROP_MARGIN - y0) // k) * k)
    x1 = min(cols, x0 + -(-(x + w + CROP_MARGIN - x0) // k) * k)
    return slice(y0, y1), slice(x0, x1)
