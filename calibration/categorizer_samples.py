"""Categorizer samples: a product's validation (and other products') images as the categorizer
sees them at inference -- regions from the served mask (mask step, threshold, learned extent),
map features from the raw map -- and the categorizer's fit and evaluation on them; also the work
folder's categorizer file."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.data import LabelledSet, load_product_splits, load_train
from calibration.thresholds import estimate_thresholds
from linewatch.errors import UserError
from linewatch.inspection.categorize import normal_appearance
from linewatch.inspection.extent import ExtentModel
from linewatch.inspection.forest import externalise, internalise
from linewatch.profiles import ProfileError, Registry

log = logging.getLogger(__name__)

CATEGORIZER_FILE = "categorizer.json"


def served_mask(maps: np.ndarray, i: int, threshold: float, raw_maps: np.ndarray | None,
                images: np.ndarray, extent: dict[str, Any] | None) -> np.ndarray:
    """Image ``i``'s mask as the worker serves it: the (refined) map thresholded, then the learned
    region extent when the profile has one (``linewatch.inspection.verdict.judge`` does the same)."""
    mask = maps[i] >= threshold
    if not extent or not mask.any():
        return mask
    return ExtentModel.from_params(extent).apply(maps[i] if raw_maps is None else raw_maps[i], images[i], mask, threshold)


def save_categorizer(work_dir: Path, params: dict[str, Any] | None) -> Path:
    """A work folder's categorizer: JSON, its classifiers beside it (skops)."""
    p = Path(work_dir) / CATEGORIZER_FILE
    p.write_text(json.dumps(externalise(params, Path(work_dir), "categorizer"), indent=2))
    return p


def read_categorizer(work_dir: Path) -> dict[str, Any] | None:
    p = Path(work_dir) / CATEGORIZER_FILE
    return internalise(json.loads(p.read_text()), Path(work_dir)) if p.is_file() else None


def extent_iou(maps: np.ndarray, served: np.ndarray, data: LabelledSet, threshold: float,
               extent: dict[str, Any]) -> dict[str, Any]:
    """Mean per-image IoU of the anomalous images at the chosen threshold, without and with the
    learned region extent (``served``: the served masks, ``served_mask``)."""
    from calibration.metrics import segmentation_metrics

    plain = segmentation_metrics(maps, data.masks, threshold)
    out = segmentation_metrics(served.astype(np.float32), data.masks, 0.5)
    return {"n_anomalous": plain.n_anomalous, "iou_thresholded": plain.iou, "iou_served": out.iou,
            "reason": extent.get("reason", "")}


def _category_samples(data: LabelledSet, maps: np.ndarray, threshold: float, product: str,
                      raw_maps: np.ndarray | None = None, normal: dict[str, Any] | None = None,
                      extent: dict[str, Any] | None = None, served: np.ndarray | None = None):
    """Labelled anomalous images as the categorizer sees them at inference: regions from the
    (refined) thresholded map and the learned extent (``served_mask``; ``served``: those masks,
    already made by the caller), map features from the RAW map -- exactly what the worker passes
    to categorize_frame -- and the true mask kept to tell which regions are real. A defect known
    by its image label only has no true mask: every region of its frame carries the frame's
    category (the frame-level labels the categorizer can still learn from)."""
    from calibration.categorizer_fit import CategorySample
    from linewatch.messages import CATEGORIES

    feats = maps if raw_maps is None else raw_maps
    return [CategorySample(image=data.images[i], category=c,
                           mask=served[i] if served is not None else served_mask(maps, i, threshold, raw_maps,
                                                                                  data.images, extent),
                           amap=feats[i],
                           threshold=threshold, background=data.background[i], product=product,
                           gt_mask=data.masks[i] if data.pixel_rows[i] else None, normal=normal)
            for i, c in enumerate(data.categories) if c in CATEGORIES]


def pooled_category_samples(dataset_root: Path, products: list[str], input_size: int,
                            registry_dir: Path | None = None, val_fraction: float = 1 / 3, seed: int = 0) -> list:
    """Labelled validation images of *other* products for a categorizer (the categories are
    product-agnostic, so every product's labels help), their regions as each product's own
    worker would serve them: from its published profile in ``registry_dir`` (model, refinement,
    threshold) when there is one at ``input_size``; otherwise from the labelled masks, with no
    map features (said in the log). Each carries its product's normal appearance.
    """
    out = []
    reg = Registry(registry_dir) if registry_dir is not None else None
    from linewatch.inspection.geometry import TiledModel

    for q in products:
        prof = model = None
        if reg is not None:
            try:
                prof, model = reg.load(q)
            except (UserError, ProfileError, FileNotFoundError) as exc:
                log.info("categorizer pool: no profile for %s (%s)", q, exc)
        served = prof is not None and model is not None and model.input_size == input_size
        size = prof.framing if served else input_size  # its own profile's view (ROI, tiles) when served
        val, _ = load_product_splits(Path(dataset_root), q, size, val_fraction, seed, progress=False)
        if not len(val) or not any(c != "good" for c in val.categories):
            log.info("categorizer pool: %s has no labelled anomalous validation images", q)
            continue
        normal = normal_appearance(load_train(Path(dataset_root), q, size, False))
        if served:
            raw, _ = TiledModel(model, prof.framing).predict(val.images)
            maps = prof.mask_step.apply_all(raw, val.images)
            out += _category_samples(val, maps, prof.threshold, q, raw, normal, prof.extent)
            out += raw_view_samples(val, raw, maps, q, normal)  # as fit_categorizer trains on its own product
        else:
            log.info("categorizer pool: %s regions from its labelled masks (no profile at size %d)", q, input_size)
            smp = _category_samples(val, val.masks.astype(np.float32), 0.5, q, None, normal)
            for x in smp:
                x.amap, x.threshold = None, None
            out += smp
    return out


