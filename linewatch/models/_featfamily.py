"""What PatchCore, the feature autoencoder and the attribution classifier share: options with a
checked backbone, and the multi-scale feature grid they all start from.

The grid is PaDiM's (``padim.PaDiMFeatures``: ImageNet normalisation, the shared frozen
backbone, finer taps average-pooled and coarser ones upsampled onto one stride) with every
channel kept, so the four patch-based families see the same features and differ only in how
they model them.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from linewatch.models._common import check_images, grid_size, shared_backbone, to_tensor, weights_path_or_none
from linewatch.models.base import AnomalyModel, ModelError
from linewatch.models.padim import PaDiMFeatures

COMMON_DEFAULTS: dict[str, Any] = {
    "layers": ["block2", "block4", "block10"],
    "grid_stride": 8,
    "sigma": 4.0,
    "seed": 0,
    "backbone_weights": None,
    "backbone_sha256": None,
}


class FeatureFamily(AnomalyModel):
    """Base for families built on the full multi-scale feature grid."""

    DEFAULTS: ClassVar[dict[str, Any]] = COMMON_DEFAULTS

    def __init__(self, input_size: int = 256, backbone: str = "efficientnet_lite0", **options: Any):
        unknown = set(options) - set(self.DEFAULTS)
        if unknown:
            raise ModelError(f"{self.kind}: unknown option(s) {sorted(unknown)} (known: {sorted(self.DEFAULTS)})")
        opts = {**self.DEFAULTS, **options}
        opts["layers"] = list(opts["layers"])
        super().__init__(input_size, backbone, **opts)
        if opts["backbone_weights"] and not opts["backbone_sha256"]:
            from linewatch.backbones import file_sha256

            try:
                self.options["backbone_sha256"] = file_sha256(opts["backbone_weights"])
            except OSError as exc:
                raise ModelError(f"{opts['backbone_weights']}: cannot read backbone weights ({exc.strerror})") from None
        if int(opts["grid_stride"]) not in (4, 8, 16):
            raise ModelError(f"{self.kind}: grid_stride must be 4, 8 or 16, got {opts['grid_stride']!r}")
        self.fit_info: dict[str, Any] = {}
        self._module: nn.Module | None = None

    # -- features ---------------------------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        o = self.options
        return shared_backbone(self.backbone_name, weights_path_or_none(o), o["layers"], self.input_size,
                               o.get("backbone_sha256"))

    @property
    def grid(self) -> tuple[int, int]:
        return grid_size(self.input_size, int(self.options["grid_stride"]))

    @property
    def feature_dim(self) -> int:
        return int(sum(self._backbone().channels))

    def _features(self) -> PaDiMFeatures:
        bb = self._backbone()
        every = [torch.arange(c) for c in bb.channels]
        return PaDiMFeatures(bb, every, int(self.options["grid_stride"]), self.grid, "bilinear").eval()

    @torch.inference_mode()
    def extract(self, images: np.ndarray, progress: bool = False, batch_size: int = 16,
                what: str = "features") -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, D, h, w) float32 feature grid."""
        images = check_images(images, self.input_size, f"{self.kind} {what}")
        feats = self._features()
        out = [feats(to_tensor(images[i : i + batch_size]))
               for i in tqdm(range(0, len(images), batch_size), desc=f"{self.kind} {what}", unit="batch",
                             disable=not progress, leave=False)]
        return torch.cat(out).float() if out else torch.zeros(0, self.feature_dim, *self.grid)

    def _check_fit_input(self, images: np.ndarray, minimum: int = 2) -> np.ndarray:
        images = check_images(images, self.input_size, f"{self.kind} fit")
        if len(images) < minimum:
            raise ModelError(f"{self.kind} fit: need at least {minimum} normal images, got {len(images)}")
        return images

    @staticmethod
    def _clock() -> float:
        return time.perf_counter()

    # -- inference ---------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not self.is_fitted():
            raise ModelError(f"{self.kind}: model is not fitted")

    def is_fitted(self) -> bool:  # overridden
        return False

    def inference_module(self) -> nn.Module:
        self._require_fitted()
        if self._module is None:
            self._module = self._build_module().eval()
        return self._module

    def _build_module(self) -> nn.Module:  # overridden
        raise NotImplementedError

    @staticmethod
    def _check_shapes(kind: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
        missing = set(expected) - set(tensors)
        if missing:
            raise ModelError(f"{kind}: weights lack {sorted(missing)}")
        for name, shape in expected.items():
            got = tuple(tensors[name].shape)
            if len(got) != len(shape) or any(e >= 0 and g != e for g, e in zip(got, shape)):
                raise ModelError(f"{kind}: weights {name} has shape {got}, the config needs {shape}")
