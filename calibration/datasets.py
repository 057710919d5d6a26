"""Readers for inspection datasets: the MVTec AD layout, the BTAD layout, and a folder + CSV.

Why: calibration, the categorizer and the demo all need the same thing -- a product's normal
training images and its labelled test images (product-agnostic category, background flag,
pixel mask) -- from whichever layout a line engineer has. Everything a person can get wrong
is checked here and reported as one line naming the file and the problem (UserError):
missing or empty folders, files that are not images, masks of another size than their image,
masks that are not binary, category labels outside the four, defect images with no normal
images to set a threshold against.

A defective image need not have a mask (what plants have is often a folder of rejects): its
``mask_path`` is then None and it counts as an image-level label -- it sets the image threshold
and the frame KPIs, never the pixel methods or pixel metrics. That happens for an MVTec or BTAD
defect folder with no ``ground_truth/<defect>/`` folder beside it, a CSV row with an empty (or
no) mask column, and the plain folders of ``load_plain_folders``. A ``ground_truth/<defect>/``
folder that exists must hold every mask of its defect folder (a missing one is an error, not a
silent image-level label: it is usually a typo).

Layouts::

    MVTec AD   <root>/<product>/train/good/*.png
               <root>/<product>/test/<defect>/*.png      (good = normal)
               <root>/<product>/ground_truth/<defect>/<stem>_mask.png
    BTAD       <root>/<product>/train/ok/*   test/ok/*   test/ko/*
               <root>/<product>/ground_truth/ko/<stem>.png
    folder+CSV a CSV with columns path, category [, mask, background, split, product];
               paths relative to the CSV's folder; category "good" or one of the four.
    folders    --normal-dir (fit), --defect-dir (defective, sub-folders may name the
               category), --normal-test-dir (defect-free, not fitted on): image labels only

The product-agnostic labels are a CSV ``path, category [, product, background]`` with paths
relative to the dataset root (``<root>/categories.csv`` is picked up automatically). MVTec
defect folders named after one of the four categories (as the synthetic line writes them)
need no CSV; other defect folders without a label are ``"unknown"``.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from linewatch.inspection.frames import framing_of, load_image_file
from linewatch.inspection.geometry import Framing, GeometryError

from linewatch.errors import UserError
from linewatch.messages import CATEGORIES

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
UNKNOWN = "unknown"
CATEGORIES_CSV = "categories.csv"
MIN_VAL_ANOMALOUS = 3
_TRUE = ("1", "true", "yes", "y", "t")
_FALSE = ("0", "false", "no", "n", "f")


@dataclass(frozen=True)
class ImageItem:
    """One image of a dataset and what is known about it."""

    path: Path
    category: str  # "good", one of CATEGORIES, or "unknown" (anomalous, unlabelled)
    mask_path: Path | None = None  # None for normal images and for image-level labels (no mask drawn)
    background: bool | None = None
    product: str = ""
    defect_type: str = ""  # the layout's own folder name (MVTec "broken_large", BTAD "ko", ...)

    @property
    def anomalous(self) -> bool:
        return self.category != GOOD


@dataclass
class Dataset:
    """A product's images: ``train`` (normal only) and ``test`` (normal and anomalous)."""

    root: Path
    product: str
    layout: str  # "mvtec" | "btad" | "folder"
    train: list[ImageItem]
    test: list[ImageItem]
    background: bool | None = None
    labels_csv: Path | None = None
    extra: dict = field(default_factory=dict)

    def train_images(self, size: int | Framing = 256, progress: bool = False) -> np.ndarray:
        return load_images([i.path for i in self.train], size, progress=progress)

    def load_images(self, items: Sequence[ImageItem], size: int | Framing = 256, progress: bool = False) -> np.ndarray:
        return load_images([i.path for i in items], size, progress=progress)

    def load_masks(self, items: Sequence[ImageItem], size: int | Framing = 256) -> np.ndarray:
        return load_masks([i.mask_path for i in items], size, [i.path for i in items])

    def split(self, val_fraction: float = 1 / 3, seed: int = 0) -> tuple[list[ImageItem], list[ImageItem]]:
        return split_validation_test(self.test, val_fraction=val_fraction, seed=seed)


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def list_images(folder: str | Path, what: str = "images") -> list[Path]:
    """Image files of a folder (sorted by name); UserError when missing, empty or holding non-images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {what} folder does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: {what} folder is empty")
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTS:
            raise UserError(f"{p}: not an image file (expected {', '.join(IMAGE_EXTS)})")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB; UserError when the file is missing or not a decodable image."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image file does not exist")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise UserError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header (no full decode when Pillow can read it)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
        return h, w
    except Exception:
        return read_image(path).shape[:2]


def read_mask(path: str | Path, image_shape: tuple[int, int] | None = None,
              image_path: str | Path | None = None) -> np.ndarray:
    """HxW bool; UserError when missing, unreadable, not binary or not the image's size."""
    path = Path(path)
    if not path.is_file():
        of = f" for {image_path}" if image_path else ""
        raise UserError(f"{path}: ground-truth mask does not exist{of}")
    data = np.fromfile(str(path), dtype=np.uint8)
    m = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if m is None:
        raise UserError(f"{path}: mask is not a readable image")
    if m.ndim == 3:
        if m.shape[2] == 4:
            m = m[..., :3]
        if not (m == m[..., :1]).all():
            raise UserError(f"{path}: mask is not binary (colour channels differ)")
        m = m[..., 0]
    if image_shape is not None and tuple(m.shape[:2]) != tuple(image_shape):
        name = Path(image_path).name if image_path else "its image"
        raise UserError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but {name} is {image_shape[1]}x{image_shape[0]}")
    values = np.unique(m)
    vs = set(values.tolist())
    if not (vs <= {0, 255} or vs <= {0, 1}):
        shown = values[:6].tolist()
        raise UserError(f"{path}: mask is not binary (values {shown}{'...' if len(values) > 6 else ''}; "
                        "expected only 0 and 255)")
    return m > 0


