"""Fit the learned region extent (``linewatch.inspection.extent``) on a product's validation images.

Judged on images it was not fitted on: a k-fold split of the anomalous validation images gives
each image's IoU without and with the extent, and the extent is adopted by the project's one
rule (``calibration.adoption.clears``: paired gain > max(0.005, 2 SE)). The forest is then
refitted on every image.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import BaseModel
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import KFold
from tqdm.auto import tqdm

from calibration.adoption import clears
from calibration.metrics import iou_per_image
from linewatch.inspection.extent import (EXTENT_FEATURES, STRIDE, ZONE_PX, ExtentModel, ExtentSettings,
                                         extent_features, extent_zone)

log = logging.getLogger(__name__)

MIN_IMAGES = 4  # anomalous validation images with thresholded regions, at least (one per fold)
FOLDS = 4
ROWS_PER_IMAGE = 3000  # zone pixels sampled per image for training
FOREST = {"n_estimators": 30, "max_depth": 10, "min_samples_leaf": 20}
CUTOFF = 0.4  # P(defect) a pixel needs: below 0.5, whole defects over tight edges (docs/calibration.md)


class ExtentFit(BaseModel):
    """The parameters (``ExtentSettings`` fields plus the fitted forest under "classifier"; None
    when not adopted) and the reason, with the held-out figures."""

    model_config = {"arbitrary_types_allowed": True}

    params: dict[str, Any] | None = None
    reason: str
    iou_plain: float | None = None
    iou_extent: float | None = None


def _fit_forest(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    clf = RandomForestClassifier(**FOREST, n_jobs=1, random_state=seed).fit(x, y)
    if len(clf.classes_) < 2:
        raise ValueError("one class only")
    return {**ExtentSettings(features=EXTENT_FEATURES, zone=ZONE_PX, cutoff=CUTOFF, stride=STRIDE).model_dump(),
            "classifier": clf}


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
            model = ExtentModel.from_params(params)
            plain.append(iou_per_image(thresholded[i][None], gt[None])[0])
            extent.append(iou_per_image(model.apply(raw_maps[i], images[i], thresholded[i], threshold)[None],
                                        gt[None])[0])
    ok, gain = clears(np.asarray(extent) - np.asarray(plain))
    figures = (f"held-out validation IoU {np.mean(plain):.4f} -> {np.mean(extent):.4f} "
               f"({gain}, {FOLDS}-fold over {len(usable)} images)")
    out = ExtentFit(reason="", iou_plain=float(np.mean(plain)), iou_extent=float(np.mean(extent)))
    if not ok:
        out.reason = f"region extent off: {figures}, under the adoption bar"
        return out
    out.params = fit(usable)
    out.reason = f"region extent on: {figures}"
    out.params["reason"] = out.reason
    log.info("%s", out.reason)
    return out
