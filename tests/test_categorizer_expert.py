"""A product's own categorizer expert: backbone features pooled over regions, trained on the
product's own labelled frames only, blended with the product-agnostic categorizer."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from calibration.categorizer_fit import EXPERT_WEIGHT, CategorySample, predict_frames, train_categorizer
from linewatch.categorize import (BASE_KINDS, categorize_frame, categorize_regions, frame_decision,
                                  frame_probabilities, normal_appearance, predict_proba, region_features)
from linewatch.messages import CATEGORIES
from linewatch.region_backbone import DEEP_CHANNELS, DEEP_FEATURES, deep_region_features, deep_stats
from linewatch.synth import SyntheticProduct


@pytest.fixture(scope="module")
def cap_normal():
    sp = SyntheticProduct("cap", 128, seed=0)
    return json.loads(json.dumps(normal_appearance(np.stack([sp.normal(i).image for i in range(10)]))))


@pytest.fixture(scope="module")
def samples(synth_samples, cap_normal):
    """The shared cap and turf samples, cap's with its normal appearance."""
    return [replace(s, normal=cap_normal) if s.product == "cap" else s for s in synth_samples]


def test_deep_region_features_see_foreign_material(cap_normal):
    sp = SyntheticProduct("cap", 128, seed=0)
    stats = cap_normal["deep"]
    assert len(stats["mean"]) == len(stats["std"]) == DEEP_CHANNELS
    img = sp.normal(40).image.copy()
    labels = np.zeros((128, 128), np.int32)
    cv2.circle(labels, (44, 64), 10, 1, -1)  # plain product material
    cv2.circle(labels, (84, 64), 10, 2, -1)
    cv2.circle(img, (84, 64), 8, (40, 90, 230), -1)  # a blue plastic blob in region 2
    f = deep_region_features(img, labels, stats)
    assert f.shape == (2, len(DEEP_FEATURES)) and np.isfinite(f).all()
    inside_minus_ring = slice(DEEP_CHANNELS, 2 * DEEP_CHANNELS)
    assert np.abs(f[1, inside_minus_ring]).mean() > 2 * np.abs(f[0, inside_minus_ring]).mean()
    assert deep_region_features(img, np.zeros((128, 128), np.int32), stats).shape == (0, len(DEEP_FEATURES))
    # the statistics are those of the normal images: z-scores of plain material stay small
    assert np.abs(f[0, :DEEP_CHANNELS]).mean() < 1.5
    assert deep_stats(np.stack([sp.normal(i).image for i in range(4)]))["layers"] == stats["layers"]


def test_expert_is_trained_for_the_own_product_and_blended_in(samples, cap_normal):
    params = json.loads(json.dumps(train_categorizer(samples, kind="forest", product="cap", normal=cap_normal)))
    ex = params["expert"]
    assert ex["weight"] == EXPERT_WEIGHT and ex["features"][-len(DEEP_FEATURES):] == list(DEEP_FEATURES)
    assert ex["trained_on"]["products"] == ["cap"] and "frame_classifier" in ex and "normal" not in ex
    w = ex["weight"]
    for s in [x for x in samples if x.product == "cap"][::3]:
        r = categorize_frame(s.image, None, s.mask, params=params)
        assert r.category in set(CATEGORIES) and all(c in BASE_KINDS for c, _ in r.per_region)
        # by hand: both categorizers' region and frame probabilities, blended
        lab = cv2.connectedComponents(s.mask.astype(np.uint8), connectivity=8)[1]
        areas = np.bincount(lab.ravel())[1:].astype(float)
        feats = region_features(s.image, None, lab, normal=cap_normal)
        _, pm = categorize_regions(params, feats)
        xfeats = np.concatenate([feats, deep_region_features(s.image, lab, cap_normal["deep"])], axis=1)
        pe = predict_proba(ex, xfeats)
        fm, fe = frame_probabilities(params, pm, areas, feats), frame_probabilities(ex, pe, areas, xfeats)
        blend = {c: (1 - w) * fm[c] + w * fe[c] for c in CATEGORIES}
        assert r.category == max(blend, key=blend.__getitem__) and r.confidence == pytest.approx(max(blend.values()))
        aligned = np.stack([pe[:, ex["classes"].index(c)] for c in params["classes"]], 1)
        assert np.allclose(r.probabilities, (1 - w) * pm + w * aligned)
    # offline evaluation runs the same path as the worker
    cap = [x for x in samples if x.product == "cap"]
    worker = [categorize_frame(s.image, None, s.mask, params=params).category for s in cap]
    assert [c for c, _ in predict_frames(params, cap)] == worker


def test_no_expert_without_own_labels_or_backbone_statistics(samples, cap_normal):
    # leave-one-product-out (no product named) and a product whose normal appearance has no
    # backbone statistics (older profiles): the product-agnostic categorizer alone
    assert "expert" not in train_categorizer(samples, kind="logreg", normal=cap_normal)
    plain = {k: v for k, v in cap_normal.items() if k != "deep"}
    params = train_categorizer([CategorySample(s.image, s.category, s.mask, None, None, s.background, s.product,
                                               normal=plain if s.normal else None) for s in samples],
                               kind="forest", product="cap", normal=plain)
    assert "expert" not in params
    s = samples[0]
    r = categorize_frame(s.image, None, s.mask, params=params)
    lab = cv2.connectedComponents(s.mask.astype(np.uint8), connectivity=8)[1]
    feats = region_features(s.image, None, lab, normal=plain)
    probs = categorize_regions(params, feats)[1]
    assert (r.category, pytest.approx(r.confidence)) == frame_decision(
        params, probs, np.bincount(lab.ravel())[1:].astype(float), feats)
    # an expert needs two labelled frames of every category of its own product
    few = [s for s in samples if not (s.product == "cap" and s.category == "combined")] + \
        [next(s for s in samples if s.product == "cap" and s.category == "combined")]
    assert "expert" not in train_categorizer(few, kind="forest", product="cap", normal=cap_normal)
    assert normal_appearance(np.stack([s.image for s in samples[:2]]), deep=False).get("deep") is None