def load_images(paths: Sequence[str | Path], size: int | Framing, progress: bool = False,
                desc: str = "images") -> np.ndarray:
    """(N, H, W, 3) uint8 RGB views (size x size for a bare model size), each image as the
    worker's decode gives it for the same bytes (``linewatch.inspection.frames.load_image_file``:
    one decode-and-resize for both sides)."""
    from tqdm.auto import tqdm

    out = np.empty((len(paths), *framing_of(size).view_hw, 3), np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False)):
        out[i] = load_image_file(p, size)
    return out


def load_masks(mask_paths: Sequence[str | Path | None], size: int | Framing,
               image_paths: Sequence[str | Path] | None = None) -> np.ndarray:
    """(N, H, W) bool at the view size (the same ROI and resize as the images, nearest
    neighbour); ``None`` entries (normal images) are all-False.

    With ``image_paths`` each mask is checked to be its image's size before resizing.
    """
    if image_paths is not None and len(image_paths) != len(mask_paths):
        raise ValueError("load_masks: mask_paths and image_paths differ in length")
    framing = framing_of(size)
    out = np.zeros((len(mask_paths), *framing.view_hw), bool)
    for i, mp in enumerate(mask_paths):
        if mp is None:
            continue
        shape = image_size(image_paths[i]) if image_paths is not None else None
        m = read_mask(mp, shape, image_paths[i] if image_paths is not None else None)
        try:
            box = framing.box(m.shape[1], m.shape[0])
        except GeometryError as exc:
            raise UserError(f"{mp}: {exc}") from None
        out[i] = framing.view(m.view(np.uint8), box, interpolation=cv2.INTER_NEAREST) > 0
    return out


# ------------------------------------------------------------------------------------------------
# labels
# ------------------------------------------------------------------------------------------------
def parse_background(value: str | None, where: str) -> bool | None:
    v = (value or "").strip().lower()
    if v == "":
        return None
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise UserError(f"{where}: background flag {value!r} is not one of 1/0/true/false")


def check_category(value: str, where: str, allow_good: bool = True) -> str:
    cat = (value or "").strip().lower()
    if cat == GOOD and allow_good:
        return cat
    if cat not in CATEGORIES:
        extra = " (or good)" if allow_good else ""
        raise UserError(f"{where}: category {value!r} is not one of {', '.join(CATEGORIES)}{extra}")
    return cat


