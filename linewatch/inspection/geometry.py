"""Frame geometry: which part of a camera frame the model sees, at what scale, in which tiles.

A line camera gives 1280 x 1024 to 2448 x 2048 frames; the product fills part of the frame and
its defects are a few pixels wide. Squashing the whole frame to the model's 256 x 256 input
throws most of those pixels away, so a profile records a ``Geometry`` and calibration, the
evaluation, the reports and the worker all go through the functions below:

1. ``roi`` (x, y, w, h in frame pixels of the calibrated frame size) is cut out of the frame;
2. the ROI is resized, keeping its aspect ratio, to the *view*: the largest picture that an
   R x C grid of ``input_size`` tiles overlapping by at least ``overlap`` covers;
3. the view (padded at its bottom/right edge where it is smaller than one tile) is cut into the
   R x C tiles, and every tile of every frame of a micro-batch goes through the engine as one batch;
4. the tiles' maps are stitched back into one view map (overlaps averaged); the image score is
   the maximum over it, and thresholds, the mask step, regions, the extent and categories work on
   it. Region boxes are mapped back to frame pixels (``View.to_frame``).

Model statistics are shared by all tiles (every tile is one more training sample of the same
model: docs/geometry.md says why, with the per-tile-position measurement).

A default ``Geometry()`` (no ROI, one tile) with no recorded frame size is the behaviour of
profiles written before geometry existed: the whole frame squashed to input_size x input_size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class GeometryError(ValueError):
    """A frame or a setting does not fit the profile's geometry (one line; the caller names
    the image or sends the frame to the DLQ with it)."""


class Roi(BaseModel):
    """A rectangle in frame pixels (absolute, of the calibrated frame size)."""

    model_config = ConfigDict(frozen=True)
    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(ge=8)
    h: int = Field(ge=8)

    @classmethod
    def parse(cls, text: str) -> "Roi":
        """``X,Y,W,H`` (integers, frame pixels)."""
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 4 or not all(re.fullmatch(r"\d+", p) for p in parts):
            raise GeometryError(f"ROI {text!r}: expected X,Y,W,H in frame pixels, e.g. 192,64,640,640")
        x, y, w, h = (int(p) for p in parts)
        if w < 8 or h < 8:
            raise GeometryError(f"ROI {text!r}: width and height must be at least 8 pixels")
        return cls(x=x, y=y, w=w, h=h)

    def __str__(self) -> str:
        return f"{self.x},{self.y},{self.w},{self.h}"


def parse_tiles(text: str) -> tuple[int, int]:
    """``RxC`` (rows x columns), each 1..8."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or not (1 <= int(m.group(1)) <= 8 and 1 <= int(m.group(2)) <= 8):
        raise GeometryError(f"tiles {text!r}: expected RxC with 1..8 rows and columns, e.g. 2x2")
    return int(m.group(1)), int(m.group(2))


