"""The synthetic production line: products, normal variation and defects with exact masks.

Why it exists: the demo, the tests and the calibration study need a line whose defects are
known to the pixel, in every product-agnostic category, with and without background, and
whose normal variation (position, rotation, lighting, texture) is large enough that a trivial
detector (|image - mean normal image|, blurred) does not win, while the defects stay visible
to a pretrained-CNN patch model at 256 x 256.

Everything is deterministic by ``(seed, product, kind, index)``: each sample draws from its own
``numpy.random.Generator``, so sample 17 is the same whether or not samples 0..16 were made.
Rendering is vectorised numpy/OpenCV on float32 planes (a few ms per 256 x 256 image).

A scene is three layers -- ``fg`` (the product's albedo), ``bg`` (what shows through a hole:
the conveyor for objects, the dark backing for textures) and ``alpha`` (where the product is)
-- plus a multiplicative ``shade`` plane. Structural defects cut ``alpha`` or warp geometry,
surface defects change ``fg``/``shade`` but keep the material, contamination lays foreign
material on top. Lighting and sensor noise come last, so every defect is lit like the part.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from linewatch.messages import CATEGORIES

BASE_CATEGORIES = ("structural", "surface", "contamination")
DEFECT_SCALE = 1.3  # defect sizes relative to a 256 px frame (1.0: sizes in the code are pixels at 256)
_KIND_CODE = {"good": 0, "structural": 1, "surface": 2, "contamination": 3, "combined": 4}


@dataclass(frozen=True)
class ProductSpec:
    """What a product looks like; ``background`` = an object on a backdrop (vs close-up texture)."""

    name: str
    background: bool
    kind: str  # "cap" | "pcb" | "texture"
    texture: str  # skimage.data texture used for the material (or the backdrop for objects)
    tint: tuple[float, float, float]
    contrast: float = 1.0
    rot_jitter_deg: float = 180.0
    scale: float = 1.0  # source texture pixels per output pixel at size 256
    warpable: bool = True  # bends are visible only on regular structure (not on random textures)
    description: str = ""


PRODUCTS: dict[str, ProductSpec] = {
    "cap": ProductSpec("cap", True, "cap", "gravel", (0.80, 0.74, 0.60),
                       description="round knurled metal bottle cap on a conveyor belt, any rotation"),
    "pcb": ProductSpec("pcb", True, "pcb", "gravel", (0.20, 0.48, 0.26), rot_jitter_deg=4.0,
                       description="small green circuit board with pads and chips on a grey tray"),
    "brick": ProductSpec("brick", False, "texture", "brick", (0.86, 0.50, 0.38), contrast=1.1,
                         rot_jitter_deg=4.0, scale=0.9, description="close-up of a brick wall panel"),
    "turf": ProductSpec("turf", False, "texture", "grass", (0.50, 0.72, 0.42), contrast=1.35,
                        rot_jitter_deg=180.0, scale=0.8, warpable=False,
                        description="close-up of an artificial-turf mat"),
    "gravel": ProductSpec("gravel", False, "texture", "gravel", (0.78, 0.74, 0.66), contrast=1.0,
                          rot_jitter_deg=180.0, scale=1.0, warpable=False,
                          description="close-up of a terrazzo/gravel tile"),
}
DEFAULT_PRODUCTS = ("cap", "pcb", "brick", "turf")


@dataclass
class SynthSample:
    """One frame of the synthetic line.

    ``image`` HxWx3 uint8 RGB; ``mask`` HxW uint8 {0,255} (None for good frames);
    ``parts`` the per-component ground truth ``(base category, bool mask)`` -- for a
    ``combined`` frame it says which component is which kind.
    """

    image: np.ndarray
    mask: np.ndarray | None
    category: str
    background: bool
    product: str = ""
    index: int = 0
    parts: list[tuple[str, np.ndarray]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# material helpers
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _texture_source(name: str) -> np.ndarray:
    """A skimage.data texture as float32 in [0, 1], contrast-normalised (shipped with skimage)."""
    import skimage.data

    img = getattr(skimage.data, name)().astype(np.float32)
    if img.ndim == 3:
        img = img.mean(axis=2)
    # flatten the photo's own illumination gradient so crops differ by texture, not by exposure
    low = cv2.GaussianBlur(img, (0, 0), 40)
    img = img - low + low.mean()
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)


def _texture_patch(rng: np.random.Generator, name: str, size: int, scale: float, rot_deg: float) -> np.ndarray:
    """A random rotated/scaled crop of a texture, size x size float32 (reflect-padded)."""
    src = _texture_source(name)
    h, w = src.shape
    s = scale * (256.0 / size) * rng.uniform(0.92, 1.08)
    ang = rng.uniform(-rot_deg, rot_deg) + (90.0 * rng.integers(4) if rot_deg >= 90 else 0.0)
    cx, cy = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.25 * h, 0.75 * h)
    a = np.deg2rad(ang)
    ca, sa = np.cos(a) * s, np.sin(a) * s
    # output (u, v) -> source (x, y): centre of output maps to (cx, cy)
    m = np.array([[ca, -sa, cx - ca * size / 2 + sa * size / 2],
                  [sa, ca, cy - sa * size / 2 - ca * size / 2]], np.float32)
    return cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise, unit-ish std, size x size float32."""
    n = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(n, (size + size // cells * 3, size + size // cells * 3), interpolation=cv2.INTER_CUBIC)
    o = size // cells
    return big[o:o + size, o:o + size]


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx, yy


def _tint(gray: np.ndarray, tint: Sequence[float], rng: np.random.Generator, jitter: float = 0.03) -> np.ndarray:
    t = np.asarray(tint, np.float32) * (1 + rng.uniform(-jitter, jitter, 3).astype(np.float32))
    return gray[..., None] * t[None, None, :]


# ------------------------------------------------------------------------------------------------
# scenes
# ------------------------------------------------------------------------------------------------
@dataclass
class _Scene:
    size: int
    fg: np.ndarray  # HxWx3 albedo of the product
    bg: np.ndarray  # HxWx3 what shows through a hole
    alpha: np.ndarray  # HxW product coverage
    shade: np.ndarray  # HxW multiplicative shading of fg
    light: np.ndarray  # (2,) unit light direction in image plane
    background: bool
    region: np.ndarray  # HxW bool: where defects may be placed (on the product)
    center: tuple[float, float]
    radius: float  # object radius (objects) or 0
    rim: np.ndarray | None = None  # HxW bool: where chips can be taken (object outline band)


def _backdrop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey conveyor belt / tray: low-contrast gravel texture with a faint weave."""
    t = _texture_patch(rng, "gravel", size, 1.4, 180.0)
    g = 0.30 + 0.10 * (t - 0.5) + 0.02 * _smooth_noise(rng, size, 6)
    return _tint(g, (0.78, 0.84, 0.95), rng, 0.04)


def _light(rng: np.random.Generator) -> np.ndarray:
    a = np.deg2rad(-135 + rng.uniform(-20, 20))  # from the top-left, jittered
    return np.array([np.cos(a), np.sin(a)], np.float32)


def _render_texture(spec: ProductSpec, rng: np.random.Generator, size: int) -> _Scene:
    t = _texture_patch(rng, spec.texture, size, spec.scale, spec.rot_jitter_deg)
    c = spec.contrast * rng.uniform(0.92, 1.08)
    g = np.clip(0.55 + c * 0.45 * (t - 0.5) + 0.03 * _smooth_noise(rng, size, 4), 0, 1)
    fg = _tint(g, spec.tint, rng)
    # what shows through a hole in a close-up: the darker, coarser backing beneath the material
    weave = _texture_patch(rng, "gravel", size, 0.6, 180.0)
    back = 0.22 + 0.16 * (weave - 0.5) + 0.03 * _smooth_noise(rng, size, 10)
    bg = _tint(np.clip(back, 0.02, 0.5), (0.85, 0.78, 0.70), rng)
    ones = np.ones((size, size), np.float32)
    m = max(4, size // 16)
    region = np.zeros((size, size), bool)
    region[m:-m, m:-m] = True
    return _Scene(size, fg, bg, ones, ones.copy(), _light(rng), False, region, (size / 2, size / 2), 0.0)


def _render_cap(spec: ProductSpec, rng: np.random.Generator, size: int) -> _Scene:
    s = size / 256.0
    xx, yy = _grid(size)
    cx = size / 2 + rng.uniform(-0.045, 0.045) * size
    cy = size / 2 + rng.uniform(-0.045, 0.045) * size
    R = 0.33 * size * (1 + rng.uniform(-0.025, 0.025))
    theta = rng.uniform(0, 2 * np.pi)
    light = _light(rng)
    dx, dy = xx - cx, yy - cy
    r = np.sqrt(dx * dx + dy * dy) + 1e-6
    phi = np.arctan2(dy, dx)
    n_knurl = 40
    knurl = 0.5 + 0.5 * np.cos(n_knurl * (phi - theta))
    redge = R * (1 - 0.018 * knurl)
    alpha = np.clip(redge - r + 0.5, 0, 1).astype(np.float32)
    # height profile: raised lip, a groove, a gently domed centre
    rn = r / R
    lip = np.exp(-((rn - 0.92) / 0.06) ** 2)
    groove = -0.6 * np.exp(-((rn - 0.78) / 0.025) ** 2)
    dome = 0.25 * np.clip(1 - rn ** 2, 0, 1)
    h = (lip + groove + dome).astype(np.float32)
    gx = cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=3) / 8 * R / 6
    gy = cv2.Sobel(h, cv2.CV_32F, 0, 1, ksize=3) / 8 * R / 6
    shade = 1.0 - 0.7 * (gx * light[0] + gy * light[1])
    # embossed logo (rotates with the cap): text rendered, rotated, turned into a height map
    logo = np.zeros((size, size), np.uint8)
    fs = 1.1 * s
    (tw, th), _ = cv2.getTextSize("LW", cv2.FONT_HERSHEY_DUPLEX, fs, max(1, int(round(2 * s))))
    cv2.putText(logo, "LW", (int(size / 2 - tw / 2), int(size / 2 + th / 2)), cv2.FONT_HERSHEY_DUPLEX, fs, 255,
                max(1, int(round(3 * s))), cv2.LINE_AA)
    cv2.circle(logo, (size // 2, size // 2), int(0.5 * R), 180, max(1, int(round(2 * s))), cv2.LINE_AA)
    logo = logo.astype(np.float32) / 255.0
    rot = cv2.getRotationMatrix2D((size / 2, size / 2), np.rad2deg(-theta), 1.0)
    rot[0, 2] += cx - size / 2
    rot[1, 2] += cy - size / 2
    logo = cv2.GaussianBlur(cv2.warpAffine(logo, rot, (size, size)), (0, 0), 1.0 * s)
    lgx = cv2.Sobel(logo, cv2.CV_32F, 1, 0, ksize=3) / 8
    lgy = cv2.Sobel(logo, cv2.CV_32F, 0, 1, ksize=3) / 8
    shade = shade - 1.4 * (lgx * light[0] + lgy * light[1])
    shade = shade * (1 + 0.07 * knurl * (rn > 0.86))
    # brushed metal: fine concentric streaks
    n_r = int(2 * size) + 2
    streak = np.interp(np.arange(n_r) / 2.5, np.arange(n_r), rng.standard_normal(n_r)).astype(np.float32)
    ridx = np.clip((r * 2).astype(np.int32), 0, n_r - 1)
    metal = 0.80 + 0.035 * streak[ridx] + 0.015 * rng.standard_normal((size, size)).astype(np.float32)
    fg = _tint(metal, spec.tint, rng)
    bg = _backdrop(rng, size)
    # soft shadow of the cap on the belt, offset away from the light
    sh = np.clip(R * 1.02 - np.sqrt((dx + light[0] * 6 * s) ** 2 + (dy + light[1] * 6 * s) ** 2), 0, 1)
    sh = cv2.GaussianBlur(sh.astype(np.float32), (0, 0), 5 * s)
    bg = bg * (1 - 0.55 * sh)[..., None]
    region = rn < 0.72
    rim = (rn > 0.88) & (rn < 1.02)
    return _Scene(size, fg, bg, alpha, shade.astype(np.float32), light, True, region, (cx, cy), R, rim)


def _render_pcb(spec: ProductSpec, rng: np.random.Generator, size: int) -> _Scene:
    s = size / 256.0
    cx = size / 2 + rng.uniform(-0.04, 0.04) * size
    cy = size / 2 + rng.uniform(-0.04, 0.04) * size
    ang = rng.uniform(-spec.rot_jitter_deg, spec.rot_jitter_deg)
    light = _light(rng)
    # draw the board in its own frame (centred), then rotate/translate into the image
    board = np.zeros((size, size), np.float32)
    w, h = int(0.66 * size), int(0.52 * size)
    x0, y0 = (size - w) // 2, (size - h) // 2
    cv2.rectangle(board, (x0, y0), (x0 + w, y0 + h), 1.0, -1)
    copper = np.zeros((size, size), np.float32)
    chips = np.zeros((size, size), np.float32)
    pads = np.zeros((size, size), np.float32)
    lw = max(1, int(round(2 * s)))
    # traces: a fixed layout (a real board is the same every time)
    lay = np.random.default_rng(1234)
    for _ in range(14):
        px, py = x0 + lay.integers(10, w - 10), y0 + lay.integers(10, h - 10)
        qx, qy = (px, y0 + lay.integers(10, h - 10)) if lay.random() < 0.5 else (x0 + lay.integers(10, w - 10), py)
        cv2.line(copper, (int(px), int(py)), (int(qx), int(qy)), 1.0, lw, cv2.LINE_AA)
        cv2.circle(pads, (int(px), int(py)), int(3 * s) + 1, 1.0, -1, cv2.LINE_AA)
    cv2.rectangle(chips, (x0 + int(0.12 * w), y0 + int(0.18 * h)), (x0 + int(0.40 * w), y0 + int(0.55 * h)), 1.0, -1)
    cv2.rectangle(chips, (x0 + int(0.62 * w), y0 + int(0.60 * h)), (x0 + int(0.82 * w), y0 + int(0.80 * h)), 1.0, -1)
    for k in range(6):  # chip legs
        yk = y0 + int((0.22 + 0.055 * k) * h)
        cv2.rectangle(pads, (x0 + int(0.08 * w), yk), (x0 + int(0.12 * w), yk + int(2 * s)), 1.0, -1)
        cv2.rectangle(pads, (x0 + int(0.40 * w), yk), (x0 + int(0.44 * w), yk + int(2 * s)), 1.0, -1)
    for hx, hy in ((0.06, 0.1), (0.94, 0.1), (0.06, 0.9), (0.94, 0.9)):  # mounting holes
        cv2.circle(board, (x0 + int(hx * w), y0 + int(hy * h)), int(5 * s) + 1, 0.0, -1, cv2.LINE_AA)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), ang, 1.0)
    m[0, 2] += cx - size / 2
    m[1, 2] += cy - size / 2
    layers = cv2.merge([board, copper, chips, pads])
    layers = cv2.warpAffine(layers, m, (size, size), flags=cv2.INTER_LINEAR)
    board, copper, chips, pads = (layers[..., i] for i in range(4))
    noise = 0.02 * _smooth_noise(rng, size, 30)
    solder_mask = _tint(np.full((size, size), 0.85, np.float32) + noise, spec.tint, rng, 0.05)
    traces = _tint(np.full((size, size), 0.9, np.float32) + noise, (0.35, 0.62, 0.30), rng, 0.03)
    gold = _tint(np.full((size, size), 0.95, np.float32), (0.92, 0.80, 0.45), rng, 0.03)
    black = _tint(np.full((size, size), 0.16, np.float32) + 0.6 * noise, (1.0, 1.0, 1.05), rng, 0.03)
    fg = solder_mask
    fg = fg * (1 - copper[..., None]) + traces * copper[..., None]
    fg = fg * (1 - pads[..., None]) + gold * pads[..., None]
    fg = fg * (1 - chips[..., None]) + black * chips[..., None]
    # chips stand up: a lit edge and a shadow edge
    cg = cv2.GaussianBlur(chips, (0, 0), 1.2 * s)
    gx = cv2.Sobel(cg, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(cg, cv2.CV_32F, 0, 1, ksize=3) / 8
    shade = (1.0 - 2.5 * (gx * light[0] + gy * light[1])).astype(np.float32)
    bg = _backdrop(rng, size)
    sh = cv2.GaussianBlur(np.roll(board, (int(5 * s), int(5 * s)), axis=(0, 1)), (0, 0), 4 * s)
    bg = bg * (1 - 0.5 * sh)[..., None]
    er = cv2.erode((board > 0.5).astype(np.uint8), np.ones((int(12 * s) + 1,) * 2, np.uint8)) > 0
    edge = (board > 0.5) & ~cv2.erode((board > 0.5).astype(np.uint8), np.ones((int(6 * s) + 1,) * 2, np.uint8)).astype(bool)
    region = cv2.erode(er.astype(np.uint8), np.ones((int(10 * s) + 1,) * 2, np.uint8)) > 0
    return _Scene(size, fg, bg, board, shade, light, True, region, (cx, cy), 0.3 * size, edge)


_RENDER = {"cap": _render_cap, "pcb": _render_pcb, "texture": _render_texture}


# ------------------------------------------------------------------------------------------------
# defect shapes
# ------------------------------------------------------------------------------------------------
def _blob(rng: np.random.Generator, size: int, c: tuple[float, float], rx: float, ry: float,
          rough: float = 0.25, cells: int = 0) -> np.ndarray:
    """Soft irregular blob alpha (0..1) around ``c`` with radii rx, ry, random orientation."""
    xx, yy = _grid(size)
    a = rng.uniform(0, np.pi)
    dx, dy = xx - c[0], yy - c[1]
    u = (dx * np.cos(a) + dy * np.sin(a)) / rx
    v = (-dx * np.sin(a) + dy * np.cos(a)) / ry
    d = np.sqrt(u * u + v * v)
    n = _smooth_noise(rng, size, cells or max(4, int(size / max(rx, ry) * 1.5)))
    d = d + rough * n
    edge = max(rx, ry)
    return np.clip((1.0 - d) * edge, 0, 1).astype(np.float32)


def _curve(rng: np.random.Generator, c: tuple[float, float], length: float, bend: float = 0.3) -> np.ndarray:
    """Points of a smooth quadratic Bezier through ~c of the given length (N, 2) float."""
    a = rng.uniform(0, np.pi)
    d = np.array([np.cos(a), np.sin(a)]) * length / 2
    nrm = np.array([-d[1], d[0]])
    p0, p2 = np.array(c) - d, np.array(c) + d
    p1 = np.array(c) + nrm * rng.uniform(-bend, bend)
    t = np.linspace(0, 1, max(8, int(length / 2)))[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _stroke(size: int, pts: np.ndarray, width: float, ss: int = 4) -> np.ndarray:
    """Anti-aliased stroke alpha (0..1) of a polyline of the given width (supersampled)."""
    big = np.zeros((size * ss // 2, size * ss // 2), np.uint8)
    k = ss // 2
    cv2.polylines(big, [np.round(pts * k).astype(np.int32)], False, 255, max(1, int(round(width * k))), cv2.LINE_AA)
    return cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _place(rng: np.random.Generator, sc: _Scene, radius: float, taken: np.ndarray, where: str = "region",
           tries: int = 60) -> tuple[float, float]:
    """A centre for a defect of the given radius inside the allowed area, away from ``taken``."""
    allowed = sc.rim if (where == "rim" and sc.rim is not None) else sc.region
    if where == "region":
        k = int(max(1, radius * 0.6)) * 2 + 1
        inner = cv2.erode(allowed.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
        if inner.sum() > 50:
            allowed = inner
    if taken.any():
        k = int(radius * 2 + 12) * 2 + 1
        far = cv2.dilate(taken.astype(np.uint8), np.ones((k, k), np.uint8)) == 0
        if (allowed & far).sum() > 20:
            allowed = allowed & far
    ys, xs = np.nonzero(allowed)
    j = rng.integers(len(xs))
    return float(xs[j]) + rng.uniform(-0.5, 0.5), float(ys[j]) + rng.uniform(-0.5, 0.5)


def _composite(sc: _Scene) -> np.ndarray:
    a = sc.alpha[..., None]
    return sc.fg * sc.shade[..., None] * a + sc.bg * (1 - a)


# each defect: (rng, scene, taken, severity, img or None) -> bool mask; modifies scene (pre-compose)
# or returns an overlay (post-compose). Severity in [0, 1]: 0 = subtle, 1 = obvious.

def _structural_hole(rng, sc: _Scene, taken, sev) -> np.ndarray:
    s = sc.size / 256 * DEFECT_SCALE
    rad = (9 + 11 * sev) * s * rng.uniform(0.9, 1.15)
    c = _place(rng, sc, rad, taken)
    hole = _blob(rng, sc.size, c, rad, rad * rng.uniform(0.55, 1.0), rough=0.3)
    ring = np.clip(cv2.GaussianBlur(hole, (0, 0), 2.0 * s) * 1.6 - hole, 0, 1)  # torn, bent-in rim
    sc.shade *= 1 - 0.5 * ring
    sc.alpha *= 1 - hole
    return (hole > 0.5) | (ring > 0.25)


def _structural_chip(rng, sc: _Scene, taken, sev) -> np.ndarray:
    """A piece missing at the object's outline (objects) / a cut through the material (textures)."""
    s = sc.size / 256 * DEFECT_SCALE
    if sc.rim is None or not sc.background:
        return _structural_cut(rng, sc, taken, sev)
    rad = (10 + 12 * sev) * s
    c = _place(rng, sc, rad, taken, where="rim")
    chip = _blob(rng, sc.size, c, rad, rad * rng.uniform(0.5, 0.9), rough=0.35)
    before = sc.alpha.copy()
    ring = np.clip(cv2.GaussianBlur(chip, (0, 0), 1.5 * s) * 1.5 - chip, 0, 1) * before
    sc.shade *= 1 - 0.35 * ring
    sc.alpha *= 1 - chip
    return ((before - sc.alpha) > 0.5) | ((ring > 0.3) & (before > 0.5))


def _structural_cut(rng, sc: _Scene, taken, sev) -> np.ndarray:
    s = sc.size / 256 * DEFECT_SCALE
    length = (30 + 40 * sev) * s
    c = _place(rng, sc, length / 2, taken)
    pts = _curve(rng, c, length, bend=0.15)
    pts = pts + rng.normal(0, 1.2 * s, pts.shape)  # jagged
    cut = _stroke(sc.size, pts, (4 + 4 * sev) * s)
    cut = np.clip(cut * 1.3, 0, 1)
    ring = np.clip(cv2.GaussianBlur(cut, (0, 0), 2.0 * s) * 1.5 - cut, 0, 1)
    sc.shade *= 1 - 0.45 * ring
    sc.alpha *= 1 - cut
    return (cut > 0.5) | (ring > 0.25)


def _warp_field(rng, sc: _Scene, taken, sev) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A localised bend: displacement field (map_x, map_y) and its support."""
    s = sc.size / 256 * DEFECT_SCALE
    where = "rim" if sc.background and sc.rim is not None else "region"
    rad = (14 + 10 * sev) * s
    c = _place(rng, sc, rad, taken, where=where)
    xx, yy = _grid(sc.size)
    dx, dy = xx - c[0], yy - c[1]
    g = np.exp(-(dx * dx + dy * dy) / (2 * rad * rad)).astype(np.float32)
    amp = (5 + 6 * sev) * s
    if sc.background:  # push the outline inwards, towards the object's centre, with a fold
        v = np.array([sc.center[0] - c[0], sc.center[1] - c[1]], np.float32)
        v /= np.linalg.norm(v) + 1e-6
        mx, my = xx - amp * g * v[0], yy - amp * g * v[1]
        along = dx * v[0] + dy * v[1] - rad * 0.4  # a crease parallel to the outline, inside the part
        fold = np.exp(-(along / (2.5 * s)) ** 2) * g
        side = np.sign(-(v[0] * sc.light[0] + v[1] * sc.light[1]) + 1e-3)
        sc.shade = sc.shade * (1 - (0.35 + 0.25 * sev) * fold * side * np.tanh(along / (1.5 * s) + 0.5))
    else:  # a twist of the material
        ang = amp / rad * 2.2 * g
        ca, sa = np.cos(ang), np.sin(ang)
        mx, my = c[0] + ca * dx - sa * dy, c[1] + sa * dx + ca * dy
    return mx.astype(np.float32), my.astype(np.float32), g


def _surface_scratch(rng, sc: _Scene, taken, sev) -> np.ndarray:
    s = sc.size / 256 * DEFECT_SCALE
    length = (30 + 45 * sev) * s
    c = _place(rng, sc, length / 2, taken)
    pts = _curve(rng, c, length, bend=0.25)
    if rng.random() < 0.35:  # an abrasion band: a wide scuff of parallel fine scratches
        width = (7 + 5 * sev) * s
        a = _stroke(sc.size, pts, width)
        blurred = cv2.GaussianBlur(sc.fg, (0, 0), 1.5 * s)
        fine = 0.5 + 0.5 * np.sin(_rot_coord(sc.size, pts) * 2.2 / s)
        lift = (0.10 + 0.18 * sev) * (0.6 + 0.4 * fine)
        new = blurred * (1 + lift[..., None])
        extent = a
    else:
        width = (2.5 + 2.0 * sev) * s
        a = _stroke(sc.size, pts, width)
        burr = np.clip(_stroke(sc.size, pts, width + 3.0 * s) - a, 0, 1) * (sc.alpha > 0.5)
        sc.shade = sc.shade * (1 - (0.25 + 0.2 * sev) * burr)  # displaced material throws a shadow
        lift = 0.22 + 0.35 * sev
        new = np.clip(sc.fg * (1 + lift) + 0.08, 0, 1.2)
        extent = np.maximum(a, burr)
    a = a * (sc.alpha > 0.5)
    sc.fg = sc.fg * (1 - a[..., None]) + new * a[..., None]
    sc.shade = sc.shade * (1 - a) + np.maximum(sc.shade, 1.0) * a  # a specular groove ignores shading
    return (extent * (sc.alpha > 0.5)) > 0.4


def _rot_coord(size: int, pts: np.ndarray) -> np.ndarray:
    """Signed distance-like coordinate across a stroke's main direction (for fine parallel lines)."""
    xx, yy = _grid(size)
    d = pts[-1] - pts[0]
    d = d / (np.linalg.norm(d) + 1e-6)
    return (xx - pts[0][0]) * -d[1] + (yy - pts[0][1]) * d[0]


def _surface_dent(rng, sc: _Scene, taken, sev) -> np.ndarray:
    s = sc.size / 256 * DEFECT_SCALE
    rad = (10 + 8 * sev) * s
    c = _place(rng, sc, rad, taken)
    xx, yy = _grid(sc.size)
    ar = rng.uniform(0.6, 1.0)
    a = rng.uniform(0, np.pi)
    dx, dy = xx - c[0], yy - c[1]
    u = (dx * np.cos(a) + dy * np.sin(a)) / rad
    v = (-dx * np.sin(a) + dy * np.cos(a)) / (rad * ar)
    h = -np.exp(-(u * u + v * v) * 2.0).astype(np.float32)  # a depression
    gx = cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=3) / 8 * rad
    gy = cv2.Sobel(h, cv2.CV_32F, 0, 1, ksize=3) / 8 * rad
    k = 0.9 + 1.2 * sev
    delta = -k * (gx * sc.light[0] + gy * sc.light[1]) - 0.12 * (1 + sev) * (-h)
    delta = np.clip(delta, -0.65, 0.8) * (sc.alpha > 0.5)
    sc.shade = sc.shade * (1 + delta)
    return (np.abs(delta) > 0.05) | ((-h > 0.35) & (sc.alpha > 0.5))


def _surface_stain(rng, sc: _Scene, taken, sev) -> np.ndarray:
    """A small discoloured patch (rust, oxidation, heat tint): the material stays, its colour changes."""
    s = sc.size / 256 * DEFECT_SCALE
    rad = (9 + 8 * sev) * s
    c = _place(rng, sc, rad, taken)
    a = _blob(rng, sc.size, c, rad, rad * rng.uniform(0.5, 1.0), rough=0.35)
    a = np.clip(cv2.GaussianBlur(a, (0, 0), 1.0 * s) * 1.2, 0, 1) * (sc.alpha > 0.5)
    mottled = 1 + 0.25 * _smooth_noise(rng, sc.size, 40)
    rust = np.array(rng.choice([(0.75, 0.42, 0.20), (0.55, 0.40, 0.50), (0.45, 0.30, 0.18)]), np.float32)
    strength = (0.45 + 0.4 * sev) * a
    tinted = sc.fg.mean(axis=2, keepdims=True) * rust[None, None, :] * 1.4 * mottled[..., None]
    sc.fg = sc.fg * (1 - strength[..., None]) + tinted * strength[..., None]
    return strength > 0.2


_FOREIGN = [  # (rgb, gloss): oil, blue plastic, white paint, green fibre, black rubber
    ((0.06, 0.05, 0.04), 0.9), ((0.15, 0.30, 0.80), 0.5), ((0.93, 0.93, 0.90), 0.2),
    ((0.25, 0.70, 0.20), 0.3), ((0.12, 0.12, 0.14), 0.2), ((0.85, 0.20, 0.60), 0.4),
]


def _foreign_material(rng, sc: _Scene, a: np.ndarray) -> np.ndarray:
    # foreign means visibly foreign: skip colours too close to the product's own
    own = (sc.fg * (sc.alpha > 0.5)[..., None]).reshape(-1, 3).sum(0) / max(1.0, float((sc.alpha > 0.5).sum()))
    options = [f for f in _FOREIGN if np.abs(np.asarray(f[0]) - own).sum() > 0.45] or _FOREIGN
    rgb, gloss = options[rng.integers(len(options))]
    tex = _texture_patch(rng, "grass", sc.size, 0.5, 180.0)
    base = np.asarray(rgb, np.float32)[None, None, :] * (0.85 + 0.3 * (tex[..., None] - 0.5))
    blur = cv2.GaussianBlur(a, (0, 0), 2.5 * sc.size / 256)
    gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3)
    spec = np.clip(-(gx * sc.light[0] + gy * sc.light[1]) * 1.5, 0, 1) * gloss
    return np.clip(base + spec[..., None] * 0.6, 0, 1)


