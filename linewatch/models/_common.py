"""Pieces every feature-based family shares: pixel normalisation, feature alignment onto one
grid, upsampling + separable Gaussian blur + image score. All of it is plain torch ops that
export to ONNX (Pad, Conv, Resize, ReduceMax) so the whole inference graph is one file."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linewatch.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, build_backbone, file_sha256
from linewatch.models.base import ModelError


def float32_scoring(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Scoring (distances, flows, reconstructions, the map head) in float32 even where the
    torch-cuda engine runs the backbone under float16 autocast: the backbone is where fp16 pays,
    while squared distances and log-likelihoods lose precision (or overflow) in it. A no-op on
    CPU and in ONNX export."""
    return torch.autocast("cuda", enabled=False) if t.is_cuda else contextlib.nullcontext()


class Preprocess(nn.Module):
    """float RGB 0..255 (N,3,H,W) -> ImageNet-normalised, as one multiply-add."""

    def __init__(self) -> None:
        super().__init__()
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, truncated at 4 sigma (scipy.ndimage's default)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def upsample_blur_matrix(in_size: int, out_size: int, sigma: float) -> torch.Tensor:
    """(out_size, in_size) matrix A with A @ v == blur(upsample(v)) for a 1-D signal v.

    Bilinear upsampling (align_corners=False) and a Gaussian blur with reflect padding are both
    linear and separable, so for a grid map G the pixel map is exactly ``A @ G @ A.T``: two small
    matmuls instead of a 256x256 interpolation plus two 33-tap convolutions (7 ms -> <1 ms)."""
    basis = torch.eye(in_size, dtype=torch.float64).view(in_size, 1, in_size)
    up = F.interpolate(basis, size=out_size, mode="linear", align_corners=False)
    if sigma > 0:
        k = gaussian_kernel1d(sigma).double()
        r = (len(k) - 1) // 2
        if r >= out_size:
            raise ModelError(f"blur sigma {sigma} is too large for a {out_size}px map")
        up = F.conv1d(F.pad(up, (r, r), mode="reflect"), k.view(1, 1, -1))
    return up[:, 0, :].T.contiguous().float()


def reference_upsample_blur(grid_map: torch.Tensor, out_size: int, sigma: float) -> torch.Tensor:
    """The textbook version (interpolate, then separable conv with reflect padding); tests use it
    to prove the matrix form equal."""
    m = F.interpolate(grid_map, size=(out_size, out_size), mode="bilinear", align_corners=False)
    if sigma > 0:
        k = gaussian_kernel1d(sigma)
        r = (len(k) - 1) // 2
        m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        m = F.conv2d(F.pad(m, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return m[:, 0]


class MapHead(nn.Module):
    """Grid map (N,1,h,w) -> pixel map (N,H,W) (bilinear up + Gaussian blur) and score = max."""

    def __init__(self, out_size: int, sigma: float = 4.0, grid: tuple[int, int] | None = None):
        super().__init__()
        self.out_size = int(out_size)
        self.sigma = float(sigma)
        if grid is None:
            raise ValueError("MapHead needs the grid size")
        self.register_buffer("ay", upsample_blur_matrix(grid[0], self.out_size, self.sigma), persistent=False)
        self.register_buffer("axt", upsample_blur_matrix(grid[1], self.out_size, self.sigma).T.contiguous(),
                             persistent=False)

    def forward(self, grid_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.matmul(torch.matmul(self.ay, grid_map[:, 0]), self.axt)
        scores = maps.flatten(1).amax(dim=1)
        return maps, scores


def align_to_grid(feats: Sequence[torch.Tensor], strides: Sequence[int], grid_stride: int,
                  grid: tuple[int, int], mode: str = "bilinear") -> list[torch.Tensor]:
    """Bring maps of different strides onto one (h, w) grid: finer ones are average-pooled
    (keeps their information), coarser ones interpolated."""
    out = []
    for f, s in zip(feats, strides):
        if s < grid_stride:
            k = grid_stride // s
            f = F.avg_pool2d(f, kernel_size=k, stride=k)
        elif s > grid_stride:
            if mode == "nearest":
                f = F.interpolate(f, size=grid, mode="nearest")
            else:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        out.append(f)
    return out


@lru_cache(maxsize=16)
def _shared_backbone(name: str, weights_path: str | None, layers: tuple[str, ...], input_size: int) -> Backbone:
    # channels_last: torch's CPU depthwise convs are ~25x faster in NHWC (154 ms -> 5.5 ms at 256px)
    return build_backbone(name, weights_path, layers, input_size).to(memory_format=torch.channels_last)


def shared_backbone(name: str, weights_path: str | None, layers: Sequence[str], input_size: int,
                    weights_sha256: str | None = None) -> Backbone:
    """Frozen backbones are stateless at inference: every product served by one process shares
    one instance per (name, weights, layers, size) -- 20 products cost one backbone of memory."""
    if weights_path and weights_sha256:
        actual = file_sha256(weights_path)
        if actual != weights_sha256:
            raise ModelError(f"{weights_path}: backbone weights changed since the model was fitted "
                             f"(sha256 {actual[:12]}..., expected {weights_sha256[:12]}...)")
    return _shared_backbone(name, str(weights_path) if weights_path else None, tuple(layers), int(input_size))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads. Many small ops (batched 64x64 linear algebra, the
    flow's training steps) gain nothing from a second thread on a quiet machine and lose a lot
    on a shared one, where OpenMP barriers wait for a descheduled thread."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def check_images(images: np.ndarray, input_size: int, what: str = "images") -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        raise ModelError(f"{what}: expected uint8 array (N, H, W, 3), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if images.shape[1:3] != (input_size, input_size):
        raise ModelError(f"{what}: images are {images.shape[1]}x{images.shape[2]}, the model expects "
                         f"{input_size}x{input_size} (resize before fit)")
    if images.dtype != np.uint8:
        raise ModelError(f"{what}: expected dtype uint8, got {images.dtype}")
    return images


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def weights_path_or_none(options: dict) -> str | None:
    p = options.get("backbone_weights")
    return str(Path(p)) if p else None


def grid_size(input_size: int, grid_stride: int) -> tuple[int, int]:
    g = math.ceil(input_size / grid_stride)
    return g, g
