"""The synthetic line: deterministic, exact masks, every category, MVTec layout readable back."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from linewatch.errors import UserError
from linewatch.messages import CATEGORIES
from linewatch.synth import (DEFAULT_PRODUCTS, PRODUCTS, SynthSample, SyntheticCamera, SyntheticProduct,
                             generate_dataset)


def test_products_cover_both_background_classes():
    flags = {PRODUCTS[p].background for p in DEFAULT_PRODUCTS}
    assert flags == {True, False}
    assert len(DEFAULT_PRODUCTS) >= 3


@pytest.mark.parametrize("product", DEFAULT_PRODUCTS)
def test_deterministic_by_seed(product):
    a, b = SyntheticProduct(product, 128, seed=3), SyntheticProduct(product, 128, seed=3)
    assert np.array_equal(a.normal(5).image, b.normal(5).image)
    da, db = a.defective(2, "combined"), b.defective(2, "combined")
    assert np.array_equal(da.image, db.image) and np.array_equal(da.mask, db.mask)
    # another seed or index gives another frame; an index does not depend on what came before
    assert not np.array_equal(a.normal(5).image, SyntheticProduct(product, 128, seed=4).normal(5).image)
    assert not np.array_equal(a.normal(5).image, a.normal(6).image)


@pytest.mark.parametrize("product", DEFAULT_PRODUCTS)
@pytest.mark.parametrize("category", CATEGORIES)
def test_defect_masks_exact_and_non_empty(product, category):
    prod = SyntheticProduct(product, 128, seed=0)
    for i in range(3):
        s = prod.defective(i, category)
        assert isinstance(s, SynthSample)
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (128, 128) and s.mask.dtype == np.uint8
        assert set(np.unique(s.mask).tolist()) == {0, 255}
        assert s.category == category and s.background == PRODUCTS[product].background
        union = np.zeros((128, 128), bool)
        for kind, m in s.parts:
            assert kind in ("structural", "surface", "contamination")
            assert m.any()
            union |= m
        assert np.array_equal(union, s.mask > 0)
        n_cc = cv2.connectedComponents((s.mask > 0).astype(np.uint8))[0] - 1
        if category == "combined":
            assert len({k for k, _ in s.parts}) >= 2 and n_cc >= 2
        else:
            assert {k for k, _ in s.parts} == {category}


def test_defect_changes_pixels_inside_mask():
    """The mask marks real change: the defective frame differs from its own normal frame
    (same scene draw) mostly inside the mask."""
    prod = SyntheticProduct("brick", 128, seed=0)
    s = prod.defective(0, "contamination")
    m = s.mask > 0
    # a defect region stands out from its surroundings in colour or texture
    inside = s.image[m].astype(float)
    ring = cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~m
    outside = s.image[ring].astype(float)
    assert np.abs(inside.mean(0) - outside.mean(0)).max() > 10


def test_normal_frames_vary():
    """Position, rotation and lighting jitter: normal frames are not copies of one template."""
    prod = SyntheticProduct("cap", 128, seed=0)
    imgs = np.stack([prod.normal(i).image for i in range(6)]).astype(float)
    assert imgs.std(0).mean() > 5


def test_camera_is_endless_and_deterministic():
    cam1 = SyntheticCamera("turf", seed=1, size=96, defect_rate=0.5)
    cam2 = SyntheticCamera("turf", seed=1, size=96, defect_rate=0.5)
    f1 = [next(cam1) for _ in range(12)]
    f2 = [next(cam2) for _ in range(12)]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(f1, f2))
    cats = [f.category for f in f1]
    assert "good" in cats and any(c in CATEGORIES for c in cats)
    for f in f1:
        assert (f.mask is None) == (f.category == "good")


def test_camera_defect_rate_zero_and_one():
    assert all(next(iter(SyntheticCamera("pcb", size=96, defect_rate=0.0))).category == "good" for _ in range(3))
    cam = SyntheticCamera("pcb", size=96, defect_rate=1.0)
    assert all(next(cam).category in CATEGORIES for _ in range(4))
    with pytest.raises(UserError):
        SyntheticCamera("pcb", defect_rate=1.5)


def test_bad_product_and_category():
    with pytest.raises(UserError, match="unknown synthetic product 'nope'"):
        SyntheticProduct("nope")
    with pytest.raises(UserError, match="unknown defect category 'rust'"):
        SyntheticProduct("cap").defective(0, "rust")


def test_generate_dataset_layout(tmp_path):
    root = generate_dataset(tmp_path / "line", products=["cap", "brick"], size=96, seed=0, n_train=3,
                            n_test_good=2, n_test_per_category=2, progress=False)
    for p in ("cap", "brick"):
        assert len(list((root / p / "train" / "good").glob("*.png"))) == 3
        assert len(list((root / p / "test" / "good").glob("*.png"))) == 2
        for c in CATEGORIES:
            imgs = sorted((root / p / "test" / c).glob("*.png"))
            masks = sorted((root / p / "ground_truth" / c).glob("*_mask.png"))
            assert [m.name for m in masks] == [f"{i.stem}_mask.png" for i in imgs] and len(imgs) == 2
            m = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
            assert m.shape == (96, 96) and set(np.unique(m).tolist()) == {0, 255}
    with open(root / "categories.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"path", "product", "category", "background"}
    assert all((root / r["path"]).is_file() for r in rows)
    bg = {r["product"]: r["background"] for r in rows}
    assert bg == {"cap": "1", "brick": "0"}
    # the PNG on disk is the sample (lossless, RGB order)
    img = cv2.cvtColor(cv2.imread(str(root / "cap" / "test" / "surface" / "001.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(img, SyntheticProduct("cap", 96, 0).defective(1, "surface").image)


def test_synth_cli(tmp_path, capsys):
    from linewatch.cli import main

    rc = main(["synth", "--out", str(tmp_path / "d"), "--products", "turf", "--size", "64", "--n-train", "2",
               "--n-test-good", "1", "--n-per-category", "1", "--no-progress"])
    assert rc == 0
    assert (tmp_path / "d" / "turf" / "ground_truth" / "combined" / "000_mask.png").is_file()
    rc = main(["synth", "--out", str(tmp_path / "e"), "--products", "nope"])
    assert rc == 2
    assert "unknown synthetic product 'nope'" in capsys.readouterr().err
