"""Product-agnostic defect categories at inference time (structural, surface, contamination,
combined), and the background flag of a product.

Why this shape: the study's categories are defined by what a defect *looks like* relative to the
normal appearance around it -- a hole shows what is behind the part and breaks its outline, a
scratch or dent keeps the material but changes its finish, contamination is foreign material of
another colour/texture -- and ``combined`` is several connected components of different kinds.
So each detected region is described by features that mean the same on a bottle cap and on a
carpet (shape, anomaly-map strength relative to the product's threshold, colour/texture change
against a ring of normal material around the region, and how unusual its colours/texture are
for the product -- ``normal_appearance`` of its normal images -- which survives the blurred,
shifted regions a detector gives), a small tree/linear classifier trained on the few labelled
validation images of *all* products maps them to a kind (or to "spurious": a detector's false
blob, never reported), and a frame classifier on summaries of the regions' probabilities and
of a few of their features (``frame_features``) gives the frame's category; without one, a
tuned rule does.

The trained parameters are plain JSON in ``Profile.categorizer`` (the product's normal
appearance included), except the fitted classifiers, which are scikit-learn estimators stored
as skops files beside the weights and loaded once (``linewatch.inspection.forest``); the
worker and the offline evaluation call the same functions here. Training lives in
``calibration/categorizer_fit.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from linewatch.messages import CATEGORIES
from linewatch.inspection.forest import classifier_proba
from linewatch.inspection.planes import FramePlanes, labels_of

log = logging.getLogger(__name__)

BASE_KINDS = ("structural", "surface", "contamination")
UNKNOWN = "unknown"
# a region classifier trained on a detector's regions also learns this class: regions that do
# not touch the labelled defect (a detector's false blobs, the worker serves them too). It is
# never reported: it only discounts a region's say in the frame's category.
SPURIOUS = "spurious"
PARAMS_VERSION = 2  # 2: the six "core" region features deleted (docs/results/ablation-synthetic.md)

FEATURES = (
    "log_area_frac",  # size
    "elongation",  # log(major / minor axis) from second moments
    "eccentricity",
    "solidity",  # area / convex hull area
    "compactness",  # 4 pi A / P^2
    "extent",  # area / bounding-box area
    "log_width",  # mean width 2A/P relative to the frame side
    "map_mean",  # log(mean map / threshold)
    "map_max",  # log(max map / threshold)
    "map_cv",  # std / mean of the map inside
    "dL",  # lightness inside - ring (0..1 scale)
    "dL_abs",
    "dab",  # colour (a*, b*) shift magnitude vs ring
    "dchroma",  # chroma inside - ring (saturation change)
    "frac_dark",  # share of pixels much darker than the ring
    "frac_bright",  # share much brighter
    "frac_colour",  # share of pixels whose colour is far from the ring's
    "tex_ratio",  # log(gradient energy inside / ring)
    "std_ratio",  # log(lightness std inside / ring)
    "background",  # 1 = object on backdrop, 0 = close-up texture, 0.5 unknown
    "zL",  # lightness shift in units of the ring's lightness spread
    "zab",  # colour shift in units of the ring's colour spread
    "z_p10",  # darkest tenth inside vs the ring's darkest tenth, in ring spreads
    "z_p90",  # brightest tenth inside vs the ring's brightest tenth
    # novelty against the product's normal appearance (``normal_appearance``; 0 without one): how
    # unlikely the region's colours / (lightness, texture) pairs are under the normal images'
    # distribution. Survives a blurred region: a few truly foreign pixels stand out however
    # much normal material the detector's region also holds, and it means the same on any product
    "nov_mean",  # mean colour novelty, in units of the normal pixels' (q99 - median)
    "nov_frac",  # share of pixels above the normal pixels' 99th percentile
    "nov_frac_hi",  # share above the 99.9th percentile
    "nov_p90",  # 90th percentile of the colour novelty
    "nov_dL",  # lightness of the novel pixels minus the rest of the region
    "tex_nov_mean",  # the same for (lightness, local gradient energy)
    "tex_nov_frac",
    "tex_nov_p90",
    "nov_L",  # absolute lightness of the novel pixels (a hole's dark backing vs foreign material)
    "nov_chroma",  # their colourfulness
    "nov_L_std",  # their lightness spread (a uniform backing vs textured material)
    "nov_grad",  # log(their gradient energy / the ring's)
)


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------
def region_features(image: np.ndarray, amap: np.ndarray | None, labels: np.ndarray, threshold: float | None = None,
                    background: bool | None = None, planes: FramePlanes | None = None,
                    normal: dict[str, Any] | None = None) -> np.ndarray:
    """(n_regions, len(FEATURES)) float32 for the components of ``labels`` (1..n).

    ``image`` HxWx3 uint8 RGB, ``amap`` HxW at the same size (None -> map features 0),
    ``threshold`` the product's pixel threshold (map features are relative to it), ``normal``
    the product's ``normal_appearance`` (None -> novelty features 0).
    """
    labels, n = labels_of(labels)
    h, w = labels.shape
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    if amap is not None and amap.shape != (h, w):
        amap = cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    planes = planes or FramePlanes.of(image)
    lab, grad = planes.lab, planes.grad
    any_defect = labels > 0
    side = float(max(h, w))
    thr = float(threshold) if threshold and threshold > 0 else None
    bg = 0.5 if background is None else float(bool(background))
    out = np.zeros((n, len(FEATURES)), np.float32)
    if n == 0:
        return out
    nov = novelty_planes(planes, normal) if normal else None
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(xs) == 0:
            continue
        area = float(len(xs))
        rw = int(np.clip(0.35 * math.sqrt(area) + 4, 5, 24))
        x0, x1 = max(0, xs.min() - rw), min(w, xs.max() + rw + 1)
        y0, y1 = max(0, ys.min() - rw), min(h, ys.max() + rw + 1)
        reg = labels[y0:y1, x0:x1] == k
        reg_u8 = reg.astype(np.uint8)
        ring = cv2.dilate(reg_u8, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rw + 1, 2 * rw + 1))) > 0
        ring &= ~any_defect[y0:y1, x0:x1]
        if ring.sum() < 8:  # region fills its neighbourhood: compare with the whole frame's normal part
            ring = ~any_defect[y0:y1, x0:x1]
            if ring.sum() < 8:
                ring = ~reg
            if not ring.any():  # the region is the whole frame: nothing to compare with but itself
                ring = reg
        # shape
        cnts, _ = cv2.findContours(reg_u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        perim = float(sum(cv2.arcLength(c, True) for c in cnts)) or 1.0
        hull_area = float(sum(cv2.contourArea(cv2.convexHull(c)) for c in cnts)) or area
        m = cv2.moments(reg_u8, binaryImage=True)
        mu20, mu02, mu11 = m["mu20"] / area, m["mu02"] / area, m["mu11"] / area
        common = math.sqrt(max(((mu20 - mu02) / 2) ** 2 + mu11 ** 2, 0.0))
        l1 = (mu20 + mu02) / 2 + common + 1 / 12
        l2 = max((mu20 + mu02) / 2 - common, 0.0) + 1 / 12
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        f = out[k - 1]
        f[0] = math.log(area / (h * w))
        f[1] = 0.5 * math.log(l1 / l2)
        f[2] = math.sqrt(max(0.0, 1 - l2 / l1))
        f[3] = min(1.0, area / max(hull_area, 1.0))
        f[4] = min(1.0, 4 * math.pi * area / perim ** 2)
        f[5] = area / float(bw * bh)
        f[6] = math.log(max(2 * area / perim, 0.5) / side)
        # anomaly map
        if amap is not None:
            vals = amap[y0:y1, x0:x1][reg].astype(np.float64)
            scale = thr if thr is not None else max(float(np.median(amap)), 1e-6)
            mean = max(float(vals.mean()), 1e-9)
            f[7] = math.log(max(mean / scale, 1e-3))
            f[8] = math.log(max(float(vals.max()) / scale, 1e-3))
            f[9] = float(vals.std()) / mean
        # colour / texture against the ring of normal material around the region
        lab_c = lab[y0:y1, x0:x1]
        li, lr = lab_c[..., 0][reg], lab_c[..., 0][ring]
        abi, abr = lab_c[..., 1:][reg], lab_c[..., 1:][ring]
        mr_l, sr_l = float(lr.mean()), float(lr.std()) + 0.02
        mab_r = abr.mean(0)
        f[10] = float(li.mean()) - mr_l
        f[11] = abs(f[10])
        f[12] = float(np.linalg.norm(abi.mean(0) - mab_r))
        f[13] = float(np.linalg.norm(abi, axis=1).mean() - np.linalg.norm(abr, axis=1).mean())
        f[14] = float((li < mr_l - 2 * sr_l).mean())
        f[15] = float((li > mr_l + 2 * sr_l).mean())
        sab = float(np.linalg.norm(abr - mab_r, axis=1).mean()) + 0.01
        f[16] = float((np.linalg.norm(abi - mab_r, axis=1) > 3 * sab).mean())
        g = grad[y0:y1, x0:x1]
        f[17] = math.log((float(g[reg].mean()) + 0.01) / (float(g[ring].mean()) + 0.01))
        f[18] = math.log((float(li.std()) + 0.01) / (float(lr.std()) + 0.01))
        f[19] = bg
        f[20] = f[10] / sr_l
        f[21] = f[12] / sab
        f[22] = (float(np.percentile(li, 10)) - float(np.percentile(lr, 10))) / sr_l
        f[23] = (float(np.percentile(li, 90)) - float(np.percentile(lr, 90))) / sr_l
        if nov is not None:
            zc, zt = nov[0][y0:y1, x0:x1][reg], nov[1][y0:y1, x0:x1][reg]
            hi = zc > 1.0
            f[24] = float(zc.mean())
            f[25] = float(hi.mean())
            f[26] = float((zc > nov[2]).mean())
            f[27] = float(np.percentile(zc, 90))
            f[28] = float(li[hi].mean() - li[~hi].mean()) if hi.any() and (~hi).any() else 0.0
            f[29] = float(zt.mean())
            f[30] = float((zt > 1.0).mean())
            f[31] = float(np.percentile(zt, 90))
            sel = hi if hi.sum() >= 3 else np.ones_like(hi)
            f[32] = float(li[sel].mean())
            f[33] = float(np.linalg.norm(abi[sel], axis=1).mean())
            f[34] = float(li[sel].std())
            f[35] = math.log((float(g[reg][sel].mean()) + 0.01) / (float(g[ring].mean()) + 0.01))
    return out


# ------------------------------------------------------------------------------------------------
# the product's normal appearance (colour and texture statistics of its normal images)
# ------------------------------------------------------------------------------------------------
NORMAL_VERSION = 1
LAB_BINS = (16, 32, 32)  # L 0..1, a and b over +-AB_RANGE
AB_RANGE = 0.3
TEX_BINS = (16, 16)  # L 0..1, log(local gradient energy + 0.01) over [log 0.01, log 2]
_LOG_G = (math.log(0.01), math.log(2.0))


def _bin(x: np.ndarray, lo: float, hi: float, nb: int) -> np.ndarray:
    return np.clip(((x - lo) * (nb / (hi - lo))).astype(np.int64), 0, nb - 1)


def _appearance_index(planes: FramePlanes) -> tuple[np.ndarray, np.ndarray]:
    """Flat histogram indices per pixel: (Lab colour, (lightness, local texture))."""
    lab = planes.lab
    li = _bin(lab[..., 0], 0.0, 1.0, LAB_BINS[0])
    ai = _bin(lab[..., 1], -AB_RANGE, AB_RANGE, LAB_BINS[1])
    bi = _bin(lab[..., 2], -AB_RANGE, AB_RANGE, LAB_BINS[2])
    g = np.log(cv2.GaussianBlur(planes.grad, (0, 0), 1.5) + 0.01)
    ti = _bin(lab[..., 0], 0.0, 1.0, TEX_BINS[0]) * TEX_BINS[1] + _bin(g, *_LOG_G, TEX_BINS[1])
    return (li * LAB_BINS[1] + ai) * LAB_BINS[2] + bi, ti


def _smooth(h: np.ndarray) -> np.ndarray:
    """Gaussian (sigma 1 bin, zero beyond the edges) along every axis of a histogram."""
    from scipy.ndimage import convolve1d

    k = np.array([0.054, 0.242, 0.403, 0.242, 0.054])
    for ax in range(h.ndim):
        h = convolve1d(h, k, axis=ax, mode="constant")
    return h


def normal_appearance(normal_images: np.ndarray, max_images: int = 64) -> dict[str, Any]:
    """Colour and (lightness, texture) histograms of a product's normal images, as negative
    log-likelihood tables with the normal pixels' own spread (JSON lists, for the profile).

    Why: a detector's region is a blurred blob around the defect; measuring how *unusual for
    this product* its pixels are keeps the defect's evidence (foreign colour, a hole's backing,
    a scratch's glint) however much normal material the blob also covers. Half of the images
    build the tables, the other half say what novelty normal pixels themselves reach.
    """
    imgs = np.asarray(normal_images)
    if imgs.ndim == 3:
        imgs = imgs[None]
    if len(imgs) == 0:
        raise ValueError("normal appearance needs at least one normal image")
    step = max(1, len(imgs) // max_images)
    imgs = imgs[::step][:max_images]
    build, held = (imgs[0::2], imgs[1::2]) if len(imgs) >= 2 else (imgs, imgs)
    hc = np.zeros(int(np.prod(LAB_BINS)))
    ht = np.zeros(int(np.prod(TEX_BINS)))
    for im in build:
        ci, ti = _appearance_index(FramePlanes.of(im))
        hc += np.bincount(ci.ravel(), minlength=hc.size)
        ht += np.bincount(ti.ravel(), minlength=ht.size)
    out: dict[str, Any] = {"version": NORMAL_VERSION, "n_images": int(len(imgs))}
    tables = []
    for name, h, shape in (("lab", hc, LAB_BINS), ("tex", ht, TEX_BINS)):
        h = _smooth(h.reshape(shape)).ravel()
        h = h + 1e-5 * h.sum() / h.size
        nll = -np.log(h / h.sum())
        out[f"{name}_bins"] = list(shape)
        out[f"{name}_nll"] = np.round(nll, 2).tolist()
        tables.append(nll)
    vals_c, vals_t = [], []
    for im in held:
        ci, ti = _appearance_index(FramePlanes.of(im))
        vals_c.append(tables[0][ci[::2, ::2]].ravel())
        vals_t.append(tables[1][ti[::2, ::2]].ravel())
    for name, v in (("lab", np.concatenate(vals_c)), ("tex", np.concatenate(vals_t))):
        med, q99, q999 = (float(x) for x in np.quantile(v, [0.5, 0.99, 0.999]))
        out[f"{name}_median"], out[f"{name}_q99"], out[f"{name}_q999"] = med, max(q99, med + 1e-3), q999
    return out


_MEMO: dict[int, tuple[Any, Any]] = {}


def _memo(obj: Any, build: Any) -> Any:
    """``build(obj)`` once per parameter object (keyed by identity; the object is kept alive with
    its result, so an id is never reused for a stale entry): the worker turns the same JSON
    lists into arrays on every frame otherwise."""
    hit = _MEMO.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    if len(_MEMO) > 1024:
        _MEMO.clear()
    out = build(obj)
    _MEMO[id(obj)] = (obj, out)
    return out


def novelty_planes(planes: FramePlanes, normal: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-pixel colour and texture novelty in units of the normal pixels' (q99 - median):
    1 = as unusual as the rarest percent of normal pixels. Also the 99.9th percentile's level."""
    if int(normal.get("version", 0)) != NORMAL_VERSION or list(normal.get("lab_bins", [])) != list(LAB_BINS) \
            or list(normal.get("tex_bins", [])) != list(TEX_BINS):
        raise ValueError("normal appearance: unsupported version or bins; recompute it with normal_appearance()")
    tabs = _memo(normal, lambda n: (np.asarray(n["lab_nll"], np.float32), np.asarray(n["tex_nll"], np.float32)))
    ci, ti = _appearance_index(planes)
    zc = (tabs[0][ci] - normal["lab_median"]) / (normal["lab_q99"] - normal["lab_median"])
    zt = (tabs[1][ti] - normal["tex_median"]) / (normal["tex_q99"] - normal["tex_median"])
    hi = (normal["lab_q999"] - normal["lab_median"]) / (normal["lab_q99"] - normal["lab_median"])
    return zc, zt, float(hi)


