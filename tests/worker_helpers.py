"""Helpers for the worker tests: frames as a producer sends them, and a tiny test-only model
family ("testmean": |image - mean normal image|, box-blurred) so profile-cache and worker
tests run in milliseconds. Importable from a worker subprocess with PYTHONPATH=tests."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from linewatch.messages import FrameHeaders
from linewatch.models.base import AnomalyModel
from linewatch.models.registry import FAMILIES
from linewatch.profiles import Profile, Registry

TEST_KIND = "testmean"


class _MeanModule(torch.nn.Module):
    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = (x - self.mean).abs().mean(1, keepdim=True) / 255.0
        d = F.avg_pool2d(d, 5, 1, 2)[:, 0]
        return d, d.amax(dim=(1, 2))


class MeanModel(AnomalyModel):
    """Test-only family: the map is the blurred distance to the mean normal image."""

    kind = TEST_KIND

    def __init__(self, input_size: int = 64, backbone: str = "none", **options):
        super().__init__(input_size, backbone, **options)
        self.mean = torch.zeros(3, input_size, input_size)

    def fit(self, images: np.ndarray, progress: bool = False) -> "MeanModel":
        self.mean = torch.from_numpy(images.astype(np.float32).mean(0)).permute(2, 0, 1).contiguous()
        return self

    def inference_module(self) -> torch.nn.Module:
        return _MeanModule(self.mean)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean = tensors["mean"].float()


def register_test_family() -> None:
    FAMILIES.setdefault(TEST_KIND, "worker_helpers:MeanModel")


def plain_image(size: int, value: int = 128, seed: int = 0, noise: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), value, np.float32) + rng.normal(0, noise, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def with_square(img: np.ndarray, x: int, y: int, side: int, value: int = 250) -> np.ndarray:
    out = img.copy()
    out[y : y + side, x : x + side] = value
    return out


def publish_mean_profile(registry_dir: Path, product: str, size: int = 64, threshold: float = 0.25,
                         base_value: int = 128, min_region_px: int = 4, **profile_fields) -> Profile:
    """Fit the test family on plain grey frames and publish it (no ONNX export)."""
    register_test_family()
    normals = np.stack([plain_image(size, base_value, seed=s) for s in range(4)])
    model = MeanModel(input_size=size).fit(normals)
    profile = Profile(product=product, model_kind=TEST_KIND, backbone="none", input_size=size,
                      threshold=threshold, threshold_method="manual", min_region_px=min_region_px,
                      **profile_fields)
    return Registry(registry_dir).publish(profile, model, export_onnx=False)


def encode(img_rgb: np.ndarray, fmt: str = "jpeg", quality: int = 92) -> bytes:
    bgr = cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", bgr,
                           [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else [])
    assert ok
    return buf.tobytes()


def frame_headers(product: str, seq: int, camera: str = "cam1", line: str = "l1", encoding: str = "jpeg",
                  frame_id: str | None = None) -> FrameHeaders:
    return FrameHeaders(frame_id=frame_id or FrameHeaders.new_frame_id(camera, seq), product=product,
                        camera=camera, line=line, seq=seq, capture_ts_ms=int(time.time() * 1000),
                        encoding=encoding)  # type: ignore[arg-type]


class FakeRecord:
    """The fields of a kafka-python ConsumerRecord the pipeline reads."""

    def __init__(self, value: bytes | None, headers, offset: int = 0, partition: int = 0, topic: str = "frames",
                 key: bytes | None = b"cam1"):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.value, self.headers = key, value, headers
