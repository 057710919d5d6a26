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
    assert not (tmp_path / "d" / "turf" / "frame.json").exists()  # the square default writes none
    rc = main(["synth", "--out", str(tmp_path / "e"), "--products", "nope"])
    assert rc == 2
    assert "unknown synthetic product 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# frame mode: the product's square in a camera frame, defects as a camera sees them
# ------------------------------------------------------------------------------------------------
# main's square-mode output (seed 1): md5 of image, mask and parts, as computed before frame mode
_MAIN_HASHES = {
    ("cap", 128, "good", 0): "fb7c22ae74bfeb3ff26ae432ce8e0ed3",
    ("brick", 128, "combined", 1): "591a3bfa24fbec7bc0f326c9b9df4b9e",
    ("pcb", 128, "structural", 0): "db1cd667a812397b91b3bbe16e35424d",
    ("turf", 128, "contamination", 1): "4818f8b8eeac8bff62b80bda26e995b7",
    ("gravel", 256, "surface", 0): "8bc128f3e492126a103c80e7f2072c63",
}


def _outside(box, shape):
    x, y, w, h = box
    out = np.ones(shape[:2], bool)
    out[y:y + h, x:x + w] = False
    return out


def test_square_mode_unchanged():
    import hashlib

    for (product, size, cat, i), want in _MAIN_HASHES.items():
        s = SyntheticProduct(product, size, seed=1).sample(i, cat)
        h = hashlib.md5(s.image.tobytes())
        if s.mask is not None:
            h.update(s.mask.tobytes())
        for kind, m in s.parts:
            h.update(kind.encode())
            h.update(m.tobytes())
        assert h.hexdigest() == want, (product, size, cat, i)
        assert s.product_box == (0, 0, size, size)


@pytest.mark.parametrize("product", list(PRODUCTS))
def test_frame_mode_model_scale_is_the_square_render_on_a_backdrop(product):
    """With defect_scale "model" the box holds exactly the square mode's image at product_size."""
    fr = SyntheticProduct(product, seed=2, frame_size=(320, 240), product_size=200)
    sq = SyntheticProduct(product, 200, seed=2)
    assert fr.frame_size == (320, 240) and fr.product_box == (60, 20, 200, 200)
    for cat in ("good", "combined"):
        f, s = fr.sample(1, cat), sq.sample(1, cat)
        assert f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 and f.product_box == fr.product_box
        assert np.array_equal(f.image[20:220, 60:260], s.image)
        if cat != "good":
            assert f.mask.shape == (240, 320) and np.array_equal(f.mask[20:220, 60:260], s.mask)
            assert not f.mask[_outside(fr.product_box, f.mask.shape)].any()
            assert [k for k, _ in f.parts] == [k for k, _ in s.parts]


@pytest.mark.parametrize("product", list(PRODUCTS))
def test_frame_mode_small_defects_exact_masks_and_backdrop(product):
    prod = SyntheticProduct(product, seed=0, frame_size=(1024, 768), defect_scale="small")
    assert prod.product_box == (192, 64, 640, 640)
    good = prod.normal(0)
    out = _outside(prod.product_box, good.image.shape)
    back = good.image[out].astype(float)
    assert back.mean() < 50 and back.std() > 1.0  # dark, but not a flat constant
    assert np.abs(np.diff(good.image[10, :, 1].astype(float))).max() > 0  # noisy along a row
    areas = []
    for cat in CATEGORIES:
        s = prod.defective(0, cat)
        assert s.image.shape == (768, 1024, 3) and s.mask.shape == (768, 1024)
        assert set(np.unique(s.mask).tolist()) == {0, 255}
        assert not s.mask[out].any()
        # the backdrop is the index's own: outside the box a defective frame is its normal frame
        assert np.array_equal(s.image[out], good.image[out])
        union = np.zeros((768, 1024), bool)
        for kind, m in s.parts:
            assert m.shape == (768, 1024) and m.any() and not m[out].any()
            union |= m
        assert np.array_equal(union, s.mask > 0)
        stats = cv2.connectedComponentsWithStats((s.mask > 0).astype(np.uint8))[2]
        areas += stats[1:, cv2.CC_STAT_AREA].tolist()
    assert np.mean(np.asarray(areas) < 400) >= 0.75 and np.median(areas) < 400


