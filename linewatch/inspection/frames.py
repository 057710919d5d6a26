"""Frames in, model input out: the one decode-and-resize for calibration and the worker.

The geometry (ROI, view, tiles: ``linewatch.inspection.geometry``) decides what part of the
frame at which scale; a bare model size means the whole frame squashed to size x size.

Speed: JPEGs are decoded straight to about the model's size with libjpeg's DCT scaling
(``IMREAD_REDUCED_COLOR_2/4/8``), into a caller's reused buffer; the header is read first
(Pillow, header only) so a decompression bomb or a truncated file never reaches the decoder.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import JpegImagePlugin, PngImagePlugin

from linewatch.errors import UserError
from linewatch.inspection.geometry import Framing, Geometry, GeometryError, Roi, scaled_box

Stage = Literal["headers", "decode", "profile", "inference", "publish", "other"]

_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_HAS_RGB_FLAG = hasattr(cv2, "IMREAD_COLOR_RGB")  # OpenCV >= 5 decodes straight to RGB


class FrameError(ValueError):
    """A frame cannot be processed; ``stage`` and the message go to the DLQ record."""

    def __init__(self, stage: Stage, reason: str):
        super().__init__(reason)
        self.stage: Stage = stage
        self.reason = reason


def frame_format(data: bytes) -> Literal["jpeg", "png"]:
    """The codec from the magic bytes (the header's ``encoding`` is checked against it)."""
    if not data:
        raise FrameError("decode", "empty frame (0 bytes)")
    if data[:2] == _JPEG_MAGIC:
        return "jpeg"
    if data[:8] == _PNG_MAGIC:
        return "png"
    raise FrameError("decode", f"not a JPEG or PNG (starts with {bytes(data[:8]).hex()})")


def frame_dims(data: bytes, max_pixels: int) -> tuple[Literal["jpeg", "png"], int, int]:
    """(format, width, height) from the header alone (Pillow reads only the header); refuses
    decompression bombs and truncated files before any pixel is decoded."""
    fmt = frame_format(data)
    # the codec's own image class reads the header without Pillow's global bomb limit
    # (Image.MAX_IMAGE_PIXELS: a warning per frame above it, a refusal above twice it, whatever
    # ``max_pixels`` allows); ``max_pixels`` below is the one limit, and its message names the size
    header = JpegImagePlugin.JpegImageFile if fmt == "jpeg" else PngImagePlugin.PngImageFile
    try:
        with header(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:  # Pillow found no frame header where the magic bytes promised one
        raise FrameError("decode", "truncated JPEG: ends before its frame header" if fmt == "jpeg"
                         else "corrupt PNG: no IHDR chunk") from None
    if w <= 0 or h <= 0:
        raise FrameError("decode", f"{fmt.upper()} declares an empty size {w}x{h}")
    if w * h > max_pixels:
        raise FrameError("decode", f"{fmt.upper()} declares {w}x{h} = {w * h} pixels, over the "
                                   f"limit of {max_pixels} (decompression bomb?)")
    # libjpeg fills a truncated scan with grey and returns "success": check the end marker.
    if fmt == "jpeg":
        tail = bytes(data[-64:]).rstrip(b"\x00")
        if not tail.endswith(b"\xff\xd9"):
            raise FrameError("decode", "truncated JPEG: no end-of-image marker")
    elif b"IEND" not in bytes(data[-16:]):
        raise FrameError("decode", "truncated PNG: no IEND chunk")
    return fmt, w, h


_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2,
            1: cv2.IMREAD_COLOR}


def _reduced_flag(framing: Framing, box: Roi) -> tuple[int, int]:
    """libjpeg's DCT reduction for ``box`` (``Framing.decode_factor``: the largest that keeps
    the ROI at or above the view's resolution) and its imdecode flag."""
    factor = framing.decode_factor(box)
    return factor, _REDUCED[factor]


def _rgb(flag: int) -> int:
    return (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB if _HAS_RGB_FLAG else flag


def framing_of(size: int | Framing) -> Framing:
    """A profile's framing, or for a bare model size the geometry of profiles from before
    geometry existed (the whole frame squashed to size x size)."""
    return size if isinstance(size, Framing) else Geometry().framing(int(size))


def decode_frame(data: bytes, size: int | Framing, max_pixels: int, encoding: str | None = None,
                 out: np.ndarray | None = None, roi: Roi | None = None) -> tuple[np.ndarray, int, int]:
    """``decode_view`` without the frame rectangle: (view, original width, original height)."""
    view, w, h, _ = decode_view(data, size, max_pixels, encoding, out, roi)
    return view, w, h


def decode_view(data: bytes, size: int | Framing, max_pixels: int, encoding: str | None = None,
                out: np.ndarray | None = None, roi: Roi | None = None) -> tuple[np.ndarray, int, int, Roi]:
    """Decode ``data`` to the model's view of it (RGB uint8, the framing's ``view_hw``; for a
    bare ``size`` that is size x size), written into ``out`` when given; returns (view, original
    width, original height, the frame rectangle the view shows). ``roi`` overrides the profile's (a camera mounted differently).
    Raises FrameError (stage "decode"; a frame that does not fit the geometry says why).

    JPEGs are decoded at the largest libjpeg DCT reduction that keeps the ROI at or above the
    view's resolution, then cropped: never larger than the tiles need. Calibration's image
    loading (``load_image_file``) goes through here too.
    """
    framing = framing_of(size)
    fmt, w, h = frame_dims(data, max_pixels)
    if encoding is not None and encoding != fmt:
        raise FrameError("decode", f"header says encoding={encoding} but the data is {fmt.upper()}")
    try:
        box = framing.box(w, h, roi)
    except GeometryError as exc:
        raise FrameError("decode", f"geometry: {exc}") from None
    factor, flag = _reduced_flag(framing, box) if fmt == "jpeg" else (1, cv2.IMREAD_COLOR)
    buf = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(buf, _rgb(flag))
    except cv2.error as exc:
        raise FrameError("decode", f"{fmt.upper()} decoder failed: {' '.join(str(exc).split())[:200]}") from None
    if img is None or img.ndim != 3 or img.shape[2] != 3:
        raise FrameError("decode", f"undecodable {fmt.upper()} ({len(data)} bytes)")
    if not _HAS_RGB_FLAG:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    x, y, bw, bh = scaled_box(box, factor)
    return framing.view_of_crop(img[y : y + bh, x : x + bw], out), w, h, box


def to_model_input(img: np.ndarray, size: int | Framing, out: np.ndarray | None = None,
                   roi: Roi | None = None) -> np.ndarray:
    """An already-decoded whole RGB frame as the model sees it (area when shrinking, linear when
    enlarging): the one resize between a frame and the model, for calibration and the worker
    alike. Raises GeometryError when the frame does not fit the geometry."""
    framing = framing_of(size)
    return framing.view(img, framing.box(img.shape[1], img.shape[0], roi), out)


def load_image_file(path: str | Path, size: int | Framing, max_pixels: int = 1 << 30) -> np.ndarray:
    """An image file as the model sees it (the framing's view, RGB uint8).

    JPEG and PNG go through ``decode_frame``, byte for byte what the worker does with the same
    frame (libjpeg's DCT-reduced decode included), so offline maps equal the stream's; other
    formats OpenCV reads (BMP, TIFF, ...) are decoded whole, then ``to_model_input``. Raises
    UserError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image file does not exist")
    data = path.read_bytes()
    if data[:2] == _JPEG_MAGIC or data[:8] == _PNG_MAGIC:
        try:
            return decode_frame(data, size, max_pixels)[0]
        except FrameError as exc:
            raise UserError(f"{path}: {exc.reason.removeprefix('geometry: ')}") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None or img.ndim != 3:
        raise UserError(f"{path}: not a readable image")
    try:
        return to_model_input(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), size)
    except GeometryError as exc:
        raise UserError(f"{path}: {exc}") from None
