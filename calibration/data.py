"""What calibration needs from a dataset: labelled image sets at model size, checked.

Reads the MVTec AD layout (``<root>/<product>/train/good``, ``test/<defect>/``,
``ground_truth/<defect>/<stem>_mask.png``) and the product-agnostic categories CSV
(``path,product,category,background``; ``<root>/categories.csv`` when present). When
``linewatch.datasets`` provides the reader, it is used; the checks here are the ones a line
engineer needs to see as one line naming the file: missing or empty folders, files that are
not images, masks of another size than their image, masks that are not binary, category
labels outside the four.

Validation/test split: the product's ``test`` images are split per category with a seeded
permutation (stable under adding files of other categories), ``val_fraction`` to validation,
at least ``MIN_VAL_ANOMALOUS`` anomalous images to validation when there are enough.
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from linewatch.errors import UserError
from linewatch.messages import CATEGORIES

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_VAL_ANOMALOUS = 3
GOOD = "good"


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


def list_images(folder: Path, what: str = "images") -> list[Path]:
    """Image files of a folder (sorted); UserError when missing, empty, or holding non-images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {what} folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: {what} folder is empty")
    bad = [p for p in files if p.suffix.lower() not in IMAGE_EXTS]
    if bad:
        raise UserError(f"{bad[0]}: not an image file (expected {', '.join(IMAGE_EXTS)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise UserError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: Path, image_shape: tuple[int, int], image_path: Path) -> np.ndarray:
    """Binary mask at its image's size; UserError for missing, wrong-size or non-binary masks."""
    if not path.is_file():
        raise UserError(f"{path}: missing ground-truth mask for {image_path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    m = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if m is None:
        raise UserError(f"{path}: mask is not a readable image")
    if m.ndim == 3:
        if not (m[..., :1] == m).all():
            raise UserError(f"{path}: mask is not binary (colour channels differ)")
        m = m[..., 0]
    if m.shape[:2] != tuple(image_shape):
        raise UserError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image {image_path.name} is "
                        f"{image_shape[1]}x{image_shape[0]}")
    values = np.unique(m)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        raise UserError(f"{path}: mask is not binary (values {values[:6].tolist()}{'...' if len(values) > 6 else ''}; "
                        "expected only 0 and 255)")
    return m > 0


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def load_images(paths: list[Path], size: int, progress: bool = False, desc: str = "images") -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False)):
        out[i] = resize_rgb(read_rgb(p), size)
    return out


