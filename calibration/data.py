"""What calibration needs from a dataset: labelled image sets at model size, checked.

A thin adapter over ``calibration.datasets`` (MVTec AD, BTAD, folder + CSV layouts, the
categories CSV, the reproducible stratified val/test split and every bad-input check: missing
or empty folders, non-images, masks of the wrong size or not binary, labels outside the
four). Calibration works on ``LabelledSet``: arrays at model size plus their labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration import datasets as lwd
from linewatch.errors import UserError

GOOD = lwd.GOOD
MIN_VAL_ANOMALOUS = lwd.MIN_VAL_ANOMALOUS


@dataclass
class LabelledSet:
    """Images (N, S, S, 3) uint8 RGB at model size, masks (N, S, S) bool, and their labels."""

    paths: list[Path]
    images: np.ndarray
    masks: np.ndarray
    categories: list[str]  # "good" or one of CATEGORIES (or "unknown" for an unlabelled defect)
    background: list[bool | None] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)  # the MVTec folder name

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def anomalous(self) -> np.ndarray:
        return self.masks.reshape(len(self.masks), -1).any(1)

    def subset(self, rows: np.ndarray) -> "LabelledSet":
        idx = np.flatnonzero(np.asarray(rows)) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return LabelledSet([self.paths[i] for i in idx], self.images[idx], self.masks[idx],
                           [self.categories[i] for i in idx], [self.background[i] for i in idx],
                           [self.defect_types[i] for i in idx])


def from_items(ds: "lwd.Dataset", items: list["lwd.ImageItem"], size: int, progress: bool = True,
               desc: str = "images") -> LabelledSet:
    """Images and masks of ``items`` at ``size`` (masks checked against their images)."""
    if not items:
        raise UserError(f"{ds.root / ds.product if ds.layout != 'folder' else ds.root}: no images for this set")
    images = lwd.load_images([i.path for i in items], size, progress=progress, desc=desc)
    masks = ds.load_masks(items, size)
    bg = [i.background if i.background is not None else ds.background for i in items]
    return LabelledSet([i.path for i in items], images, masks, [i.category for i in items], bg,
                       [i.defect_type for i in items])


def open_product(root: Path, product: str | None, categories_csv: Path | None = None) -> "lwd.Dataset":
    return lwd.open_dataset(root, product, categories_csv=categories_csv)


def load_train(root: Path, product: str, size: int, progress: bool = True) -> np.ndarray:
    ds = open_product(root, product)
    return ds.train_images(size, progress=progress)


def load_product_splits(root: Path, product: str, size: int, val_fraction: float = 1 / 3, seed: int = 0,
                        categories_csv: Path | None = None, progress: bool = True) -> tuple[LabelledSet, LabelledSet]:
    """(validation, test) sets of a product: the dataset's reproducible stratified split."""
    ds = open_product(root, product, categories_csv)
    val, test = ds.split(val_fraction, seed)
    return (from_items(ds, val, size, progress, f"{product} val"),
            from_items(ds, test, size, progress, f"{product} test"))


def product_background(root: Path, product: str) -> bool | None:
    return open_product(root, product).background


def load_validation_folder(folder: Path, size: int, categories_csv: Path | None = None,
                           progress: bool = True) -> LabelledSet:
    """A whole folder used as the validation (or test) set: a product folder (its ``test/``),
    an MVTec ``test`` folder (``<folder>/<defect>/``, masks in ``../ground_truth``), or a
    folder + CSV dataset (the CSV file)."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() == ".csv":
        ds = lwd.load_folder_csv(folder)
        return from_items(ds, ds.test, size, progress, folder.name)
    if not folder.is_dir():
        raise UserError(f"{folder}: folder does not exist")
    if (folder / "test").is_dir():
        pdir, sub = folder, "test"
    else:
        pdir, sub = folder.parent, folder.name
    root = pdir.parent
    csv_path = categories_csv or (root / lwd.CATEGORIES_CSV if (root / lwd.CATEGORIES_CSV).is_file() else None)
    labels = lwd.read_categories_csv(csv_path) if csv_path else {}
    test_dir = pdir / sub
    defects = sorted(d.name for d in test_dir.iterdir() if d.is_dir())
    if not defects:
        raise UserError(f"{test_dir}: folder is empty (expected good/ and defect sub-folders)")
    items = []
    for d in defects:
        for p in lwd.list_images(test_dir / d, f"{sub}/{d}"):
            rel = p.relative_to(root).as_posix()
            lab = labels.get(rel)
            cat = lab.category if lab else (GOOD if d == GOOD else (d if d in lwd.CATEGORIES else lwd.UNKNOWN))
            if (d == GOOD) != (cat == GOOD):
                raise UserError(f"{csv_path}: {rel} is in folder {d!r} but labelled {cat!r}")
            mask = None if d == GOOD else pdir / "ground_truth" / d / f"{p.stem}_mask.png"
            items.append(lwd.ImageItem(p, cat, mask, lab.background if lab else None, pdir.name, d))
    ds = lwd.Dataset(root, pdir.name, "mvtec", [], items, None, csv_path)
    lwd.check_dataset_masks(ds)
    return from_items(ds, items, size, progress, f"{pdir.name} {sub}")
