"""Reconstruction family: a small convolutional autoencoder on pretrained backbone features
(the DFR / "feature reconstruction" idea); the anomaly map is the reconstruction error.

Why this representative, and not a pixel autoencoder or DRAEM:
- A pixel autoencoder on 256x256 images reconstructs blurry images; its error is largest on
  every sharp normal edge and texture (knurling, brick joints, turf), so it localises the
  texture, not the defect -- the family's known weakness on close-up textures.
- DRAEM (a reconstructive plus a discriminative U-Net trained on synthetic anomalies) is the
  strongest reconstruction method, but it needs hundreds of epochs of full-resolution U-Net
  training: hours on a GPU, days on the project's 2-core CPUs, for every new product.
- Reconstructing the *features* of the same frozen backbone the other families use keeps
  what makes the family a family (learn to rebuild normal appearance, score what cannot be
  rebuilt) while training in seconds on cached features: the features are extracted once,
  then only a ~0.1 M-parameter network is trained. Normal features lie on a low-dimensional
  manifold the bottleneck can span; defect features do not, and come back wrong.

Details: features are standardised per channel (mean/std of the training grid), the encoder is
1x1 conv -> 3x3 conv into a narrow ``bottleneck``, the decoder mirrors it; training is denoising
(Gaussian noise on the input, clean target) with Adam, so the network cannot learn the
identity. Map: mean squared error over channels per grid position -> upsample + blur (sigma 4)
-> image score = max. The whole graph (normalisation, backbone, autoencoder, error, head) is
plain convolutions and exports to ONNX.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from linewatch.models._common import MapHead, float32_scoring
from linewatch.models._featfamily import COMMON_DEFAULTS, FeatureFamily
from linewatch.models.base import ModelError
from linewatch.models.padim import PaDiMFeatures

DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "hidden": 128,
    "bottleneck": 24,
    "epochs": 40,
    "batch_size": 8,
    "lr": 2e-3,
    "noise": 0.5,
}


class FeatureAE(nn.Module):
    def __init__(self, dim: int, hidden: int, bottleneck: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.ReLU(),
                                     nn.Conv2d(hidden, bottleneck, 3, padding=1), nn.ReLU())
        self.decoder = nn.Sequential(nn.Conv2d(bottleneck, hidden, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(hidden, dim, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(z))


class ReconstructionModule(nn.Module):
    """(N,3,H,W) 0..255 -> (maps, scores): standardise features, reconstruct, squared error."""

    def __init__(self, features: PaDiMFeatures, mean: torch.Tensor, std: torch.Tensor, ae: FeatureAE,
                 head: MapHead):
        super().__init__()
        self.features = features
        self.ae = ae
        self.head = head
        self.register_buffer("mean", mean.view(1, -1, 1, 1).float())
        self.register_buffer("inv_std", (1.0 / std).view(1, -1, 1, 1).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x).float()
        with float32_scoring(f):
            z = (f - self.mean) * self.inv_std
            err = (self.ae(z) - z).pow(2).mean(dim=1, keepdim=True)
            return self.head(err)


class FeatureAutoencoder(FeatureFamily):
    kind = "reconstruction"
    DEFAULTS = DEFAULTS

    def __init__(self, input_size: int = 256, backbone: str = "efficientnet_lite0", **options: Any):
        super().__init__(input_size, backbone, **options)
        o = self.options
        for key in ("hidden", "bottleneck", "epochs", "batch_size"):
            if int(o[key]) < 1:
                raise ModelError(f"reconstruction: {key} must be >= 1, got {o[key]!r}")
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.ae: FeatureAE | None = None

    def is_fitted(self) -> bool:
        return self.ae is not None and self.mean is not None

    def _new_ae(self) -> FeatureAE:
        return FeatureAE(self.feature_dim, int(self.options["hidden"]), int(self.options["bottleneck"]))

    def fit(self, images: np.ndarray, progress: bool = True, batch_size: int = 16) -> "FeatureAutoencoder":
        images = self._check_fit_input(images, 2)
        o = self.options
        t0 = self._clock()
        feats = self.extract(images, progress, batch_size, "features")  # (N, D, h, w)
        t_feat = self._clock() - t0
        mean = feats.mean(dim=(0, 2, 3))
        std = feats.std(dim=(0, 2, 3)).clamp_min(1e-3)
        z = (feats - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

        gen = torch.Generator().manual_seed(int(o["seed"]))
        torch.manual_seed(int(o["seed"]))  # parameter init
        ae = self._new_ae()
        opt = torch.optim.Adam(ae.parameters(), lr=float(o["lr"]))
        epochs, bs = int(o["epochs"]), min(int(o["batch_size"]), len(z))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        losses = []
        ae.train()
        for _ in tqdm(range(epochs), desc="reconstruction training", unit="epoch", disable=not progress, leave=False):
            order = torch.randperm(len(z), generator=gen)
            total = 0.0
            for s in range(0, len(z), bs):
                batch = z[order[s : s + bs]]
                noisy = batch + float(o["noise"]) * torch.randn(batch.shape, generator=gen)
                loss = (ae(noisy) - batch).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(batch)
            sched.step()
            losses.append(total / len(z))
        ae.eval()
        for p in ae.parameters():
            p.requires_grad_(False)
        self.mean, self.std, self.ae = mean, std, ae
        self._module = None
        self.fit_info = {"n_images": int(len(images)), "dim": int(z.shape[1]), "epochs": epochs,
                         "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                         "feature_s": round(t_feat, 3), "fit_s": round(self._clock() - t0, 3)}
        return self

    def _build_module(self) -> ReconstructionModule:
        head = MapHead(self.input_size, float(self.options["sigma"]), self.grid)
        return ReconstructionModule(self._features(), self.mean, self.std, self.ae, head)

    # -- persistence ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._require_fitted()
        out = {"feat_mean": self.mean, "feat_std": self.std}
        out.update({f"ae.{k}": v for k, v in self.ae.state_dict().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        ae = self._new_ae()
        expected = {"feat_mean": (self.feature_dim,), "feat_std": (self.feature_dim,)}
        expected.update({f"ae.{k}": tuple(v.shape) for k, v in ae.state_dict().items()})
        self._check_shapes(self.kind, tensors, expected)
        ae.load_state_dict({k[3:]: tensors[k].float() for k in expected if k.startswith("ae.")})
        ae.eval()
        for p in ae.parameters():
            p.requires_grad_(False)
        self.mean, self.std, self.ae = tensors["feat_mean"].float(), tensors["feat_std"].float(), ae
        self._module = None
