"""The product-agnostic categorizer: frame rule, stored classifiers (skops files) read back
identically, the four categories only, profiles without a categorizer, background detection."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.categorizer_fit import (CONTRAST_FEATURES, CategorySample, contrast_views, evaluate_categorizer,
                                         train_categorizer, _fit_classifier)
from linewatch.errors import ModelError
from linewatch.inspection.categorize import (BASE_KINDS, FEATURES, FRAME_FEATURES, categorize_frame, detect_background,
                                             frame_decision, frame_features, normal_appearance, predict_proba,
                                             region_features)
from linewatch.inspection.forest import externalise, internalise, load_classifier, save_classifier
from linewatch.messages import CATEGORIES, Region
from linewatch.synth import SyntheticProduct

ALLOWED = set(CATEGORIES) | {"unknown"}


def _stored(params: dict) -> dict:
    """``params`` as a profile stores and reads them back: JSON plus skops files (no pickle)."""
    folder = Path(tempfile.mkdtemp(prefix="lw-cat-"))
    text = json.dumps(externalise(params, folder, "categorizer"))
    return internalise(json.loads(text), folder)


def _hand_params() -> dict:
    """A hand-set linear model: dark -> structural, colourful -> contamination, bright -> surface."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((3, len(FEATURES)))
    coef[0, FEATURES.index("dL")] = -30.0  # structural: darker than the ring
    coef[1, FEATURES.index("dL")] = 30.0  # surface: brighter
    coef[2, FEATURES.index("dab")] = 60.0  # contamination: another colour
    clf = LogisticRegression()
    clf.classes_ = np.array(["structural", "surface", "contamination"])
    clf.coef_, clf.intercept_ = coef, np.array([0.0, 0.0, -3.0])
    return {"version": 1, "features": list(FEATURES), "classes": clf.classes_.tolist(),
            "scaler_mean": [0.0] * len(FEATURES), "scaler_scale": [1.0] * len(FEATURES),
            "classifier": clf, "frame_rule": {"combined_min_conf": 0.5, "combined_min_rel_area": 0.1}}


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
    assert r.category == "combined" and 0.5 <= r.confidence <= 1.0 and len(r.per_region) == 2
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
    r = categorize_frame(img, None, labels, _hand_params(), regions=regions)
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
    r = categorize_frame(img, np.zeros((128, 128), np.float32), mask, prof.categorizer, regions=regions)
    assert (r.category, r.confidence) == ("unknown", 0.0)
    assert [x.category for x in r.regions] == ["unknown"]


def test_trained_parameters_are_stored_without_pickle_and_never_leave_the_four(synth_samples):
    params = _stored(train_categorizer(synth_samples, kind="logreg", region_source="gt"))
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
def test_stored_classifiers_predict_exactly_as_the_fitted_ones(kind, tmp_path):
    """skops files in the version folder give bit-identical probabilities to the estimator that
    was fitted (the worker reads what calibration measured)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, len(FEATURES)))
    y = np.array(["structural", "surface", "contamination"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 1)]
    clf = _fit_classifier(x, y, kind, 0, None)
    models = clf if isinstance(clf, list) else [clf]
    params = {"features": list(FEATURES), "classes": models[0].classes_.tolist(),
              "scaler_mean": [0.0] * len(FEATURES), "scaler_scale": [1.0] * len(FEATURES), "classifier": clf}
    on_disk = externalise(params, tmp_path, "categorizer")
    assert on_disk["classifier"] == {"skops": "categorizer.skops"} and (tmp_path / "categorizer.skops").is_file()
    expected = np.mean([m.predict_proba(x) for m in models], axis=0)
    loaded = internalise(json.loads(json.dumps(on_disk)), tmp_path)
    again = loaded["classifier"] if isinstance(loaded["classifier"], list) else [loaded["classifier"]]
    np.testing.assert_array_equal(np.mean([m.predict_proba(x) for m in again], axis=0), expected)  # bit for bit
    np.testing.assert_allclose(predict_proba(loaded, x), expected, rtol=1e-12, atol=1e-15)  # through the scaler


def test_a_classifier_file_with_other_types_is_refused(tmp_path):
    """A classifier file a user can hand us is rebuilt without pickle, and anything but the
    estimators linewatch stores is refused with the file's name."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    save_classifier(Pipeline([("s", StandardScaler())]).fit(np.ones((3, 2))), tmp_path / "x.skops")
    with pytest.raises(ModelError, match="not a linewatch classifier"):
        load_classifier(tmp_path / "x.skops")
    (tmp_path / "bad.skops").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable skops file"):
        load_classifier(tmp_path / "bad.skops")


