"""The mask step: how an anomaly map becomes the map that is thresholded into regions.

One ``MaskStep`` (owned by the profile, chosen by calibration on the validation images) and one
``MaskStep.apply(map, image)``, called by calibration, evaluation, reports and the worker alike,
so the served masks are the calibrated ones. Its stages, each off unless calibration switched it
on for the product (docs/calibration.md says how, docs/results/ablation-synthetic.md what each
one earns): the colour cue (``cue_map``), then the peak-relative refinement (``refine_map``).
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

CUE_WINDOW = 33  # odd side (model-size pixels) of the box of normal material the colour cue compares with
CUE_SIGMA = 3.0  # Gaussian blur (model-size pixels) of the colour cue's damping factor


class MaskStep(BaseModel):
    """The mask step's settings, each default written here only. All stages off = the raw map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cue_scale: float = Field(0.0, ge=0.0, description=(
        "colour cue fused with the map before thresholding: pixels that look like the normal material "
        "around them are damped (z-score scale; 0 = off)"))
    cue_floor: float = Field(0.5, ge=0.0, le=1.0, description="least weight the colour cue leaves a pixel")
    refine_fraction: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "peak-relative refinement: a map pixel counts only if it is >= this fraction of the map's maximum "
        "in its refine_window neighbourhood (0 = off)"))
    refine_window: int = Field(33, ge=3, le=255, description="odd side (model-size pixels) of the refinement window")
    reason: str = Field("mask step off", description="why calibration chose these settings")

    @property
    def needs_image(self) -> bool:
        """Whether a stage reads the frame (the colour cue does)."""
        return self.cue_scale > 0

    @property
    def is_off(self) -> bool:
        return not self.needs_image and self.refine_fraction <= 0

    def apply(self, amap: np.ndarray, image_rgb: np.ndarray | None) -> np.ndarray:
        """The map that is thresholded: ``cue_map`` (when on and the frame is given), then
        ``refine_map``. The image score stays the raw map's maximum."""
        if image_rgb is not None:
            amap = cue_map(amap, image_rgb, self.cue_scale, self.cue_floor)
        return refine_map(amap, self.refine_fraction, self.refine_window)

    def apply_all(self, maps: np.ndarray, images: np.ndarray | None) -> np.ndarray:
        """``apply`` over a stack of maps (and their frames); the maps themselves when off."""
        if self.refine_fraction <= 0 and (not self.needs_image or images is None):
            return maps
        return np.stack([self.apply(m, None if images is None else images[i]) for i, m in enumerate(maps)])


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


def cue_map(amap: np.ndarray, image_rgb: np.ndarray, scale: float, floor: float, window: int = CUE_WINDOW,
            sigma: float = CUE_SIGMA) -> np.ndarray:
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
