"""Attribution-map family: an image-level classifier, normal vs synthetic anomaly, whose
Grad-CAM localises the defect.

Why this representative:
- The family's defining trait is that localisation is *explained* from an image-level
  decision by a gradient-based attribution. With defect-free training data only, the
  decision "normal vs anomalous" has to be learnt against synthetic anomalies; CutPaste
  (Li et al. 2021: a patch of the same image cut out, jittered and pasted elsewhere, plus a
  thin "scar" variant) is the standard self-supervised choice and needs no outside data --
  nothing downloads, nothing but the product's own normal images is used.
- Training a CNN end to end on CutPaste takes hours; here the classifier is a small head on
  the shared frozen backbone's feature grid (standardised per channel), trained in seconds on
  features extracted once for the normal images and their CutPaste copies.
- The attribution is Grad-CAM of the image logit with respect to the head's hidden layer. The
  head is 3x3 conv -> ReLU -> 1x1 conv (patch logits) -> spatial mean (the image logit), so
  Grad-CAM's channel weights are the constant ``w2 / P`` and the map has a closed form,
  ``ReLU(patch logit - b2)`` (times P): the exported ONNX graph computes it with no autograd,
  and ``gradcam_autograd`` (the textbook version through ``torch.autograd``) is kept to prove
  the two equal. Unlike the usual per-image min-max normalised Grad-CAM, this map keeps one
  scale across images, so a single pixel threshold means the same thing on every frame.
- Training signal: the image label (BCE on the mean-pooled logit), plus an auxiliary patch
  loss from the pasted region's mask, which is known for free and makes a few hundred steps
  enough on a CPU. The known weakness of the family: it detects what looks like the synthetic
  anomalies; real defects unlike a pasted patch (a faint stain, a uniform dent) score lower.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from linewatch.models._common import MapHead, check_images, float32_scoring, to_tensor
from linewatch.models._featfamily import COMMON_DEFAULTS, FeatureFamily
from linewatch.models.base import ModelError
from linewatch.models.padim import PaDiMFeatures

DEFAULTS: dict[str, Any] = {
    **COMMON_DEFAULTS,
    "hidden": 64,
    "steps": 300,
    "batch_size": 16,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "aug_per_image": 2,
    "patch_loss": 1.0,
}


# ---------------------------------------------------------------------------------------------
# CutPaste synthetic anomalies
# ---------------------------------------------------------------------------------------------
def cutpaste(image: np.ndarray, rng: np.random.Generator, scar: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A CutPaste copy of ``image`` (uint8 HxWx3) and its bool mask of changed pixels.

    Normal variant: a rectangle of 2-15 % of the area, aspect 0.3-3.3; scar: 2-16 px wide and
    10-25 % of the side long, rotated by any angle. The patch gets a colour jitter and is pasted
    at a random other place.
    """
    h, w = image.shape[:2]
    if scar:
        pw = int(rng.integers(2, max(3, int(16 * w / 256)) + 1))
        ph = int(rng.integers(max(4, int(0.10 * h)), max(5, int(0.25 * h)) + 1))
    else:
        area = rng.uniform(0.02, 0.15) * h * w
        aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(3.3))))
        pw = int(np.clip(round(np.sqrt(area * aspect)), 4, w - 2))
        ph = int(np.clip(round(np.sqrt(area / aspect)), 4, h - 2))
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch = image[y0 : y0 + ph, x0 : x0 + pw].astype(np.float32)
    gain = rng.uniform(0.75, 1.25, size=3).astype(np.float32)
    bias = rng.uniform(-25, 25, size=3).astype(np.float32)
    patch = np.clip(patch * gain + bias, 0, 255)
    # paste through a (possibly rotated) placement mask
    cy, cx = rng.uniform(ph / 2, h - ph / 2), rng.uniform(pw / 2, w - pw / 2)
    angle = float(rng.uniform(0, 360)) if scar else float(rng.choice([0.0, 90.0, 180.0, 270.0]))
    m = cv2.getRotationMatrix2D((pw / 2, ph / 2), angle, 1.0)
    m[:, 2] += (cx - pw / 2, cy - ph / 2)
    canvas = cv2.warpAffine(patch, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    mask = cv2.warpAffine(np.ones((ph, pw), np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT)
    out = image.astype(np.float32) * (1 - mask[..., None]) + canvas * mask[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask > 0.5


# ---------------------------------------------------------------------------------------------
# the classifier and its attribution graph
# ---------------------------------------------------------------------------------------------
class PatchHead(nn.Module):
    """Standardised features (N,D,h,w) -> hidden activations -> patch logits (N,1,h,w)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 1, 1)

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv1(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.hidden(z))

    def image_logit(self, z: torch.Tensor) -> torch.Tensor:
        return self(z).mean(dim=(1, 2, 3))


class AttributionModule(nn.Module):
    """(N,3,H,W) 0..255 -> (Grad-CAM maps, scores), Grad-CAM in its closed form (see module doc)."""

    def __init__(self, features: PaDiMFeatures, mean: torch.Tensor, std: torch.Tensor, head: PatchHead,
                 map_head: MapHead):
        super().__init__()
        self.features = features
        self.head = head
        self.map_head = map_head
        self.register_buffer("mean", mean.view(1, -1, 1, 1).float())
        self.register_buffer("inv_std", (1.0 / std).view(1, -1, 1, 1).float())

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (self.features(x) - self.mean) * self.inv_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x).float()
        with float32_scoring(f):
            a = self.head.hidden((f - self.mean) * self.inv_std)
            # Grad-CAM weights alpha_k = mean_p d(image logit)/dA_kp = w2_k / P; map = ReLU(sum_k alpha_k A_k) * P
            w2 = self.head.conv2.weight.view(1, -1, 1, 1)
            cam = F.relu((a * w2).sum(dim=1, keepdim=True))
            return self.map_head(cam)


class AttributionClassifier(FeatureFamily):
    kind = "attribution"
    DEFAULTS = DEFAULTS

    def __init__(self, input_size: int = 256, backbone: str = "efficientnet_lite0", **options: Any):
        super().__init__(input_size, backbone, **options)
        o = self.options
        for key in ("hidden", "steps", "batch_size", "aug_per_image"):
            if int(o[key]) < 1:
                raise ModelError(f"attribution: {key} must be >= 1, got {o[key]!r}")
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.head: PatchHead | None = None

    def is_fitted(self) -> bool:
        return self.head is not None and self.mean is not None

    def _new_head(self) -> PatchHead:
        return PatchHead(self.feature_dim, int(self.options["hidden"]))

    def synthetic_anomalies(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``aug_per_image`` CutPaste copies per image (alternating patch / scar) and their masks."""
        rng = np.random.default_rng(int(self.options["seed"]))
        out, masks = [], []
        for k in range(int(self.options["aug_per_image"])):
            for img in images:
                a, m = cutpaste(img, rng, scar=bool(k % 2))
                out.append(a)
                masks.append(m)
        return np.stack(out), np.stack(masks)

    def fit(self, images: np.ndarray, progress: bool = True, batch_size: int = 16) -> "AttributionClassifier":
        images = self._check_fit_input(images, 2)
        o = self.options
        t0 = self._clock()
        anomalies, masks = self.synthetic_anomalies(images)
        normal = self.extract(images, progress, batch_size, "features")
        abnormal = self.extract(anomalies, progress, batch_size, "cutpaste features")
        t_feat = self._clock() - t0
        mean = normal.mean(dim=(0, 2, 3))
        std = normal.std(dim=(0, 2, 3)).clamp_min(1e-3)
        z = (torch.cat([normal, abnormal]) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(abnormal))])
        # patch targets: fraction of each grid cell covered by the paste; ambiguous cells ignored
        h, w = self.grid
        frac = np.stack([cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA) for m in masks])
        frac = torch.cat([torch.zeros(len(normal), h, w), torch.from_numpy(frac)]).unsqueeze(1)
        patch_target = (frac >= 0.3).float()
        patch_weight = ((frac >= 0.3) | (frac == 0)).float()

        torch.manual_seed(int(o["seed"]))
        gen = torch.Generator().manual_seed(int(o["seed"]))
        head = self._new_head()
        opt = torch.optim.AdamW(head.parameters(), lr=float(o["lr"]), weight_decay=float(o["weight_decay"]))
        steps, bs = int(o["steps"]), min(int(o["batch_size"]), len(z))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        pos = float(patch_target.sum())
        pos_weight = torch.tensor(float(patch_weight.sum() - pos) / max(pos, 1.0)).clamp(1.0, 50.0)
        head.train()
        loss_first = loss_last = 0.0
        for step in tqdm(range(steps), desc="attribution training", unit="step", disable=not progress, leave=False):
            idx = torch.randint(len(z), (bs,), generator=gen)
            patch_logits = head(z[idx])
            img_loss = F.binary_cross_entropy_with_logits(patch_logits.mean(dim=(1, 2, 3)), labels[idx])
            patch_loss = F.binary_cross_entropy_with_logits(patch_logits, patch_target[idx], weight=patch_weight[idx],
                                                            pos_weight=pos_weight)
            loss = img_loss + float(o["patch_loss"]) * patch_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step == 0:
                loss_first = float(loss.detach())
            loss_last = float(loss.detach())
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            acc = float(((head.image_logit(z) > 0).float() == labels).float().mean())
        self.mean, self.std, self.head = mean, std, head
        self._module = None
        self.fit_info = {"n_images": int(len(images)), "synthetic": int(len(anomalies)), "steps": steps,
                         "loss_first": round(loss_first, 4), "loss_last": round(loss_last, 4),
                         "train_accuracy": round(acc, 4), "feature_s": round(t_feat, 3),
                         "fit_s": round(self._clock() - t0, 3)}
        return self

    def _build_module(self) -> AttributionModule:
        head = MapHead(self.input_size, float(self.options["sigma"]), self.grid)
        return AttributionModule(self._features(), self.mean, self.std, self.head, head)

    def image_logits(self, images: np.ndarray) -> np.ndarray:
        """The classifier's own decision (mean-pooled patch logits), > 0 = anomalous."""
        module = self.inference_module()
        x = to_tensor(check_images(images, self.input_size))
        with torch.no_grad():
            return self.head.image_logit(module.standardise(x)).numpy()

    def gradcam_autograd(self, images: np.ndarray) -> np.ndarray:
        """Textbook Grad-CAM on the grid, via torch.autograd: alpha_k = mean_p dy/dA_kp,
        map = ReLU(sum_k alpha_k A_k), scaled by P (the number of grid positions)."""
        module = self.inference_module()
        x = to_tensor(check_images(images, self.input_size))
        with torch.no_grad():
            z = module.standardise(x)
        with torch.enable_grad():
            a = self.head.hidden(z).detach().requires_grad_(True)
            y = self.head.conv2(a).mean(dim=(1, 2, 3))
            (grad,) = torch.autograd.grad(y.sum(), a)
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        p = a.shape[2] * a.shape[3]
        return (F.relu((alpha * a).sum(dim=1)) * p).detach().numpy()

    # -- persistence ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._require_fitted()
        out = {"feat_mean": self.mean, "feat_std": self.std}
        out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        head = self._new_head()
        expected = {"feat_mean": (self.feature_dim,), "feat_std": (self.feature_dim,)}
        expected.update({f"head.{k}": tuple(v.shape) for k, v in head.state_dict().items()})
        self._check_shapes(self.kind, tensors, expected)
        head.load_state_dict({k[5:]: tensors[k].float() for k in expected if k.startswith("head.")})
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        self.mean, self.std, self.head = tensors["feat_mean"].float(), tensors["feat_std"].float(), head
        self._module = None