def raw_view_threshold(raw_maps: np.ndarray, masks: np.ndarray) -> float | None:
    """The IoU-curve threshold of the *unrefined* validation maps (None when it cannot be had)."""
    m = estimate_thresholds(raw_maps, masks, prefer="iou").method("iou")
    return float(m.threshold) if m.available and m.threshold is not None else None


def raw_view_samples(val: LabelledSet, raw_maps: np.ndarray, served_maps: np.ndarray, product: str,
                     normal: dict[str, Any] | None = None) -> list:
    """The validation images once more, with the regions of the unrefined map thresholded at its
    own IoU-curve threshold: a second, differently cut view of every labelled defect for
    training only (the worker still serves the refined regions). Why: more and more varied
    regions per label; on the synthetic line within-product macro-F1 +0.04 (three seeds),
    leave-one-product-out unchanged. Empty when the served maps are the raw ones (no refinement:
    the view would be the same regions again)."""
    if served_maps is raw_maps or np.array_equal(served_maps, raw_maps):
        return []
    k = val.pixel_rows
    if not (val.anomalous & k).any():
        return []
    thr = raw_view_threshold(raw_maps[k], val.masks[k])
    return [] if thr is None else _category_samples(val, raw_maps, thr, product, raw_maps, normal)


def fit_categorizer(val: LabelledSet, val_maps: np.ndarray, threshold: float, product: str,
                    raw_maps: np.ndarray | None = None, normal: dict[str, Any] | None = None,
                    pooled: list | None = None, extent: dict[str, Any] | None = None,
                    why: list[str] | None = None) -> dict[str, Any] | None:
    """Categorizer parameters trained on the validation images -- this product's weighed up,
    plus ``pooled`` samples of other products (``pooled_category_samples``) -- or None (said in
    the log) when the labels are too few. ``normal``: this product's normal appearance, stored
    with the parameters for the worker. With ``raw_maps`` that differ from ``val_maps`` (a mask
    step is on), ``raw_view_samples`` join the training. A product whose anomalous validation
    images carry no category learns from ``pooled`` alone. ``why``, when given, receives the
    reason when no categorizer comes out (the profile's notes say it)."""
    from calibration.categorizer_fit import train_categorizer

    samples = _category_samples(val, val_maps, threshold, product, raw_maps, normal, extent)
    pooled = list(pooled or [])
    if raw_maps is not None and samples:
        pooled += raw_view_samples(val, raw_maps, val_maps, product, normal)
    try:
        return train_categorizer(samples + pooled, product=product, region_source="predicted", normal=normal)
    except UserError as exc:
        log.info("categorizer on predicted regions failed for %s (%s); using the true masks", product, exc)
    samples = [smp for smp in samples if smp.gt_mask is not None]  # image-level labels have no mask to fall back on
    for smp in samples:  # too few predicted regions: learn from the labelled masks themselves
        smp.mask = smp.gt_mask
    try:
        return train_categorizer(samples + pooled, product=product, region_source="ground_truth", normal=normal)
    except UserError as exc:
        log.warning("categorizer not trained for %s: %s", product, exc)
        if why is not None:
            why.append(f"no categorizer: {exc}")
        return None


def categorizer_evaluation(params: dict[str, Any] | None, test: LabelledSet, maps: np.ndarray,
                           threshold: float, product: str, raw_maps: np.ndarray | None = None,
                           extent: dict[str, Any] | None = None, served: np.ndarray | None = None,
                           ) -> dict[str, Any] | None:
    if not params:
        return None
    from calibration.categorizer_fit import evaluate_categorizer

    samples = _category_samples(test, maps, threshold, product, raw_maps, extent=extent, served=served)
    if not samples:
        return None
    try:
        return evaluate_categorizer(params, samples)
    except UserError as exc:
        log.warning("category evaluation skipped for %s: %s", product, exc)
        return None


def resolve_categorizer_products(dataset_root: Path, product: str, names: Sequence[str]) -> list[str]:
    """Other products for the categorizer pool: ``names`` (``"all"`` = every product under the
    dataset root), this product left out; an unknown name is a UserError."""
    from calibration.datasets import list_products

    names = [n for n in names if n]
    if not names:
        return []
    have = list_products(Path(dataset_root))
    wanted = have if "all" in names else names
    missing = [n for n in wanted if n not in have]
    if missing:
        raise UserError(f"{dataset_root}: no product {', '.join(missing)} for the categorizer pool "
                        f"(products: {', '.join(have)})")
    return [n for n in wanted if n != product]
