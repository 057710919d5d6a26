"""Frames as line cameras make them: the product in part of a larger frame, on a dark backdrop.

Why it exists: a line camera gives 1024x768 .. 2448x2048 frames in which the product fills only
part of the picture and a defect is a few pixels wide, while the square close-ups of the
synthetic line grow their defects with the image. A ``FrameLayout`` says where the product's
square (rendered as in the square mode, at ``product_size``) lies in the frame; the backdrop
around it is dark with a faint vignette, a static low-frequency pattern (by seed) and sensor
noise (by frame index), so a tool cannot find the product box by a flat constant.

Defect scale: ``"model"`` keeps the square mode's sizes (they grow with ``product_size``);
``"small"`` fixes them in frame pixels (``SMALL_DEFECT_UNIT`` pixels per size unit of the
defect painters, whose sizes are written for 256 px), whatever the product size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

DEFECT_SCALES = ("model", "small")
# frame pixels per defect-size unit in the "small" scale: holes/chips of radius ~4..10 px,
# scratches ~1..2 px wide, blobs/stains of radius ~4..10 px, thin dust and fibres
SMALL_DEFECT_UNIT = 0.35
_BACKDROP_CODE = 77  # the backdrop's own random stream: the same for every category of an index


def _user_error(msg: str) -> Exception:
    from linewatch.errors import UserError

    return UserError(msg)


def parse_frame_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768); a malformed or out-of-range value is a one-line UserError."""
    parts = str(text).lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise _user_error(f"frame size {text!r}: expected WxH in pixels, e.g. 1024x768")
    w, h = (int(p) for p in parts)
    if not (64 <= w <= 8192 and 64 <= h <= 8192):
        raise _user_error(f"frame size {text!r}: width and height must be within 64..8192")
    return w, h


def default_product_size(frame_size: tuple[int, int]) -> int:
    """The smaller frame side * 5/6, rounded down to a multiple of 8 (640 for 1024x768)."""
    return max(64, min(frame_size) * 5 // 6 // 8 * 8)


def check_defect_scale(defect_scale: str) -> str:
    if defect_scale not in DEFECT_SCALES:
        raise _user_error(f"defect scale {defect_scale!r}: choose from {', '.join(DEFECT_SCALES)}")
    return defect_scale


@dataclass(frozen=True)
class FrameLayout:
    """Where the product's square lies in the frame; ``box`` = (x, y, w, h) in frame pixels."""

    width: int
    height: int
    product_size: int
    x: int
    y: int

    @classmethod
    def make(cls, frame_size: tuple[int, int], product_size: int | None = None,
             offset: tuple[int, int] | None = None) -> FrameLayout:
        """Centred by default; ``offset`` = the box's top-left corner (a camera's own placement)."""
        w, h = (int(v) for v in frame_size)
        p = default_product_size((w, h)) if product_size is None else int(product_size)
        if not 64 <= p <= 2048:
            raise _user_error(f"product size {p}: must be within 64..2048")
        if p > min(w, h):
            raise _user_error(f"product size {p} does not fit in a {w}x{h} frame")
        x, y = ((w - p) // 2, (h - p) // 2) if offset is None else (int(offset[0]), int(offset[1]))
        if not (0 <= x <= w - p and 0 <= y <= h - p):
            raise _user_error(f"product box at ({x}, {y}) size {p} leaves the {w}x{h} frame")
        return cls(w, h, p, x, y)

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.product_size, self.product_size

    def paste(self, canvas: np.ndarray, patch: np.ndarray) -> np.ndarray:
        """``canvas`` with ``patch`` (the product square) at the box; the canvas is changed in place."""
        canvas[self.y:self.y + self.product_size, self.x:self.x + self.product_size] = patch
        return canvas

    def full_mask(self, mask: np.ndarray) -> np.ndarray:
        """A product-square mask as a frame mask (zero outside the box), same dtype."""
        return self.paste(np.zeros((self.height, self.width), mask.dtype), mask)


@lru_cache(maxsize=16)
def _static_backdrop(seed: int, code: int, width: int, height: int) -> np.ndarray:
    """The camera's fixed backdrop (float32 HxWx3, 0..255): a dark, slightly tinted surface, a
    vignette and a faint low-frequency pattern; fixed for a camera, so cached by (seed, product)."""
    rng = np.random.default_rng([seed, code, _BACKDROP_CODE])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width * rng.uniform(0.45, 0.55), height * rng.uniform(0.45, 0.55)
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (0.25 * (width * width + height * height))
    vignette = 1.0 - rng.uniform(0.30, 0.45) * r2
    cells = rng.standard_normal((9, 12)).astype(np.float32)
    low = cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC)
    level = rng.uniform(20.0, 30.0) * vignette * (1.0 + 0.08 * low)
    tint = np.float32([0.95, 1.0, 1.08]) * (1 + rng.uniform(-0.03, 0.03, 3).astype(np.float32))
    return (level[..., None] * tint[None, None, :]).astype(np.float32)


def backdrop(seed: int, code: int, index: int, width: int, height: int) -> np.ndarray:
    """The frame around the product (uint8 HxWx3 RGB): the static backdrop plus this frame's
    sensor noise; pure in (seed, product code, index), the same for every category of an index."""
    rng = np.random.default_rng([seed, code, _BACKDROP_CODE, int(index)])
    img = _static_backdrop(seed, code, width, height) * np.float32(rng.uniform(0.97, 1.03))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(1.8)
    img += np.float32(0.5)
    return np.clip(img, 0, 255, out=img).astype(np.uint8)
