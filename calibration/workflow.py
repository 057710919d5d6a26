"""The calibration workflow as library functions (the CLI is a thin shell over these).

A *work folder* holds one fitted model between steps::

    <work>/model.json, weights.safetensors   AnomalyModel.save()
    <work>/fit.json                          product, dataset, image count, fit time, background
    <work>/threshold.json                    ThresholdReport of the last `threshold` run

``calibrate_product`` runs the whole path -- fit, threshold, evaluate (report folder), publish --
and returns the published Profile (`linewatch calibrate run`, which the demo runs too).
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

from calibration.categorizer_samples import (categorizer_evaluation, extent_iou, fit_categorizer,
                                             pooled_category_samples, read_categorizer,
                                             resolve_categorizer_products, served_mask)
from calibration.data import LabelledSet, load_product_splits, load_train
from calibration.extent_fit import ExtentFit, fit_extent
from calibration.mask_step import calibrate_refinement, choose_variant
from calibration.operating_curve import check_target_supported, operating_curve, threshold_for_escape_rate
from calibration.thresholds import (METHODS, ThresholdReport, estimate_image_threshold, estimate_thresholds,
                                   pixel_curves)
from linewatch.inspection.categorize import normal_appearance
from linewatch.inspection.forest import externalise, internalise
from linewatch.drift import reference as drift_reference
from linewatch.errors import UserError
from linewatch.inspection.geometry import Framing, Geometry, GeometryError, TiledModel
from linewatch.inspection.mask import MaskStep
from linewatch.models.base import AnomalyModel, ModelError
from linewatch.models.registry import CONFIG_FILE, WEIGHTS_FILE, load_model
from linewatch.profiles import Profile, Registry

log = logging.getLogger(__name__)
FIT_FILE = "fit.json"
THRESHOLD_FILE = "threshold.json"


class FitInfo(BaseModel):
    product: str
    model_kind: str
    dataset: str
    n_train: int
    fit_seconds: float
    input_size: int
    geometry: Geometry = Geometry()
    background: bool | None = None
    options: dict[str, Any] = {}


# -- models --------------------------------------------------------------------------------------
def build(model_kind: str, input_size: int = 256, options: dict[str, Any] | None = None) -> AnomalyModel:
    from linewatch.models.registry import build_model

    return build_model(model_kind, input_size=input_size, **(options or {}))


def fit_model(images: np.ndarray, model_kind: str = "padim", input_size: int = 256,
              options: dict[str, Any] | None = None, progress: bool = True,
              framing: Framing | None = None) -> tuple[TiledModel, float]:
    """Fit on normal images only (views of ``framing``; every tile is a training sample of the
    one model); returns the model, seen through the framing, and the fit time in seconds."""
    framing = framing or Geometry().framing(input_size)
    model = TiledModel(build(model_kind, framing.input_size, options), framing)
    t0 = time.perf_counter()
    model.fit(images, progress=progress)
    return model, time.perf_counter() - t0


def resolve_framing(geometry: Geometry | None, input_size: int, first_image: Path) -> Framing:
    """The geometry with the calibration frames' size recorded (from the first training image's
    header) at ``input_size``; a bad ROI or tile grid is a one-line error naming that image."""
    from calibration.datasets import image_size

    h, w = image_size(first_image)
    try:
        return (geometry or Geometry()).resolved(w, h).framing(input_size)
    except GeometryError as exc:
        raise UserError(f"{first_image}: {exc}") from None


def served_model(profile: Profile, model: AnomalyModel) -> TiledModel:
    """A published model seen through its profile's framing (what the worker serves)."""
    return TiledModel(model, profile.framing)


