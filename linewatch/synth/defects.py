"""Defect painters of the synthetic line, one family per base category.

Structural defects cut ``alpha`` or warp geometry, surface defects change ``fg``/``shade`` but
keep the material, contamination lays foreign material on top. Structural and surface painters
change the scene in place and return the defect's boolean mask; a contamination painter returns
an overlay ``(alpha, material, opacity)`` that ``SyntheticProduct`` lays on the composed scene.
"""

from __future__ import annotations

import cv2
import numpy as np

from linewatch.synth.scenes import _defect_s, _grid, _Scene, _smooth_noise, _texture_patch


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
    s = _defect_s(sc)
    rad = (9 + 11 * sev) * s * rng.uniform(0.9, 1.15)
    c = _place(rng, sc, rad, taken)
    hole = _blob(rng, sc.size, c, rad, rad * rng.uniform(0.55, 1.0), rough=0.3)
    ring = np.clip(cv2.GaussianBlur(hole, (0, 0), 2.0 * s) * 1.6 - hole, 0, 1)  # torn, bent-in rim
    sc.shade *= 1 - 0.5 * ring
    sc.alpha *= 1 - hole
    return (hole > 0.5) | (ring > 0.25)


def _structural_chip(rng, sc: _Scene, taken, sev) -> np.ndarray:
    """A piece missing at the object's outline (objects) / a cut through the material (textures)."""
    s = _defect_s(sc)
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
    s = _defect_s(sc)
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
    s = _defect_s(sc)
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
    s = _defect_s(sc)
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
    s = _defect_s(sc)
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
    s = _defect_s(sc)
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
    blur = cv2.GaussianBlur(a, (0, 0), 2.5 * sc.size / 256 if sc.defect_unit is None else 2.5 * sc.defect_unit)
    gx = cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3)
    spec = np.clip(-(gx * sc.light[0] + gy * sc.light[1]) * 1.5, 0, 1) * gloss
    return np.clip(base + spec[..., None] * 0.6, 0, 1)


def _contam_blob(rng, sc: _Scene, taken, sev):
    s = _defect_s(sc)
    rad = (9 + 10 * sev) * s
    c = _place(rng, sc, rad, taken)
    a = _blob(rng, sc.size, c, rad, rad * rng.uniform(0.5, 1.0), rough=0.4)
    return a, _foreign_material(rng, sc, a), 0.5


def _contam_dust(rng, sc: _Scene, taken, sev):
    s = _defect_s(sc)
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
    s = _defect_s(sc)
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