def _contam_blob(rng, sc: _Scene, taken, sev):
    s = sc.size / 256 * DEFECT_SCALE
    rad = (9 + 10 * sev) * s
    c = _place(rng, sc, rad, taken)
    a = _blob(rng, sc.size, c, rad, rad * rng.uniform(0.5, 1.0), rough=0.4)
    return a, _foreign_material(rng, sc, a), 0.5


def _contam_dust(rng, sc: _Scene, taken, sev):
    s = sc.size / 256 * DEFECT_SCALE
    rad = (12 + 8 * sev) * s
    c = _place(rng, sc, rad, taken)
    n = int(18 + 25 * sev)
    a = np.zeros((sc.size, sc.size), np.float32)
    pts = rng.normal(0, rad / 2, (n, 2)) + np.asarray(c)
    dark = rng.random() < 0.5
    for (x, y) in pts:
        cv2.circle(a, (int(x * 4), int(y * 4)), int(rng.uniform(1.2, 2.6) * s * 4), 1.0, -1, cv2.LINE_AA, 2)
    if rng.random() < 0.6:  # a fibre through the cluster
        fib = _curve(rng, c, rad * 2.2, bend=0.6)
        a = np.maximum(a, _stroke(sc.size, fib, 1.6 * s))
    col = np.float32([0.10, 0.09, 0.08]) if dark else np.float32([0.95, 0.94, 0.90])
    mat = np.broadcast_to(col, (sc.size, sc.size, 3)).astype(np.float32)
    # annotators circle a cluster: close small gaps between specks
    return a, mat, 0.5