def load_model_dir(directory: Path) -> TiledModel:
    """Load a work folder (seen through the geometry its fit.json records) or a profile
    version folder; errors name the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: model folder does not exist")
    try:
        model = load_model(directory)
        info = read_fit_info(directory)
        if info is None and (directory / "profile.json").is_file():
            geometry = Profile.model_validate_json((directory / "profile.json").read_text()).geometry
        else:
            geometry = info.geometry if info is not None else Geometry()
        return TiledModel(model, geometry.framing(model.input_size))
    except ModelError as exc:
        msg = str(exc)
        if str(directory) not in msg:
            msg = f"{directory / WEIGHTS_FILE}: {msg}"
        raise UserError(msg) from None
    except (KeyError, TypeError) as exc:
        raise UserError(f"{directory / CONFIG_FILE}: incomplete model config ({exc})") from None
    except GeometryError as exc:
        raise UserError(f"{directory / FIT_FILE}: {exc}") from None


def background_of(labelled: LabelledSet) -> bool | None:
    flags = [b for b in labelled.background if b is not None]
    return None if not flags else bool(np.mean(flags) >= 0.5)


def fit_product(dataset_root: Path | None, product: str, work_dir: Path, model_kind: str = "padim",
                input_size: int = 256, options: dict[str, Any] | None = None,
                progress: bool = True, normal_dir: Path | None = None,
                geometry: Geometry | None = None) -> tuple[TiledModel, FitInfo]:
    """Fit ``product``'s normal training images and save the model to ``work_dir``. Only the
    normal images are read: a dataset's train/good (MVTec) or train/ok (BTAD), or a plain
    ``normal_dir`` of defect-free images; test images and masks are not needed to fit."""
    from calibration.datasets import load_normal_folder, open_dataset

    if (dataset_root is None) == (normal_dir is None):
        raise UserError("fit: give either a dataset (--dataset) or a folder of normal images (--normal-dir)")
    ds = (load_normal_folder(normal_dir, product) if normal_dir is not None
          else open_dataset(Path(dataset_root), product, train_only=True))
    framing = resolve_framing(geometry, input_size, ds.train[0].path)
    train = ds.train_images(framing, progress=progress)
    if len(train) < 2:
        raise UserError(f"{ds.train[0].path.parent}: need at least 2 normal images, found {len(train)}")
    model, secs = fit_model(train, model_kind, input_size, options, progress, framing)
    bg = ds.background
    info = FitInfo(product=product, model_kind=model_kind, dataset=str(dataset_root or normal_dir), n_train=len(train),
                   fit_seconds=round(secs, 2), input_size=input_size, geometry=framing.geometry, background=bg,
                   options=options or {})
    work_dir = Path(work_dir)
    model.save(work_dir)
    (work_dir / FIT_FILE).write_text(info.model_dump_json(indent=2))
    return model, info


def read_fit_info(work_dir: Path) -> FitInfo | None:
    p = Path(work_dir) / FIT_FILE
    return FitInfo.model_validate_json(p.read_text()) if p.is_file() else None


# -- thresholds ----------------------------------------------------------------------------------
def threshold_model(model: AnomalyModel, val: LabelledSet, prefer: str = "iou", k_std: float = 3.0,
                    quantile: float = 0.999, require_anomalies: bool = True,
                    batch_size: int = 16, refine: bool = True,
                    choose_setting: bool = True, extent: bool = True,
                    progress: bool = False,
                    target_escape_rate: float | None = None) -> tuple[ThresholdReport, np.ndarray]:
    """All five methods on the validation set; one chosen. Returns (report, raw validation maps).

    Image-level labels: the pixel side (mask step, model setting, the five methods, the extent)
    sees only the images whose pixels are labelled (``LabelledSet.pixel_rows``: normal images and
    defects with a mask); the image threshold sees every labelled image. With defects but no
    mask at all, methods iou/f1/roc are impossible, so the pixel threshold comes from the normal
    statistics (``normal_quantile`` unless ``normal_std`` was asked for) and the report says so.

    ``target_escape_rate``: place the image threshold at the lowest validation false-reject point
    whose validation escape rate is at most this (``calibration.operating_curve``); refused
    (UserError) when the validation set has too few defective images to show it.

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
    where = val.paths[0].parent.parent if val.paths else "validation set"
    n_anom = int(val.anomalous.sum())
    if n_anom == 0 and prefer in ("iou", "f1", "roc") and require_anomalies:
        raise UserError(f"{where}: validation set has no anomalous images, so methods iou, f1 and roc are "
                        "impossible; add a few defective images with masks or pass --method normal_quantile "
                        "(or normal_std)")
    if target_escape_rate is not None:
        check_target_supported(target_escape_rate, n_anom, where)
    pix_rows = val.pixel_rows
    pix = val.pixel_set()
    n_masked = int(pix.anomalous.sum())
    label_notes: list[str] = []
    asked = prefer
    if val.n_unmasked:
        label_notes.append(f"validation: {val.mask_coverage()}; the image threshold uses all "
                           f"{n_anom} defective images, the pixel methods the {n_masked} with masks")
    if n_anom and not n_masked:
        if not (~val.anomalous).any():
            raise UserError(f"{where}: defect images but no normal ones (the pixel threshold of image-level "
                            "labels comes from normal images)")
        if prefer in ("iou", "f1", "roc"):
            label_notes.append(f"image-level labels only: the pixel threshold is set from the normal images' "
                               f"statistics (normal_quantile) because {prefer} needs pixel masks; pixel metrics "
                               "need masks")
            prefer = "normal_quantile"
    maps, scores = model.predict(val.images, batch_size=batch_size)
    ref = (calibrate_refinement(maps[pix_rows], pix.masks, pix.images, k_std=k_std, quantile=quantile) if refine
           else MaskStep(reason="mask step off (not requested)"))
    variant_note = ""
    if refine and choose_setting:
        before = None if pix is val else json.dumps(model.config(), sort_keys=True)
        pmaps, pscores, ref, variant_note = choose_variant(model, pix, maps[pix_rows], scores[pix_rows], ref,
                                                           k_std=k_std, quantile=quantile, batch_size=batch_size)
        if pix is val:
            maps, scores = pmaps, pscores
        elif json.dumps(model.config(), sort_keys=True) != before:  # another setting: every image's map moves
            maps, scores = model.predict(val.images, batch_size=batch_size)
    served = ref.apply_all(maps[pix_rows], pix.images)
    report = estimate_thresholds(served, pix.masks, prefer=prefer, k_std=k_std, quantile=quantile)
    if n_anom and not n_masked:  # "no anomalous images" of the pixel side: they have no masks, say that
        report = report.model_copy(update={"notes": [
            n.replace("no anomalous validation images", "no validation defect has a pixel mask")
            .replace("0 anomalous validation image(s)", "0 masked validation defect(s)") for n in report.notes]})
    if prefer != asked:
        report = report.model_copy(update={"reason": (
            f"{report.chosen} from the normal images' statistics: image-level labels only (no validation defect "
            f"has a mask), so {asked} is impossible; the frame verdict comes from the image threshold")})
    if target_escape_rate is not None:
        img_thr, img_reason = threshold_for_escape_rate(scores, val.anomalous, target_escape_rate)
    else:
        img_thr, img_reason = estimate_image_threshold(scores, val.anomalous)
    ext = (fit_extent(maps[pix_rows], served, pix.images, pix.masks, report.threshold, progress=progress) if extent
           else ExtentFit(reason="region extent off (not requested)"))
    report = report.model_copy(update={"image_threshold": img_thr, "image_threshold_reason": img_reason,
                                       "mask_step": ref, "extent": ext.params, "extent_reason": ext.reason,
                                       "n_image_labels_only": val.n_unmasked,
                                       "target_escape_rate": target_escape_rate,
                                       "normal_scores": drift_reference(scores[~val.anomalous]),
                                       "val_operating_curve": operating_curve(scores, val.anomalous)
                                       if val.anomalous.any() and not val.anomalous.all() else None,
                                       "notes": [*label_notes, *report.notes, *([variant_note] if variant_note else []),
                                                 ref.reason, ext.reason]})
    if n_anom and not n_masked:
        report = report.model_copy(update={"notes": [n.replace("0 anomalous validation image(s)", "0 masked validation "
                                                               "defect(s)") for n in report.notes]})
    return report, maps


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
    framing = getattr(model, "framing", None)
    return Profile(product=product, model_kind=model.kind, backbone=model.backbone_name,
                   input_size=model.input_size, geometry=framing.geometry if framing is not None else Geometry(),
                   threshold=report.threshold, threshold_method=report.chosen,
                   image_threshold=report.image_threshold,
                   thresholds=report.thresholds(),
                   threshold_reason=report.reason + (f"; frame verdict: {report.image_threshold_reason}"
                                                     if report.image_threshold_reason else ""),
                   calibration_metrics={"validation": {m.method: {"threshold": m.threshold, "iou": m.val_iou,
                                                                  "f1": m.val_f1} for m in report.methods},
                                        "n_val_anomalous": report.n_anomalous, "n_val_normal": report.n_normal,
                                        "notes": report.notes, "normal_scores": report.normal_scores,
                                        **(metrics or {})},
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
                k_std: float = 3.0, quantile: float = 0.999,
                target_escape_rate: float | None = None) -> tuple[Profile, ThresholdReport]:
    """New threshold for the current profile from new validation images; no refit.

    Publishes a new version whose model files are copied from the current one.
    """
    reg = Registry(registry_dir)
    profile, bare = reg.load(product)
    model = served_model(profile, bare)
    method = prefer or (profile.threshold_method if profile.threshold_method in METHODS else "iou")
    report, _ = threshold_model(model, val, method, k_std, quantile, choose_setting=False,
                                target_escape_rate=target_escape_rate)
    new = recalibrated_profile(profile, model, report, {}, f"recalibrated from v{profile.version} on {len(val)} images")
    return publish_recalibrated(reg, profile, new), report


