"""Dataset readers: MVTec, BTAD, folder+CSV, the categories CSV, splits, and every bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.datasets import (ImageItem, list_products, load_btad, load_folder_csv, load_images, load_masks,
                                load_mvtec, open_dataset, read_categories_csv, split_validation_test)
from linewatch.errors import UserError
from linewatch.messages import CATEGORIES
from linewatch.synth import SyntheticProduct, generate_dataset


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("line") / "synth"
    return generate_dataset(root, products=["cap", "turf"], size=64, seed=0, n_train=4, n_test_good=3,
                            n_test_per_category=4, progress=False)


@pytest.fixture()
def copy(line, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(line, dst)
    return dst


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def test_mvtec_reads_back_what_synth_wrote(line):
    ds = load_mvtec(line, "cap")
    assert ds.layout == "mvtec" and ds.background is True
    assert len(ds.train) == 4 and len(ds.test) == 3 + 4 * 4
    assert {i.category for i in ds.test} == {"good", *CATEGORIES}
    imgs = ds.load_images(ds.test, 64)
    masks = ds.load_masks(ds.test, 64)
    assert imgs.shape == (19, 64, 64, 3) and imgs.dtype == np.uint8
    assert masks.shape == (19, 64, 64) and masks.dtype == bool
    for it, m in zip(ds.test, masks):
        assert m.any() == it.anomalous
    # exactly the generator's sample, image and mask
    k = next(j for j, it in enumerate(ds.test) if it.category == "combined" and it.path.stem == "002")
    s = SyntheticProduct("cap", 64, 0).defective(2, "combined")
    assert np.array_equal(imgs[k], s.image) and np.array_equal(masks[k], s.mask > 0)
    assert load_mvtec(line, "turf").background is False
    assert list_products(line) == ["cap", "turf"]
    assert open_dataset(line, "turf").layout == "mvtec"


def test_load_images_resizes(line):
    paths = sorted((line / "cap" / "train" / "good").glob("*.png"))
    assert load_images(paths, 32).shape == (4, 32, 32, 3)
    ds = load_mvtec(line, "cap")
    assert ds.load_masks(ds.test, 32).shape == (19, 32, 32)


def test_split_reproducible_and_stratified(line):
    ds = load_mvtec(line, "cap")
    v1, t1 = split_validation_test(ds.test, val_fraction=1 / 3, seed=0)
    v2, t2 = split_validation_test(ds.test, val_fraction=1 / 3, seed=0)
    assert [i.path for i in v1] == [i.path for i in v2]
    assert not {i.path for i in v1} & {i.path for i in t1} and len(v1) + len(t1) == len(ds.test)
    for c in CATEGORIES:  # a few anomalous of each category to validation, the rest to test
        assert sum(i.category == c for i in v1) >= 1 and sum(i.category == c for i in t1) >= 1
    v3, _ = split_validation_test(ds.test, val_fraction=1 / 3, seed=1)
    assert [i.path for i in v3] != [i.path for i in v1]


def test_btad_layout(tmp_path):
    root = tmp_path / "btad"
    p = root / "01"
    rng = np.random.default_rng(0)
    for split, n in (("train/ok", 3), ("test/ok", 2), ("test/ko", 2)):
        for i in range(n):
            _write(p / split / f"{i:04d}.bmp", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    for i in range(2):
        m = np.zeros((40, 48), np.uint8)
        m[5:15, 5:20] = 255
        _write(p / "ground_truth" / "ko" / f"{i:04d}.png", m)
    (root / "categories.csv").write_text("path,category,background\n01/test/ko/0000.bmp,surface,0\n")
    ds = load_btad(root, "01")
    assert ds.layout == "btad" and len(ds.train) == 3 and len(ds.test) == 4
    cats = {i.path.name: i.category for i in ds.test}
    assert cats["0000.bmp"] == "surface" and cats["0001.bmp"] == "unknown" and cats["0000.bmp"] != "good"
    masks = ds.load_masks(ds.test, 32)
    assert masks.sum(axis=(1, 2)).tolist()[2:] == [masks[2].sum()] * 2 and masks[:2].sum() == 0
    assert open_dataset(root, "01").layout == "btad"


def test_folder_csv(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        _write(tmp_path / "imgs" / f"n{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    _write(tmp_path / "imgs" / "d0.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    m = np.zeros((32, 32), np.uint8)
    m[4:9, 4:9] = 255
    _write(tmp_path / "masks" / "d0.png", m)
    (tmp_path / "data.csv").write_text(
        "path,category,mask,background,split\n"
        "imgs/n0.png,good,,1,train\nimgs/n1.png,good,,1,train\nimgs/n2.png,good,,1,test\n"
        "imgs/d0.png,contamination,masks/d0.png,1,test\n")
    ds = load_folder_csv(tmp_path / "data.csv")
    assert ds.layout == "folder" and len(ds.train) == 2 and len(ds.test) == 2 and ds.background is True
    assert ds.load_masks(ds.test, 32)[1].sum() == 25
    assert open_dataset(tmp_path / "data.csv").layout == "folder"


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and the problem
# ---------------------------------------------------------------------------------------------
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_and_empty_folders(tmp_path, copy):
    with pytest.raises(UserError) as e:
        load_mvtec(tmp_path / "nowhere", "cap")
    assert "nowhere: dataset folder does not exist" in _one_line(e)
    with pytest.raises(UserError) as e:
        load_mvtec(copy, "bottle")
    assert "bottle: product folder does not exist" in _one_line(e)
    for f in (copy / "cap" / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(UserError) as e:
        load_mvtec(copy, "cap")
    assert "train/good: normal training images folder is empty" in _one_line(e)


def test_non_image_file(copy):
    (copy / "turf" / "test" / "surface" / "notes.txt").write_text("hello")
    with pytest.raises(UserError) as e:
        load_mvtec(copy, "turf")
    assert "notes.txt: not an image file" in _one_line(e)


def test_corrupt_image(copy):
    (copy / "turf" / "train" / "good" / "000.png").write_bytes(b"not a png at all")
    ds = load_mvtec(copy, "turf")
    with pytest.raises(UserError) as e:
        ds.train_images(64)
    assert "000.png: not a readable image" in _one_line(e)


def test_mask_size_differs(copy):
    mp = copy / "turf" / "ground_truth" / "surface" / "001_mask.png"
    m = cv2.imread(str(mp), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(mp), cv2.resize(m, (50, 40), interpolation=cv2.INTER_NEAREST))
    with pytest.raises(UserError) as e:
        load_mvtec(copy, "turf")
    assert "001_mask.png: mask is 50x40 but 001.png is 64x64" in _one_line(e)


def test_mask_not_binary(copy):
    mp = copy / "turf" / "ground_truth" / "structural" / "000_mask.png"
    m = cv2.imread(str(mp), cv2.IMREAD_UNCHANGED)
    m[m > 0] = 128
    m[0, 0] = 255
    cv2.imwrite(str(mp), m)
    with pytest.raises(UserError) as e:
        load_mvtec(copy, "turf")
    assert "000_mask.png: mask is not binary (values [0, 128, 255]" in _one_line(e)


def test_mask_missing(copy):
    (copy / "turf" / "ground_truth" / "contamination" / "003_mask.png").unlink()
    with pytest.raises(UserError) as e:
        load_mvtec(copy, "turf")
    assert "003_mask.png: ground-truth mask does not exist" in _one_line(e)


def test_category_outside_the_four(copy):
    csv_path = copy / "categories.csv"
    lines = csv_path.read_text().splitlines()
    j = next(k for k, ln in enumerate(lines) if "/test/surface/" in ln)
    lines[j] = lines[j].replace(",surface,", ",rust,")
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        read_categories_csv(csv_path)
    assert f"categories.csv:{j + 1}: category 'rust' is not one of structural, surface, contamination, combined" \
        in _one_line(e)
    with pytest.raises(UserError):
        load_mvtec(copy, "cap")


def test_folder_csv_bad_rows(tmp_path):
    _write(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "d.csv").write_text("path,category\na.png,good\na.png,dirt\n")
    with pytest.raises(UserError) as e:
        load_folder_csv(tmp_path / "d.csv")
    assert "d.csv:3: category 'dirt' is not one of" in _one_line(e)
    (tmp_path / "d.csv").write_text("path,category\na.png,good\nb.png,good\n")
    with pytest.raises(UserError) as e:
        load_folder_csv(tmp_path / "d.csv")
    assert "b.png: image file does not exist" in _one_line(e)


def test_load_masks_none_is_empty():
    m = load_masks([None, None], 16)
    assert m.shape == (2, 16, 16) and not m.any()


def test_image_item_anomalous_flag():
    assert ImageItem(Path("x.png"), "surface").anomalous and not ImageItem(Path("x.png"), "good").anomalous
