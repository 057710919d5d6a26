"""Pixel-threshold estimation: the five methods of the study, side by side.

Every method works from one pass over the validation pixels: each pixel is binned once on a
common grid of candidate thresholds (``np.searchsorted``), per-image histograms of positive
and negative pixels are counted with one ``np.bincount``, and reversed cumulative sums give
TP/FP/FN at *every* candidate threshold at once -- no Python loop over thresholds. When the
validation set has no more distinct scores than the grid allows, the grid is the set of
distinct scores and the result is exact.

Methods (a pixel is predicted anomalous when ``score >= threshold``):

1. ``iou``   -- maximise the mean per-image IoU over the anomalous validation images (default).
2. ``f1``    -- maximise pooled pixel F1 (Dice) on the precision-recall curve.
3. ``roc``   -- maximise Youden's J = TPR - FPR over all validation pixels.
4. ``normal_std``      -- mean + k * std of the pixel scores of the normal validation images.
5. ``normal_quantile`` -- a high quantile (99.9 %) of the normal pixel scores.

Pooled IoU and pooled F1 are monotone in each other (IoU = F1 / (2 - F1)), so method 1 uses
the per-image mean IoU -- the quantity a line engineer sees per frame -- which weighs a small
defect as much as a large one; method 2 is the pooled pixel F1. With no anomalous image only
methods 4-5 can run, and the report says so instead of silently falling back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from linewatch.inspection.mask import MaskStep
from pydantic import BaseModel, Field

MethodName = Literal["iou", "f1", "roc", "normal_std", "normal_quantile"]
METHODS: tuple[MethodName, ...] = ("iou", "f1", "roc", "normal_std", "normal_quantile")
SUPERVISED: tuple[MethodName, ...] = ("iou", "f1", "roc")
METHOD_TITLES: dict[str, str] = {
    "iou": "IoU curve",
    "f1": "F1/Dice curve",
    "roc": "ROC Youden J",
    "normal_std": "normal mean + k*std",
    "normal_quantile": "normal quantile",
}
MIN_ANOMALOUS = 3
DEFAULT_BINS = 4096


class MethodResult(BaseModel):
    """One threshold method's outcome on the validation set."""

    method: MethodName
    title: str
    available: bool
    threshold: float | None = None
    val_iou: float | None = Field(None, description="mean per-image IoU over anomalous val images")
    val_f1: float | None = Field(None, description="pooled pixel F1 over all val pixels")
    val_pooled_iou: float | None = None
    note: str = ""


class ThresholdReport(BaseModel):
    """All five methods, the one chosen, and why."""

    methods: list[MethodResult]
    chosen: MethodName
    threshold: float
    reason: str
    n_images: int
    n_anomalous: int
    n_normal: int
    n_pixels: int
    exact: bool = Field(description="True when every distinct score was a candidate threshold")
    k_std: float
    quantile: float
    notes: list[str] = []
    image_threshold: float | None = Field(None, description="image-score threshold for the frame verdict")
    image_threshold_reason: str = ""
    mask_step: MaskStep = Field(default_factory=MaskStep, description="how the maps become the thresholded map")
    extent: dict[str, Any] | None = Field(None, description=(
        "learned region extent (linewatch.inspection.extent: settings and forest); None = off"))
    extent_reason: str = ""
    n_image_labels_only: int = Field(0, description=(
        "defective validation images labelled by image only (no mask): in the image threshold, not the pixel methods"))
    target_escape_rate: float | None = Field(None, description="the image threshold was placed for this escape rate")
    normal_scores: dict[str, Any] | None = Field(None, description=(
        "the normal validation image scores as quantiles (linewatch.drift.reference): the reference "
        "the sink's drift alert compares recent normal frames with"))
    val_operating_curve: list[dict[str, Any]] | None = Field(None, description=(
        "escape / false-reject counts of the validation images at every image threshold (calibration.operating_curve)"))

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.method == name:
                return m
        raise KeyError(name)

    def thresholds(self) -> dict[str, float | None]:
        return {m.method: m.threshold for m in self.methods}

    def table(self) -> str:
        """A Markdown table a line engineer can read in a terminal."""
        lines = ["| method | threshold | val IoU (per image) | val F1 (pooled) | chosen | note |",
                 "|---|---|---|---|---|---|"]
        for m in self.methods:
            thr = "n/a" if m.threshold is None else f"{m.threshold:.5g}"
            iou = "n/a" if m.val_iou is None else f"{m.val_iou:.4f}"
            f1 = "n/a" if m.val_f1 is None else f"{m.val_f1:.4f}"
            mark = "<==" if m.method == self.chosen else ""
            lines.append(f"| {m.title} ({m.method}) | {thr} | {iou} | {f1} | {mark} | {m.note} |")
        return "\n".join(lines)


