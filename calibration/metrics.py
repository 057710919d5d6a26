"""Localization metrics: threshold-free (pixel AUROC, AUPRO, image AUROC) and at a threshold
(IoU, Dice/F1, precision, recall; pooled and per image), plus threshold regret.

Conventions: maps (N, H, W) float, higher = more anomalous; masks (N, H, W) binary; a pixel
is predicted anomalous when ``score >= threshold``. An image is anomalous when its mask has
any defect pixel. "Per image" IoU/Dice are means over the anomalous images (IoU is undefined
on an empty mask); normal images enter the pooled figures and the false-alarm rate.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from calibration.thresholds import DEFAULT_BINS, PixelCurves, _as_arrays, _safe_div, candidate_grid, pixel_curves

_EIGHT = np.ones((3, 3), dtype=bool)


# -- threshold-free --------------------------------------------------------------------------
def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """Pixel-level ROC AUC over every pixel (scikit-learn); None when only one class exists."""
    maps, masks = _as_arrays(maps, masks)
    y = masks.ravel()
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, maps.ravel()))


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Image-level ROC AUC of image scores vs anomalous/normal labels; None with one class."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of every mask with globally unique ids (0 = none)."""
    masks = np.asarray(masks).astype(bool)
    out = np.zeros(masks.shape, dtype=np.int32)
    total = 0
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=_EIGHT)
        if n:
            out[i] = np.where(lab > 0, lab + total, 0)
            total += n
    return out, total