# -- categories CSV --------------------------------------------------------------------------
def read_categories_csv(path: Path) -> dict[str, tuple[str, bool | None]]:
    """``relative path -> (category, background)``; UserError on labels outside the four."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: categories CSV does not exist")
    out: dict[str, tuple[str, bool | None]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"path", "category"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise UserError(f"{path}: categories CSV needs columns path, category (got {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            cat = (row.get("category") or "").strip().lower()
            if cat != GOOD and cat not in CATEGORIES:
                raise UserError(f"{path}:{line}: category {cat!r} is not one of {', '.join(CATEGORIES)} (or good)")
            bg_raw = (row.get("background") or "").strip().lower()
            bg = None if bg_raw == "" else bg_raw in ("1", "true", "yes", "y")
            out[row["path"].strip().replace("\\", "/")] = (cat, bg)
    return out


# -- MVTec layout ----------------------------------------------------------------------------
def product_dir(root: Path, product: str) -> Path:
    pdir = Path(root) / product
    if not pdir.is_dir():
        raise UserError(f"{pdir}: product folder does not exist")
    return pdir


def train_paths(root: Path, product: str) -> list[Path]:
    return list_images(product_dir(root, product) / "train" / "good", "normal training images")


def load_train(root: Path, product: str, size: int, progress: bool = True) -> np.ndarray:
    return load_images(train_paths(root, product), size, progress, desc=f"{product} train")


def _mask_path(pdir: Path, defect: str, img: Path) -> Path:
    return pdir / "ground_truth" / defect / f"{img.stem}_mask.png"


def load_labelled_folder(pdir: Path, size: int, categories_csv: Path | None = None,
                         root: Path | None = None, sub: str = "test", progress: bool = True) -> LabelledSet:
    """Every image of ``<pdir>/<sub>/<defect>/`` with its mask and product-agnostic label."""
    test = Path(pdir) / sub
    if not test.is_dir():
        raise UserError(f"{test}: folder does not exist")
    defects = sorted(d.name for d in test.iterdir() if d.is_dir())
    if not defects:
        raise UserError(f"{test}: folder is empty (expected good/ and defect sub-folders)")
    labels = read_categories_csv(categories_csv) if categories_csv else {}
    base = Path(root) if root else Path(pdir).parent
    paths, cats, bgs, types = [], [], [], []
    for d in defects:
        for p in list_images(test / d, f"{sub}/{d}"):
            rel = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix()
            cat, bg = labels.get(rel, (None, None))
            if cat is None:
                cat = GOOD if d == GOOD else (d if d in CATEGORIES else "unknown")
            if (d == GOOD) != (cat == GOOD):
                where = categories_csv if rel in labels else p
                raise UserError(f"{where}: {rel} is in folder {d!r} but labelled {cat!r}")
            paths.append(p); cats.append(cat); bgs.append(bg); types.append(d)
    images = np.empty((len(paths), size, size, 3), np.uint8)
    masks = np.zeros((len(paths), size, size), bool)
    for i, p in enumerate(tqdm(paths, desc=f"{Path(pdir).name} {sub}", unit="img", disable=not progress, leave=False)):
        img = read_rgb(p)
        images[i] = resize_rgb(img, size)
        if types[i] != GOOD:
            m = read_mask(_mask_path(Path(pdir), types[i], p), img.shape[:2], p)
            if not m.any():
                raise UserError(f"{_mask_path(Path(pdir), types[i], p)}: mask of defective image {p.name} is empty")
            masks[i] = resize_mask(m, size)
    return LabelledSet(paths, images, masks, cats, bgs, types)


def default_categories_csv(root: Path) -> Path | None:
    p = Path(root) / "categories.csv"
    return p if p.is_file() else None


def split_rows(labelled: LabelledSet, val_fraction: float = 1 / 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible stratified (per category) val/test split: boolean row masks."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction} must be within (0, 1)")
    val = np.zeros(len(labelled), bool)
    cats = np.array(labelled.categories)
    names = np.array([p.name for p in labelled.paths])
    for c in sorted(set(cats.tolist())):
        rows = np.flatnonzero(cats == c)
        rows = rows[np.argsort(names[rows], kind="stable")]
        rng = np.random.default_rng([seed, zlib.crc32(c.encode())])
        rows = rows[rng.permutation(len(rows))]
        k = int(round(len(rows) * val_fraction))
        if c != GOOD and len(rows) > MIN_VAL_ANOMALOUS:
            k = max(k, 1)
        val[rows[:k]] = True
    # the threshold methods 1-3 need a few anomalous validation images
    anom = labelled.anomalous
    if (val & anom).sum() < MIN_VAL_ANOMALOUS and (anom.sum() >= 2 * MIN_VAL_ANOMALOUS):
        extra = np.flatnonzero(anom & ~val)[: MIN_VAL_ANOMALOUS - int((val & anom).sum())]
        val[extra] = True
    return val, ~val


def load_product_splits(root: Path, product: str, size: int, val_fraction: float = 1 / 3, seed: int = 0,
                        categories_csv: Path | None = None, progress: bool = True) -> tuple[LabelledSet, LabelledSet]:
    """(validation, test) sets of a product in the MVTec layout."""
    root = Path(root)
    pdir = product_dir(root, product)
    csv_path = categories_csv or default_categories_csv(root)
    full = load_labelled_folder(pdir, size, csv_path, root=root, progress=progress)
    val, test = split_rows(full, val_fraction, seed)
    return full.subset(val), full.subset(test)


def load_validation_folder(folder: Path, size: int, categories_csv: Path | None = None,
                           progress: bool = True) -> LabelledSet:
    """A whole folder used as validation set: ``<folder>/<defect>/`` + ``<folder>/../ground_truth``
    (MVTec ``test``) or ``<folder>/ground_truth/`` next to the defect folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: validation folder does not exist")
    if (folder / "test").is_dir():  # a product folder
        return load_labelled_folder(folder, size, categories_csv, progress=progress)
    return load_labelled_folder(folder.parent, size, categories_csv, sub=folder.name, progress=progress)