def recalibrated_profile(current: Profile, model: AnomalyModel, report: ThresholdReport, metrics: dict[str, Any],
                         notes: str) -> Profile:
    """The next version of ``current`` with ``report``'s thresholds and the same model, mask
    settings of its own report, categorizer, background and minimum region (not yet published)."""
    new = make_profile(current.product, model, report, {"recalibrated_from": current.version, **metrics},
                       current.background, current.categorizer, notes=notes, parent_version=current.version)
    return new.model_copy(update={"background_source": current.background_source,
                                  "min_region_px": current.min_region_px, "geometry": current.geometry})


def publish_recalibrated(reg: Registry, current: Profile, new: Profile) -> Profile:
    """Publish ``new`` with the model files of ``current`` (no refit); workers hot-reload it."""
    return reg.publish(new, source_dir=reg.version_dir(current.product, current.version))


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
        rows = val.pixel_rows
        val_curves = pixel_curves(ref.apply_all(val_maps[rows], val.images[rows]), val.masks[rows],
                                  extra=[t for t in report.thresholds().values() if t is not None])
    ev = evaluate_maps(name, product, test, maps, scores, report.thresholds(), report.chosen, report, val_curves,
                       raw_maps=raw)
    ev.extra["refinement"] = ref.model_dump()
    if report.extent:
        ev.served_masks = np.stack([served_mask(maps, i, report.threshold, raw, test.images, report.extent)
                                    for i in range(len(maps))])
        k = test.pixel_rows
        ev.extra["extent"] = extent_iou(maps[k], ev.served_masks[k], test.subset(k), report.threshold, report.extent)
    ev.category_eval = categorizer_evaluation(categorizer, test, maps, report.threshold, product, raw, report.extent,
                                              served=ev.served_masks)
    ev.extra["frame_kpis"] = served_frame_kpis(product, model, report, test, raw, scores)
    ev.extra["operating_curve"] = {"test": operating_curve(scores, test.anomalous),
                                   **({"validation": report.val_operating_curve}
                                      if report.val_operating_curve else {}),
                                   "image_threshold": report.image_threshold,
                                   "target_escape_rate": report.target_escape_rate}
    return ev