def test_region_features_shape_and_meaning():
    img = _grey_frame()
    labels = np.zeros((128, 128), np.int32)
    cv2.line(labels, (10, 10), (100, 20), 1, 3)  # a thin line
    cv2.circle(labels, (64, 90), 15, 2, -1)  # a disc
    f = region_features(img, None, labels)
    assert f.shape == (2, len(FEATURES)) and np.isfinite(f).all()
    e = FEATURES.index("elongation")
    assert f[0, e] > f[1, e] + 1.0  # the line is far more elongated than the disc


def test_a_region_covering_the_whole_frame_has_finite_features():
    """A predicted region can fill the frame (a low threshold on a toy line): no crash, finite."""
    img = _grey_frame()
    labels = np.ones((128, 128), np.int32)
    amap = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    f = region_features(img, amap, labels, threshold=0.1)
    assert f.shape == (1, len(FEATURES)) and np.isfinite(f).all()


def test_detect_background():
    for prod, expected in (("cap", True), ("pcb", True), ("brick", False), ("turf", False)):
        sp = SyntheticProduct(prod, 128, seed=0)
        imgs = np.stack([sp.normal(i).image for i in range(8)])
        assert detect_background(imgs) is expected, prod


def test_normal_appearance_is_json_and_flags_foreign_colour():
    sp = SyntheticProduct("cap", 128, seed=0)
    normal = json.loads(json.dumps(normal_appearance(np.stack([sp.normal(i).image for i in range(12)]))))
    img = sp.normal(50).image.copy()
    labels = np.zeros((128, 128), np.int32)
    cv2.circle(labels, (40, 64), 9, 1, -1)  # plain product material
    cv2.circle(labels, (88, 64), 9, 2, -1)
    cv2.circle(img, (88, 64), 6, (240, 30, 200), -1)  # a magenta blob inside region 2
    f = region_features(img, None, labels, normal=normal)
    frac, mean = FEATURES.index("nov_frac"), FEATURES.index("nov_mean")
    assert f[1, frac] > 0.2 > f[0, frac] and f[1, mean] > f[0, mean]
    # without a normal appearance the novelty features are 0 and the rest unchanged
    f0 = region_features(img, None, labels)
    assert not f0[:, frac:].any() and np.allclose(f0[:, :FEATURES.index("nov_mean")], f[:, :FEATURES.index("nov_mean")])


def test_frame_features_see_mixed_regions():
    classes = ["contamination", "structural", "surface"]
    one_kind = frame_features(np.array([[0.1, 0.8, 0.1], [0.1, 0.7, 0.2]]), [300, 200], classes)
    mixed = frame_features(np.array([[0.1, 0.8, 0.1], [0.9, 0.05, 0.05]]), [300, 200], classes)
    assert one_kind.shape == mixed.shape == (len(FRAME_FEATURES),)
    k, n = FRAME_FEATURES.index("mixed_pair"), FRAME_FEATURES.index("n_kinds")
    assert mixed[k] > one_kind[k] + 0.3 and (mixed[n], one_kind[n]) == (2.0, 1.0)
    # probabilities land in BASE_KINDS order whatever the classes' order
    assert one_kind[FRAME_FEATURES.index("w_structural")] == pytest.approx(0.76)
    # with the regions' feature rows: their (area x P(real))-weighted mean and the weightiest region's
    feats = np.zeros((2, len(FEATURES)))
    feats[:, FEATURES.index("dL")] = [-0.2, 0.1]
    with_feats = frame_features(np.array([[0.1, 0.8, 0.1], [0.1, 0.7, 0.2]]), [300, 200], classes, feats)
    assert np.allclose(with_feats[: len(one_kind) - 20], one_kind[: len(one_kind) - 20])
    assert with_feats[FRAME_FEATURES.index("w_dL")] == pytest.approx(0.6 * -0.2 + 0.4 * 0.1)
    assert with_feats[FRAME_FEATURES.index("top_dL")] == pytest.approx(-0.2)
    assert one_kind[FRAME_FEATURES.index("w_dL")] == 0.0  # without feature rows


