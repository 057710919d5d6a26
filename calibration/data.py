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
    """Images (N, S, S, 3) uint8 RGB at model size, masks (N, S, S) bool, and their labels.

    Two kinds of label, because plants have both: every image carries an image-level label
    (``labels``: defective or not -- what the image threshold and the frame KPIs need), and
    ``mask_known`` says where its pixel mask is known (normal images: an empty mask; defective
    images only when a mask was drawn). Pixel methods and pixel metrics use the rows of
    ``pixel_rows`` only, so a defect without a mask is never read as a defect-free image.
    Without ``labels`` the masks decide (a set built from masks alone).
    """

    paths: list[Path]
    images: np.ndarray
    masks: np.ndarray
    categories: list[str]  # "good" or one of CATEGORIES (or "unknown" for an unlabelled defect)
    background: list[bool | None] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)  # the MVTec folder name
    labels: np.ndarray | None = None  # (N,) bool: image-level "defective"
    mask_known: np.ndarray | None = None  # (N,) bool: the pixel mask is known

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.labels is None:
            self.labels = self.masks.reshape(n, -1).any(1) if n else np.zeros(0, bool)
        if self.mask_known is None:
            self.mask_known = np.ones(n, bool)
        self.labels = np.asarray(self.labels, bool)
        self.mask_known = np.asarray(self.mask_known, bool) | ~self.labels  # a normal image's mask is empty
        if not self.background:
            self.background = [None] * n
        if not self.defect_types:
            self.defect_types = [""] * n

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def anomalous(self) -> np.ndarray:
        """Image-level labels: every labelled defective image, with a mask or without."""
        return self.labels

    @property
    def pixel_rows(self) -> np.ndarray:
        """(N,) bool: the images whose pixels are labelled (normal ones, masked defective ones)."""
        return self.mask_known

    @property
    def n_unmasked(self) -> int:
        """Defective images known only by their image-level label."""
        return int((self.labels & ~self.mask_known).sum())

    def pixel_set(self) -> "LabelledSet":
        """The images whose pixel labels are known (itself when all are)."""
        return self if self.mask_known.all() else self.subset(self.mask_known)

    def subset(self, rows: np.ndarray) -> "LabelledSet":
        idx = np.flatnonzero(np.asarray(rows)) if np.asarray(rows).dtype == bool else np.asarray(rows)
        return LabelledSet([self.paths[i] for i in idx], self.images[idx], self.masks[idx],
                           [self.categories[i] for i in idx], [self.background[i] for i in idx],
                           [self.defect_types[i] for i in idx], self.labels[idx], self.mask_known[idx])

    def mask_coverage(self) -> str:
        """How the defective images are labelled, in words (the report and the profile say it)."""
        n_def = int(self.labels.sum())
        masked = n_def - self.n_unmasked
        if n_def == 0:
            return "no defective images"
        if masked == n_def:
            return f"pixel masks on all {n_def} defective images"
        if masked == 0:
            return f"image-level labels only ({n_def} defective images, no pixel masks)"
        return f"pixel masks on {masked} of {n_def} defective images (the others image-level labels only)"


def from_items(ds: "lwd.Dataset", items: list["lwd.ImageItem"], size: int, progress: bool = True,
               desc: str = "images") -> LabelledSet:
    """Images and masks of ``items`` at ``size`` (masks checked against their images)."""
    if not items:
        raise UserError(f"{ds.root / ds.product if ds.layout != 'folder' else ds.root}: no images for this set")
    images = lwd.load_images([i.path for i in items], size, progress=progress, desc=desc)
    masks = ds.load_masks(items, size)
    bg = [i.background if i.background is not None else ds.background for i in items]
    return LabelledSet([i.path for i in items], images, masks, [i.category for i in items], bg,
                       [i.defect_type for i in items], np.array([i.anomalous for i in items], bool),
                       np.array([i.mask_path is not None for i in items], bool))


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
            gt = pdir / "ground_truth" / d
            mask = None if d == GOOD or not gt.is_dir() else gt / f"{p.stem}_mask.png"
            items.append(lwd.ImageItem(p, cat, mask, lab.background if lab else None, pdir.name, d))
    ds = lwd.Dataset(root, pdir.name, "mvtec", [], items, None, csv_path)
    lwd.check_has_normal(ds, test_dir)
    lwd.check_dataset_masks(ds)
    return from_items(ds, items, size, progress, f"{pdir.name} {sub}")


def load_plain_sets(product: str, defect_dir: Path | None, normal_test_dir: Path | None, size: int,
                    progress: bool = True) -> LabelledSet:
    """``--defect-dir`` and ``--normal-test-dir`` as one labelled set (image-level labels only):
    the whole validation set of ``threshold``, the whole test set of ``evaluate``."""
    ds = lwd.load_plain_folders(product, None, defect_dir, normal_test_dir)
    return from_items(ds, ds.test, size, progress, f"{product} folders")


def plain_splits(product: str, defect_dir: Path, normal_test_dir: Path | None, size: int,
                 val_fraction: float = 1 / 3, seed: int = 0,
                 progress: bool = True) -> tuple[LabelledSet, LabelledSet]:
    """(validation, test) of the plain folders, by the same seeded stratified split as a dataset's."""
    ds = lwd.load_plain_folders(product, None, defect_dir, normal_test_dir)
    val, test = ds.split(val_fraction, seed)
    return (from_items(ds, val, size, progress, f"{product} val"),
            from_items(ds, test, size, progress, f"{product} test"))
