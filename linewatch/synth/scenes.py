"""Products of the synthetic line and how a normal frame of each is rendered.

A scene is three layers -- ``fg`` (the product's albedo), ``bg`` (what shows through a hole:
the conveyor for objects, the dark backing for textures) and ``alpha`` (where the product is)
-- plus a multiplicative ``shade`` plane. The defect painters (``linewatch.synth.defects``)
change these layers before they are composed; lighting and sensor noise (``_light_and_noise``)
come last, so every defect is lit like the part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

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
    # pixels per defect-size unit (the sizes in defects.py are pixels at 256): None = size / 256,
    # defects grow with the image; a number = fixed pixels, as a camera sees a defect of a given size
    defect_unit: float | None = None


def _defect_s(sc: _Scene) -> float:
    """The factor the defect painters multiply their sizes by (see ``_Scene.defect_unit``)."""
    return sc.size / 256 * DEFECT_SCALE if sc.defect_unit is None else sc.defect_unit * DEFECT_SCALE


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