def _scaled(params: dict[str, Any], feats: np.ndarray, all_names: Sequence[str]) -> np.ndarray:
    names = params.get("features", list(all_names))
    idx = [list(all_names).index(nm) for nm in names]
    x = np.asarray(feats, np.float64).reshape(len(feats), -1)[:, idx]
    x = np.nan_to_num(x, nan=0.0, posinf=10.0, neginf=-10.0)
    return (x - np.asarray(params["scaler_mean"])) / np.asarray(params["scaler_scale"])


def predict_proba(params: dict[str, Any], feats: np.ndarray) -> np.ndarray:
    """(n, len(classes)) region probabilities of the categorizer's region classifier."""
    return classifier_proba(params["classifier"], _scaled(params, feats, FEATURES))


# ------------------------------------------------------------------------------------------------
# frame decision
# ------------------------------------------------------------------------------------------------
@dataclass
class FrameCategories:
    """The frame's category and confidence, the per-region ``(category, confidence)`` list, and
    the regions (``linewatch.messages.Region``) with their category filled when they were given.
    """

    category: str
    confidence: float
    per_region: list[tuple[str, float]] = field(default_factory=list)
    regions: list[Any] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)


def frame_category(per_region: Sequence[tuple[str, float]], areas: Sequence[float], probs: np.ndarray,
                   classes: Sequence[str], rule: dict[str, float] | None = None) -> tuple[str, float]:
    """``combined`` when at least two regions of different kinds are each confident enough and
    big enough (relative to the largest); otherwise the area-weighted most probable kind."""
    rule = rule or {}
    min_conf = float(rule.get("combined_min_conf", 0.5))
    min_rel = float(rule.get("combined_min_rel_area", 0.0))
    if not per_region:
        return UNKNOWN, 0.0
    areas_a = np.asarray(areas, np.float64)
    big = areas_a >= min_rel * areas_a.max()
    best: dict[str, float] = {}
    for (cat, conf), ok in zip(per_region, big):
        if ok and conf >= min_conf:
            best[cat] = max(best.get(cat, 0.0), conf)
    if len(best) >= 2:
        top = sorted(best.values(), reverse=True)[:2]
        return "combined", float(np.mean(top))
    wts = areas_a / max(areas_a.sum(), 1e-12)
    p = (np.asarray(probs) * wts[:, None]).sum(0)
    j = int(np.argmax(p))
    return str(classes[j]), float(p[j])