def test_frame_classifier_trained_on_all_four_and_applied_offline_as_in_the_worker(synth_samples):
    params = _stored(train_categorizer(synth_samples, kind="forest", region_source="gt"))
    fc = params["frame_classifier"]
    assert set(fc["classes"]) == set(CATEGORIES) and fc["features"] == list(FRAME_FEATURES)
    res = evaluate_categorizer(params, synth_samples)
    assert res["macro_f1"] > 0.6 and np.asarray(res["confusion"]).sum() == len(synth_samples)
    s = next(x for x in synth_samples if x.category == "combined")
    r = categorize_frame(s.image, None, s.mask, params=params)
    assert r.category in ALLOWED and 0 <= r.confidence <= 1
    probs = np.asarray(r.probabilities)
    areas = np.bincount(cv2.connectedComponents(s.mask.astype(np.uint8), connectivity=8)[1].ravel())[1:]
    feats = region_features(s.image, None, s.mask, normal=params.get("normal"))
    assert frame_decision(params, probs, areas.astype(float), feats) == (r.category, pytest.approx(r.confidence))
    # without combined frames there is nothing to learn "combined" from: the tuned rule decides
    rule_only = train_categorizer([x for x in synth_samples if x.category != "combined"], kind="forest")
    assert "frame_classifier" not in rule_only and rule_only["frame_rule"]["tuned"] == 0.0
    assert "frame_classifier" not in train_categorizer(synth_samples, kind="logreg", frame_model="rule")


def test_normal_appearance_travels_with_the_parameters(synth_samples):
    sp = SyntheticProduct("cap", 128, seed=0)
    normal = normal_appearance(np.stack([sp.normal(i).image for i in range(8)]))
    with_normal = [CategorySample(s.image, s.category, s.mask, None, None, s.background, s.product, normal=normal)
                   for s in synth_samples]
    params = _stored(train_categorizer(with_normal, kind="logreg", normal=normal))
    assert params["normal"]["lab_bins"] == normal["lab_bins"]
    r = categorize_frame(synth_samples[0].image, None, synth_samples[0].mask, params=params)
    assert r.category in ALLOWED


def test_false_blobs_train_a_spurious_class_that_is_never_reported(synth_samples):
    """Regions off the labelled defect (a detector's false blobs, which the worker serves too)
    train a 'spurious' class; it only discounts a region, no region or frame is ever called so."""
    noisy = []
    for k, s in enumerate(synth_samples):
        gt = s.mask > 0
        mask = gt.copy()
        free = ~cv2.dilate(gt.astype(np.uint8), np.ones((25, 25), np.uint8)).astype(bool)
        ys, xs = np.nonzero(free[8:-8, 8:-8])
        if len(ys):
            j = (k * 7919) % len(ys)
            cv2.circle(mask.view(np.uint8), (int(xs[j]) + 8, int(ys[j]) + 8), 5, 1, -1)
        noisy.append(CategorySample(s.image, s.category, mask, None, None, s.background, s.product, gt_mask=gt))
    params = _stored(train_categorizer(noisy, kind="forest", region_source="predicted"))
    assert "spurious" in params["classes"] and params["trained_on"]["regions_per_kind"]["spurious"] >= 4
    assert {"real_max", "real_share"} <= set(params["frame_classifier"]["features"])
    for s in noisy[::5]:
        r = categorize_frame(s.image, None, s.mask, params=params)
        assert r.category in ALLOWED and all(c in BASE_KINDS and 0 <= p <= 1 for c, p in r.per_region)
    # without true masks nothing is known to be spurious: no such class
    plain = train_categorizer([CategorySample(s.image, s.category, s.mask, None, None, s.background, s.product)
                               for s in noisy], kind="logreg")
    assert "spurious" not in plain["classes"]


