"""Fit the product-agnostic defect categorizer with scikit-learn.

Why: categories are learnt from the same few labelled validation images calibration uses, of
all products together (a scratch is a scratch on a cap or on a carpet). Each region of a
labelled anomalous image that touches its labelled defect becomes one training row (features
from ``linewatch.inspection.categorize.region_features``); regions that miss it -- a detector's false
blobs, which the worker serves as well -- become "spurious" rows. Images labelled ``combined``
carry no per-region label, so they teach the frame level: a frame classifier on the regions'
out-of-fold probabilities and feature summaries (``linewatch.inspection.categorize.frame_features``) is
trained on every labelled frame, and the fallback rule (two regions of different kinds make
``combined``) is tuned on them too. The result is a dict for ``Profile.categorizer``: JSON
settings plus the fitted estimators, which the registry stores as skops files
(``linewatch.inspection.forest``); inference is ``linewatch.inspection.categorize``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from linewatch.inspection.categorize import (BASE_KINDS, FEATURES, FRAME_FEATURES, PARAMS_VERSION, SPURIOUS, UNKNOWN,
                                             categorize_regions, frame_category, frame_features, region_features,
                                             region_kinds)
from linewatch.errors import UserError
from linewatch.inspection.planes import FramePlanes, labels_of
from linewatch.messages import CATEGORIES

log = logging.getLogger(__name__)


@dataclass
class CategorySample:
    """One labelled anomalous image and the regions to describe.

    ``mask`` is where the regions are (ground truth, or a model's thresholded map at inference
    size); ``gt_mask`` (optional) keeps training rows to regions that touch the true defect;
    ``normal`` the sample's product's ``linewatch.inspection.categorize.normal_appearance`` (novelty
    features; None -> 0).
    """

    image: np.ndarray
    category: str
    mask: np.ndarray
    amap: np.ndarray | None = None
    threshold: float | None = None
    background: bool | None = None
    product: str = ""
    gt_mask: np.ndarray | None = None
    normal: dict[str, Any] | None = None


@dataclass
class SampleFeatures:
    feats: np.ndarray  # (n_regions, F)
    areas: np.ndarray  # (n_regions,)
    overlap: np.ndarray  # (n_regions,) bool: touches the true defect (all True without gt_mask)


def describe(sample: CategorySample, min_region_px: int = 16) -> SampleFeatures:
    """Region features of one sample (components smaller than ``min_region_px`` dropped)."""
    lab, n = labels_of(sample.mask)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = np.flatnonzero(areas >= max(1, min_region_px)) + 1
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1)
    lab = lut[lab]
    feats = region_features(sample.image, sample.amap, lab, sample.threshold, sample.background,
                            FramePlanes.of(sample.image), normal=sample.normal)
    areas = areas[keep - 1].astype(float) if len(keep) else np.zeros(0)
    if sample.gt_mask is not None and len(keep):
        gt = np.asarray(sample.gt_mask) > 0
        hit = np.bincount(lab[gt].ravel(), minlength=len(keep) + 1)[1:]
        overlap = (hit >= np.minimum(10, 0.2 * areas)) & (hit > 0)
    else:
        overlap = np.ones(len(keep), bool)
    return SampleFeatures(feats, areas, overlap)


def _check_labels(samples: Sequence[CategorySample]) -> None:
    for i, s in enumerate(samples):
        if s.category not in CATEGORIES:
            raise UserError(f"categorizer sample {i} ({s.product or 'product ?'}): category {s.category!r} "
                            f"is not one of {', '.join(CATEGORIES)}")


def _fit_classifier(x: np.ndarray, y: np.ndarray, kind: str, seed: int, weights: np.ndarray | None):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    if kind == "ensemble":
        return [_fit_classifier(x, y, "logreg", seed, weights), _fit_classifier(x, y, "forest", seed, weights)]
    if kind == "logreg":
        clf = LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000)
    elif kind == "forest":
        clf = RandomForestClassifier(n_estimators=100, max_depth=10, min_samples_leaf=2, class_weight="balanced",
                                     random_state=seed, n_jobs=1)
    else:
        raise UserError(f"categorizer kind {kind!r} is not logreg, forest or ensemble")
    clf.fit(x, y, sample_weight=weights)
    return clf


def _classes(clf: Any) -> np.ndarray:
    return clf[0].classes_ if isinstance(clf, list) else clf.classes_


MIN_SPURIOUS_ROWS = 4  # fewer regions off the labelled defects than this: no "spurious" class

# features whose size grows with how strongly a product's defects contrast with its material (a
# dark hole on bright turf vs on a brick): differences, z-scores, novelty levels and log-ratios
CONTRAST_FEATURES = ("map_mean", "map_max", "dL", "dL_abs", "dab", "dchroma", "tex_ratio", "std_ratio", "zL",
                     "zab", "z_p10", "z_p90", "nov_mean", "nov_p90", "nov_dL",
                     "tex_nov_mean", "tex_nov_p90", "nov_grad")


def contrast_views(x: np.ndarray, groups: np.ndarray, n_views: int, spread: float, seed: int) -> np.ndarray:
    """``n_views`` copies of the rows (raw ``FEATURES`` columns) with the contrast features of each
    frame scaled by one factor drawn log-uniformly from [1/spread, spread].

    Why: the categories must transfer to products never seen in training, and how much a
    defect stands out is a property of the product (foreign material on plain green turf is far
    more novel than on grey gravel) -- a classifier trained on a few products otherwise learns
    their contrast levels instead of the signs and proportions that mean the same everywhere
    (leave-one-product-out macro-F1 on the regions the detector serves 0.54 -> 0.61 and 0.56 -> 0.60
    on two seeds of the synthetic line, within product 0.77 -> 0.78 and 0.75 -> 0.78;
    docs/results/categories-synthetic.md).
    """
    cols = [FEATURES.index(f) for f in CONTRAST_FEATURES]
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    out = []
    for _ in range(n_views):
        f = np.exp(rng.uniform(-np.log(spread), np.log(spread), len(uniq)))[inv]
        v = x.copy()
        v[:, cols] *= f[:, None]
        out.append(v)
    return np.concatenate(out) if out else np.zeros((0, x.shape[1]))


def _image_groups(samples: Sequence[CategorySample]) -> np.ndarray:
    """Per sample, the index of the first sample with the same image bytes.

    Why: one validation image enters training several times (the served regions and the
    unrefined map's regions, self-training's guesses, a file copied twice); out-of-fold
    probabilities are only honest when every view of an image sits in the same fold.
    """
    import hashlib

    first: dict[bytes, int] = {}
    return np.asarray([first.setdefault(hashlib.blake2b(np.ascontiguousarray(s.image).tobytes(),
                                                        digest_size=16).digest(), i)
                       for i, s in enumerate(samples)], dtype=np.int64)


def _rows(described: Sequence[SampleFeatures], samples: Sequence[CategorySample]):
    """Training rows: regions touching the labelled defect of single-kind frames get the frame's
    kind; regions of *any* labelled frame that miss its defect (a detector's false blobs; only
    known when the sample has a true mask) get SPURIOUS."""
    xs, ys, groups, prods = [], [], [], []
    for i, (d, s) in enumerate(zip(described, samples)):
        knows = s.gt_mask is not None
        for f, ok in zip(d.feats, d.overlap):
            if ok and s.category in BASE_KINDS:
                label = s.category
            elif not ok and knows:
                label = SPURIOUS
            else:
                continue
            xs.append(f)
            ys.append(label)
            groups.append(i)
            prods.append(s.product)
    y = np.asarray(ys)
    keep = np.ones(len(y), bool) if (y == SPURIOUS).sum() >= MIN_SPURIOUS_ROWS else y != SPURIOUS
    width = described[0].feats.shape[1] if described else len(FEATURES)
    return (np.asarray(xs, np.float64).reshape(-1, width)[keep], y[keep], np.asarray(groups)[keep],
            np.asarray(prods)[keep])


def train_categorizer(samples: Sequence[CategorySample], kind: str = "forest", seed: int = 0,
                      min_region_px: int = 16, product: str | None = None, product_weight: float = 2.0,
                      features: Sequence[str] = FEATURES, region_source: str = "unspecified",
                      progress: bool = False, normal: dict[str, Any] | None = None,
                      frame_model: str = "forest", n_contrast_views: int = 3,
                      contrast_spread: float = 2.0) -> dict[str, Any]:
    """Train on labelled anomalous samples (any products); returns the parameters.

    ``product`` with ``product_weight`` weighs that product's own examples up (its profile's
    categorizer), while every product's examples still count. Needs at least two examples of
    at least two of the base kinds. ``normal``: the normal appearance of the product the
    parameters are for (stored with them; each sample brings its own product's for training).
    ``frame_model``: "forest" trains a frame classifier on every labelled frame (all four
    categories needed, at least two frames each; otherwise, or with "rule", the tuned rule).
    ``n_contrast_views`` extra copies of the region rows with their contrast scaled
    (``contrast_views``; 0: none).
    """
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler
    from tqdm.auto import tqdm

    _check_labels(samples)
    described = [describe(s, min_region_px) for s in tqdm(samples, desc="categorizer features", unit="img",
                                                                 disable=not progress, leave=False)]
    x, y, groups, prods = _rows(described, samples)
    classes, counts = np.unique(y, return_counts=True)
    base = np.isin(classes, BASE_KINDS)
    if base.sum() < 2 or counts[base].min() < 2:
        raise UserError("categorizer: need at least 2 labelled regions of at least 2 of structural, surface, "
                        f"contamination (got {dict(zip(classes.tolist(), counts.tolist()))})")
    idx = [FEATURES.index(f) for f in features]
    n_rows = len(y)
    if n_contrast_views > 0:
        views = 1 + int(n_contrast_views)
        x = np.concatenate([x, contrast_views(x, groups, int(n_contrast_views), contrast_spread, seed)])
        y, groups, prods = np.tile(y, views), np.tile(groups, views), np.tile(prods, views)
    x = np.nan_to_num(x[:, idx], nan=0.0, posinf=10.0, neginf=-10.0)
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 1e-9, scaler.scale_, 1.0)
    xs = (x - scaler.mean_) / scale
    weights = None
    if product:
        weights = np.where(prods == product, float(product_weight), 1.0)
    clf = _fit_classifier(xs, y, kind, seed, weights)
    params: dict[str, Any] = {
        "version": PARAMS_VERSION,
        "features": list(features),
        "classes": _classes(clf).tolist(),
        "scaler_mean": scaler.mean_.tolist(),
        "scaler_scale": scale.tolist(),
        "classifier": clf,
        "min_region_px": int(min_region_px),
        "frame_rule": {"combined_min_conf": 0.5, "combined_min_rel_area": 0.0},
    }
    # out-of-fold region probabilities for the training frames (honest confidences), the full
    # model for the combined frames; then tune the frame rule on every labelled frame
    oof: dict[int, np.ndarray] = {}
    folds = _image_groups(samples)[groups]  # every view of one image in one fold
    n_groups = len(np.unique(folds))
    if n_groups >= 3:
        for tr, te in GroupKFold(n_splits=min(5, n_groups)).split(xs, y, folds):
            if len(np.unique(y[tr])) < len(classes):
                continue
            sub = _fit_classifier(xs[tr], y[tr], kind, seed, None if weights is None else weights[tr])
            p_sub = {**params, "classifier": sub, "classes": _classes(sub).tolist()}
            for g in np.unique(groups[te]):
                d = described[g]
                oof[int(g)] = categorize_regions(p_sub, d.feats)[1]
    frames = []
    for i, (d, s) in enumerate(zip(described, samples)):
        probs = oof.get(i)
        if probs is None:
            probs = categorize_regions(params, d.feats)[1]
        frames.append((s.category, d.areas, probs, d.feats))
    params["frame_rule"] = _tune_rule(frames, params["classes"])
    frame_weights = [float(product_weight) if product and s.product == product else 1.0 for s in samples]
    if frame_model != "rule":
        fc = _fit_frame_classifier(frames, params["classes"], frame_model, seed, frame_weights)
        if fc is not None:
            params["frame_classifier"] = fc
    if normal is not None:
        params["normal"] = normal
    params["trained_on"] = {
        "n_frames": len(samples), "n_regions": int(n_rows),
        "regions_per_kind": dict(zip(classes.tolist(), counts.astype(int).tolist())),
        "n_combined_frames": int(sum(s.category == "combined" for s in samples)),
        "products": sorted({s.product for s in samples if s.product}),
        "region_source": region_source, "kind": kind, "weighted_product": product,
        "contrast_views": int(n_contrast_views), "contrast_spread": float(contrast_spread),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return params


def _fit_frame_classifier(frames: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], classes: Sequence[str],
                          kind: str, seed: int, weights: Sequence[float]) -> dict[str, Any] | None:
    """A classifier from ``frame_features`` (the regions' out-of-fold probabilities and feature
    summaries) to the frame's category, or None when some category has fewer than two labelled
    frames."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.preprocessing import StandardScaler

    rows = [(frame_features(p, a, classes, f), c, w) for (c, a, p, f), w in zip(frames, weights) if len(a)]
    if not rows:
        return None
    y = np.asarray([c for _, c, _ in rows])
    got, counts = np.unique(y, return_counts=True)
    if set(got) != set(CATEGORIES) or counts.min() < 2:
        return None
    x = np.stack([v for v, _, _ in rows])
    scaler = StandardScaler().fit(x)
    scale = np.where(scaler.scale_ > 1e-9, scaler.scale_, 1.0)
    if kind != "forest":
        raise UserError(f"categorizer frame model {kind!r} is not forest or rule")
    clf = RandomForestClassifier(n_estimators=200, max_depth=5, min_samples_leaf=2, class_weight="balanced",
                                 random_state=seed, n_jobs=1)
    clf.fit((x - scaler.mean_) / scale, y, sample_weight=np.asarray([w for _, _, w in rows]))
    return {"features": list(FRAME_FEATURES), "classes": clf.classes_.tolist(), "scaler_mean": scaler.mean_.tolist(),
            "scaler_scale": scale.tolist(), "classifier": clf, "n_frames": int(len(y))}


def _tune_rule(frames: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], classes: Sequence[str],
               ) -> dict[str, float]:
    best, best_rule = -1.0, {"combined_min_conf": 0.5, "combined_min_rel_area": 0.0}
    truth = [c for c, *_ in frames]
    if "combined" not in truth:
        return {**best_rule, "tuned": 0.0}
    base = []  # as linewatch.inspection.categorize.frame_decision sees them without a frame classifier
    for _, areas, probs, _ in frames:
        per, pb = region_kinds(probs, classes)
        base.append((areas, pb, per))
    for conf in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        for rel in (0.0, 0.05, 0.1, 0.2, 0.35):
            rule = {"combined_min_conf": conf, "combined_min_rel_area": rel}
            pred = []
            for areas, pb, per in base:
                pred.append(frame_category(per, areas, pb, BASE_KINDS, rule)[0] if len(areas) else UNKNOWN)
            f1 = macro_f1(truth, pred)
            if f1 > best + 1e-9:
                best, best_rule = f1, rule
    return {**best_rule, "tuned": 1.0, "train_macro_f1": round(best, 4)}


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def macro_f1(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str] = CATEGORIES) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(list(truth), list(pred), labels=list(labels), average="macro", zero_division=0))