@dataclass(frozen=True)
class CategoryLabel:
    category: str
    background: bool | None = None
    product: str | None = None


def read_categories_csv(path: str | Path) -> dict[str, CategoryLabel]:
    """``relative path -> CategoryLabel`` from a categories CSV (columns path, category
    [, product, background]); UserError naming file and line on any bad row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: categories CSV does not exist")
    out: dict[str, CategoryLabel] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if not {"path", "category"} <= set(cols):
            raise UserError(f"{path}: categories CSV needs columns path, category (got {reader.fieldnames})")
        reader.fieldnames = cols
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            rel = (row.get("path") or "").strip().replace("\\", "/")
            if not rel:
                raise UserError(f"{where}: empty path")
            cat = check_category(row.get("category") or "", where)
            bg = parse_background(row.get("background"), where)
            out[rel] = CategoryLabel(cat, bg, (row.get("product") or "").strip() or None)
    return out


def write_categories_csv(path: str | Path, rows: Sequence[tuple[str, str, str, bool | None]]) -> Path:
    """Write ``(path, product, category, background)`` rows (the synthetic line's format)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "product", "category", "background"])
        for rel, product, cat, bg in rows:
            w.writerow([rel, product, cat, "" if bg is None else int(bool(bg))])
    return path


def _label_for(labels: dict[str, CategoryLabel], root: Path, p: Path) -> CategoryLabel | None:
    try:
        rel = p.relative_to(root).as_posix()
    except ValueError:
        rel = p.as_posix()
    return labels.get(rel)


def _product_background(items: Sequence[ImageItem]) -> bool | None:
    flags = {i.background for i in items if i.background is not None}
    return flags.pop() if len(flags) == 1 else None


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------
def _product_dir(root: Path, product: str) -> Path:
    if not Path(root).is_dir():
        raise UserError(f"{root}: dataset folder does not exist")
    pdir = Path(root) / product
    if not pdir.is_dir():
        raise UserError(f"{pdir}: product folder does not exist")
    return pdir


def load_mvtec(root: str | Path, product: str, categories_csv: str | Path | None = None,
               check_masks: bool = True, size: int | None = None, train_only: bool = False) -> Dataset:
    """A product in the MVTec AD layout. ``categories_csv`` defaults to ``<root>/categories.csv``.

    ``check_masks`` verifies every mask now (exists, binary, same size as its image) so a bad
    file is reported before any long work starts. ``size`` is accepted for symmetry and unused.
    ``train_only``: read and check only ``train/good`` (what fitting needs: a plant's first
    folder of defect-free images has no test/ and no ground_truth/ yet).
    """
    root = Path(root)
    pdir = _product_dir(root, product)
    csv_path = Path(categories_csv) if categories_csv else (root / CATEGORIES_CSV if (root / CATEGORIES_CSV).is_file() else None)
    labels = read_categories_csv(csv_path) if csv_path else {}
    train = [ImageItem(p, GOOD, None, _bg(labels, root, p), product, GOOD)
             for p in list_images(pdir / "train" / "good", "normal training images")]
    if train_only:
        return Dataset(root, product, "mvtec", train, [], _product_background(train), csv_path)
    test_dir = pdir / "test"
    if not test_dir.is_dir():
        raise UserError(f"{test_dir}: test folder does not exist")
    defects = sorted(d.name for d in test_dir.iterdir() if d.is_dir())
    if not defects:
        raise UserError(f"{test_dir}: test folder is empty (expected good/ and defect sub-folders)")
    test: list[ImageItem] = []
    for d in defects:
        for p in list_images(test_dir / d, f"test/{d}"):
            lab = _label_for(labels, root, p)
            if lab is not None:
                cat = lab.category
            else:
                cat = GOOD if d == GOOD else (d if d in CATEGORIES else UNKNOWN)
            if (d == GOOD) != (cat == GOOD):
                raise UserError(f"{csv_path}: {p.relative_to(root).as_posix()} is in folder {d!r} but labelled {cat!r}")
            gt = pdir / "ground_truth" / d
            mask = None if d == GOOD or not gt.is_dir() else gt / f"{p.stem}_mask.png"
            test.append(ImageItem(p, cat, mask, lab.background if lab else None, product, d))
    ds = Dataset(root, product, "mvtec", train, test, _product_background(train + test), csv_path)
    check_has_normal(ds, test_dir)
    if check_masks:
        check_dataset_masks(ds)
    return ds


def _bg(labels: dict[str, CategoryLabel], root: Path, p: Path) -> bool | None:
    lab = _label_for(labels, root, p)
    return lab.background if lab else None


def _btad_mask(gt: Path, img: Path) -> Path:
    for name in (f"{img.stem}.png", f"{img.stem}.bmp", f"{img.stem}_mask.png", img.name):
        if (gt / name).is_file():
            return gt / name
    return gt / f"{img.stem}.png"


def load_btad(root: str | Path, product: str, categories_csv: str | Path | None = None,
              check_masks: bool = True, train_only: bool = False) -> Dataset:
    """A product in the BTAD layout (train/ok, test/ok, test/ko, ground_truth/ko); ``train_only``:
    only train/ok is read and checked."""
    root = Path(root)
    pdir = _product_dir(root, product)
    csv_path = Path(categories_csv) if categories_csv else (root / CATEGORIES_CSV if (root / CATEGORIES_CSV).is_file() else None)
    labels = read_categories_csv(csv_path) if csv_path else {}
    train = [ImageItem(p, GOOD, None, _bg(labels, root, p), product, "ok")
             for p in list_images(pdir / "train" / "ok", "normal training images")]
    if train_only:
        return Dataset(root, product, "btad", train, [], _product_background(train), csv_path)
    test = [ImageItem(p, GOOD, None, _bg(labels, root, p), product, "ok")
            for p in list_images(pdir / "test" / "ok", "normal test images")]
    gt = pdir / "ground_truth" / "ko"
    for p in list_images(pdir / "test" / "ko", "anomalous test images"):
        lab = _label_for(labels, root, p)
        cat = lab.category if lab else UNKNOWN
        if cat == GOOD:
            raise UserError(f"{csv_path}: {p.relative_to(root).as_posix()} is in folder 'ko' but labelled 'good'")
        test.append(ImageItem(p, cat, _btad_mask(gt, p) if gt.is_dir() else None, lab.background if lab else None,
                              product, "ko"))
    ds = Dataset(root, product, "btad", train, test, _product_background(train + test), csv_path)
    if check_masks:
        check_dataset_masks(ds)
    return ds


def load_folder_csv(csv_path: str | Path, product: str | None = None, check_masks: bool = True) -> Dataset:
    """A plain folder described by a CSV: ``path, category [, mask, background, split, product]``.

    Paths are relative to the CSV's folder. ``split`` is train/test (``val`` counts as test);
    without it, normal images train the model and anomalous ones are the test set. A defective
    row with an empty mask (or no mask column) is an image-level label; a mask that names a
    missing file is an error naming the row.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: dataset CSV does not exist")
    base = csv_path.parent
    train: list[ImageItem] = []
    test: list[ImageItem] = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if not {"path", "category"} <= set(cols):
            raise UserError(f"{csv_path}: dataset CSV needs columns path, category (got {reader.fieldnames})")
        reader.fieldnames = cols
        for line, row in enumerate(reader, start=2):
            where = f"{csv_path}:{line}"
            prod = (row.get("product") or "").strip()
            if product and prod and prod != product:
                continue
            rel = (row.get("path") or "").strip()
            if not rel:
                raise UserError(f"{where}: empty path")
            p = base / rel
            if p.suffix.lower() not in IMAGE_EXTS:
                raise UserError(f"{p}: not an image file (expected {', '.join(IMAGE_EXTS)})")
            if not p.is_file():
                raise UserError(f"{p}: image file does not exist ({where})")
            cat = check_category(row.get("category") or "", where)
            bg = parse_background(row.get("background"), where)
            mrel = (row.get("mask") or "").strip() if cat != GOOD else ""
            mask = base / mrel if mrel else None
            if mask is not None and not mask.is_file():
                raise UserError(f"{mask}: ground-truth mask does not exist ({where})")
            split = (row.get("split") or "").strip().lower() or ("train" if cat == GOOD else "test")
            if split not in ("train", "test", "val", "validation"):
                raise UserError(f"{where}: split {split!r} is not train/test/val")
            item = ImageItem(p, cat, mask, bg, prod or product or base.name, "csv")
            if split == "train":
                if cat != GOOD:
                    raise UserError(f"{where}: training images must be normal (category good), got {cat!r}")
                train.append(item)
            else:
                test.append(item)
    if not train and not test:
        raise UserError(f"{csv_path}: no images listed" + (f" for product {product!r}" if product else ""))
    if not train:
        raise UserError(f"{csv_path}: no normal training images (category good, split train)")
    ds = Dataset(base, product or (train[0].product), "folder", train, test, _product_background(train + test),
                 csv_path)
    check_has_normal(ds, csv_path)
    if check_masks:
        check_dataset_masks(ds)
    return ds


def detect_layout(root: str | Path, product: str | None = None) -> str:
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return "folder"
    pdir = root / product if product else root
    if (pdir / "train" / "good").is_dir():
        return "mvtec"
    if (pdir / "train" / "ok").is_dir():
        return "btad"
    if not root.exists():
        raise UserError(f"{root}: dataset folder does not exist")
    raise UserError(f"{pdir}: not an MVTec (train/good) or BTAD (train/ok) product folder, nor a CSV")


def load_normal_folder(folder: str | Path, product: str) -> Dataset:
    """A plain folder of defect-free images (every format OpenCV reads, any mix of sizes: each is
    resized to the model input exactly as the worker resizes a frame), for fitting only."""
    folder = Path(folder)
    train = [ImageItem(p, GOOD, None, None, product, GOOD) for p in list_images(folder, "normal images")]
    return Dataset(folder, product, "normal-folder", train, [])


def load_plain_folders(product: str, normal_dir: str | Path | None = None, defect_dir: str | Path | None = None,
                       normal_test_dir: str | Path | None = None) -> Dataset:
    """Plain folders as a dataset with image-level labels only: ``normal_dir`` (defect-free, to
    fit), ``defect_dir`` (defective: its images, and the images of sub-folders named for one of
    the four categories, which label them), ``normal_test_dir`` (defect-free, not fitted on:
    what the image threshold and the false-reject rate are measured against). Why a separate
    normal test folder: a threshold set on the images the model was fitted on would read them
    as more normal than the line's next frame. Any format OpenCV reads, any mix of sizes."""
    train = ([ImageItem(p, GOOD, None, None, product, GOOD) for p in list_images(normal_dir, "normal images")]
             if normal_dir is not None else [])
    test: list[ImageItem] = []
    if normal_test_dir is not None:
        test += [ImageItem(p, GOOD, None, None, product, GOOD)
                 for p in list_images(normal_test_dir, "normal test images")]
    if defect_dir is not None:
        defects = _defect_folder(Path(defect_dir), product)
        if normal_test_dir is None:
            raise UserError(f"{defect_dir}: defect images but no normal test images to set the image threshold "
                            "against; pass --normal-test-dir DIR (defect-free images the model is not fitted on)")
        test += defects
    root = Path(defect_dir or normal_test_dir or normal_dir or ".")
    return Dataset(root, product, "folders", train, test)


def _defect_folder(folder: Path, product: str) -> list[ImageItem]:
    """A folder of defective images; sub-folders must be named for one of the four categories."""
    if not folder.is_dir():
        raise UserError(f"{folder}: defect images folder does not exist")
    items: list[ImageItem] = []
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if files:
        items += [ImageItem(p, UNKNOWN, None, None, product, UNKNOWN) for p in list_images(folder, "defect images")]
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        cat = check_category(sub.name, f"{sub} (sub-folders of a defect folder name the category)", allow_good=False)
        items += [ImageItem(p, cat, None, None, product, cat) for p in list_images(sub, f"defect images ({cat})")]
    if not items:
        raise UserError(f"{folder}: defect images folder is empty")
    return items


def check_has_normal(ds: Dataset, where: str | Path) -> None:
    """Defective images without masks need normal images beside them: the image threshold and the
    pixel threshold (normal statistics) are set against normal images, so a set of defects alone
    can calibrate nothing (UserError naming the folder)."""
    if any(i.anomalous and i.mask_path is None for i in ds.test) and not any(not i.anomalous for i in ds.test):
        raise UserError(f"{where}: defect images but no normal ones (add defect-free test images, e.g. test/good, "
                        "to set the image threshold against)")


def open_dataset(root: str | Path, product: str | None = None, layout: str = "auto",
                 categories_csv: str | Path | None = None, check_masks: bool = True,
                 train_only: bool = False) -> Dataset:
    """Open a product from any supported layout (``auto`` detects it); ``train_only``: only its
    normal training images (what ``calibrate fit`` needs)."""
    layout = detect_layout(root, product) if layout == "auto" else layout
    if layout == "folder":
        return load_folder_csv(root, product, check_masks=check_masks and not train_only)
    if product is None:
        raise UserError(f"{root}: a product name is needed for the {layout} layout")
    if layout == "mvtec":
        return load_mvtec(root, product, categories_csv, check_masks=check_masks, train_only=train_only)
    if layout == "btad":
        return load_btad(root, product, categories_csv, check_masks=check_masks, train_only=train_only)
    raise UserError(f"unknown dataset layout {layout!r} (mvtec, btad, folder, auto)")


def list_products(root: str | Path) -> list[str]:
    """Product folders under a dataset root (MVTec or BTAD)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder does not exist")
    out = sorted(p.name for p in root.iterdir()
                 if p.is_dir() and ((p / "train" / "good").is_dir() or (p / "train" / "ok").is_dir()))
    if not out:
        raise UserError(f"{root}: no product folders (expected <product>/train/good or <product>/train/ok)")
    return out


def check_dataset_masks(ds: Dataset) -> None:
    """Every mask given is binary, non-empty for an anomalous image and of its image's size
    (UserError otherwise); anomalous images without a mask are image-level labels."""
    for it in ds.test:
        if it.mask_path is None:
            continue
        m = read_mask(it.mask_path, image_size(it.path), it.path)
        if it.anomalous and not m.any():
            raise UserError(f"{it.mask_path}: mask of anomalous image {it.path.name} is empty")


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------
def split_validation_test(items: Sequence[ImageItem], val_fraction: float = 1 / 3,
                          seed: int = 0) -> tuple[list[ImageItem], list[ImageItem]]:
    """Reproducible split stratified by category: ``val_fraction`` of each category (normal
    included) to validation, at least one per anomalous category that has more than
    MIN_VAL_ANOMALOUS images, and at least MIN_VAL_ANOMALOUS anomalous in total when there are
    twice that many. The order within a category is a seeded permutation of the sorted file
    names, so adding images of another category does not move these. Defects with a mask and
    defects with an image-level label only are stratified apart (a partially masked product
    gets masks into validation for the pixel methods and image labels for the image threshold).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction} must be within (0, 1)")
    items = list(items)
    val = np.zeros(len(items), bool)
    # defects labelled by image only are their own stratum, so both kinds reach validation
    cats = np.array([i.category + ("" if i.mask_path is not None or not i.anomalous else "/image-label")
                     for i in items])
    names = np.array([i.path.name for i in items])
    for c in sorted(set(cats.tolist())):
        rows = np.flatnonzero(cats == c)
        rows = rows[np.argsort(names[rows], kind="stable")]
        rng = np.random.default_rng([seed, zlib.crc32(c.encode())])
        rows = rows[rng.permutation(len(rows))]
        k = int(round(len(rows) * val_fraction))
        if c != GOOD and len(rows) > MIN_VAL_ANOMALOUS:
            k = max(k, 1)
        val[rows[:k]] = True
    anom = np.array([i.anomalous for i in items], bool)
    if (val & anom).sum() < MIN_VAL_ANOMALOUS and anom.sum() >= 2 * MIN_VAL_ANOMALOUS:
        extra = np.flatnonzero(anom & ~val)[: MIN_VAL_ANOMALOUS - int((val & anom).sum())]
        val[extra] = True
    return [it for it, v in zip(items, val) if v], [it for it, v in zip(items, val) if not v]


def with_background(items: Sequence[ImageItem], background: bool | None) -> list[ImageItem]:
    """The items with their background flag set (e.g. from detection or an override)."""
    return [replace(i, background=background) for i in items]
