"""The trivial baseline: |image - mean normal image|, averaged over RGB, Gaussian-blurred.

It exists to keep the synthetic line honest: if this scores like PaDiM, the data is too easy
(defects are just "pixels that differ from the average frame"). It has the full
AnomalyModel interface, so it can be calibrated, evaluated, published and served like any
family; its inference graph is three ops and exports to ONNX.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from linewatch.models.base import AnomalyModel, ModelError

DEFAULTS: dict[str, Any] = {"sigma": 4.0}


def _gaussian(sigma: float) -> torch.Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))  # scipy.ndimage's truncation
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


class MeanDiffModule(nn.Module):
    """(N,3,H,W) 0..255 -> blurred mean-abs-difference map (N,H,W) and score = max."""

    def __init__(self, mean: torch.Tensor, sigma: float):
        super().__init__()
        self.register_buffer("mean", mean.view(1, 3, *mean.shape[-2:]).float(), persistent=False)
        k = _gaussian(sigma) if sigma > 0 else torch.ones(1)
        self.r = (len(k) - 1) // 2
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = (x - self.mean).abs().mean(dim=1, keepdim=True) / 255.0
        if self.r:
            m = F.conv2d(F.pad(m, (self.r, self.r, 0, 0), mode="reflect"), self.kx)
            m = F.conv2d(F.pad(m, (0, 0, self.r, self.r), mode="reflect"), self.ky)
        maps = m[:, 0]
        return maps, maps.flatten(1).amax(dim=1)


class MeanDiff(AnomalyModel):
    kind = "meandiff"

    def __init__(self, input_size: int = 256, backbone: str = "none", **options: Any):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ModelError(f"meandiff: unknown option(s) {sorted(unknown)} (known: {sorted(DEFAULTS)})")
        super().__init__(input_size, backbone, **{**DEFAULTS, **options})
        self.mean: torch.Tensor | None = None  # (3, H, W) in 0..255
        self._module: MeanDiffModule | None = None

    def fit(self, images: np.ndarray, progress: bool = True, batch_size: int = 64) -> "MeanDiff":
        if (not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8
                or images.shape[1:] != (self.input_size, self.input_size, 3)):
            raise ModelError(f"meandiff fit: expected uint8 images (N, {self.input_size}, {self.input_size}, 3), "
                             f"got {getattr(images, 'dtype', '?')} {getattr(images, 'shape', '?')}")
        if len(images) < 1:
            raise ModelError("meandiff fit: need at least 1 normal image")
        total = np.zeros(images.shape[1:], np.float64)
        for i in tqdm(range(0, len(images), batch_size), desc="meandiff mean", unit="batch",
                      disable=not progress, leave=False):
            total += images[i : i + batch_size].sum(0, dtype=np.float64)
        self.mean = torch.from_numpy((total / len(images)).astype(np.float32)).permute(2, 0, 1).contiguous()
        self._module = None
        return self

    def inference_module(self) -> nn.Module:
        if self.mean is None:
            raise ModelError("meandiff: model is not fitted")
        if self._module is None:
            self._module = MeanDiffModule(self.mean, float(self.options["sigma"])).eval()
        return self._module

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            raise ModelError("meandiff: model is not fitted")
        return {"mean": self.mean}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        mean = tensors.get("mean")
        want = (3, self.input_size, self.input_size)
        if mean is None or tuple(mean.shape) != want:
            got = None if mean is None else tuple(mean.shape)
            raise ModelError(f"meandiff: weights hold mean {got}, expected {want} (not a meandiff model of this size)")
        self.mean = mean.float()
        self._module = None
