"""The calibration workflow as library functions (the CLI is a thin shell over these).

A *work folder* holds one fitted model between steps::

    <work>/model.json, weights.safetensors   AnomalyModel.save()
    <work>/fit.json                          product, dataset, image count, fit time, background
    <work>/threshold.json                    ThresholdReport of the last `threshold` run

``calibrate_product`` runs the whole path -- fit, threshold, evaluate (report folder), publish --
and returns the published Profile; the demo calls it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from calibration.data import LabelledSet, load_product_splits, load_train, open_product
from calibration.extent_fit import ExtentFit, fit_extent
from calibration.thresholds import (METHODS, ThresholdReport, estimate_image_threshold, estimate_thresholds,
                                   pixel_curves)
from calibration.adoption import clears
from linewatch.inspection.categorize import normal_appearance
from linewatch.inspection.extent import ExtentModel, ExtentSettings
from linewatch.inspection.forest import externalise, internalise
from linewatch.inspection.mask import MaskStep
from linewatch.errors import UserError
from linewatch.models.base import AnomalyModel, ModelError
from linewatch.models.registry import CONFIG_FILE, WEIGHTS_FILE, load_model
from linewatch.profiles import Profile, ProfileError, Registry

log = logging.getLogger(__name__)
FIT_FILE = "fit.json"
THRESHOLD_FILE = "threshold.json"
CATEGORIZER_FILE = "categorizer.json"


class FitInfo(BaseModel):
    product: str
    model_kind: str
    dataset: str
    n_train: int
    fit_seconds: float
    input_size: int
    background: bool | None = None
    options: dict[str, Any] = {}


# -- models --------------------------------------------------------------------------------------
def build(model_kind: str, input_size: int = 256, options: dict[str, Any] | None = None) -> AnomalyModel:
    from linewatch.models.registry import build_model

    return build_model(model_kind, input_size=input_size, **(options or {}))


def fit_model(images: np.ndarray, model_kind: str = "padim", input_size: int = 256,
              options: dict[str, Any] | None = None, progress: bool = True) -> tuple[AnomalyModel, float]:
    """Fit on normal images only; returns the model and the fit time in seconds."""
    model = build(model_kind, input_size, options)
    t0 = time.perf_counter()
    model.fit(images, progress=progress)
    return model, time.perf_counter() - t0


def load_model_dir(directory: Path) -> AnomalyModel:
    """Load a work folder or profile version folder; errors name the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: model folder does not exist")
    try:
        return load_model(directory)
    except ModelError as exc:
        msg = str(exc)
        if str(directory) not in msg:
            msg = f"{directory / WEIGHTS_FILE}: {msg}"
        raise UserError(msg) from None
    except (KeyError, TypeError) as exc:
        raise UserError(f"{directory / CONFIG_FILE}: incomplete model config ({exc})") from None


def background_of(labelled: LabelledSet) -> bool | None:
    flags = [b for b in labelled.background if b is not None]
    return None if not flags else bool(np.mean(flags) >= 0.5)


def fit_product(dataset_root: Path, product: str, work_dir: Path, model_kind: str = "padim",
                input_size: int = 256, options: dict[str, Any] | None = None,
                progress: bool = True) -> tuple[AnomalyModel, FitInfo]:
    """Fit ``product``'s normal training images and save the model to ``work_dir``."""
    ds = open_product(Path(dataset_root), product)
    train = ds.train_images(input_size, progress=progress)
    if len(train) < 2:
        raise UserError(f"{ds.train[0].path.parent}: need at least 2 normal images, found {len(train)}")
    model, secs = fit_model(train, model_kind, input_size, options, progress)
    bg = ds.background
    info = FitInfo(product=product, model_kind=model_kind, dataset=str(dataset_root), n_train=len(train),
                   fit_seconds=round(secs, 2), input_size=input_size, background=bg, options=options or {})
    work_dir = Path(work_dir)
    model.save(work_dir)
    (work_dir / FIT_FILE).write_text(info.model_dump_json(indent=2))
    return model, info