def _contam_smear(rng, sc: _Scene, taken, sev):
    s = sc.size / 256 * DEFECT_SCALE
    length = (28 + 35 * sev) * s
    c = _place(rng, sc, length / 2, taken)
    pts = _curve(rng, c, length, bend=0.5)
    a = _stroke(sc.size, pts, (8 + 6 * sev) * s)
    n = _smooth_noise(rng, sc.size, int(sc.size / (6 * s)))
    near = cv2.GaussianBlur(a, (0, 0), 2 * s)
    a = np.clip((near - 0.35 + 0.25 * n * (near > 0.05)) * 4, 0, 1)
    glue = np.float32(rng.choice([(0.95, 0.78, 0.35), (0.92, 0.92, 0.85), (0.55, 0.35, 0.15)]))
    mat = np.broadcast_to(glue, (sc.size, sc.size, 3)).astype(np.float32)
    return a, mat, 0.7 + 0.25 * sev  # translucent


STRUCTURAL = (_structural_hole, _structural_chip, "warp")
SURFACE = (_surface_scratch, _surface_dent, _surface_stain)
CONTAMINATION = (_contam_blob, _contam_dust, _contam_smear)


def _light_and_noise(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
    """Per-frame exposure, a lighting gradient, colour temperature and sensor noise."""
    xx, yy = _grid(size)
    a = rng.uniform(0, 2 * np.pi)
    grad = 1 + rng.uniform(0.0, 0.10) * ((xx - size / 2) * np.cos(a) + (yy - size / 2) * np.sin(a)) / (size / 2)
    gain = rng.uniform(0.86, 1.14)
    temp = 1 + rng.uniform(-0.03, 0.03, 3).astype(np.float32)
    g = (gain * 255.0 * grad).astype(np.float32)[..., None] * temp[None, None, :]
    out = img * g
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(0.008 * 255)
    out += np.float32(0.5)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
class SyntheticProduct:
    """One product of the synthetic line; ``normal(i)`` / ``defective(i, category)`` are pure in i."""

    def __init__(self, name: str, size: int = 256, seed: int = 0):
        if name not in PRODUCTS:
            from linewatch.errors import UserError

            raise UserError(f"unknown synthetic product {name!r}; choose from {', '.join(PRODUCTS)}")
        if not 64 <= int(size) <= 2048:
            from linewatch.errors import UserError

            raise UserError(f"synthetic image size {size} out of range 64..2048")
        self.name = name
        self.spec = PRODUCTS[name]
        self.size = int(size)
        self.seed = int(seed)
        self._code = zlib.crc32(name.encode())

    @property
    def background(self) -> bool:
        return self.spec.background

    def _rng(self, kind: str, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._code, _KIND_CODE[kind], int(i)])

    def _scene(self, rng: np.random.Generator) -> _Scene:
        return _RENDER[self.spec.kind](self.spec, rng, self.size)

    def normal(self, i: int) -> SynthSample:
        rng = self._rng("good", i)
        sc = self._scene(rng)
        img = _light_and_noise(rng, _composite(sc), self.size)
        return SynthSample(img, None, "good", self.background, self.name, int(i))

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
        return SynthSample(img, mask.astype(np.uint8) * 255, category, self.background, self.name, int(i), parts)

    def _apply(self, rng: np.random.Generator, sc: _Scene, kinds: list[str]):
        """Render the defects of ``kinds`` (one variant each); None if the result is unusable."""
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
                    k = max(3, int(5 * self.size / 256)) | 1
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
            k = max(3, int(7 * self.size / 256)) | 1
            changed = cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((k, k), np.uint8)) > 0
            k2 = max(5, int(11 * self.size / 256)) | 1
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
            shadow = cv2.GaussianBlur(a, (0, 0), 1.5 * self.size / 256) * 0.25
            img = img * (1 - shadow[..., None])
            img = img * (1 - a[..., None]) + mat * a[..., None]
        min_px = max(12, int(20 * (self.size / 256) ** 2))
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
                 categories: Sequence[str] = CATEGORIES):
        if not 0.0 <= defect_rate <= 1.0:
            from linewatch.errors import UserError

            raise UserError(f"defect_rate {defect_rate} must be within 0..1")
        self.product = SyntheticProduct(product, size=size, seed=seed)
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


def generate_dataset(root: str | Path, products: Sequence[str] | None = None, size: int = 256, seed: int = 0,
                     n_train: int = 120, n_test_good: int = 20, n_test_per_category: int = 12,
                     categories: Sequence[str] = CATEGORIES, progress: bool = True) -> Path:
    """Write the MVTec AD layout for each product plus ``<root>/categories.csv``; returns root."""
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
    makers = {p: SyntheticProduct(p, size=size, seed=seed) for p in products}
    root.mkdir(parents=True, exist_ok=True)
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