def pro_curve(maps: np.ndarray, masks: np.ndarray, bins: int = DEFAULT_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every candidate threshold, FPR ascending, starting at (0, 0).

    PRO = mean over all defect regions (connected components) of the fraction of the region
    predicted anomalous; FPR over all defect-free pixels. One binning of the pixels, then
    cumulative counts per region.
    """
    maps, masks = _as_arrays(maps, masks)
    regions, n_regions = label_regions(masks)
    if n_regions == 0 or masks.all():
        raise ValueError("PRO needs at least one defect region and one normal pixel")
    grid, _ = candidate_grid(maps, maps[masks], bins)
    k = grid.size
    idx = np.searchsorted(grid, maps.astype(np.float64).ravel(), side="right") - 1  # all >= 0
    reg = regions.ravel()
    neg = np.bincount(idx[reg == 0], minlength=k)
    fp = np.cumsum(neg[::-1])[::-1]
    fpr = fp / max(int((reg == 0).sum()), 1)
    inside = reg > 0
    counts = np.bincount((reg[inside] - 1).astype(np.int64) * k + idx[inside],
                         minlength=n_regions * k).reshape(n_regions, k)
    covered = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    sizes = covered[:, 0]
    pro = (covered / sizes[:, None]).mean(0)
    # thresholds ascending -> fpr descending; flip and prepend "threshold above every score"
    return np.concatenate([[0.0], fpr[::-1]]), np.concatenate([[0.0], pro[::-1]])


def area_under(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max], interpolating at x_max (x ascending)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if not keep.all():
        j = int(np.argmax(~keep))  # first point beyond x_max
        x0, y0, x1, y1 = x[j - 1], y[j - 1], x[j], y[j]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.trapezoid(ys, xs))


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, bins: int = DEFAULT_BINS) -> float | None:
    """Area under the PRO curve up to ``max_fpr``, normalised to [0, 1]; None without regions."""
    try:
        fpr, pro = pro_curve(maps, masks, bins)
    except ValueError:
        return None
    return area_under(fpr, pro, max_fpr) / max_fpr


# -- at a threshold --------------------------------------------------------------------------
class SegmentationMetrics(BaseModel):
    """Threshold-dependent figures for one group of images."""

    threshold: float
    n_images: int
    n_anomalous: int
    iou: float | None  # mean per-image IoU over anomalous images
    dice: float | None  # mean per-image Dice over anomalous images
    pooled_iou: float | None
    pooled_dice: float | None
    precision: float | None
    recall: float | None
    normal_false_alarm_rate: float | None  # share of normal images with any predicted pixel


def image_counts(maps: np.ndarray, masks: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Per-image TP/FP/FN/TN pixel counts at a threshold (vectorised over images)."""
    maps, masks = _as_arrays(maps, masks)
    pred = maps >= threshold
    tp = (pred & masks).sum((1, 2))
    fp = (pred & ~masks).sum((1, 2))
    fn = (~pred & masks).sum((1, 2))
    tn = (~pred & ~masks).sum((1, 2))
    return {"tp": tp.astype(np.int64), "fp": fp.astype(np.int64), "fn": fn.astype(np.int64),
            "tn": tn.astype(np.int64)}


def summarize_counts(counts: dict[str, np.ndarray], threshold: float,
                     rows: np.ndarray | None = None) -> SegmentationMetrics:
    """Pooled and per-image figures from per-image counts, restricted to ``rows``."""
    c = {k: (v if rows is None else v[rows]) for k, v in counts.items()}
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    anomalous = (tp + fn) > 0
    n_anom = int(anomalous.sum())
    TP, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b > 0 else None

    iou = dice = None
    if n_anom:
        iou = float(_safe_div(tp[anomalous], (tp + fp + fn)[anomalous]).mean())
        dice = float(_safe_div(2 * tp[anomalous], (2 * tp + fp + fn)[anomalous]).mean())
    normal = ~anomalous
    far = float((fp[normal] > 0).mean()) if normal.any() else None
    return SegmentationMetrics(
        threshold=float(threshold), n_images=int(len(tp)), n_anomalous=n_anom, iou=iou, dice=dice,
        pooled_iou=ratio(TP, TP + FP + FN) if n_anom else None,
        pooled_dice=ratio(2 * TP, 2 * TP + FP + FN) if n_anom else None,
        precision=ratio(TP, TP + FP), recall=ratio(TP, TP + FN), normal_false_alarm_rate=far)


def segmentation_metrics(maps: np.ndarray, masks: np.ndarray, threshold: float) -> SegmentationMetrics:
    """IoU, Dice/F1, precision, recall at ``threshold``, pooled and per image."""
    return summarize_counts(image_counts(maps, masks, threshold), threshold)


# -- regret ----------------------------------------------------------------------------------
class Regret(BaseModel):
    threshold: float
    iou_at_threshold: float
    oracle_threshold: float
    oracle_iou: float
    regret: float


def threshold_regret(maps: np.ndarray | None = None, masks: np.ndarray | None = None, *,
                     threshold: float, curves: PixelCurves | None = None,
                     rows: np.ndarray | None = None) -> Regret:
    """Oracle mean per-image IoU on this (test) set minus the IoU at the calibrated threshold.

    The calibrated threshold is added to the candidate grid, so both numbers are exact for it.
    """
    if curves is None:
        if maps is None or masks is None:
            raise ValueError("need maps and masks, or curves")
        maps, masks = _as_arrays(maps, masks)
        grid, _ = candidate_grid(maps, maps[masks])
        curves = pixel_curves(maps, masks, grid=np.unique(np.append(grid, threshold)))
    curve = curves.mean_image_iou(rows)
    if np.isnan(curve).all():
        raise ValueError("regret needs anomalous images")
    best = int(np.nanargmax(curve))
    i = curves.index_of(threshold)  # exact when the threshold is on the grid (added above)
    at = float(curve[i])
    oracle = float(curve[best])
    return Regret(threshold=float(threshold), iou_at_threshold=at,
                  oracle_threshold=float(curves.thresholds[best]), oracle_iou=oracle,
                  regret=max(0.0, oracle - at))


def iou_per_image(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N,) IoU of each predicted mask with its true mask (1.0 where both are empty)."""
    p = np.asarray(pred, bool).reshape(len(pred), -1)
    g = np.asarray(gt, bool).reshape(len(gt), -1)
    union = (p | g).sum(1)
    return np.where(union > 0, (p & g).sum(1) / np.maximum(union, 1), 1.0)