FRAME_FEATURES = (
    "w_structural", "w_surface", "w_contamination",  # area-weighted mean region probabilities
    "max_structural", "max_surface", "max_contamination",  # the most confident region of each kind
    "big_structural", "big_surface", "big_contamination",  # the largest region's probabilities
    "log_n_regions",
    "second_rel_area",  # second largest region / largest
    "mixed_pair",  # max over region pairs of (1 - p_i . p_j) * sqrt(smaller relative area)
    "n_kinds",  # kinds held by a confident (>= 0.5) region of at least a tenth of the largest's area
    "entropy",  # of the area-weighted kind mixture
    "real_max",  # the most certainly real region's P(real)
    "real_share",  # area-weighted P(real)
)
# region features the frame classifier also reads, (area x P(real))-weighted over the frame's
# regions ("w_") and of its weightiest region ("top_"): the region forest only learns from frames
# of one kind, the frame classifier from all four -- ``combined`` included -- and a product's own
# mix of evidence shows in the features before the region forest's probabilities flatten it
FRAME_REGION_FEATURES = ("log_area_frac", "elongation", "dL", "dab", "frac_dark", "nov_frac", "nov_L", "tex_ratio",
                         "map_max")
FRAME_FEATURES = FRAME_FEATURES + tuple(f"w_{f}" for f in FRAME_REGION_FEATURES) \
    + tuple(f"top_{f}" for f in FRAME_REGION_FEATURES)


