"""The mask-step search: which ``MaskStep`` (colour cue, peak-relative refinement) and which of
the model's own settings (PaDiM's texture term) a product's validation images earn, each by the
one rule of ``calibration.adoption``."""

from __future__ import annotations

import logging

import numpy as np

from calibration.adoption import MIN_GAIN, clears, improves
from calibration.data import LabelledSet
from calibration.thresholds import estimate_thresholds
from linewatch.inspection.mask import MaskStep
from linewatch.models.base import AnomalyModel

log = logging.getLogger(__name__)

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
    on the *validation* maps, adopted when its mean per-image IoU gain over the plain map, paired
    per image, exceeds ``MIN_GAIN`` (``calibration.adoption.improves``: the procedure whose
    held-out gain docs/results/ablation-synthetic.md measured).

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
    ok, figures = improves(served - plain)
    parts = ([f"colour cue scale {cue[0]:g}, floor {cue[1]:g}"] if cue[0] > 0 else []) + \
            ([f"peak-relative refinement fraction {f:g}, window {w}"] if f > 0 else [])
    if not ok:
        return MaskStep(reason=f"mask step off: the best setting ({' + '.join(parts)}) gains {figures} on "
                               f"{n_anom} anomalous validation images, not above the plain map's by {MIN_GAIN}")
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
