"""Each threshold method against a case computed by hand (numbers in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.thresholds import estimate_thresholds, pixel_curves

# three 1x8 images; a pixel is predicted when score >= t.
#   img0 big defect    scores 10 9 8 7 3 1 1 1   mask 1 1 1 1 0 0 0 0
#   img1 small defect  scores  4 6 5 2 1 1 1 1   mask 1 0 0 1 0 0 0 0
#   img2 normal        scores  1 2 3 1 2 3 1 1
# P = 6 defect pixels, 18 normal pixels.
#   t  | IoU img0 img1 mean | pooled TP FP  F1        | Youden J
#   7  |   1    0    .500   |   4  0  8/10  = .800    | 4/6        = .667
#   4  |   1   1/4   .625   |   5  2  10/13 = .769    | 5/6 - 2/18 = .722
#   2  |  4/5  1/2   .650   |   6  7  12/19 = .632    | 1 - 7/18   = .611
# so IoU curve -> 2, F1 curve -> 7, ROC -> 4.  Normal pixels 1 2 3 1 2 3 1 1: mean 1.75,
# population std sqrt(5.5/8) = .82916; 75 % quantile (linear) = 2.25.
MAPS = np.array([[[10, 9, 8, 7, 3, 1, 1, 1]], [[4, 6, 5, 2, 1, 1, 1, 1]], [[1, 2, 3, 1, 2, 3, 1, 1]]], float)
MASKS = np.zeros_like(MAPS, dtype=bool)
MASKS[0, 0, :4] = True
MASKS[1, 0, [0, 3]] = True


def test_iou_curve_by_hand():
    r = estimate_thresholds(MAPS, MASKS, k_std=2.0, quantile=0.75)
    m = r.method("iou")
    assert m.threshold == 2.0
    assert m.val_iou == pytest.approx(0.65)
    assert r.chosen == "iou" and r.threshold == 2.0 and "IoU" in r.reason
    assert r.exact and r.n_anomalous == 2 and r.n_normal == 1


def test_f1_curve_by_hand():
    m = estimate_thresholds(MAPS, MASKS).method("f1")
    assert m.threshold == 7.0
    assert m.val_f1 == pytest.approx(0.8)
    assert m.val_iou == pytest.approx(0.5)


def test_roc_youden_by_hand():
    m = estimate_thresholds(MAPS, MASKS).method("roc")
    assert m.threshold == 4.0
    assert "0.7222" in m.note
    assert m.val_iou == pytest.approx(0.625)
    assert m.val_f1 == pytest.approx(10 / 13)


def test_normal_std_by_hand():
    m = estimate_thresholds(MAPS, MASKS, k_std=2.0).method("normal_std")
    assert m.threshold == pytest.approx(1.75 + 2 * np.sqrt(5.5 / 8))  # 3.4083
    # 3.408 predicts scores >= 4: the same masks as t = 4
    assert m.val_iou == pytest.approx(0.625)


def test_normal_quantile_by_hand():
    m = estimate_thresholds(MAPS, MASKS, quantile=0.75).method("normal_quantile")
    assert m.threshold == pytest.approx(2.25)
    # 2.25 predicts scores >= 3: img0 4/5, img1 1/4 -> mean .525
    assert m.val_iou == pytest.approx(0.525)


def test_prefer_another_method():
    r = estimate_thresholds(MAPS, MASKS, prefer="roc")
    assert r.chosen == "roc" and r.threshold == 4.0


def test_no_anomalies_only_normal_methods_said_explicitly():
    normal = MAPS[[2, 2, 2]] + np.arange(3)[:, None, None]
    r = estimate_thresholds(normal, np.zeros_like(normal, dtype=bool))
    for name in ("iou", "f1", "roc"):
        assert not r.method(name).available and r.method(name).threshold is None
        assert "impossible" in r.method(name).note
    assert r.method("normal_std").available and r.method("normal_quantile").available
    assert r.chosen == "normal_quantile"
    assert "impossible" in r.reason and any("no anomalous" in n for n in r.notes)
    assert "n/a" in r.table()


def test_few_anomalous_images_warns():
    r = estimate_thresholds(MAPS, MASKS)
    assert any("unreliable below 3" in n for n in r.notes)


def test_histogram_grid_matches_exact_on_large_data():
    """Quantile grid (many distinct scores) finds (almost) the exact optimum."""
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 64, 64), bool)
    masks[:4, 20:40, 20:40] = True
    maps = rng.normal(0, 1, masks.shape) + 2.5 * masks
    coarse = estimate_thresholds(maps, masks, bins=512)
    fine = estimate_thresholds(maps, masks, bins=1 << 16)
    assert not coarse.exact
    assert coarse.method("iou").val_iou == pytest.approx(fine.method("iou").val_iou, abs=2e-3)
    assert coarse.method("f1").val_f1 == pytest.approx(fine.method("f1").val_f1, abs=2e-3)


def test_curves_counts_equal_direct_counts():
    rng = np.random.default_rng(2)
    maps = rng.random((4, 16, 16)).astype(np.float32)  # models emit float32
    masks = rng.random((4, 16, 16)) > 0.8
    c = pixel_curves(maps, masks, bins=64)
    for k in (0, 10, 40, len(c.thresholds) - 1):
        pred = maps >= c.thresholds[k]
        np.testing.assert_array_equal(c.tp[:, k], (pred & masks).sum((1, 2)))
        np.testing.assert_array_equal(c.fp[:, k], (pred & ~masks).sum((1, 2)))


def test_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        estimate_thresholds(MAPS, MASKS[:, :, :4])


def test_three_anomalous_images_are_enough():
    """Calibrated on 3 anomalous + 2 normal images, the IoU threshold is near the oracle of a
    large held-out set drawn the same way (the regret is small)."""
    from calibration.metrics import threshold_regret

    def draw(seed, n_anom, n_norm):
        rng = np.random.default_rng(seed)
        masks = np.zeros((n_anom + n_norm, 48, 48), bool)
        for i in range(n_anom):
            y, x = rng.integers(4, 30, 2)
            masks[i, y : y + rng.integers(6, 14), x : x + rng.integers(6, 14)] = True
        maps = rng.normal(0, 1, masks.shape).astype(np.float32) + 3.0 * masks
        return maps, masks

    vm, vk = draw(0, 3, 2)
    r = estimate_thresholds(vm, vk)
    assert r.chosen == "iou" and r.n_anomalous == 3 and not any("unreliable" in n for n in r.notes)
    tm, tk = draw(1, 60, 20)
    assert threshold_regret(tm, tk, threshold=r.threshold).regret < 0.03


def test_image_threshold_separates_normal_from_anomalous_with_margin():
    from calibration.thresholds import estimate_image_threshold

    scores = np.array([1.0, 2.0, 3.0, 2.5, 10.0, 11.0])
    anomalous = np.array([0, 0, 0, 0, 1, 1], bool)
    t, reason = estimate_image_threshold(scores, anomalous)
    assert t == pytest.approx(6.5)  # halfway between the highest normal (3) and the lowest anomalous (10)
    assert "Youden" in reason


def test_image_threshold_needs_both_classes():
    from calibration.thresholds import estimate_image_threshold

    t, reason = estimate_image_threshold(np.array([1.0, 2.0]), np.array([False, False]))
    assert t is None and "both normal and anomalous" in reason