def parse_frame_size(text: str) -> tuple[int, int]:
    """``WxH`` in pixels."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 8 or int(m.group(2)) < 8:
        raise GeometryError(f"frame size {text!r}: expected WxH in pixels, e.g. 1024x768")
    return int(m.group(1)), int(m.group(2))


class Geometry(BaseModel):
    """How a frame becomes model input; recorded in profile.json (``Profile.geometry``)."""

    model_config = ConfigDict(frozen=True)
    roi: Roi | None = Field(None, description="x, y, w, h in pixels of the calibrated frame size; None = whole frame")
    tiles: tuple[int, int] = Field((1, 1), description="rows x columns of model-size tiles over the ROI")
    overlap: float = Field(0.25, ge=0.0, le=0.75, description="least overlap between neighbouring tiles (fraction of a tile)")
    keep_aspect: bool = Field(True, description="keep the ROI's aspect ratio (False: stretch it to the tile grid)")
    frame_size: tuple[int, int] | None = Field(None, description=(
        "(width, height) of the calibration frames; None = a profile from before geometry (any frame size, squashed)"))

    @model_validator(mode="after")
    def _check(self) -> "Geometry":
        r, c = self.tiles
        if not (1 <= r <= 8 and 1 <= c <= 8):
            raise ValueError(f"tiles {r}x{c}: 1..8 rows and columns")
        return self

    @property
    def strict(self) -> bool:
        """Whether frames must have the calibrated size: an ROI in absolute pixels or a tile grid
        only mean the same place on a frame of the same size."""
        return self.roi is not None or self.tiles != (1, 1)

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    def describe(self) -> str:
        roi = f"roi {self.roi}" if self.roi else "whole frame"
        size = f" of {self.frame_size[0]}x{self.frame_size[1]}" if self.frame_size else ""
        return f"{roi}{size}, tiles {self.tiles[0]}x{self.tiles[1]} (overlap {self.overlap:g})"

    def resolved(self, frame_w: int, frame_h: int) -> "Geometry":
        """This geometry with the calibration frames' size recorded, checked against it (an ROI
        that leaves the frame, tiles that do not fit): raises GeometryError."""
        g = self.model_copy(update={"frame_size": (int(frame_w), int(frame_h))})
        if g.roi is not None:
            _check_inside(g.roi, int(frame_w), int(frame_h), "calibration frame")
        return g

    def framing(self, input_size: int) -> "Framing":
        """The fixed view and tile grid at model size ``input_size`` (GeometryError when the
        tiles do not fit the ROI's shape)."""
        return _framing(self, int(input_size))


@dataclass(frozen=True)
class Framing:
    """A geometry at one model input size: the fixed view and tile grid of a profile."""

    geometry: Geometry
    input_size: int
    view_hw: tuple[int, int]  # the view (resized ROI) every frame becomes
    padded_hw: tuple[int, int]  # the view padded (for tiling only) to at least one tile per axis
    origins: tuple[tuple[int, int], ...]  # (y, x) of each tile in the padded view, row-major

    @property
    def n_tiles(self) -> int:
        return len(self.origins)

    @property
    def identity(self) -> bool:
        """One tile that is the whole view: the model sees the view itself (no copy, no stitch)."""
        return self.n_tiles == 1 and self.padded_hw == self.view_hw == (self.input_size, self.input_size)

    # -- frames -> views ---------------------------------------------------------------------
    def box(self, frame_w: int, frame_h: int, roi: Roi | None = None) -> Roi:
        """The frame rectangle a frame's view is cut from; raises GeometryError when the frame
        does not fit (another size than calibrated, an ROI leaving it)."""
        g = self.geometry
        if g.strict and g.frame_size is not None and (frame_w, frame_h) != tuple(g.frame_size):
            raise GeometryError(
                f"frame is {frame_w}x{frame_h}, the profile was calibrated on {g.frame_size[0]}x{g.frame_size[1]} "
                f"frames ({g.describe()}): recalibrate or set this camera's ROI")
        box = roi or g.roi or Roi(x=0, y=0, w=max(8, frame_w), h=max(8, frame_h))
        _check_inside(box, frame_w, frame_h, "frame")
        return box

    def view(self, image: np.ndarray, box: Roi, out: np.ndarray | None = None,
             interpolation: int | None = None) -> np.ndarray:
        """Cut ``box`` out of ``image`` (a whole frame, HxW[x3]) and resize it to the view
        (``view_hw``); written into ``out`` when given."""
        return self.view_of_crop(image[box.y : box.y + box.h, box.x : box.x + box.w], out, interpolation)

    def view_of_crop(self, crop: np.ndarray, out: np.ndarray | None = None,
                     interpolation: int | None = None) -> np.ndarray:
        """An already cut-out ROI resized to the view (area when shrinking, linear when enlarging;
        masks pass ``cv2.INTER_NEAREST``)."""
        vh, vw = self.view_hw
        if interpolation is None:
            interpolation = cv2.INTER_AREA if crop.shape[0] >= vh and crop.shape[1] >= vw else cv2.INTER_LINEAR
        if crop.shape[:2] == (vh, vw):
            if out is None:
                return crop
            out[...] = crop
            return out
        if out is None:
            return cv2.resize(np.ascontiguousarray(crop), (vw, vh), interpolation=interpolation)
        cv2.resize(np.ascontiguousarray(crop), (vw, vh), dst=out, interpolation=interpolation)
        return out

    # -- views -> tiles -> maps ---------------------------------------------------------------
    def tile(self, views: np.ndarray) -> np.ndarray:
        """(N, Hv, Wv, ...) views -> (N * T, S, S, ...) tiles, frame-major; a view smaller than
        one tile along an axis is padded at its bottom/right edge with its edge pixels."""
        if self.identity:
            return views
        s = self.input_size
        (vh, vw), (ph, pw) = self.view_hw, self.padded_hw
        if (ph, pw) != (vh, vw):
            pad = [(0, 0), (0, ph - vh), (0, pw - vw)] + [(0, 0)] * (views.ndim - 3)
            views = np.pad(views, pad, mode="edge")
        if self.n_tiles == 1:
            return np.ascontiguousarray(views)
        out = np.empty((len(views) * self.n_tiles, s, s, *views.shape[3:]), views.dtype)
        for k, (y, x) in enumerate(self.origins):
            out[k :: self.n_tiles] = views[:, y : y + s, x : x + s]
        return out

    def stitch(self, tile_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N * T, S, S) tile maps -> (view maps (N, Hv, Wv), image scores (N,)): overlaps
        averaged, the padding cut off, the score the maximum of the view map."""
        if self.identity:
            maps = tile_maps
        else:
            t, s = self.n_tiles, self.input_size
            n = len(tile_maps) // t
            ph, pw = self.padded_hw
            acc = np.zeros((n, ph, pw), np.float32)
            for k, (y, x) in enumerate(self.origins):
                acc[:, y : y + s, x : x + s] += tile_maps[k::t]
            vh, vw = self.view_hw
            maps = acc[:, :vh, :vw] * _inverse_cover(self)[None]
        scores = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros((0,), np.float32)
        return maps.astype(np.float32, copy=False), scores.astype(np.float32, copy=False)

    # -- view coordinates -> frame coordinates ------------------------------------------------
    def scale_to_frame(self, box: Roi) -> tuple[float, float]:
        """Frame pixels per view pixel along x and y for a view cut from ``box``."""
        return box.w / self.view_hw[1], box.h / self.view_hw[0]

    def decode_factor(self, box: Roi) -> int:
        """The largest libjpeg DCT reduction (8, 4, 2 or 1) that keeps the ROI at or above the
        view's resolution: the decoder never makes more pixels than the tiles need."""
        vh, vw = self.view_hw
        for f in (8, 4, 2):
            if box.w // f >= vw and box.h // f >= vh:
                return f
        return 1


def _check_inside(box: Roi, fw: int, fh: int, what: str) -> None:
    if box.x + box.w > fw or box.y + box.h > fh:
        raise GeometryError(f"ROI {box} leaves the {fw}x{fh} {what} (it ends at x={box.x + box.w}, y={box.y + box.h})")


def _axis(n: int, length: int, s: int) -> tuple[int, ...]:
    """Tile origins along one axis: n tiles of s pixels covering ``length`` evenly."""
    if n == 1:
        return (0,)
    step = (length - s) / (n - 1)
    return tuple(int(round(i * step)) for i in range(n))


@lru_cache(maxsize=256)
def _framing(g: Geometry, s: int) -> Framing:
    rows, cols = g.tiles
    stride = s * (1.0 - g.overlap)
    grid_h, grid_w = s + (rows - 1) * stride, s + (cols - 1) * stride
    if g.roi is not None:
        src_w, src_h = g.roi.w, g.roi.h
    elif g.frame_size is not None:
        src_w, src_h = g.frame_size
    else:  # a profile from before geometry: the frame squashed to the square input
        src_w = src_h = 0
    if src_w and src_h and g.keep_aspect:
        scale = min(grid_w / src_w, grid_h / src_h)
        vh, vw = max(1, int(round(src_h * scale))), max(1, int(round(src_w * scale)))
    else:
        vh, vw = int(round(grid_h)), int(round(grid_w))
    for n, length, axis in ((rows, vh, "rows"), (cols, vw, "columns")):
        # each extra tile along an axis must add at least an eighth of a tile of new pixels
        if n > 1 and length < s + (n - 1) * max(1, s // 8):
            fewer = f"1x{cols}" if axis == "rows" else f"{rows}x1"
            raise GeometryError(
                f"tiles {rows}x{cols} do not fit: the ROI's aspect ratio leaves a {vw}x{vh} px view, too small for "
                f"{n} {axis} of {s}-px tiles; use fewer {axis} (e.g. {fewer}) or an ROI of another shape")
    ph, pw = max(vh, s), max(vw, s)
    origins = tuple((y, x) for y in _axis(rows, ph, s) for x in _axis(cols, pw, s))
    return Framing(g, s, (vh, vw), (ph, pw), origins)


@lru_cache(maxsize=64)
def _inverse_cover_cached(key: tuple) -> np.ndarray:
    (ph, pw), (vh, vw), s, origins = key
    cover = np.zeros((ph, pw), np.float32)
    for y, x in origins:
        cover[y : y + s, x : x + s] += 1.0
    return (1.0 / cover[:vh, :vw]).astype(np.float32)


def _inverse_cover(f: Framing) -> np.ndarray:
    return _inverse_cover_cached((f.padded_hw, f.view_hw, f.input_size, f.origins))


def scaled_box(box: Roi, factor: int) -> tuple[int, int, int, int]:
    """``box`` in the pixels of a frame decoded at 1/factor (libjpeg rounds sizes up)."""
    if factor == 1:
        return box.x, box.y, box.w, box.h
    x0, y0 = box.x // factor, box.y // factor
    x1, y1 = math.ceil((box.x + box.w) / factor), math.ceil((box.y + box.h) / factor)
    return x0, y0, x1 - x0, y1 - y0


class TiledModel:
    """An anomaly model seen through a profile's framing, for calibration: ``fit`` and
    ``predict`` take views (N, Hv, Wv, 3) and give view maps, through the very ``tile`` and
    ``stitch`` the worker runs around its engine. Everything else (``save``, ``config``,
    ``input_size``, the calibration variants ...) is the wrapped model's own.

    Chunks of ``chunk_frames`` views at a time bound the memory of the tiles and their maps."""

    def __init__(self, model: object, framing: Framing, chunk_frames: int = 32):
        self.model = model
        self.framing = framing
        self.chunk_frames = max(1, int(chunk_frames))

    def __getattr__(self, name: str) -> object:
        model = self.__dict__.get("model")
        if model is None:  # copy/pickle probing an instance without __init__
            raise AttributeError(name)
        return getattr(model, name)

    def fit(self, views: np.ndarray, progress: bool = True) -> "TiledModel":
        self.model.fit(self.framing.tile(views), progress=progress)  # type: ignore[attr-defined]
        return self

    def predict(self, views: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        f = self.framing
        if f.identity:
            return self.model.predict(views, batch_size=batch_size)  # type: ignore[attr-defined]
        maps, scores = [], []
        for i in range(0, len(views), self.chunk_frames):
            tile_maps, _ = self.model.predict(f.tile(views[i : i + self.chunk_frames]),  # type: ignore[attr-defined]
                                              batch_size=batch_size)
            m, s = f.stitch(tile_maps)
            maps.append(m)
            scores.append(s)
        if not maps:
            return np.zeros((0, *f.view_hw), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(maps), np.concatenate(scores)

    def anomaly_map(self, views: np.ndarray, batch_size: int = 16) -> np.ndarray:
        return self.predict(views, batch_size)[0]