@dataclass
class PixelCurves:
    """TP/FP counts per image at every candidate threshold (ascending ``thresholds``).

    ``tp[i, k]`` = pixels of image i with mask 1 and score >= thresholds[k]; likewise ``fp``.
    """

    thresholds: np.ndarray  # (K,)
    tp: np.ndarray  # (N, K) int64
    fp: np.ndarray  # (N, K) int64
    pos: np.ndarray  # (N,) positives per image
    neg: np.ndarray  # (N,) negatives per image
    exact: bool

    @property
    def anomalous(self) -> np.ndarray:
        return self.pos > 0

    def pooled(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
        sel = slice(None) if rows is None else rows
        return self.tp[sel].sum(0), self.fp[sel].sum(0), int(self.pos[sel].sum()), int(self.neg[sel].sum())

    def pooled_iou(self, rows: np.ndarray | None = None) -> np.ndarray:
        tp, fp, p, _ = self.pooled(rows)
        return _safe_div(tp, fp + p)

    def pooled_f1(self, rows: np.ndarray | None = None) -> np.ndarray:
        tp, fp, p, _ = self.pooled(rows)
        return _safe_div(2 * tp, 2 * tp + fp + (p - tp))

    def per_image_iou(self) -> np.ndarray:
        """(N, K): IoU of each image at each threshold (NaN for images with an empty mask)."""
        union = self.fp + self.pos[:, None]
        iou = np.full(self.tp.shape, np.nan)
        rows = self.anomalous
        iou[rows] = self.tp[rows] / np.maximum(union[rows], 1)
        return iou

    def mean_image_iou(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(K,): mean per-image IoU over the anomalous images among ``rows``."""
        sel = self.anomalous if rows is None else (self.anomalous & rows)
        if not sel.any():
            return np.full(len(self.thresholds), np.nan)
        union = self.fp[sel] + self.pos[sel][:, None]
        return (self.tp[sel] / np.maximum(union, 1)).mean(0)

    def youden(self) -> np.ndarray:
        tp, fp, p, n = self.pooled()
        return _safe_div(tp, p) - _safe_div(fp, n)

    def index_of(self, threshold: float) -> int:
        """Index of the largest candidate <= threshold (prediction-equivalent on the grid)."""
        return int(np.clip(np.searchsorted(self.thresholds, threshold, side="right") - 1, 0,
                           len(self.thresholds) - 1))


def _safe_div(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _as_arrays(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise ValueError("need at least one (H, W) map")
    if not np.isfinite(maps).all():
        raise ValueError("anomaly maps contain NaN or inf")
    return maps, masks.astype(bool)


def candidate_grid(scores: np.ndarray, pos_scores: np.ndarray, bins: int = DEFAULT_BINS) -> tuple[np.ndarray, bool]:
    """Ascending candidate thresholds: all distinct scores if few, else a quantile grid.

    The quantile grid is half over all scores and half over the defect pixels' scores, so it
    is fine where the decision between defect and background is made.
    """
    flat = np.asarray(scores, dtype=np.float64).ravel()
    lo = flat.min()
    # cheap exactness check on a sample before the full unique()
    if flat.size <= 4 * bins or np.unique(flat[:: max(1, flat.size // (8 * bins))]).size <= bins:
        uniq = np.unique(flat)
        if uniq.size <= bins:
            return uniq, True
    q = np.linspace(0.0, 1.0, bins // 2)
    parts = [np.quantile(flat, q)]
    if pos_scores.size:
        parts.append(np.quantile(np.asarray(pos_scores, np.float64), q))
    grid = np.unique(np.concatenate(parts + [[lo]]))
    return grid, False


def pixel_curves(maps: np.ndarray, masks: np.ndarray, bins: int = DEFAULT_BINS,
                 grid: np.ndarray | None = None, extra: list[float] | tuple[float, ...] = ()) -> PixelCurves:
    """Per-image TP/FP at every candidate threshold, from one binning of all pixels.

    Counts are exact at every grid point; ``extra`` thresholds (e.g. the calibrated ones) are
    added to the grid so the figures at them are exact too.
    """
    maps, masks = _as_arrays(maps, masks)
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    mflat = masks.reshape(n, -1)
    if grid is None:
        grid, exact = candidate_grid(flat, flat[mflat], bins)
    else:
        grid, exact = np.asarray(grid, dtype=np.float64), False
    if len(extra):
        grid = np.unique(np.concatenate([grid, np.asarray(extra, dtype=np.float64)]))
    k = grid.size
    # bin b holds scores in [grid[b], grid[b+1]); scores below grid[0] never pass any threshold
    idx = np.searchsorted(grid, flat.astype(np.float64), side="right") - 1  # -1 .. k-1
    keep = idx >= 0
    img = np.broadcast_to(np.arange(n)[:, None], idx.shape)
    lin = img * k + idx
    pos_counts = np.bincount(lin[keep & mflat], minlength=n * k).reshape(n, k)
    neg_counts = np.bincount(lin[keep & ~mflat], minlength=n * k).reshape(n, k)
    tp = np.cumsum(pos_counts[:, ::-1], axis=1)[:, ::-1]
    fp = np.cumsum(neg_counts[:, ::-1], axis=1)[:, ::-1]
    pos = mflat.sum(1).astype(np.int64)
    neg = (~mflat).sum(1).astype(np.int64)
    return PixelCurves(grid, tp.astype(np.int64), fp.astype(np.int64), pos, neg, exact)


def _argmax_last(values: np.ndarray) -> int:
    """Index of the max; among ties, the highest threshold (fewest false alarms)."""
    v = np.nan_to_num(values, nan=-np.inf)
    return int(len(v) - 1 - np.argmax(v[::-1]))


def estimate_thresholds(maps: np.ndarray, masks: np.ndarray, *, prefer: MethodName = "iou",
                        k_std: float = 3.0, quantile: float = 0.999,
                        bins: int = DEFAULT_BINS, curves: PixelCurves | None = None) -> ThresholdReport:
    """All five methods on validation maps (N, H, W) and binary masks (N, H, W).

    Normal images are those whose mask is empty. ``prefer`` is the method to choose; when it
    needs anomalies and there are none, the report says methods 1-3 are impossible and the
    choice falls to ``normal_quantile`` with that reason spelled out (callers that must refuse
    instead -- the CLI -- check ``report.n_anomalous``).
    """
    if prefer not in METHODS:
        raise ValueError(f"unknown threshold method {prefer!r} (known: {', '.join(METHODS)})")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    maps, masks = _as_arrays(maps, masks)
    anomalous = masks.reshape(masks.shape[0], -1).any(1)
    n_anom = int(anomalous.sum())
    n_norm = int((~anomalous).sum())
    notes: list[str] = []
    results: dict[str, MethodResult] = {}

    # -- 4-5: statistics of normal pixels (first, so their thresholds join the grid) ----------
    if n_norm:
        normal_px = maps[~anomalous].ravel()
        source = f"{n_norm} normal image(s)"
    else:
        normal_px = maps[~masks]
        source = "defect-free pixels of the anomalous images (no normal validation image)"
        notes.append("no normal validation images: methods 4-5 use the defect-free pixels of anomalous images")
    normal_thr: dict[str, tuple[float, str]] = {}
    if normal_px.size:
        mu, sd = float(normal_px.mean(dtype=np.float64)), float(normal_px.std(dtype=np.float64))
        normal_thr["normal_std"] = (mu + k_std * sd, f"mean {mu:.4g} + {k_std:g} x std {sd:.4g} over {source}")
        normal_thr["normal_quantile"] = (float(np.quantile(normal_px, quantile)),
                                         f"{quantile * 100:g} % quantile over {source}")
    if curves is None:
        curves = pixel_curves(maps, masks, bins=bins, extra=[t for t, _ in normal_thr.values()])

    mean_iou = curves.mean_image_iou() if n_anom else None
    f1 = curves.pooled_f1() if n_anom else None
    piou = curves.pooled_iou() if n_anom else None

    def at(t: float) -> dict[str, float | None]:
        if not n_anom:
            return {"val_iou": None, "val_f1": None, "val_pooled_iou": None}
        i = curves.index_of(t)
        return {"val_iou": float(mean_iou[i]), "val_f1": float(f1[i]), "val_pooled_iou": float(piou[i])}

    # -- 1-3: need anomalous images with masks -------------------------------------------------
    if n_anom:
        j = curves.youden()
        for name, curve in (("iou", mean_iou), ("f1", f1), ("roc", j)):
            i = _argmax_last(curve)
            t = float(curves.thresholds[i])
            note = "Youden J = %.4f" % float(j[i]) if name == "roc" else ""
            results[name] = MethodResult(method=name, title=METHOD_TITLES[name], available=True,
                                         threshold=t, note=note, **at(t))
        if n_anom < MIN_ANOMALOUS:
            notes.append(f"only {n_anom} anomalous validation image(s); methods iou/f1/roc are "
                         f"unreliable below {MIN_ANOMALOUS}")
    else:
        why = "impossible: the validation set has no anomalous image (no defect pixels in any mask)"
        for name in SUPERVISED:
            results[name] = MethodResult(method=name, title=METHOD_TITLES[name], available=False, note=why)
        notes.append("no anomalous validation images: only normal_std and normal_quantile were computed; "
                     "methods iou, f1 and roc are impossible")
    for name in ("normal_std", "normal_quantile"):
        if name in normal_thr:
            t, note = normal_thr[name]
            results[name] = MethodResult(method=name, title=METHOD_TITLES[name], available=True,
                                         threshold=t, note=note, **at(t))
        else:  # every pixel is a defect pixel: degenerate, but say so
            results[name] = MethodResult(method=name, title=METHOD_TITLES[name], available=False,
                                         note="impossible: no normal pixels in the validation set")

    # -- choice ---------------------------------------------------------------------------------
    chosen: MethodName = prefer
    if results[prefer].available:
        if prefer == "iou":
            reason = ("IoU curve (the study's recommendation): it maximised the mean per-image IoU "
                      f"on {n_anom} anomalous validation image(s)")
        else:
            reason = f"{METHOD_TITLES[prefer]} requested"
    else:
        fallback = "normal_quantile" if results["normal_quantile"].available else "iou"
        if not results[fallback].available:
            raise ValueError("no threshold method is possible on this validation set")
        reason = (f"{METHOD_TITLES[prefer]} was requested but is impossible ({results[prefer].note}); "
                  f"chose {METHOD_TITLES[fallback]} instead")
        notes.append(reason)
        chosen = fallback
    ordered = [results[m] for m in METHODS]
    return ThresholdReport(methods=ordered, chosen=chosen, threshold=float(results[chosen].threshold),
                           reason=reason, n_images=int(maps.shape[0]), n_anomalous=n_anom,
                           n_normal=n_norm, n_pixels=int(maps.size), exact=curves.exact,
                           k_std=k_std, quantile=quantile, notes=notes)


def estimate_image_threshold(scores: np.ndarray, anomalous: np.ndarray) -> tuple[float | None, str]:
    """Image-score threshold for the frame verdict, from the same validation images.

    The pixel threshold segments; it is not a good frame-level decision on textures, where a
    few normal pixels always cross it. With both normal and anomalous validation images we
    take the point of the image ROC that maximises Youden's J, placed halfway to the highest
    normal score below it for margin. Without anomalies: None (the verdict then needs a
    surviving region above the pixel threshold).
    """
    from sklearn.metrics import roc_curve

    scores = np.asarray(scores, dtype=np.float64).ravel()
    anomalous = np.asarray(anomalous, dtype=bool).ravel()
    if anomalous.all() or not anomalous.any():
        return None, "no image threshold: the validation set needs both normal and anomalous images"
    fpr, tpr, thr = roc_curve(anomalous, scores)
    finite = np.isfinite(thr)
    j = np.where(finite, tpr - fpr, -np.inf)
    best = int(np.argmax(j))
    t = float(thr[best])
    below = scores[~anomalous & (scores < t)]
    if below.size:
        t = 0.5 * (t + float(below.max()))
    return t, (f"image ROC, Youden J = {tpr[best] - fpr[best]:.3f} (TPR {tpr[best]:.3f}, FPR {fpr[best]:.3f}) "
               f"on {int(anomalous.sum())} anomalous + {int((~anomalous).sum())} normal validation images")
