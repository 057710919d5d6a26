"""The synthetic line itself: one product's frames, the endless camera and the dataset writer."""

from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from linewatch.messages import CATEGORIES
from linewatch.synth.defects import CONTAMINATION, STRUCTURAL, SURFACE, _composite, _warp_field
from linewatch.synth.frame import SMALL_DEFECT_UNIT, FrameLayout, backdrop, check_defect_scale
from linewatch.synth.scenes import (BASE_CATEGORIES, DEFAULT_PRODUCTS, PRODUCTS, _grid, _KIND_CODE,
                                    _light_and_noise, _RENDER, _Scene)


@dataclass
class SynthSample:
    """One frame of the synthetic line.

    ``image`` HxWx3 uint8 RGB; ``mask`` HxW uint8 {0,255} (None for good frames);
    ``parts`` the per-component ground truth ``(base category, bool mask)`` -- for a
    ``combined`` frame it says which component is which kind. ``product_box`` is the
    product's square in image pixels (x, y, w, h): the whole image in the square mode.
    """

    image: np.ndarray
    mask: np.ndarray | None
    category: str
    background: bool
    product: str = ""
    index: int = 0
    parts: list[tuple[str, np.ndarray]] = field(default_factory=list)
    product_box: tuple[int, int, int, int] | None = None


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
class SyntheticProduct:
    """One product of the synthetic line; ``normal(i)`` / ``defective(i, category)`` are pure in i.

    Square mode (``frame_size`` None, the default): ``size`` x ``size`` close-ups. Frame mode
    (``frame_size=(W, H)``): the product's square, rendered as in the square mode at
    ``product_size`` (default: the smaller side * 5/6 rounded down to a multiple of 8), lies at
    ``offset`` (its top-left corner; default centred) in a W x H frame on a dark, noisy backdrop;
    ``size`` is then unused. ``defect_scale``: ``"model"`` (defects grow with the rendered
    square, as today) or ``"small"`` (fixed sizes in frame pixels, as a line camera sees them).
    """

    def __init__(self, name: str, size: int = 256, seed: int = 0, *, frame_size: tuple[int, int] | None = None,
                 product_size: int | None = None, defect_scale: str = "model",
                 offset: tuple[int, int] | None = None):
        if name not in PRODUCTS:
            from linewatch.errors import UserError

            raise UserError(f"unknown synthetic product {name!r}; choose from {', '.join(PRODUCTS)}")
        if not 64 <= int(size) <= 2048:
            from linewatch.errors import UserError

            raise UserError(f"synthetic image size {size} out of range 64..2048")
        self.name = name
        self.spec = PRODUCTS[name]
        self.defect_scale = check_defect_scale(defect_scale)
        self.layout = None if frame_size is None else FrameLayout.make(frame_size, product_size, offset)
        self.size = int(size) if self.layout is None else self.layout.product_size  # the rendered square
        self.seed = int(seed)
        self._code = zlib.crc32(name.encode())

    @property
    def frame_size(self) -> tuple[int, int]:
        """(W, H) of the images this product gives."""
        return (self.size, self.size) if self.layout is None else (self.layout.width, self.layout.height)

    @property
    def product_box(self) -> tuple[int, int, int, int]:
        """The product's square in frame pixels (x, y, w, h): the true ROI of a frame."""
        return (0, 0, self.size, self.size) if self.layout is None else self.layout.box

    def _unit(self) -> float:
        """Pixels per defect-size unit (sizes in the painters are pixels at 256)."""
        return self.size / 256 if self.defect_scale == "model" else SMALL_DEFECT_UNIT

    def _framed(self, smp: SynthSample) -> SynthSample:
        """The square sample as a frame of the layout (unchanged in the square mode)."""
        smp.product_box = self.product_box
        if self.layout is None:
            return smp
        lay = self.layout
        smp.image = lay.paste(backdrop(self.seed, self._code, smp.index, lay.width, lay.height), smp.image)
        smp.mask = None if smp.mask is None else lay.full_mask(smp.mask)
        smp.parts = [(k, lay.full_mask(m)) for k, m in smp.parts]
        return smp

    @property
    def background(self) -> bool:
        return self.spec.background

    def _rng(self, kind: str, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._code, _KIND_CODE[kind], int(i)])

    def _scene(self, rng: np.random.Generator) -> _Scene:
        sc = _RENDER[self.spec.kind](self.spec, rng, self.size)
        if self.defect_scale != "model":
            sc.defect_unit = self._unit()
        return sc

    def normal(self, i: int) -> SynthSample:
        rng = self._rng("good", i)
        sc = self._scene(rng)
        img = _light_and_noise(rng, _composite(sc), self.size)
        return self._framed(SynthSample(img, None, "good", self.background, self.name, int(i)))

    def defective(self, i: int, category: str) -> SynthSample:
        if category not in CATEGORIES:
            from linewatch.errors import UserError

            raise UserError(f"unknown defect category {category!r}; choose from {', '.join(CATEGORIES)}")
        rng = self._rng(category, i)
        sc = self._scene(rng)
        if category == "combined":
            n = 3 if rng.random() < 0.3 else 2
            kinds = [str(k) for k in rng.choice(BASE_CATEGORIES, size=n, replace=False)]
        else:
            kinds = [category]
        for _attempt in range(6):
            parts = self._apply(rng, sc, kinds)
            if parts is not None:
                break
            rng = self._rng(category, i + 100_000 * (_attempt + 1))
            sc = self._scene(rng)
        else:  # pragma: no cover - defensive
            raise RuntimeError(f"could not place defects for {self.name} {category} {i}")
        img, parts = parts
        img = _light_and_noise(rng, img, self.size)
        mask = np.zeros((self.size, self.size), bool)
        for _, m in parts:
            mask |= m
        return self._framed(SynthSample(img, mask.astype(np.uint8) * 255, category, self.background, self.name, int(i),
                                        parts))

    def _apply(self, rng: np.random.Generator, sc: _Scene, kinds: list[str]):
        """Render the defects of ``kinds`` (one variant each); None if the result is unusable."""
        u = self._unit()
        taken = np.zeros((self.size, self.size), bool)
        parts: list[tuple[str, np.ndarray]] = []
        overlays = []
        overlay_idx: set[int] = set()
        warp = None
        sevs = rng.uniform(0.0, 1.0, len(kinds)) ** 0.7
        for kind, sev in zip(kinds, sevs):
            if kind == "structural":
                options = STRUCTURAL if self.spec.warpable else STRUCTURAL[:2]
                fn = options[rng.integers(len(options))]
                if fn == "warp":
                    warp = (*_warp_field(rng, sc, taken, sev), len(parts))
                    parts.append(("structural", np.zeros_like(taken)))  # filled after the warp
                    taken |= warp[2] > 0.2
                    continue
                m = fn(rng, sc, taken, sev)
            elif kind == "surface":
                m = SURFACE[rng.integers(len(SURFACE))](rng, sc, taken, sev)
            else:
                a, mat, opacity = CONTAMINATION[rng.integers(len(CONTAMINATION))](rng, sc, taken, sev)
                a = a * opacity
                overlays.append((a, mat))
                overlay_idx.add(len(parts))
                m = a > 0.35 * opacity
                if m.sum() > 0 and (cv2.connectedComponents(m.astype(np.uint8))[0] > 2):
                    k = max(3 if self.defect_scale == "model" else 5, int(5 * u)) | 1  # a cluster is one spot
                    m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((k, k), np.uint8)) > 0
            parts.append((kind, m))
            taken |= m
        wm = None
        if warp is not None:  # bend the product (not the belt under it), then compose
            mx, my, g, idx = warp
            before = _composite(sc)
            obj = sc.fg * sc.shade[..., None]
            sc.fg = cv2.remap(obj, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            sc.shade = np.ones_like(sc.shade)
            sc.alpha = cv2.remap(sc.alpha, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            after = _composite(sc)
            xx, yy = _grid(self.size)
            disp = np.sqrt((mx - xx) ** 2 + (my - yy) ** 2)
            changed = np.abs(after - before).max(axis=2) > 0.04
            k = max(3, int(7 * u)) | 1
            changed = cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((k, k), np.uint8)) > 0
            k2 = max(5, int(11 * u)) | 1
            near = cv2.dilate(changed.astype(np.uint8), np.ones((k2, k2), np.uint8)) > 0
            wm = (disp > max(1.5, 0.3 * float(disp.max()))) & near
            wm = cv2.morphologyEx(wm.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((k2, k2), np.uint8)) > 0
            new_parts = []
            for j, (kind, m) in enumerate(parts):
                if j == idx:
                    new_parts.append((kind, wm))
                elif j in overlay_idx:
                    new_parts.append((kind, m & ~wm))
                else:
                    mm = cv2.remap(m.astype(np.float32), mx, my, cv2.INTER_LINEAR) > 0.5
                    new_parts.append((kind, mm & ~wm))
            parts = new_parts
        img = _composite(sc)
        for a, mat in overlays:
            shadow = cv2.GaussianBlur(a, (0, 0), 1.5 * u) * 0.25
            img = img * (1 - shadow[..., None])
            img = img * (1 - a[..., None]) + mat * a[..., None]
        min_px = max(12 if self.defect_scale == "model" else 6, int(20 * u ** 2))
        if any(int(m.sum()) < min_px for _, m in parts):
            return None
        if len(parts) > 1:
            union = np.zeros_like(taken)
            for _, m in parts:
                union |= m
            if cv2.connectedComponents(union.astype(np.uint8))[0] - 1 < 2:
                return None
        return img.astype(np.float32), parts

    def sample(self, i: int, category: str = "good") -> SynthSample:
        return self.normal(i) if category == "good" else self.defective(i, category)


class SyntheticCamera:
    """An endless camera on the synthetic line: normal frames, and a defect with ``defect_rate``.

    Deterministic by seed; frames never repeat the dataset's indices (they start at 10**6).
    """

    def __init__(self, product: str, seed: int = 0, size: int = 256, defect_rate: float = 0.2,
                 categories: Sequence[str] = CATEGORIES, *, frame_size: tuple[int, int] | None = None,
                 product_size: int | None = None, defect_scale: str = "model",
                 offset: tuple[int, int] | None = None):
        if not 0.0 <= defect_rate <= 1.0:
            from linewatch.errors import UserError

            raise UserError(f"defect_rate {defect_rate} must be within 0..1")
        self.product = SyntheticProduct(product, size=size, seed=seed, frame_size=frame_size,
                                        product_size=product_size, defect_scale=defect_scale, offset=offset)
        self.defect_rate = float(defect_rate)
        self.categories = tuple(categories)
        self.seed = int(seed)
        self.count = 0

    def __iter__(self) -> Iterator[SynthSample]:
        return self

    def __next__(self) -> SynthSample:
        i = 1_000_000 + self.count
        self.count += 1
        rng = np.random.default_rng([self.seed, self.product._code, 99, i])
        if rng.random() < self.defect_rate:
            return self.product.defective(i, self.categories[rng.integers(len(self.categories))])
        return self.product.normal(i)


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"{path}: could not write PNG")