def predict_frames(params: dict[str, Any] | None, samples: Sequence[CategorySample],
                   min_region_px: int | None = None) -> list[tuple[str, float]]:
    """Frame (category, confidence) for each sample, exactly as the workers compute it."""
    from linewatch.inspection.categorize import categorize_frame

    out = []
    for s in samples:
        px = params.get("min_region_px", 16) if (params and min_region_px is None) else (min_region_px or 16)
        lab, n = labels_of(s.mask)
        areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        keep = np.flatnonzero(areas >= px) + 1
        lut = np.zeros(n + 1, np.int32)
        lut[keep] = np.arange(1, len(keep) + 1)
        lab = lut[lab]
        if not len(keep):
            out.append((UNKNOWN, 0.0))
            continue
        r = categorize_frame(s.image, s.amap, labels=lab, params=params, threshold=s.threshold,
                             background=s.background)
        out.append((r.category, r.confidence))
    return out


def evaluate_categorizer(params: dict[str, Any] | None, samples: Sequence[CategorySample]) -> dict[str, Any]:
    """Macro-F1 over the four categories, accuracy, and the confusion matrix (rows = truth,
    columns = prediction, the last column "unknown" = no region found / no categorizer)."""
    _check_labels(samples)
    return category_scores([s.category for s in samples], [c for c, _ in predict_frames(params, samples)])


def category_scores(truth: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    """``evaluate_categorizer``'s figures from frame categories already predicted (pooling the
    predictions of several categorizers needs no second pass)."""
    from sklearn.metrics import confusion_matrix

    cols = [*CATEGORIES, UNKNOWN]
    cm = confusion_matrix(truth, pred, labels=cols)[: len(CATEGORIES)]
    return {"macro_f1": macro_f1(truth, pred), "accuracy": float(np.mean([a == b for a, b in zip(truth, pred)]))
            if truth else 0.0, "n": len(truth), "labels": cols, "confusion": cm.tolist()}


def format_confusion(result: dict[str, Any]) -> str:
    cols = result["labels"]
    short = [c[:6] for c in cols]
    lines = ["truth \\ pred  " + " ".join(f"{c:>6s}" for c in short)]
    for name, row in zip(CATEGORIES, result["confusion"]):
        lines.append(f"{name[:13]:13s} " + " ".join(f"{v:6d}" for v in row))
    return "\n".join(lines)