def test_frame_mode_small_hole_radius():
    """Structural defects of an object (holes, chips, bends) span a few frame pixels."""
    prod = SyntheticProduct("cap", seed=0, frame_size=(1024, 768), defect_scale="small")
    radii = []
    for i in range(4):
        for _, m in prod.defective(i, "structural").parts:
            stats = cv2.connectedComponentsWithStats(m.astype(np.uint8))[2]
            radii += [float(np.sqrt(a / np.pi)) for a in stats[1:, cv2.CC_STAT_AREA]]
    assert radii and 3 <= float(np.median(radii)) <= 12 and max(radii) < 16


def test_frame_mode_deterministic_offset_and_errors():
    a = SyntheticProduct("pcb", seed=5, frame_size=(400, 300), product_size=160, defect_scale="small",
                         offset=(10, 20))
    b = SyntheticProduct("pcb", seed=5, frame_size=(400, 300), product_size=160, defect_scale="small",
                         offset=(10, 20))
    assert a.product_box == (10, 20, 160, 160)
    da, db = a.defective(3, "surface"), b.defective(3, "surface")
    assert np.array_equal(da.image, db.image) and np.array_equal(da.mask, db.mask)
    assert not np.array_equal(a.normal(3).image, a.normal(4).image)
    c = SyntheticProduct("pcb", seed=6, frame_size=(400, 300), product_size=160, offset=(10, 20))
    assert not np.array_equal(a.normal(3).image, c.normal(3).image)
    from linewatch.synth import default_product_size, parse_frame_size

    assert parse_frame_size("1024x768") == (1024, 768) and default_product_size((1024, 768)) == 640
    assert default_product_size((2448, 2048)) % 8 == 0
    for bad in ("1024", "1024x", "axb", "10x10", "1024x768x3"):
        with pytest.raises(UserError, match="frame size"):
            parse_frame_size(bad)
    with pytest.raises(UserError, match="does not fit"):
        SyntheticProduct("cap", frame_size=(320, 240), product_size=300)
    with pytest.raises(UserError, match="leaves the"):
        SyntheticProduct("cap", frame_size=(320, 240), product_size=200, offset=(200, 0))
    with pytest.raises(UserError, match="defect scale"):
        SyntheticProduct("cap", defect_scale="tiny")


def test_camera_frame_mode():
    cam = SyntheticCamera("brick", seed=1, defect_rate=0.5, frame_size=(320, 240), defect_scale="small")
    for f in (next(cam) for _ in range(3)):
        assert f.image.shape == (240, 320, 3) and f.product_box == (60, 20, 200, 200)


def test_synth_cli_frame_mode(tmp_path, capsys):
    import json

    from linewatch.cli import main

    rc = main(["synth", "--out", str(tmp_path / "d"), "--products", "cap,turf", "--frame-size", "320x240",
               "--defect-scale", "small", "--n-train", "2", "--n-test-good", "1", "--n-per-category", "1",
               "--no-progress"])
    assert rc == 0
    for p in ("cap", "turf"):
        info = json.loads((tmp_path / "d" / p / "frame.json").read_text())
        assert info["frame_size"] == [320, 240] and info["product_box"] == [60, 20, 200, 200]
        assert info["defect_scale"] == "small"
        assert cv2.imread(str(tmp_path / "d" / p / "train" / "good" / "001.png")).shape == (240, 320, 3)
        m = cv2.imread(str(tmp_path / "d" / p / "ground_truth" / "combined" / "000_mask.png"), cv2.IMREAD_UNCHANGED)
        assert m.shape == (240, 320) and m.max() == 255
    with open(tmp_path / "d" / "categories.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * (2 + 1 + len(CATEGORIES))
    for argv, msg in ((["--frame-size", "320by240"], "frame size '320by240'"),
                      (["--frame-size", "320x240", "--product-size", "300"], "does not fit"),
                      (["--product-size", "100"], "needs --frame-size")):
        rc = main(["synth", "--out", str(tmp_path / "bad"), "--products", "cap", "--no-progress", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