def _write_frame_json(folder: Path, prod: SyntheticProduct) -> None:
    """``frame.json``: where the product lies in the frames of this product folder."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {"frame_size": list(prod.frame_size), "product_box": list(prod.product_box),
            "defect_scale": prod.defect_scale, "seed": prod.seed}
    (folder / "frame.json").write_text(json.dumps(info, indent=1) + "\n")


def generate_dataset(root: str | Path, products: Sequence[str] | None = None, size: int = 256, seed: int = 0,
                     n_train: int = 120, n_test_good: int = 20, n_test_per_category: int = 12,
                     categories: Sequence[str] = CATEGORIES, progress: bool = True, *,
                     frame_size: tuple[int, int] | None = None, product_size: int | None = None,
                     defect_scale: str = "model") -> Path:
    """Write the MVTec AD layout for each product plus ``<root>/categories.csv``; returns root.

    ``frame_size``/``product_size``/``defect_scale``: the frame mode of ``SyntheticProduct``
    (default: square ``size`` images as always). Outside the default, each product folder also
    gets ``frame.json`` -- ``frame_size`` [W, H], ``product_box`` [x, y, w, h] in frame pixels and
    ``defect_scale`` -- so a tool knows the true ROI without guessing it from the pixels.
    """
    from tqdm import tqdm

    from linewatch.errors import UserError

    root = Path(root)
    products = list(products or DEFAULT_PRODUCTS)
    for p in products:
        if p not in PRODUCTS:
            raise UserError(f"unknown synthetic product {p!r}; choose from {', '.join(PRODUCTS)}")
    for c in categories:
        if c not in CATEGORIES:
            raise UserError(f"unknown defect category {c!r}; choose from {', '.join(CATEGORIES)}")
    if min(n_train, n_test_good, n_test_per_category) < 0:
        raise UserError("image counts must not be negative")
    jobs: list[tuple[str, str, str, int, int]] = []  # product, split, category, index, file number
    for p in products:
        jobs += [(p, "train", "good", i, i) for i in range(n_train)]
        jobs += [(p, "test", "good", n_train + i, i) for i in range(n_test_good)]
        for c in categories:
            jobs += [(p, "test", c, i, i) for i in range(n_test_per_category)]
    rows: list[tuple[str, str, str, int]] = []
    makers = {p: SyntheticProduct(p, size=size, seed=seed, frame_size=frame_size, product_size=product_size,
                                  defect_scale=defect_scale) for p in products}
    root.mkdir(parents=True, exist_ok=True)
    if frame_size is not None or defect_scale != "model":
        for p, prod in makers.items():
            _write_frame_json(root / p, prod)
    for p, split, cat, i, num in tqdm(jobs, desc="synth", unit="img", disable=not progress):
        prod = makers[p]
        smp = prod.sample(i, cat)
        d = root / p / split / cat
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{num:03d}.png"
        _write_png(path, smp.image)
        if smp.mask is not None:
            g = root / p / "ground_truth" / cat
            g.mkdir(parents=True, exist_ok=True)
            _write_png(g / f"{num:03d}_mask.png", smp.mask)
        rows.append((path.relative_to(root).as_posix(), p, cat, int(prod.background)))
    with open(root / "categories.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "product", "category", "background"])
        w.writerows(rows)
    return root