def served_frame_kpis(product: str, model: AnomalyModel, report: ThresholdReport, test: LabelledSet,
                      raw_maps: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Escape and false-reject rates of the verdicts the worker would serve with this report:
    the same ``judge`` on the raw maps, through the profile the report becomes."""
    from calibration.frame_kpis import frame_kpis
    from linewatch.inspection.extent import ExtentModel
    from linewatch.inspection.verdict import inspect_images

    profile = make_profile(product, model, report)
    extent = ExtentModel.from_params(report.extent) if report.extent else None
    verdicts = inspect_images(test.images, raw_maps, scores, profile, extent)
    return frame_kpis([v.verdict == "defect" for v in verdicts], test.anomalous)


# -- one shot --------------------------------------------------------------------------------------
def calibrate_product(dataset_root: str | Path | None, product: str, registry_dir: str | Path,
                      model_kind: str = "padim", *, input_size: int = 256, method: str = "iou",
                      options: dict[str, Any] | None = None, val_fraction: float = 1 / 3, seed: int = 0,
                      report_dir: str | Path | None = None, publish: bool = True, export_onnx: bool = True,
                      k_std: float = 3.0, quantile: float = 0.999, progress: bool = True,
                      categorizer_products: Sequence[str] = (), normal_dir: str | Path | None = None,
                      defect_dir: str | Path | None = None, normal_test_dir: str | Path | None = None,
                      target_escape_rate: float | None = None, geometry: Geometry | None = None) -> Profile:
    """Fit on ``<root>/<product>/train/good``, threshold on the validation split, evaluate on the
    test split (report folder when ``report_dir``), publish to ``registry_dir``; returns the
    published Profile (version 0 = not published when ``publish=False``).

    Plain folders instead of a dataset: ``normal_dir`` (fit), ``defect_dir`` and
    ``normal_test_dir`` (image-level labels, split into validation and test as a dataset's test
    images are). ``normal_dir`` alone may also replace a dataset's train/good.

    ``categorizer_products``: other products under ``dataset_root`` (``["all"]``: every one)
    whose labelled validation images also train the categorizer (``pooled_category_samples``;
    regions from their profiles in ``registry_dir``), this product's own weighed up.
    ``target_escape_rate``: the image threshold's placement (``threshold_model``); checked
    against the validation set before anything is fitted. ``geometry``: ROI and tiles
    (``linewatch.inspection.geometry``); the calibration frames' size is recorded from the first
    training image, and every image must fit it.
    """
    from calibration.data import plain_splits
    from calibration.datasets import load_normal_folder

    root = Path(dataset_root) if dataset_root is not None else None
    if root is None and (normal_dir is None or defect_dir is None):
        raise UserError("run: give --dataset, or --normal-dir with --defect-dir and --normal-test-dir")
    if root is not None and defect_dir is not None:
        raise UserError("run: give --dataset or --defect-dir/--normal-test-dir, not both")
    from calibration.data import open_product

    train_ds = load_normal_folder(Path(normal_dir), product) if normal_dir is not None else open_product(root, product)
    size = resolve_framing(geometry, input_size, train_ds.train[0].path) if train_ds.train else input_size
    train = train_ds.train_images(size, progress=progress)
    if len(train) < 2:
        raise UserError(f"{normal_dir or root}: need at least 2 normal images, found {len(train)}")
    if defect_dir is not None:
        val, test = plain_splits(product, Path(defect_dir), Path(normal_test_dir) if normal_test_dir else None,
                                 size, val_fraction, seed, progress=progress)
    else:
        val, test = load_product_splits(root, product, size, val_fraction, seed, progress=progress)
    where = Path(defect_dir) if defect_dir is not None else root / product
    if target_escape_rate is not None:
        check_target_supported(target_escape_rate, int(val.anomalous.sum()), where)
    pool = resolve_categorizer_products(root, product, categorizer_products) if root is not None else []
    model, secs = fit_model(train, model_kind, input_size, options, progress,
                            size if isinstance(size, Framing) else None)
    report, val_maps = threshold_model(model, val, method, k_std, quantile, progress=progress,
                                       target_escape_rate=target_escape_rate)
    pooled = pooled_category_samples(root, pool, input_size, Path(registry_dir), val_fraction, seed) if pool else []
    why: list[str] = []
    categorizer = fit_categorizer(val, report.mask_step.apply_all(val_maps, val.images),
                                  report.threshold, product, raw_maps=val_maps, normal=normal_appearance(train),
                                  pooled=pooled, extent=report.extent, why=why)
    if why:
        report = report.model_copy(update={"notes": [*report.notes, *why]})
    ev = evaluate_model(model_kind, product, model, test, report, val, val_maps, categorizer)
    metrics = {"test": ev.headline(), "fit_seconds": round(secs, 2), "n_train": int(len(train)),
               "n_val": len(val), "n_test": len(test), "labels": label_summary(val, test, report)}
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
    source = f"{normal_dir}" if normal_dir is not None else str(root)
    profile = make_profile(product, model, report, metrics, bg, categorizer,
                           notes=f"calibrate_product: {model_kind} on {len(train)} normal images of {source}")
    if not publish:
        return profile
    return Registry(registry_dir).publish(profile, model, export_onnx=export_onnx)


def label_summary(val: LabelledSet, test: LabelledSet, report: ThresholdReport) -> dict[str, Any]:
    """How the defects were labelled and what that decided, in the profile (``calibrate show``):
    a line engineer reading a profile fitted on image labels must see that its pixel threshold
    comes from normal statistics and that its pixel metrics need masks."""
    from calibration.thresholds import SUPERVISED

    pixel = (f"pixel threshold from the normal images' statistics ({report.chosen}): no validation defect has a "
             "mask" if report.n_anomalous == 0 and val.anomalous.any() and report.chosen not in SUPERVISED
             else f"pixel threshold {report.chosen} on {report.n_anomalous} masked + {report.n_normal} normal "
                  "validation images")
    return {"validation": val.mask_coverage(), "test": test.mask_coverage(), "pixel_threshold": pixel,
            "image_threshold": report.image_threshold_reason}
