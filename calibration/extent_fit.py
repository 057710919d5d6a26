"""Fit the learned region extent (``workers.extent``) on a product's validation images.

Judged on images it was not fitted on: a k-fold split of the anomalous validation images gives
each image's IoU without and with the extent. It is adopted unless it costs more than
``MAX_LOSS`` held-out IoU. Why not demand a gain, as the mask step's other settings do: the
extent's second job is whole defects for the categorizer, and the categorizer learns from
every product's regions at once, so regions must be cut the same way on every product. On the
synthetic line, extents on two products and not on the other two (a gain rule's outcome on
seed 0) cut within-product macro-F1 from 0.806 to 0.787, while extents on all four raised it
to 0.81. The forest is then refitted on every image.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import BaseModel
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import KFold
from tqdm.auto import tqdm

from calibration.categorizer_fit import export_classifier
from workers.extent import EXTENT_FEATURES, STRIDE, ZONE_PX, apply_extent, extent_features, extent_zone

log = logging.getLogger(__name__)

MAX_LOSS = 0.005  # held-out mean validation IoU the extent may cost (calibration.fit.REFINE_MIN_GAIN)
MIN_IMAGES = 4  # anomalous validation images with thresholded regions, at least (one per fold)
FOLDS = 4
ROWS_PER_IMAGE = 3000  # zone pixels sampled per image for training
FOREST = {"n_estimators": 30, "max_depth": 10, "min_samples_leaf": 20}
CUTOFF = 0.4  # P(defect) a pixel needs: below 0.5, whole defects over tight edges (seed 0, held-out IoU:
# 0.4 / 0.5 / 0.6 gave mean gains +0.016 / +0.014 / -0.003 over the four products)


class ExtentFit(BaseModel):
    """The stored parameters (None when not adopted) and the reason, with the held-out figures."""

    params: dict[str, Any] | None = None
    reason: str
    iou_plain: float | None = None
    iou_extent: float | None = None


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


def _fit_forest(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    clf = RandomForestClassifier(**FOREST, n_jobs=1, random_state=seed).fit(x, y)
    if len(clf.classes_) < 2:
        raise ValueError("one class only")
    return {"kind": "extent-forest", "features": list(EXTENT_FEATURES), "zone": ZONE_PX, "cutoff": CUTOFF,
            "stride": STRIDE, "classifier": export_classifier(clf, "forest")}


def fit_extent(raw_maps: np.ndarray, served_maps: np.ndarray, images: np.ndarray, masks: np.ndarray,
               threshold: float, *, seed: int = 0, progress: bool = False) -> ExtentFit:
    """``raw_maps``: the model's maps; ``served_maps``: after the mask step (thresholded at
    ``threshold`` they give the regions to reshape); ``masks``: the true masks."""
    anom = [i for i in range(len(masks)) if np.asarray(masks[i]).any()]
    thresholded = {i: served_maps[i] >= threshold for i in anom}
    usable = [i for i in anom if thresholded[i].any()]
    if len(usable) < max(MIN_IMAGES, FOLDS):
        return ExtentFit(reason=f"region extent off: {len(usable)} anomalous validation image(s) with regions, "
                                f"need {max(MIN_IMAGES, FOLDS)}")
    rng = np.random.default_rng(seed)
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in tqdm(usable, desc="region extent: pixel features", unit="img", disable=not progress, leave=False):
        f = extent_features(raw_maps[i], images[i], thresholded[i], threshold)
        idx = np.flatnonzero(extent_zone(thresholded[i]).ravel())
        if len(idx) > ROWS_PER_IMAGE:
            idx = rng.choice(idx, ROWS_PER_IMAGE, replace=False)
        rows[i] = (f.reshape(-1, f.shape[-1])[idx].astype(np.float32), np.asarray(masks[i]).ravel()[idx] > 0)

    def fit(ids: list[int]) -> dict[str, Any]:
        return _fit_forest(np.concatenate([rows[i][0] for i in ids]), np.concatenate([rows[i][1] for i in ids]), seed)

    plain, extent = [], []
    order = np.asarray(usable)
    for train_idx, held_idx in tqdm(KFold(FOLDS, shuffle=True, random_state=seed).split(order), total=FOLDS,
                                    desc="region extent: held-out folds", unit="fold", disable=not progress,
                                    leave=False):
        try:
            params = fit(order[train_idx].tolist())
        except ValueError:
            return ExtentFit(reason="region extent off: a fold's training pixels hold one class only")
        for i in order[held_idx].tolist():
            gt = np.asarray(masks[i]) > 0
            plain.append(_iou(thresholded[i], gt))
            extent.append(_iou(apply_extent(params, raw_maps[i], images[i], thresholded[i], threshold), gt))
    gain = np.asarray(extent) - np.asarray(plain)
    se = float(gain.std(ddof=1) / np.sqrt(len(gain)))
    figures = (f"held-out validation IoU {np.mean(plain):.4f} -> {np.mean(extent):.4f} "
               f"(gain {gain.mean():+.4f} +- {se:.4f}, {FOLDS}-fold over {len(usable)} images)")
    out = ExtentFit(reason="", iou_plain=float(np.mean(plain)), iou_extent=float(np.mean(extent)))
    if float(gain.mean()) < -MAX_LOSS:
        out.reason = f"region extent off: {figures}, it costs more than {MAX_LOSS}"
        return out
    out.params = fit(usable)
    out.reason = f"region extent on: {figures}"
    out.params["reason"] = out.reason
    log.info("%s", out.reason)
    return out
