"""The product-agnostic categorizer: frame rule, numpy inference = scikit-learn, the four
categories only, profiles without a categorizer, background detection."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from calibration.categorizer_fit import (CategorySample, evaluate_categorizer, train_categorizer, _fit_classifier,
                                         _export)
from linewatch.categorize import (BASE_KINDS, FEATURES, categorize_frame, detect_background, predict_proba,
                                  region_features)
from linewatch.messages import CATEGORIES, Region
from linewatch.synth import SyntheticProduct

ALLOWED = set(CATEGORIES) | {"unknown"}


def _hand_params() -> dict:
    """A hand-written linear model: dark -> structural, colourful -> contamination, bright -> surface."""
    coef = np.zeros((3, len(FEATURES)))
    coef[0, FEATURES.index("dL")] = -30.0  # structural: darker than the ring
    coef[1, FEATURES.index("dL")] = 30.0  # surface: brighter
    coef[2, FEATURES.index("dab")] = 60.0  # contamination: another colour
    return {"version": 1, "features": list(FEATURES), "classes": ["structural", "surface", "contamination"],
            "scaler_mean": [0.0] * len(FEATURES), "scaler_scale": [1.0] * len(FEATURES),
            "classifier": {"kind": "logreg", "coef": coef.tolist(), "intercept": [0.0, 0.0, -3.0]},
            "frame_rule": {"combined_min_conf": 0.5, "combined_min_rel_area": 0.1}}


def _grey_frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(128 + rng.normal(0, 4, (128, 128, 3)), 0, 255).astype(np.uint8)


def test_two_regions_of_different_kinds_make_combined():
    img = _grey_frame()
    mask = np.zeros((128, 128), np.uint8)
    cv2.circle(img, (35, 40), 10, (20, 20, 20), -1)  # a dark hole
    cv2.circle(mask, (35, 40), 10, 255, -1)
    cv2.circle(img, (90, 90), 12, (30, 60, 220), -1)  # a blue blob
    cv2.circle(mask, (90, 90), 12, 255, -1)
    amap = cv2.GaussianBlur((mask > 0).astype(np.float32), (0, 0), 3)
    r = categorize_frame(img, amap, mask, params=_hand_params(), threshold=0.5)
    assert [c for c, _ in r.per_region] == ["structural", "contamination"]
    assert r.category == "combined" and 0.5 <= r.confidence <= 1.0
    cat, conf, per = r  # unpacks as (frame category, confidence, per-region)
    assert cat == "combined" and len(per) == 2
    # one kind only -> that kind, not combined
    img2 = _grey_frame()
    cv2.circle(img2, (35, 40), 10, (20, 20, 20), -1)
    cv2.circle(img2, (90, 90), 12, (25, 25, 25), -1)
    r2 = categorize_frame(img2, amap, mask, params=_hand_params(), threshold=0.5)
    assert r2.category == "structural"


def test_regions_come_back_with_categories_in_label_order():
    img = _grey_frame()
    labels = np.zeros((128, 128), np.int32)
    cv2.circle(img, (90, 90), 12, (30, 60, 220), -1)
    cv2.circle(labels, (90, 90), 12, 1, -1)
    cv2.circle(img, (35, 40), 10, (250, 250, 250), -1)
    cv2.circle(labels, (35, 40), 10, 2, -1)
    regions = [Region(area_px=450, area_frac=0.03, bbox=(78, 78, 25, 25), peak_score=2, mean_score=1),
               Region(area_px=314, area_frac=0.02, bbox=(25, 30, 21, 21), peak_score=2, mean_score=1)]
    r = categorize_frame(image=img, amap=None, labels=labels, regions=regions, params=_hand_params())
    assert [x.category for x in r.regions] == ["contamination", "surface"]
    assert all(0 <= x.confidence <= 1 for x in r.regions)
    assert r.category == "combined"


def test_profile_without_categorizer_is_unknown():
    from linewatch.profiles import Profile

    prof = Profile(product="cap", model_kind="padim", backbone="efficientnet_lite0", input_size=128,
                   threshold=0.5, threshold_method="iou")
    assert prof.categorizer is None
    img = _grey_frame()
    mask = np.zeros((128, 128), np.uint8)
    mask[10:20, 10:20] = 255
    regions = [Region(area_px=100, area_frac=0.006, bbox=(10, 10, 10, 10), peak_score=1, mean_score=1)]
    r = categorize_frame(profile=prof, image=img, amap=np.zeros((128, 128), np.float32), labels=mask,
                         regions=regions)
    assert (r.category, r.confidence) == ("unknown", 0.0)
    assert [x.category for x in r.regions] == ["unknown"]


@pytest.fixture(scope="module")
def synth_samples():
    """Ground-truth regions of synthetic defects (two products, every category), 128 px."""
    out = []
    for prod in ("cap", "turf"):
        sp = SyntheticProduct(prod, 128, seed=0)
        for cat in CATEGORIES:
            for i in range(6):
                s = sp.defective(i, cat)
                out.append(CategorySample(s.image, cat, s.mask > 0, None, None, s.background, prod))
    return out


def test_trained_parameters_are_json_and_never_leave_the_four(synth_samples):
    params = train_categorizer(synth_samples, kind="logreg", region_source="gt")
    text = json.dumps(params)  # plain JSON: no pickle anywhere
    params = json.loads(text)
    assert set(params["classes"]) <= set(BASE_KINDS)
    rng = np.random.default_rng(1)
    for _ in range(5):  # arbitrary frames and masks: still one of the four (or unknown)
        img = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
        mask = (cv2.GaussianBlur(rng.random((128, 128)).astype(np.float32), (0, 0), 3) > 0.52)
        amap = rng.random((128, 128)).astype(np.float32)
        r = categorize_frame(img, amap, mask, params=params, threshold=0.5)
        assert r.category in ALLOWED
        assert all(c in BASE_KINDS and 0 <= p <= 1 for c, p in r.per_region)
    res = evaluate_categorizer(params, synth_samples)
    assert res["macro_f1"] > 0.6  # on its own training frames: well above chance (0.25)
    assert np.asarray(res["confusion"]).sum() == len(synth_samples)


@pytest.mark.parametrize("kind", ["logreg", "forest", "ensemble"])
def test_numpy_inference_equals_sklearn(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, len(FEATURES)))
    y = np.array(["structural", "surface", "contamination"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 1)]
    clf = _fit_classifier(x, y, kind, 0, None)
    models = clf if isinstance(clf, list) else [clf]
    params = {"features": list(FEATURES), "classes": models[0].classes_.tolist(),
              "scaler_mean": [0.0] * len(FEATURES), "scaler_scale": [1.0] * len(FEATURES),
              "classifier": json.loads(json.dumps(_export(clf, kind)))}
    expected = np.mean([m.predict_proba(x) for m in models], axis=0)
    np.testing.assert_allclose(predict_proba(params, x), expected, atol=1e-4)


def test_region_features_shape_and_meaning():
    img = _grey_frame()
    labels = np.zeros((128, 128), np.int32)
    cv2.line(labels, (10, 10), (100, 20), 1, 3)  # a thin line
    cv2.circle(labels, (64, 90), 15, 2, -1)  # a disc
    f = region_features(img, None, labels)
    assert f.shape == (2, len(FEATURES)) and np.isfinite(f).all()
    e = FEATURES.index("elongation")
    assert f[0, e] > f[1, e] + 1.0  # the line is far more elongated than the disc


def test_detect_background():
    for prod, expected in (("cap", True), ("pcb", True), ("brick", False), ("turf", False)):
        sp = SyntheticProduct(prod, 128, seed=0)
        imgs = np.stack([sp.normal(i).image for i in range(8)])
        assert detect_background(imgs) is expected, prod