def base_probabilities(probs: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) probabilities over BASE_KINDS (in that order, rows summing to 1) and (n,) the
    probability that each region is a real defect (1 - P(spurious); 1 without that class)."""
    probs = np.asarray(probs, np.float64).reshape(-1, len(classes))
    p = np.zeros((len(probs), len(BASE_KINDS)))
    for j, c in enumerate(classes):
        if c in BASE_KINDS:
            p[:, BASE_KINDS.index(c)] = probs[:, j]
    real = 1.0 - probs[:, list(classes).index(SPURIOUS)] if SPURIOUS in classes else np.ones(len(probs))
    tot = p.sum(1, keepdims=True)
    p = np.where(tot > 1e-12, p / np.maximum(tot, 1e-12), 1.0 / len(BASE_KINDS))
    return p, np.clip(real, 0.0, 1.0)


def region_kinds(probs: np.ndarray, classes: Sequence[str]) -> tuple[list[tuple[str, float]], np.ndarray]:
    """Per region (base kind, confidence = P(kind | defect) * P(real)) and the base-kind
    probabilities (``base_probabilities``): what the frame rule reads."""
    pb, real = base_probabilities(probs, classes)
    return [(BASE_KINDS[int(np.argmax(q))], float(np.max(q) * r)) for q, r in zip(pb, real)], pb


def frame_features(probs: np.ndarray, areas: Sequence[float], classes: Sequence[str],
                   feats: np.ndarray | None = None) -> np.ndarray:
    """(len(FRAME_FEATURES),) summary of a frame's regions for the frame classifier.

    Why a classifier and not only the rule: a detector splits one defect into fragments and
    adds spurious blobs, so "two regions of different kinds" fires on single-kind frames; the
    frame classifier learns from labelled frames -- ``combined`` ones included, which carry no
    per-region label -- how much mixed evidence a real combined frame shows. Each region
    weighs by its area times the probability that it is real. ``feats``: the regions' ``FEATURES``
    rows (the ``FRAME_REGION_FEATURES`` summaries are 0 without them).
    """
    a0 = np.asarray(areas, np.float64)
    if len(a0) == 0:
        return np.zeros(len(FRAME_FEATURES))
    p, real = base_probabilities(probs, classes)
    a = a0 * np.maximum(real, 0.05)
    rel, w = a / max(a.max(), 1e-12), a / max(a.sum(), 1e-12)
    wmean = (p * w[:, None]).sum(0)
    srt = np.sort(a)[::-1]
    mixed = 0.0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            mixed = max(mixed, (1.0 - float(p[i] @ p[j])) * math.sqrt(min(rel[i], rel[j])))
    kinds = {int(np.argmax(p[i])) for i in range(len(a)) if p[i].max() >= 0.5 and rel[i] >= 0.1}
    ent = float(-(wmean * np.log(wmean + 1e-9)).sum())
    reg = np.zeros(2 * len(FRAME_REGION_FEATURES))
    if feats is not None:
        x = np.nan_to_num(np.asarray(feats, np.float64).reshape(len(a), -1)[:, _FRAME_REGION_IDX],
                          nan=0.0, posinf=10.0, neginf=-10.0)
        reg = np.concatenate([(x * w[:, None]).sum(0), x[int(np.argmax(a))]])
    return np.array([*wmean, *p.max(0), *p[int(np.argmax(a))], math.log1p(len(a)),
                     srt[1] / srt[0] if len(a) > 1 else 0.0, mixed, float(len(kinds)), ent,
                     float(real.max()), float((real * a0).sum() / max(a0.sum(), 1e-12)), *reg])


_FRAME_REGION_IDX = [FEATURES.index(f) for f in FRAME_REGION_FEATURES]


def frame_decision(params: dict[str, Any], probs: np.ndarray, areas: Sequence[float],
                   feats: np.ndarray | None = None) -> tuple[str, float]:
    """The frame's (category, confidence): the stored frame classifier when the parameters have
    one, else the ``frame_rule`` (``frame_category``) on the regions' base-kind probabilities.
    ``feats``: the regions' feature rows (``frame_features``)."""
    if not len(areas):
        return UNKNOWN, 0.0
    fp = frame_probabilities(params, probs, areas, feats)
    if fp is None:
        per, pb = region_kinds(probs, list(params["classes"]))
        return frame_category(per, areas, pb, BASE_KINDS, params.get("frame_rule"))
    cat = max(fp, key=fp.__getitem__)
    return str(cat), float(fp[cat])


