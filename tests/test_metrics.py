"""Metrics against scikit-learn (and a brute-force PRO reference) on random data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score, roc_auc_score

from calibration.metrics import (aupro, image_auroc, pixel_auroc, segmentation_metrics,
                                 threshold_regret)


def _random(seed: int = 0, n: int = 5, size: int = 24):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n - 2):  # last two images are normal
        y, x = rng.integers(2, size - 8, 2)
        masks[i, y : y + rng.integers(2, 7), x : x + rng.integers(2, 7)] = True
    maps = (rng.normal(0, 1, masks.shape) + 1.5 * masks).astype(np.float32)
    return maps, masks


def test_pixel_and_image_auroc_equal_sklearn():
    maps, masks = _random()
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    scores = maps.reshape(len(maps), -1).max(1)
    labels = masks.reshape(len(masks), -1).any(1)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert image_auroc(scores, np.ones(len(scores), bool)) is None
    assert pixel_auroc(maps, np.zeros_like(masks)) is None


@pytest.mark.parametrize("t", [-0.5, 0.7, 1.6])
def test_segmentation_metrics_equal_sklearn(t):
    maps, masks = _random(3)
    m = segmentation_metrics(maps, masks, t)
    y, p = masks.ravel(), (maps >= t).ravel()
    assert m.pooled_iou == pytest.approx(jaccard_score(y, p))
    assert m.pooled_dice == pytest.approx(f1_score(y, p))
    assert m.precision == pytest.approx(precision_score(y, p))
    assert m.recall == pytest.approx(recall_score(y, p))
    per = [jaccard_score(masks[i].ravel(), (maps[i] >= t).ravel()) for i in range(3)]
    dice = [f1_score(masks[i].ravel(), (maps[i] >= t).ravel()) for i in range(3)]
    assert m.iou == pytest.approx(np.mean(per))
    assert m.dice == pytest.approx(np.mean(dice))
    assert m.n_anomalous == 3 and m.n_images == 5
    normal_alarm = np.mean([(maps[i] >= t).any() for i in (3, 4)])
    assert m.normal_false_alarm_rate == pytest.approx(normal_alarm)


def _aupro_brute(maps, masks, max_fpr=0.3):
    """The textbook definition: a Python loop over every distinct threshold (slow, obvious)."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    neg = ~masks
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & neg).sum() / neg.sum()
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    # integrate to max_fpr with linear interpolation at the limit
    xs, ys = [0.0], [0.0]
    for a, b, c, d in zip(x[:-1], y[:-1], x[1:], y[1:]):
        if c <= max_fpr:
            xs.append(c); ys.append(d)
        else:
            if a < max_fpr:
                xs.append(max_fpr); ys.append(b + (d - b) * (max_fpr - a) / (c - a))
            break
    return np.trapezoid(ys, xs) / max_fpr


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_equals_brute_force(seed):
    maps, masks = _random(seed, n=4, size=16)
    assert aupro(maps, masks) == pytest.approx(_aupro_brute(maps, masks), abs=1e-9)


def test_aupro_perfect_and_missing():
    maps, masks = _random(0)
    assert aupro(masks.astype(np.float32) + 0.01 * maps, masks) > 0.99
    assert aupro(maps, np.zeros_like(masks)) is None


def test_regret_by_brute_force():
    maps, masks = _random(5)
    ts = np.unique(maps)
    ious = [segmentation_metrics(maps, masks, t).iou for t in ts[:: 7]]
    r = threshold_regret(maps, masks, threshold=0.3)
    at = segmentation_metrics(maps, masks, 0.3).iou
    assert r.iou_at_threshold == pytest.approx(at)
    assert r.oracle_iou >= max(ious) - 1e-9
    assert r.regret == pytest.approx(r.oracle_iou - at)
    assert segmentation_metrics(maps, masks, r.oracle_threshold).iou == pytest.approx(r.oracle_iou)
