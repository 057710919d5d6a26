"""Frames in, model input out: the one decode-and-resize for calibration and the worker.

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


def _reduced_flag(w: int, h: int, size: int) -> tuple[int, int]:
    """The largest libjpeg DCT scale (1/8, 1/4, 1/2) that stays at or above the model size."""
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if w // factor >= size and h // factor >= size:
            return factor, flag
    return 1, cv2.IMREAD_COLOR


def _rgb(flag: int) -> int:
    return (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB if _HAS_RGB_FLAG else flag


def decode_frame(data: bytes, size: int, max_pixels: int, encoding: str | None = None,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """Decode ``data`` to an RGB uint8 ``size`` x ``size`` image (written into ``out`` when
    given); returns (image, original width, original height). Raises FrameError.

    The frame is squashed to the square model input by ``to_model_input``, the function
    calibration's image loading (``load_image_file``) goes through too.
    """
    fmt, w, h = frame_dims(data, max_pixels)
    if encoding is not None and encoding != fmt:
        raise FrameError("decode", f"header says encoding={encoding} but the data is {fmt.upper()}")
    flag = cv2.IMREAD_COLOR
    if fmt == "jpeg":
        _, flag = _reduced_flag(w, h, size)
    buf = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(buf, _rgb(flag))
    except cv2.error as exc:
        raise FrameError("decode", f"{fmt.upper()} decoder failed: {' '.join(str(exc).split())[:200]}") from None
    if img is None or img.ndim != 3 or img.shape[2] != 3:
        raise FrameError("decode", f"undecodable {fmt.upper()} ({len(data)} bytes)")
    if not _HAS_RGB_FLAG:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return to_model_input(img, size, out), w, h


def to_model_input(img: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Squash an RGB image to size x size (area when shrinking, linear when enlarging): the one
    resize between a frame and the model, for calibration and the worker alike."""
    if img.shape[0] == size and img.shape[1] == size:
        if out is None:
            return img
        out[...] = img
        return out
    interp = cv2.INTER_AREA if img.shape[0] >= size and img.shape[1] >= size else cv2.INTER_LINEAR
    if out is None:
        return cv2.resize(img, (size, size), interpolation=interp)
    cv2.resize(img, (size, size), dst=out, interpolation=interp)
    return out


def load_image_file(path: str | Path, size: int, max_pixels: int = 1 << 30) -> np.ndarray:
    """An image file as the model sees it (size x size RGB uint8).

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
            raise UserError(f"{path}: {exc.reason}") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None or img.ndim != 3:
        raise UserError(f"{path}: not a readable image")
    return to_model_input(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), size)