def frame_probabilities(params: dict[str, Any], probs: np.ndarray, areas: Sequence[float],
                        feats: np.ndarray | None = None) -> dict[str, float] | None:
    """The frame classifier's probability per category (None without a frame classifier)."""
    fc = params.get("frame_classifier")
    if not fc or not len(areas):
        return None
    x = _scaled(fc, frame_features(probs, areas, list(params["classes"]), feats)[None], FRAME_FEATURES)
    return dict(zip(fc["classes"], classifier_proba(fc["classifier"], x)[0].tolist()))


def categorize_regions(params: dict[str, Any], feats: np.ndarray) -> tuple[list[tuple[str, float]], np.ndarray]:
    """Per region (base kind, confidence) -- the confidence is P(kind | defect) * P(real) -- and
    the full (n, len(classes)) probabilities."""
    classes = list(params["classes"])
    probs = predict_proba(params, feats) if len(feats) else np.zeros((0, len(classes)))
    return region_kinds(probs, classes)[0], probs


def categorize_frame(image: np.ndarray, amap: np.ndarray | None, labels: np.ndarray | None,
                     params: dict[str, Any] | None, *, threshold: float | None = None,
                     background: bool | None = None, regions: Sequence[Any] | None = None) -> FrameCategories:
    """Category of a frame and of each of its defect regions.

    ``image`` HxWx3 uint8 RGB and ``amap`` HxW at model size; the regions are the components of
    ``labels`` (int 1..n in the order of ``regions``, or a binary mask). Without ``params``
    everything is ``"unknown"`` with confidence 0 (a profile without a categorizer still works).
    ``regions`` (``messages.Region``) come back as copies with category/confidence set.
    """
    n_given = len(regions) if regions is not None else None
    if labels is None or not params:
        n = n_given if n_given is not None else (labels_of(labels)[1] if labels is not None else 0)
        per = [(UNKNOWN, 0.0)] * n
        return FrameCategories(UNKNOWN, 0.0, per, _with_categories(regions, per))
    lab, n = labels_of(labels)
    feats = region_features(image, amap, lab, threshold, background, normal=params.get("normal"))
    per, probs = categorize_regions(params, feats)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(float)
    cat, conf = frame_decision(params, probs, areas, feats)
    if cat not in CATEGORIES and cat != UNKNOWN:  # never outside the four
        cat, conf = UNKNOWN, 0.0
    return FrameCategories(cat, conf, per, _with_categories(regions, per), probs.tolist())


