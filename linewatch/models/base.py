"""The one interface every anomaly-model family implements.

Calibration, the registry, the workers and the engines only talk to this, so a new family
(PatchCore, reconstruction, attribution) slots in by subclassing and registering.

Conventions (fixed, relied on everywhere):
- images in: ``uint8`` RGB, shape (N, H, W, 3), already at ``input_size`` x ``input_size``;
- maps out: ``float32`` (N, H, W) at the same size, higher = more anomalous;
- image score: the max of the (blurred) map, so one threshold family covers both;
- ``inference_module()`` is an ``nn.Module`` taking a float32 tensor (N, 3, H, W) with values
  0..255 (RGB) and returning ``(maps (N, H, W), scores (N,))``: normalisation, backbone,
  scoring, upsampling and blur all inside, so it exports to ONNX as one graph.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file

from linewatch.errors import ModelError  # noqa: F401  (the families raise it from here)
from linewatch.models.registry import CONFIG_FILE, WEIGHTS_FILE


class AnomalyModel(ABC):
    kind: ClassVar[str]

    def __init__(self, input_size: int = 256, backbone: str = "efficientnet_lite0", **options: Any):
        self.input_size = int(input_size)
        self.backbone_name = backbone
        self.options = dict(options)

    # -- training -----------------------------------------------------------------------------
    @abstractmethod
    def fit(self, images: np.ndarray, progress: bool = True) -> "AnomalyModel":
        """Learn the normal appearance from defect-free images only."""

    # -- inference ----------------------------------------------------------------------------
    @abstractmethod
    def inference_module(self) -> torch.nn.Module:
        """The whole inference graph (see module docstring)."""

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Maps (N, H, W) and image scores (N,) for uint8 RGB images (N, H, W, 3)."""
        module = self.inference_module().eval()
        maps, scores = [], []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2).float()
            m, s = module(x)
            maps.append(m.numpy())
            scores.append(s.numpy())
        if not maps:
            return np.zeros((0, self.input_size, self.input_size), np.float32), np.zeros((0,), np.float32)
        return np.concatenate(maps).astype(np.float32), np.concatenate(scores).astype(np.float32)

    def anomaly_map(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        return self.predict(images, batch_size)[0]

    # -- persistence (safetensors + JSON, never pickle) ----------------------------------------
    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything learned by fit(), as named tensors."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_size": self.input_size, "backbone": self.backbone_name,
                "options": self.options}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_tensors().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2))