def read_fit_info(work_dir: Path) -> FitInfo | None:
    p = Path(work_dir) / FIT_FILE
    return FitInfo.model_validate_json(p.read_text()) if p.is_file() else None


# -- region refinement -----------------------------------------------------------------------------
REFINE_FRACTIONS: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
REFINE_WINDOWS: tuple[int, ...] = (17, 33, 49)
# (scale, floor) of the colour cue (docs/calibration.md: why these)
CUES: tuple[tuple[float, float], ...] = ((1.0, 0.5), (1.5, 0.5), (1.5, 0.3), (3.0, 0.5), (1.0, 0.3))
_SEARCH_BINS = 1024  # threshold grid while searching settings (the final thresholds use the default)


def calibrate_refinement(maps: np.ndarray, masks: np.ndarray, images: np.ndarray | None = None, *,
                         k_std: float = 3.0, quantile: float = 0.999,
                         fractions: tuple[float, ...] = REFINE_FRACTIONS,
                         windows: tuple[int, ...] = REFINE_WINDOWS,
                         cues: tuple[tuple[float, float], ...] = CUES) -> MaskStep:
    """The mask step (``MaskStep``: the colour cue when ``images`` are given, then peak-relative
    refinement) that maximises the mean per-image IoU at the IoU-curve threshold
    on the *validation* maps, adopted only when it clears the project's one rule
    (``calibration.adoption.clears``) against the plain map, paired per image.

    Two stages, to keep the search small: the colour cue (or none) is chosen first, each
    candidate judged with its best refinement fraction at the default window; then the refinement
    is searched on the maps with that cue.

    Off when there are too few anomalous images to judge it, or when maps can be negative (the
    refinement rule is a fraction of a non-negative peak).
    """
    from calibration.thresholds import MIN_ANOMALOUS

    n_anom = int(masks.reshape(len(masks), -1).any(1).sum())
    if n_anom < MIN_ANOMALOUS:
        return MaskStep(reason=f"mask step off: {n_anom} anomalous validation image(s), need {MIN_ANOMALOUS}")
    if float(maps.min()) < 0:
        return MaskStep(reason="mask step off: the maps have negative values (the rule needs non-negative maps)")

    def val_iou(m: np.ndarray) -> float:
        return estimate_thresholds(m, masks, k_std=k_std, quantile=quantile,
                                   bins=_SEARCH_BINS).method("iou").val_iou or 0.0

    mid = 33 if 33 in windows else (windows[len(windows) // 2] if windows else 33)
    cue, cued = (0.0, 0.5), maps
    if images is not None and cues:
        def staged(m: np.ndarray) -> float:
            return max([val_iou(m)] + [val_iou(MaskStep(refine_fraction=f, refine_window=mid).apply_all(m, None))
                                       for f in fractions])

        cue_best = staged(maps)
        for scale, floor in cues:
            m = MaskStep(cue_scale=scale, cue_floor=floor).apply_all(maps, images)
            iou = staged(m)
            if iou > cue_best + 1e-9:
                cue_best, cue, cued = iou, (scale, floor), m
    best = (val_iou(cued), 0.0, mid)
    for w in windows:
        for f in fractions:
            iou = val_iou(MaskStep(refine_fraction=f, refine_window=w).apply_all(cued, None))
            if iou > best[0] + 1e-9:
                best = (iou, f, w)
    _, f, w = best
    step = MaskStep(cue_scale=cue[0], cue_floor=cue[1], refine_fraction=f, refine_window=w)
    if step.is_off:
        return MaskStep(reason="mask step off: no setting beat the plain map's validation IoU")
    plain = per_image_iou(maps, masks, k_std=k_std, quantile=quantile)
    served = per_image_iou(step.apply_all(maps, images), masks, k_std=k_std, quantile=quantile)
    ok, figures = clears(served - plain)
    parts = ([f"colour cue scale {cue[0]:g}, floor {cue[1]:g}"] if cue[0] > 0 else []) + \
            ([f"peak-relative refinement fraction {f:g}, window {w}"] if f > 0 else [])
    if not ok:
        return MaskStep(reason=f"mask step off: the best setting ({' + '.join(parts)}) gains {figures} on "
                               f"{n_anom} anomalous validation images, under the adoption bar")
    return step.model_copy(update={"reason": f"{' + '.join(parts)}: validation IoU {plain.mean():.4f} -> "
                                             f"{served.mean():.4f} ({figures}, {n_anom} anomalous validation images)"})


def per_image_iou(maps: np.ndarray, masks: np.ndarray, *, k_std: float = 3.0, quantile: float = 0.999,
                  threshold: float | None = None) -> np.ndarray:
    """Per-image IoU of the anomalous images at ``threshold`` (default: the maps' own IoU-curve
    threshold): what the paired adoption tests compare."""
    from calibration.metrics import iou_per_image

    if threshold is None:
        threshold = estimate_thresholds(maps, masks, k_std=k_std, quantile=quantile,
                                        bins=_SEARCH_BINS).method("iou").threshold
    anom = masks.reshape(len(masks), -1).any(1)
    return iou_per_image(maps[anom] >= threshold, masks[anom])


# -- thresholds ----------------------------------------------------------------------------------
def threshold_model(model: AnomalyModel, val: LabelledSet, prefer: str = "iou", k_std: float = 3.0,
                    quantile: float = 0.999, require_anomalies: bool = True,
                    batch_size: int = 16, refine: bool = True,
                    choose_setting: bool = True, extent: bool = True,
                    progress: bool = False) -> tuple[ThresholdReport, np.ndarray]:
    """All five methods on the validation set; one chosen. Returns (report, raw validation maps).

    ``refine``: also calibrate the mask step (``calibrate_refinement``) on the validation set;
    the thresholds are then estimated on the served maps and the report carries the step (the
    profile and the worker's ``judge`` apply it the same way).

    ``extent``: also fit the learned region extent on the validation masks
    (``calibration.extent_fit.fit_extent``, adopted by the rule of ``calibration.adoption`` on
    held-out validation images); the profile and the worker apply it after thresholding.

    ``choose_setting``: also choose between the model's own settings (``choose_variant``; the
    model is left on the chosen one and must be saved with it); recalibration passes False,
    since it republishes the current model files unchanged.

    ``require_anomalies``: when ``prefer`` needs anomalous images and there are none, refuse
    (UserError) rather than fall back -- the CLI passes True, a caller that accepts the
    normal-statistics fallback passes False (the report then says so).
    """
    if prefer not in METHODS:
        raise UserError(f"--method {prefer!r} is not one of {', '.join(METHODS)}")
    n_anom = int(val.anomalous.sum())
    if n_anom == 0 and prefer in ("iou", "f1", "roc") and require_anomalies:
        where = val.paths[0].parent.parent if val.paths else "validation set"
        raise UserError(f"{where}: validation set has no anomalous images, so methods iou, f1 and roc are "
                        "impossible; add a few defective images with masks or pass --method normal_quantile "
                        "(or normal_std)")
    maps, scores = model.predict(val.images, batch_size=batch_size)
    ref = (calibrate_refinement(maps, val.masks, val.images, k_std=k_std, quantile=quantile) if refine
           else MaskStep(reason="mask step off (not requested)"))
    variant_note = ""
    if refine and choose_setting:
        maps, scores, ref, variant_note = choose_variant(model, val, maps, scores, ref, k_std=k_std,
                                                         quantile=quantile, batch_size=batch_size)
    served = ref.apply_all(maps, val.images)
    report = estimate_thresholds(served, val.masks, prefer=prefer, k_std=k_std, quantile=quantile)
    img_thr, img_reason = estimate_image_threshold(scores, val.anomalous)
    ext = (fit_extent(maps, served, val.images, val.masks, report.threshold, progress=progress) if extent
           else ExtentFit(reason="region extent off (not requested)"))
    report = report.model_copy(update={"image_threshold": img_thr, "image_threshold_reason": img_reason,
                                       "mask_step": ref, "extent": ext.params, "extent_reason": ext.reason,
                                       "notes": [*report.notes, *([variant_note] if variant_note else []), ref.reason,
                                                 ext.reason]})
    return report, maps


def _val_ious(maps: np.ndarray, step: MaskStep, val: LabelledSet, k_std: float, quantile: float) -> np.ndarray:
    """Per-image IoU of the anomalous validation images at the IoU-curve threshold of the served maps."""
    return per_image_iou(step.apply_all(maps, val.images), val.masks, k_std=k_std, quantile=quantile)


def choose_variant(model: AnomalyModel, val: LabelledSet, maps: np.ndarray, scores: np.ndarray, ref: MaskStep, *,
                   k_std: float = 3.0, quantile: float = 0.999,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, MaskStep, str]:
    """The model setting (``model.calibration_variants()``: PaDiM's texture-term weight) with the
    best validation IoU, each with its own calibrated mask step. The model's current setting
    stays unless another beats it by the rule of ``calibration.adoption`` (paired per image); the
    model is left on the chosen one (it is saved with the profile). Returns (maps, scores, mask
    step, note); the note is empty when the model has no variants or too few anomalous
    validation images to judge them."""
    from calibration.thresholds import MIN_ANOMALOUS

    variants = getattr(model, "calibration_variants", lambda: [])()
    if len(variants) < 2 or int(val.anomalous.sum()) < MIN_ANOMALOUS:
        return maps, scores, ref, ""
    current = {k: model.options.get(k) for k in variants[0]}
    base = _val_ious(maps, ref, val, k_std, quantile)
    best = (float(base.mean()), current, maps, scores, ref)
    seen = []
    for v in variants:
        if v == current:
            continue
        model.apply_variant(v)
        m, sc = model.predict(val.images, batch_size=batch_size)
        r = calibrate_refinement(m, val.masks, val.images, k_std=k_std, quantile=quantile)
        ious = _val_ious(m, r, val, k_std, quantile)
        ok, figures = clears(ious - base)
        seen.append(f"{', '.join(f'{k} {x:g}' for k, x in v.items())}: {ious.mean():.4f} "
                    f"({figures}{'' if ok else ', not significant'})")
        if ok and float(ious.mean()) > best[0] + 1e-9:
            best = (float(ious.mean()), v, m, sc, r)
    iou, chosen, maps, scores, ref = best
    model.apply_variant(chosen)
    setting = ", ".join(f"{k} {v:g}" for k, v in chosen.items())
    note = (f"model setting {setting}: validation IoU {iou:.4f}; current setting {base.mean():.4f}; "
            + "; ".join(seen))
    log.info("%s", note)
    return maps, scores, ref, note


def save_threshold(work_dir: Path, report: ThresholdReport) -> Path:
    """The report as JSON in the work folder, its extent forest beside it (skops)."""
    p = Path(work_dir) / THRESHOLD_FILE
    on_disk = report.model_copy(update={"extent": externalise(report.extent, Path(work_dir), "extent")})
    p.write_text(on_disk.model_dump_json(indent=2))
    return p


def read_threshold(work_dir: Path) -> ThresholdReport:
    p = Path(work_dir) / THRESHOLD_FILE
    if not p.is_file():
        raise UserError(f"{p}: no threshold yet; run `linewatch calibrate threshold` first")
    report = ThresholdReport.model_validate_json(p.read_text())
    return report.model_copy(update={"extent": internalise(report.extent, Path(work_dir))})


# -- profiles ------------------------------------------------------------------------------------
def make_profile(product: str, model: AnomalyModel, report: ThresholdReport,
                 metrics: dict[str, Any] | None = None, background: bool | None = None,
                 categorizer: dict[str, Any] | None = None, notes: str = "",
                 parent_version: int | None = None) -> Profile:
    return Profile(product=product, model_kind=model.kind, backbone=model.backbone_name,
                   input_size=model.input_size, threshold=report.threshold, threshold_method=report.chosen,
                   image_threshold=report.image_threshold,
                   thresholds=report.thresholds(),
                   threshold_reason=report.reason + (f"; frame verdict: {report.image_threshold_reason}"
                                                     if report.image_threshold_reason else ""),
                   calibration_metrics={"validation": {m.method: {"threshold": m.threshold, "iou": m.val_iou,
                                                                  "f1": m.val_f1} for m in report.methods},
                                        "n_val_anomalous": report.n_anomalous, "n_val_normal": report.n_normal,
                                        "notes": report.notes, **(metrics or {})},
                   mask_step=report.mask_step, extent=report.extent, categorizer=categorizer, background=background,
                   background_source="override" if background is not None else "unknown",
                   notes=notes, parent_version=parent_version)


def publish_work_dir(work_dir: Path, registry_dir: Path, product: str | None = None,
                     metrics: dict[str, Any] | None = None, categorizer: dict[str, Any] | None = None,
                     export_onnx: bool = True) -> Profile:
    """Publish a fitted + thresholded work folder as the product's next profile version."""
    work_dir = Path(work_dir)
    report = read_threshold(work_dir)
    model = load_model_dir(work_dir)
    info = read_fit_info(work_dir)
    product = product or (info.product if info else None)
    if not product:
        raise UserError(f"{work_dir / FIT_FILE}: product unknown; pass --product")
    if metrics is None and (work_dir / "evaluation.json").is_file():
        metrics = {"test": json.loads((work_dir / "evaluation.json").read_text())}
    if categorizer is None:
        categorizer = read_categorizer(work_dir)
    profile = make_profile(product, model, report, metrics, info.background if info else None, categorizer,
                           notes=f"fitted on {info.n_train} images of {info.dataset}" if info else "")
    return Registry(registry_dir).publish(profile, model, export_onnx=export_onnx)


def recalibrate(registry_dir: Path, product: str, val: LabelledSet, prefer: str | None = None,
                k_std: float = 3.0, quantile: float = 0.999) -> tuple[Profile, ThresholdReport]:
    """New threshold for the current profile from new validation images; no refit.

    Publishes a new version whose model files are copied from the current one.
    """
    reg = Registry(registry_dir)
    profile, model = reg.load(product)
    method = prefer or (profile.threshold_method if profile.threshold_method in METHODS else "iou")
    report, _ = threshold_model(model, val, method, k_std, quantile, choose_setting=False)
    new = make_profile(product, model, report, {"recalibrated_from": profile.version},
                       profile.background, profile.categorizer,
                       notes=f"recalibrated from v{profile.version} on {len(val)} images", parent_version=profile.version)
    new = new.model_copy(update={"background_source": profile.background_source,
                                 "min_region_px": profile.min_region_px})
    stored = reg.publish(new, source_dir=reg.version_dir(product, profile.version))
    return stored, report


# -- evaluation of a model on a test set -------------------------------------------------------------
def evaluate_model(name: str, product: str, model: AnomalyModel, test: LabelledSet,
                   report: ThresholdReport, val: LabelledSet | None = None,
                   val_maps: np.ndarray | None = None, categorizer: dict[str, Any] | None = None,
                   batch_size: int = 16):
    """Maps on test, every metric, and the category evaluation when a categorizer is given."""
    from calibration.evaluate import evaluate_maps

    raw, scores = model.predict(test.images, batch_size=batch_size)
    ref = report.mask_step
    maps = ref.apply_all(raw, test.images)  # what the worker thresholds (linewatch.inspection.verdict.judge)
    val_curves = None
    if val is not None:
        if val_maps is None:
            val_maps, _ = model.predict(val.images, batch_size=batch_size)
        val_curves = pixel_curves(ref.apply_all(val_maps, val.images), val.masks,
                                  extra=[t for t in report.thresholds().values() if t is not None])
    ev = evaluate_maps(name, product, test, maps, scores, report.thresholds(), report.chosen, report, val_curves,
                       raw_maps=raw)
    ev.extra["refinement"] = ref.model_dump()
    if report.extent:
        ev.served_masks = np.stack([served_mask(maps, i, report.threshold, raw, test.images, report.extent)
                                    for i in range(len(maps))])
        ev.extra["extent"] = extent_iou(maps, ev.served_masks, test, report.threshold, report.extent)
    ev.category_eval = categorizer_evaluation(categorizer, test, maps, report.threshold, product, raw, report.extent,
                                              served=ev.served_masks)
    return ev


def served_mask(maps: np.ndarray, i: int, threshold: float, raw_maps: np.ndarray | None,
                images: np.ndarray, extent: dict[str, Any] | None) -> np.ndarray:
    """Image ``i``'s mask as the worker serves it: the (refined) map thresholded, then the learned
    region extent when the profile has one (``linewatch.inspection.verdict.judge`` does the same)."""
    mask = maps[i] >= threshold
    if not extent or not mask.any():
        return mask
    return extent_model(extent).apply(maps[i] if raw_maps is None else raw_maps[i], images[i], mask, threshold)


def extent_model(extent: dict[str, Any]) -> ExtentModel:
    """A fitted extent's parameters (settings and forest, as ``fit_extent`` gives them) ready to apply."""
    return ExtentModel(ExtentSettings(**{k: v for k, v in extent.items() if k != "classifier"}), extent["classifier"])


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
    to categorize_frame -- and the true mask kept to tell which regions are real."""
    from calibration.categorizer_fit import CategorySample
    from linewatch.messages import CATEGORIES

    feats = maps if raw_maps is None else raw_maps
    return [CategorySample(image=data.images[i], category=c,
                           mask=served[i] if served is not None else served_mask(maps, i, threshold, raw_maps,
                                                                                  data.images, extent),
                           amap=feats[i],
                           threshold=threshold, background=data.background[i], product=product,
                           gt_mask=data.masks[i], normal=normal)
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
    for q in products:
        val, _ = load_product_splits(Path(dataset_root), q, input_size, val_fraction, seed, progress=False)
        if not len(val) or not any(c != "good" for c in val.categories):
            log.info("categorizer pool: %s has no labelled anomalous validation images", q)
            continue
        normal = normal_appearance(load_train(Path(dataset_root), q, input_size, False))
        prof = model = None
        if reg is not None:
            try:
                prof, model = reg.load(q)
            except (UserError, ProfileError, FileNotFoundError) as exc:
                log.info("categorizer pool: no profile for %s (%s)", q, exc)
        if prof is not None and model is not None and model.input_size == input_size:
            raw, _ = model.predict(val.images)
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
    thr = raw_view_threshold(raw_maps, val.masks)
    return [] if thr is None else _category_samples(val, raw_maps, thr, product, raw_maps, normal)


def fit_categorizer(val: LabelledSet, val_maps: np.ndarray, threshold: float, product: str,
                    raw_maps: np.ndarray | None = None, normal: dict[str, Any] | None = None,
                    pooled: list | None = None, extent: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Categorizer parameters trained on the validation images -- this product's weighed up,
    plus ``pooled`` samples of other products (``pooled_category_samples``) -- or None (said in
    the log) when the labels are too few. ``normal``: this product's normal appearance, stored
    with the parameters for the worker. With ``raw_maps`` that differ from ``val_maps`` (a mask
    step is on), ``raw_view_samples`` join the training. A product whose anomalous validation
    images carry no category learns from ``pooled`` alone."""
    from calibration.categorizer_fit import train_categorizer

    samples = _category_samples(val, val_maps, threshold, product, raw_maps, normal, extent)
    pooled = list(pooled or [])
    if raw_maps is not None and samples:
        pooled += raw_view_samples(val, raw_maps, val_maps, product, normal)
    try:
        return train_categorizer(samples + pooled, product=product, region_source="predicted", normal=normal)
    except UserError as exc:
        log.info("categorizer on predicted regions failed for %s (%s); using the true masks", product, exc)
    for smp in samples:  # too few predicted regions: learn from the labelled masks themselves
        smp.mask = smp.gt_mask
    try:
        return train_categorizer(samples + pooled, product=product, region_source="ground_truth", normal=normal)
    except UserError as exc:
        log.warning("categorizer not trained for %s: %s", product, exc)
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


# -- one shot --------------------------------------------------------------------------------------
def calibrate_product(dataset_root: str | Path, product: str, registry_dir: str | Path,
                      model_kind: str = "padim", *, input_size: int = 256, method: str = "iou",
                      options: dict[str, Any] | None = None, val_fraction: float = 1 / 3, seed: int = 0,
                      report_dir: str | Path | None = None, publish: bool = True, export_onnx: bool = True,
                      k_std: float = 3.0, quantile: float = 0.999, progress: bool = True,
                      categorizer_products: Sequence[str] = ()) -> Profile:
    """Fit on ``<root>/<product>/train/good``, threshold on the validation split, evaluate on the
    test split (report folder when ``report_dir``), publish to ``registry_dir``; returns the
    published Profile (version 0 = not published when ``publish=False``).

    ``categorizer_products``: other products under ``dataset_root`` (``["all"]``: every one)
    whose labelled validation images also train the categorizer (``pooled_category_samples``;
    regions from their profiles in ``registry_dir``), this product's own weighed up.
    """
    root = Path(dataset_root)
    train = load_train(root, product, input_size, progress)
    val, test = load_product_splits(root, product, input_size, val_fraction, seed, progress=progress)
    model, secs = fit_model(train, model_kind, input_size, options, progress)
    report, val_maps = threshold_model(model, val, method, k_std, quantile, progress=progress)
    pool = resolve_categorizer_products(root, product, categorizer_products)
    pooled = pooled_category_samples(root, pool, input_size, Path(registry_dir), val_fraction, seed) if pool else []
    categorizer = fit_categorizer(val, report.mask_step.apply_all(val_maps, val.images),
                                  report.threshold, product, raw_maps=val_maps, normal=normal_appearance(train),
                                  pooled=pooled, extent=report.extent)
    ev = evaluate_model(model_kind, product, model, test, report, val, val_maps, categorizer)
    metrics = {"test": ev.headline(), "fit_seconds": round(secs, 2), "n_train": int(len(train)),
               "n_val": len(val), "n_test": len(test)}
    if "extent" in ev.extra:
        metrics["extent"] = ev.extra["extent"]
    if ev.category_eval:
        metrics["categories"] = {k: ev.category_eval[k] for k in ("accuracy", "macro_f1", "n") if k in ev.category_eval}
    if report_dir is not None:
        from calibration.evaluate import write_tables
        from calibration.report import write_report

        write_tables([ev], Path(report_dir))
        write_report([ev], Path(report_dir), title=f"linewatch calibration: {product}")
    bg = background_of(val) if background_of(val) is not None else background_of(test)
    profile = make_profile(product, model, report, metrics, bg, categorizer,
                           notes=f"calibrate_product: {model_kind} on {len(train)} normal images of {root}")
    if not publish:
        return profile
    return Registry(registry_dir).publish(profile, model, export_onnx=export_onnx)