def _with_categories(regions: Sequence[Any] | None, per: Sequence[tuple[str, float]]) -> list[Any]:
    if regions is None:
        return []
    out = []
    for i, r in enumerate(regions):
        cat, conf = per[i] if i < len(per) else (UNKNOWN, 0.0)
        conf = float(min(1.0, max(0.0, conf)))
        out.append(r.model_copy(update={"category": cat, "confidence": conf}) if hasattr(r, "model_copy") else r)
    return out


# ------------------------------------------------------------------------------------------------
# background flag
# ------------------------------------------------------------------------------------------------
def background_scores(normal_images: np.ndarray) -> dict[str, float]:
    """Evidence that a product is an object on a backdrop rather than a close-up texture.

    ``border_contrast``: how different the frame's border ring is from its centre (Lab distance
    over the within-frame lightness spread), median over frames -- a backdrop around an object.
    ``layout``: spatial structure of the mean normal image relative to the per-image spread --
    an object sits in roughly the same place; a texture's mean is flat.
    """
    imgs = np.asarray(normal_images)
    if imgs.ndim == 3:
        imgs = imgs[None]
    n = len(imgs)
    if n == 0:
        raise ValueError("background detection needs at least one normal image")
    step = max(1, n // 32)
    sel = imgs[::step][:32]
    size = 96
    small = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in sel]).astype(np.float32) / 255
    labs = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2Lab) for im in small])  # L 0..100
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.maximum(np.abs(xx - size / 2 + 0.5), np.abs(yy - size / 2 + 0.5)) / (size / 2)
    border, centre = r > 0.85, r < 0.45
    bc = []
    for lab in labs:
        d = np.linalg.norm(lab[border].mean(0) - lab[centre].mean(0))
        spread = lab[..., 0].std() + 2.0
        bc.append(d / spread)
    mean_img = cv2.GaussianBlur(labs[..., 0].mean(0), (0, 0), 2)
    per_std = float(np.mean([cv2.GaussianBlur(lab[..., 0], (0, 0), 2).std() for lab in labs])) + 1.0
    layout = float(mean_img.std() / per_std) if len(labs) >= 4 else float("nan")
    return {"border_contrast": float(np.median(bc)), "layout": layout, "n_images": float(len(labs))}


BACKGROUND_RULE = {"border_contrast": 0.6, "layout": 0.4}


def detect_background(normal_images: np.ndarray, rule: dict[str, float] | None = None) -> bool:
    """True when the product is an object on a backdrop (with background), False for a
    close-up texture. Either piece of evidence above its limit says "background"."""
    rule = rule or BACKGROUND_RULE
    s = background_scores(normal_images)
    if s["border_contrast"] >= rule["border_contrast"]:
        return True
    return bool(not math.isnan(s["layout"]) and s["layout"] >= rule["layout"])