def test_contrast_views_scale_each_frames_contrast_features_by_one_factor():
    """Training copies for unseen products: the contrast features of every row of one frame are
    scaled by the same factor within [1/spread, spread]; shape, fractions and flags are untouched."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, len(FEATURES))) + 3.0
    groups = np.repeat(np.arange(4), 3)
    v = contrast_views(x, groups, n_views=5, spread=2.0, seed=0)
    assert v.shape == (60, len(FEATURES))
    cols = [FEATURES.index(f) for f in CONTRAST_FEATURES]
    other = [j for j in range(len(FEATURES)) if j not in cols]
    assert "log_area_frac" in [FEATURES[j] for j in other] and "background" in [FEATURES[j] for j in other]
    for k in range(5):
        part = v[12 * k:12 * (k + 1)]
        np.testing.assert_array_equal(part[:, other], x[:, other])
        ratio = part[:, cols] / x[:, cols]
        assert np.allclose(ratio, ratio[:, :1])  # one factor per row ...
        per_frame = ratio[:, 0].reshape(4, 3)
        assert np.allclose(per_frame, per_frame[:, :1])  # ... and per frame
        assert np.all((per_frame >= 0.5 - 1e-9) & (per_frame <= 2.0 + 1e-9))
    assert not np.allclose(v[:12], v[12:24])  # the views differ
    assert contrast_views(x, groups, 0, 2.0, 0).shape == (0, len(FEATURES))


def test_training_with_contrast_views_counts_the_real_regions(synth_samples):
    with_views = train_categorizer(synth_samples, kind="forest", region_source="gt", n_contrast_views=3)
    without = train_categorizer(synth_samples, kind="forest", region_source="gt", n_contrast_views=0)
    assert with_views["trained_on"]["n_regions"] == without["trained_on"]["n_regions"]
    assert with_views["trained_on"]["contrast_views"] == 3 and without["trained_on"]["contrast_views"] == 0
    assert evaluate_categorizer(with_views, synth_samples)["macro_f1"] > 0.6


def test_out_of_fold_probabilities_keep_every_view_of_an_image_in_one_fold(synth_samples, monkeypatch):
    """Calibration trains on each validation image twice (served regions and the unrefined map's,
    here a dilated copy of the mask); the frame classifier learns from out-of-fold region
    probabilities, honest only if a fold never holds one view of an image while training on the other."""
    from dataclasses import replace

    import sklearn.model_selection

    cap = [s for s in synth_samples if s.product == "cap"]
    wider = [replace(s, mask=cv2.dilate(s.mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0,
                     image=s.image.copy()) for s in cap]  # same pixels, another array
    seen: list[np.ndarray] = []

    class Spy(sklearn.model_selection.GroupKFold):
        def split(self, X, y=None, groups=None):
            seen.append(np.asarray(groups))
            return super().split(X, y, groups)

    monkeypatch.setattr(sklearn.model_selection, "GroupKFold", Spy)
    train_categorizer(cap + wider, kind="forest", region_source="gt", n_contrast_views=2)
    assert len(seen) == 1
    folds = seen[0]
    assert set(folds.tolist()) <= set(range(len(cap)))  # the wider views fall into their originals' groups
    assert len(np.unique(folds)) >= 3
