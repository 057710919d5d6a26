"""Camera sources: where frames come from before they go to the `frames` topic.

Every source yields ``SourceFrame`` (already encoded bytes + encoding + a label naming the
frame for error messages). Kinds:

- ``FolderSource``: a folder of images, sorted by name, optionally looping. JPEG and PNG
  files are sent byte for byte (no re-encode loss); other formats are re-encoded.
- ``VideoSource``: a video file read through OpenCV.
- ``CameraSource``: a live camera (device index) or a stream URL (rtsp/http/https).
- ``SyntheticSource``: the synthetic production line of linewatch.synth (normal frames and
  defects at a given rate), so the whole pipeline runs without hardware.

``open_source(spec)`` turns a command-line spec into one of them (forms: producers.cli.SPEC_HELP).
Bad input raises UserError with a one-line message naming the path/device and the problem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # our own error says it once, not ffmpeg's

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from linewatch.errors import UserError  # noqa: E402
from linewatch.synth.exposure import ExposureDrift  # noqa: E402

log = logging.getLogger(__name__)

Encoding = Literal["jpeg", "png"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
STREAM_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")

@dataclass(frozen=True)
class SourceFrame:
    data: bytes
    encoding: Encoding
    label: str  # names the frame in errors: file path, "video.mp4#17", "synthetic:cap#3"
    capture_ts_ms: int


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV prints several warnings for a device that does not open; UserError says it once."""
    logging_mod = cv2.utils.logging
    old = logging_mod.getLogLevel()
    logging_mod.setLogLevel(logging_mod.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging_mod.setLogLevel(old)


def _now_ms() -> int:
    return int(time.time() * 1000)


def encode_image(bgr: np.ndarray, encoding: Encoding = "jpeg", quality: int = 90) -> bytes:
    """Encode a BGR (OpenCV order) or gray uint8 image as JPEG or PNG."""
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {bgr.shape} image as {encoding}")
    return buf.tobytes()


def sniff_encoding(data: bytes) -> Encoding | None:
    """The encoding of image bytes by their magic number, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


class FrameSource:
    """Base class: iterate to get frames; ``close()`` releases devices/files."""

    kind: str = "source"
    name: str = ""

    def __iter__(self) -> Iterator[SourceFrame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FolderSource(FrameSource):
    kind = "folder"

    def __init__(self, path: str | Path, loop: bool = False, encoding: Encoding = "jpeg",
                 quality: int = 90, reencode: bool = False) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise UserError(f"source folder {self.path}: no such directory")
        if not self.path.is_dir():
            raise UserError(f"source {self.path}: not a directory")
        self.files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise UserError(f"source folder {self.path}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
        self.loop = loop
        self.encoding: Encoding = encoding
        self.quality = quality
        self.reencode = reencode
        self.name = str(self.path)
        self.skipped = 0

    def _load(self, path: Path) -> SourceFrame | None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("%s: cannot read (%s); skipped", path, exc.strerror or exc)
            return None
        enc = sniff_encoding(data)
        if enc is not None and not self.reencode:
            return SourceFrame(data, enc, str(path), _now_ms())
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            log.error("%s: not a readable image; skipped", path)
            return None
        return SourceFrame(encode_image(img, self.encoding, self.quality), self.encoding, str(path), _now_ms())

    def __iter__(self) -> Iterator[SourceFrame]:
        while True:
            sent_any = False
            for path in self.files:
                frame = self._load(path)
                if frame is None:
                    self.skipped += 1
                    continue
                sent_any = True
                yield frame
            if not self.loop or not sent_any:
                if not sent_any:
                    raise UserError(f"source folder {self.path}: none of the {len(self.files)} files is a readable image")
                return


class _CaptureSource(FrameSource):
    """Shared by video files and live cameras: read BGR frames from cv2.VideoCapture."""

    def __init__(self, encoding: Encoding, quality: int) -> None:
        self.encoding: Encoding = encoding
        self.quality = quality
        self.cap: cv2.VideoCapture | None = None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class VideoSource(_CaptureSource):
    kind = "video"

    def __init__(self, path: str | Path, loop: bool = False, encoding: Encoding = "jpeg", quality: int = 90) -> None:
        super().__init__(encoding, quality)
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise UserError(f"video {self.path}: no such file")
        if not self.path.is_file():
            raise UserError(f"video {self.path}: not a file")
        self.loop = loop
        self.name = str(self.path)
        self._open()
        ok, first = self.cap.read()  # type: ignore[union-attr]
        if not ok or first is None:
            self.close()
            raise UserError(f"video {self.path}: unreadable (OpenCV could not decode a frame)")
        self._first: np.ndarray | None = first

    def _open(self) -> None:
        with _quiet_opencv():
            self.cap = cv2.VideoCapture(str(self.path))
        if not self.cap.isOpened():
            self.close()
            raise UserError(f"video {self.path}: unreadable (OpenCV could not open it)")

    @property
    def fps(self) -> float:
        return float(self.cap.get(cv2.CAP_PROP_FPS)) if self.cap is not None else 0.0

    def __iter__(self) -> Iterator[SourceFrame]:
        index = 0
        while True:
            if self._first is not None:
                img, self._first = self._first, None
            else:
                if self.cap is None:
                    return
                ok, img = self.cap.read()
                if not ok or img is None:
                    if not self.loop:
                        return
                    self.close()
                    self._open()
                    ok, img = self.cap.read()  # type: ignore[union-attr]
                    if not ok or img is None:
                        return
            yield SourceFrame(encode_image(img, self.encoding, self.quality), self.encoding,
                              f"{self.path.name}#{index}", _now_ms())
            index += 1


class CameraSource(_CaptureSource):
    """A live camera (device index) or stream URL. Transient read failures are retried;
    ``max_failures`` consecutive failures end the stream with an error."""

    kind = "camera"

    def __init__(self, device: int | str, encoding: Encoding = "jpeg", quality: int = 90,
                 open_timeout_s: float = 10.0, max_failures: int = 50) -> None:
        super().__init__(encoding, quality)
        self.device = device
        self.name = f"camera:{device}" if isinstance(device, int) else str(device)
        self.max_failures = max_failures
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(open_timeout_s * 1000),
        ]
        try:
            with _quiet_opencv():
                self.cap = cv2.VideoCapture(device, cv2.CAP_ANY, params)
        except cv2.error as exc:  # pragma: no cover - depends on the OpenCV build
            raise UserError(f"{self.name}: could not be opened ({' '.join(str(exc).split())})") from None
        if not self.cap.isOpened():
            self.close()
            what = f"camera device {device}" if isinstance(device, int) else f"stream {device}"
            raise UserError(f"{what}: could not be opened (no such device, no permission, or unreachable)")

    def __iter__(self) -> Iterator[SourceFrame]:
        index = 0
        failures = 0
        while self.cap is not None:
            ok, img = self.cap.read()
            if not ok or img is None:
                failures += 1
                if failures >= self.max_failures:
                    log.warning("%s: %d consecutive read failures; stream ended", self.name, failures)
                    return
                time.sleep(0.02)
                continue
            failures = 0
            yield SourceFrame(encode_image(img, self.encoding, self.quality), self.encoding,
                              f"{self.name}#{index}", _now_ms())
            index += 1


def _synthetic_camera_class():
    """linewatch.synth.SyntheticCamera when present; else a placeholder source of textures."""
    try:
        from linewatch.synth import SyntheticCamera
    except ImportError:
        log.warning("linewatch.synth not available: the synthetic source sends placeholder textures")
        return _PlaceholderCamera
    return SyntheticCamera


class _PlaceholderCamera:
    """Fallback when linewatch.synth is absent: shifted scikit-image textures, by seed."""

    def __init__(self, product: str, seed: int = 0, size: int = 256, defect_rate: float = 0.0) -> None:
        from skimage import data

        base = data.brick() if product != "turf" else data.grass()
        self.base = cv2.cvtColor(cv2.resize(base, (size, size)), cv2.COLOR_GRAY2RGB)
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self):
        dx, dy = self.rng.integers(0, self.base.shape[0], 2)

        @dataclass
        class _Sample:
            image: np.ndarray

        return _Sample(np.roll(self.base, (int(dy), int(dx)), axis=(0, 1)))


class SyntheticSource(FrameSource):
    kind = "synthetic"

    """The synthetic line as a camera: square ``size`` close-ups, or with ``frame_size=(W, H)``
    camera frames with the product's square (``product_size``) centred on a dark backdrop and
    defects sized by ``defect_scale`` ("model" | "small"); see linewatch.synth.SyntheticProduct."""

    def __init__(self, product: str, seed: int = 0, size: int = 256, defect_rate: float = 0.2,
                 encoding: Encoding = "jpeg", quality: int = 90, exposure: ExposureDrift | None = None, *,
                 frame_size: tuple[int, int] | None = None, product_size: int | None = None,
                 defect_scale: str = "model") -> None:
        self.exposure = exposure
        cls = _synthetic_camera_class()
        frame = {} if frame_size is None and defect_scale == "model" else {
            "frame_size": frame_size, "product_size": product_size, "defect_scale": defect_scale}
        if product_size is not None and frame_size is None:
            raise UserError(f"synthetic:{product}: --product-size needs --frame-size (square frames are --size)")
        try:
            self.camera = cls(product, seed=seed, size=size, defect_rate=defect_rate, **frame)
        except (KeyError, ValueError) as exc:
            raise UserError(f"synthetic:{product}: {' '.join(str(exc).split())}") from None
        self.product = product
        self.encoding: Encoding = encoding
        self.quality = quality
        self.name = f"synthetic:{product}"

    def __iter__(self) -> Iterator[SourceFrame]:
        for index, sample in enumerate(self.camera):
            rgb = sample.image if self.exposure is None else self.exposure.apply(sample.image, index)
            bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
            yield SourceFrame(encode_image(bgr, self.encoding, self.quality), self.encoding,
                              f"{self.name}#{index}", _now_ms())


def source_kind(spec: str) -> str:
    """'folder' | 'video' | 'camera' | 'stream' | 'synthetic' for a SOURCE spec (no I/O
    beyond a stat)."""
    if spec.startswith(("synthetic:", "synth:")):
        return "synthetic"
    if spec.startswith("camera:") or spec.isdigit():
        return "camera"
    if spec.lower().startswith(STREAM_PREFIXES):
        return "stream"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.exists():
        return "video"
    raise UserError(f"source {spec}: no such file or directory (see `linewatch produce --help` for SOURCE forms)")


def open_source(spec: str, *, loop: bool = False, encoding: Encoding = "jpeg", quality: int = 90,
                reencode: bool = False, seed: int = 0, size: int = 256, defect_rate: float = 0.2,
                open_timeout_s: float = 10.0, exposure: ExposureDrift | None = None,
                frame_size: tuple[int, int] | None = None, product_size: int | None = None,
                defect_scale: str = "model") -> FrameSource:
    """Open a SOURCE spec (forms: producers.cli.SPEC_HELP)."""
    if not 1 <= quality <= 100:
        raise UserError(f"quality {quality}: must be within 1..100")
    kind = source_kind(spec)
    if kind == "synthetic":
        product = spec.split(":", 1)[1]
        if not product:
            raise UserError(f"source {spec}: name a product, e.g. synthetic:cap")
        return SyntheticSource(product, seed=seed, size=size, defect_rate=defect_rate, encoding=encoding, quality=quality,
                               exposure=exposure, frame_size=frame_size, product_size=product_size,
                               defect_scale=defect_scale)
    if kind == "camera":
        index = spec.split(":", 1)[1] if spec.startswith("camera:") else spec
        if not index.isdigit():
            raise UserError(f"source {spec}: a camera is camera:N with N a device index")
        return CameraSource(int(index), encoding=encoding, quality=quality, open_timeout_s=open_timeout_s)
    if kind == "stream":
        return CameraSource(spec, encoding=encoding, quality=quality, open_timeout_s=open_timeout_s)
    if kind == "folder":
        return FolderSource(spec, loop=loop, encoding=encoding, quality=quality, reencode=reencode)
    return VideoSource(spec, loop=loop, encoding=encoding, quality=quality)
