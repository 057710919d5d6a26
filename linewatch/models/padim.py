"""PaDiM (patch distribution modelling), built to be small and fast.

Per patch position of a feature grid: a Gaussian over a fixed random subset of ``d``
multi-scale backbone channels, with Ledoit-Wolf shrinkage covariance (closed form, vectorised
over all positions at once). Scoring is the Mahalanobis distance, computed as one batched
matmul with the Cholesky factor ``L`` of each position's precision matrix
(``(x-mu)^T S^-1 (x-mu) = |(x-mu) L|^2``), then bilinear upsampling to the input size, a
separable Gaussian blur (sigma 4) and image score = max.

Where the cost goes and how it is kept down (anomalib stores 165 MB per product):
- the backbone stops at the deepest tap used;
- ``d`` and the grid are modest: L is P x d x d (P = grid positions), stored as float16 in the
  profile (the ONNX graph carries float16 too, cast once at session start);
- the random channel choice is applied per tap before alignment, so only kept channels are
  pooled/upsampled;
- upsampling + blur is one exact matrix product (see ``_common.upsample_blur_matrix``).

Defaults (EfficientNet-Lite0 blocks 2/4/7/10 on the stride-4 grid with a fixed share of
channels per tap -- 16/24/24/40, d = 104 -- float16 factors; ``PADIM_TAPS``) give a 46 MB
profile at 256 px (d = 64 over blocks 2/4/10, the earlier default: 18 MB). Measured on the
synthetic line (100-120 normal images): the share of fine channels is the strongest map-side
IoU lever (cap 0.63 -> 0.66, turf 0.46 -> 0.52 with the calibrated mask step), sigma 4 -> 2
the next (+0.01..0.06); sigma 1, input 384/512 (4x the cost at 512), k x k neighbourhood
statistics and a shared Gaussian moved IoU by less than 0.03 or cost AUROC.
``sigma`` is 2 (4, the usual PaDiM setting, over-spreads small defects).

A texture term (``TextureTerm``, off by default, its statistics always fitted) multiplies in a
stationary stride-4 score for close-up textures; the calibration switches it on per product
when validation IoU says so (turf 0.52 -> 0.63, cap 0.655 -> 0.662; pcb and brick keep it off).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from linewatch.models._common import (MapHead, Preprocess, align_to_grid, check_images, float32_scoring,
                                      grid_size, shared_backbone, to_tensor, torch_threads,
                                      weights_path_or_none)
from linewatch.models.base import AnomalyModel, ModelError

DEFAULTS: dict[str, Any] = {
    "layers": None,  # default: the backbone's (EfficientNet-Lite0: block2, block4, block10)
    "d": 64,
    "tap_d": None,  # channels drawn from each tap (list, one per layer); None: d drawn from all taps together
    "grid_stride": 4,
    "upsample": "bilinear",
    "sigma": 2.0,  # sigma 4 (anomalib) over-spreads small defects: IoU +0.01..0.06 at sigma 1-2, AUROC >= 0.976
    "seed": 0,
    "neighborhood": 1,  # k: each position's Gaussian is fitted on its k x k neighbourhood
    "shared": False,  # one Gaussian for all positions (close-up textures whose pattern shifts)
    "storage": "float16",  # dtype of the Cholesky factors on disk and in the ONNX graph
    # texture term: exponent w of a second, stationary score multiplied into the map,
    # map * (t / t_normal)^w, where t is the Mahalanobis distance of the finest tap's full
    # channels to ONE Gaussian shared by every position. Fitted always (a few KB); 0 = off. The
    # calibration chooses w on the validation images (calibration.mask_step.choose_variant).
    "texture_weight": 0.0,
    "texture_sigma": 1.0,  # blur (input pixels) of the texture map after upsampling
    "backbone_weights": None,
    "backbone_sha256": None,
}


# PaDiM's own default taps and channel shares per backbone (other families keep the backbone's
# DEFAULT_LAYERS). Measured on the synthetic line (seed 1, IoU-curve threshold, calibrated mask
# step; docs/calibration.md): EfficientNet-Lite0 block2/4/10 with d = 64 random channels
# (about 9 of block2's 24) gave mean IoU 0.628 / 0.596 / 0.515 / 0.456 on cap / pcb / brick /
# turf; these four taps with a fixed share -- 16 of block2, 24 of block4, 24 of block7, 40 of
# block10 -- give 0.655 / 0.573 / 0.527 / 0.521 at pixel AUROC >= 0.971 everywhere. More
# fine channels (all of block2) sharpen the maps further (cap 0.68) but drop brick's AUROC to
# 0.93-0.96: the coarse taps carry what tells a brick pattern from a broken one.
TEXTURE_SAMPLES = 200_000  # finest-tap pixels drawn from the normal images for the shared Gaussian
TEXTURE_WEIGHTS = (0.0, 0.3, 0.5)  # the calibration's candidates for texture_weight (0 first: the default)

PADIM_TAPS: dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]] = {
    "efficientnet_lite0": (("block2", "block4", "block7", "block10"), (16, 24, 24, 40)),
}


class PaDiMFeatures(nn.Module):
    """uint8-range image -> (N, d, h, w) PaDiM embedding."""

    def __init__(self, backbone: nn.Module, channel_idx: list[torch.Tensor], grid_stride: int,
                 grid: tuple[int, int], upsample: str):
        super().__init__()
        self.pre = Preprocess()
        self.backbone = backbone
        self.grid_stride = grid_stride
        self.grid = grid
        self.upsample = upsample
        self.strides = list(backbone.strides)
        self.keep = [len(i) > 0 for i in channel_idx]
        for j, idx in enumerate(channel_idx):
            self.register_buffer(f"idx{j}", idx.long(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[0]

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(PaDiM embedding (N, d, h, w), every channel of the finest tap (N, C, h_f, w_f))."""
        feats = self.backbone(self.pre(x).contiguous(memory_format=torch.channels_last))
        fine = feats[int(np.argmin(self.strides))]
        sel, strides = [], []
        for j, f in enumerate(feats):
            if self.keep[j]:
                sel.append(torch.index_select(f, 1, getattr(self, f"idx{j}")))
                strides.append(self.strides[j])
        return torch.cat(align_to_grid(sel, strides, self.grid_stride, self.grid, self.upsample), dim=1), fine


class TextureTerm(nn.Module):
    """Finest-tap features -> the stationary texture factor (N, H, W), ``(t / t_normal)^w``.

    Why: PaDiM's per-position Gaussians come from a stride-4..16 grid blurred up to the input,
    so a close-up texture's thin or small defects spread. The finest tap (stride 4) scored
    against ONE Gaussian for all positions -- right for a stationary texture, wrong for an
    object on a backdrop (the calibration then leaves w at 0) -- is sharp; multiplying it in
    keeps PaDiM's detection and takes the texture term's outline. Measured on the synthetic
    turf: mean IoU over categories 0.52 -> 0.63 (docs/calibration.md)."""

    def __init__(self, mean: torch.Tensor, chol: torch.Tensor, ref: float, weight: float, head: MapHead):
        super().__init__()
        self.register_buffer("mean", mean.float().view(1, 1, -1))  # (1, 1, C)
        self.register_buffer("chol", chol.float())  # (C, C)
        self.register_buffer("inv_ref", torch.tensor(1.0 / max(float(ref), 1e-6)))
        self.register_buffer("weight", torch.tensor(float(weight)))
        self.head = head

    def distance(self, fine: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, H, W) distance to the shared Gaussian, upsampled + blurred."""
        n, c, h, w = fine.shape
        y = torch.matmul(fine.float().reshape(n, c, h * w).transpose(1, 2) - self.mean, self.chol)
        grid = y.pow(2).sum(-1).sqrt().reshape(n, 1, h, w)
        return self.head(grid)[0]

    def forward(self, fine: torch.Tensor) -> torch.Tensor:
        return torch.pow(torch.clamp(self.distance(fine) * self.inv_ref, min=1e-3), self.weight)


class PaDiMModule(nn.Module):
    """The whole inference graph: (N,3,H,W) 0..255 -> (maps (N,H,W), scores (N,)).

    ``chol`` is either the full (P, d, d) float32 factor (torch serving), or -- for export --
    the packed lower triangles (P, d(d+1)/2 + 1) in the storage dtype plus a gather index that
    rebuilds the full factor; ONNX Runtime folds that rebuild once at session start, so the file
    holds half the numbers at half the width and serving speed is unchanged.
    """

    def __init__(self, features: PaDiMFeatures, mean: torch.Tensor, chol: torch.Tensor, head: MapHead,
                 packed: bool = False, d: int = 0, texture: TextureTerm | None = None):
        super().__init__()
        self.features = features
        self.head = head
        self.texture = texture
        self.packed = packed
        self.d = d
        # persistent: the ONNX exporter makes them initializers instead of tracing through them
        self.register_buffer("mean", mean.float().unsqueeze(1))  # (P, 1, d)
        self.register_buffer("chol", chol)
        if packed:
            self.register_buffer("unpack", unpack_index(d))

    def full_chol(self) -> torch.Tensor:
        if not self.packed:
            return self.chol
        p = self.chol.shape[0]
        return torch.index_select(self.chol.float(), 1, self.unpack).reshape(p, self.d, self.d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, fine = self.features.embed(x)  # (N, d, h, w), (N, C, h_f, w_f)
        emb = emb.float()
        with float32_scoring(emb):
            maps, scores = self._score(emb)
            if self.texture is None:
                return maps, scores
            maps = maps * self.texture(fine)
            return maps, maps.flatten(1).amax(dim=1)

    def _score(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, d, h, w = emb.shape
        e = emb.reshape(n, d, h * w).permute(2, 0, 1)  # (P, N, d)
        chol = self.full_chol()
        if chol.shape[0] == 1:  # one Gaussian shared by all positions: a single GEMM
            y = torch.matmul((e - self.mean).reshape(-1, d), chol[0]).reshape(h * w, n, d)
        else:
            y = torch.matmul(e - self.mean, chol)  # (P, N, d): one small GEMM per position
        dist = y.pow(2).sum(dim=-1).sqrt()  # (P, N)
        grid_map = dist.permute(1, 0).reshape(n, 1, h, w)
        return self.head(grid_map)


def unpack_index(d: int) -> torch.Tensor:
    """Index into [packed lower triangle..., 0] giving the row-major full (d, d) matrix."""
    rows, cols = torch.tril_indices(d, d)
    full = torch.full((d, d), rows.numel(), dtype=torch.long)
    full[rows, cols] = torch.arange(rows.numel())
    return full.flatten()


def pack_tril(chol: torch.Tensor) -> torch.Tensor:
    d = chol.shape[-1]
    rows, cols = torch.tril_indices(d, d)
    return chol[:, rows, cols]


def unpack_tril(packed: torch.Tensor, d: int) -> torch.Tensor:
    zero = torch.zeros(packed.shape[0], 1, dtype=packed.dtype)
    return torch.cat([packed, zero], 1)[:, unpack_index(d)].reshape(packed.shape[0], d, d)


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ledoit-Wolf shrunk covariance for many groups at once (same formula as
    sklearn.covariance.ledoit_wolf, vectorised). x: (P, N, d) -> (mean (P,d), cov (P,d,d), shrinkage (P,))."""
    p, n, d = x.shape
    mean = x.mean(dim=1)
    xc = x - mean[:, None, :]
    emp = xc.transpose(1, 2) @ xc / n  # (P, d, d)
    trace = torch.diagonal(emp, dim1=1, dim2=2).sum(-1)  # (P,)
    mu = trace / d
    sq = (xc * xc).sum(-1)  # (P, N): |x_n|^2
    beta_ = (sq * sq).sum(-1)  # sum_ij (X2^T X2)_ij
    delta_ = (emp * emp).sum((1, 2))  # |X^T X|_F^2 / n^2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace + d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    shrink = torch.where(delta > 0, beta / delta.clamp_min(1e-30), torch.zeros_like(delta))
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    cov = (1 - shrink)[:, None, None] * emp + (shrink * mu)[:, None, None] * eye
    return mean, cov, shrink


class PaDiM(AnomalyModel):
    kind = "padim"

    def __init__(self, input_size: int = 256, backbone: str = "efficientnet_lite0", **options: Any):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ModelError(f"padim: unknown option(s) {sorted(unknown)} (known: {sorted(DEFAULTS)})")
        opts = {**DEFAULTS, **options}
        if opts["layers"] is None:
            from linewatch.backbones import DEFAULT_LAYERS

            if backbone not in DEFAULT_LAYERS:
                raise ModelError(f"padim: unknown backbone {backbone!r} (known: {', '.join(DEFAULT_LAYERS)})")
            layers, tap_d = PADIM_TAPS.get(backbone, (DEFAULT_LAYERS[backbone], None))
            opts["layers"] = layers
            if tap_d is not None and "d" not in options and opts["tap_d"] is None:
                opts["tap_d"] = list(tap_d)
        opts["layers"] = list(opts["layers"])
        if opts["tap_d"] is not None:
            tap_d = opts["tap_d"]
            if (not isinstance(tap_d, (list, tuple)) or len(tap_d) != len(opts["layers"])
                    or not all(isinstance(k, int) and k >= 0 for k in tap_d) or sum(tap_d) < 1):
                raise ModelError(f"padim: tap_d must be one non-negative integer per layer ({len(opts['layers'])}) "
                                 f"with a positive sum, got {tap_d!r}")
            opts["tap_d"] = [int(k) for k in tap_d]
            opts["d"] = int(sum(tap_d))
        super().__init__(input_size, backbone, **opts)
        if opts["backbone_weights"] and not opts["backbone_sha256"]:
            from linewatch.backbones import file_sha256

            try:
                opts["backbone_sha256"] = file_sha256(opts["backbone_weights"])
            except OSError as exc:
                raise ModelError(f"{opts['backbone_weights']}: cannot read backbone weights ({exc.strerror})") from None
            self.options["backbone_sha256"] = opts["backbone_sha256"]
        if opts["storage"] not in ("float16", "float32"):
            raise ModelError(f"padim: storage must be float16 or float32, got {opts['storage']!r}")
        k = opts["neighborhood"]
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ModelError(f"padim: neighborhood must be an odd integer >= 1, got {k!r}")
        if opts["grid_stride"] not in (4, 8, 16):
            raise ModelError(f"padim: grid_stride must be 4, 8 or 16, got {opts['grid_stride']!r}")
        if float(opts["sigma"]) < 0:
            raise ModelError(f"padim: sigma must be >= 0, got {opts['sigma']!r}")
        for key in ("texture_weight", "texture_sigma"):
            if not isinstance(opts[key], (int, float)) or not 0 <= float(opts[key]) <= 4:
                raise ModelError(f"padim: {key} must be a number in [0, 4], got {opts[key]!r}")
        self.mean: torch.Tensor | None = None  # (P, d)
        # packed lower triangles (P, d(d+1)/2) in the storage dtype: a loaded model that is only
        # served through ONNX Runtime never holds the full float32 factors in torch as well
        self.tri: torch.Tensor | None = None
        self.channel_idx: torch.Tensor | None = None  # (d,) indices into the concatenated taps
        # the texture term's shared Gaussian over the finest tap: mean (C,), precision Cholesky
        # factor (C, C), and the median distance of normal pixels (profiles from before it: None)
        self.texture_stats: dict[str, torch.Tensor] | None = None
        self._module: PaDiMModule | None = None
        self.fit_info: dict[str, Any] = {}

    # -- pieces ---------------------------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        o = self.options
        return shared_backbone(self.backbone_name, weights_path_or_none(o), o["layers"], self.input_size,
                               o.get("backbone_sha256"))

    def _features(self, channel_idx: torch.Tensor) -> PaDiMFeatures:
        bb = self._backbone()
        bounds = np.cumsum([0, *bb.channels])
        per_tap = [channel_idx[(channel_idx >= lo) & (channel_idx < hi)] - lo for lo, hi in zip(bounds, bounds[1:])]
        g = grid_size(self.input_size, self.options["grid_stride"])
        return PaDiMFeatures(bb, per_tap, self.options["grid_stride"], g, self.options["upsample"]).eval()

    def _choose_channels(self) -> torch.Tensor:
        channels = self._backbone().channels
        total = sum(channels)
        d = int(self.options["d"])
        gen = torch.Generator().manual_seed(int(self.options["seed"]))
        tap_d = self.options.get("tap_d")
        if tap_d is not None:
            # a fixed share per tap: the fine taps keep all their channels, so the Mahalanobis
            # distance is not dominated by the coarse (stride-16) tap's many channels
            picks, lo = [], 0
            for name, c, k in zip(self.options["layers"], channels, tap_d):
                if k > c:
                    raise ModelError(f"padim: tap_d asks {k} channels of {name}, which has {c}")
                picks.append(lo + torch.randperm(c, generator=gen)[:k])
                lo += c
            return torch.cat(picks).sort().values
        if not 1 <= d <= total:
            raise ModelError(f"padim: d={d} must be between 1 and {total} (channels of {self.options['layers']})")
        return torch.randperm(total, generator=gen)[:d].sort().values

    # -- training ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def fit(self, images: np.ndarray, progress: bool = True, batch_size: int = 16) -> "PaDiM":
        import time

        images = check_images(images, self.input_size, "padim fit")
        if len(images) < 2:
            raise ModelError(f"padim fit: need at least 2 normal images, got {len(images)}")
        t0 = time.perf_counter()
        idx = self._choose_channels()
        feats = self._features(idx)
        embs, fines, first_fine = [], [], None
        gen = torch.Generator().manual_seed(int(self.options["seed"]))
        for i in tqdm(range(0, len(images), batch_size), desc="padim features", unit="batch",
                      disable=not progress, leave=False):
            e, fine = feats.embed(to_tensor(images[i : i + batch_size]))
            embs.append(e)
            first_fine = fine if first_fine is None else first_fine
            rows = fine.float().permute(0, 2, 3, 1).reshape(-1, fine.shape[1])
            keep = -(-TEXTURE_SAMPLES * len(fine) // len(images))  # the same share of every batch
            fines.append(rows[torch.randperm(len(rows), generator=gen)[:keep]])
        emb = torch.cat(embs)  # (N, d, h, w)
        del embs
        with torch_threads(1):
            self.texture_stats = self._texture_stats(torch.cat(fines), first_fine)
        del fines
        t_feat = time.perf_counter() - t0
        n, d, h, w = emb.shape
        with torch_threads(1):
            means, chols, shrinks = self._gaussians(emb, progress)
        self.channel_idx = idx
        self.mean = torch.cat(means).float()
        chol = torch.cat(chols)
        self._set_chol(chol)
        self._module = None
        sh = torch.cat(shrinks)
        self.fit_info = {"n_images": int(len(images)), "positions": int(h * w), "gaussians": len(self.mean),
                         "d": int(d),
                         "shrinkage_mean": float(sh.mean()), "feature_s": round(t_feat, 3),
                         "fit_s": round(time.perf_counter() - t0, 3)}
        return self

    def _texture_head(self) -> MapHead:
        stride = min(self._backbone().strides)
        return MapHead(self.input_size, float(self.options["texture_sigma"]), grid_size(self.input_size, stride))

    def _texture_stats(self, rows: torch.Tensor, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Ledoit-Wolf Gaussian over the finest tap's channels, and the median distance of
        the ``sample`` normal images' pixels to it (the texture term's unit)."""
        mean, cov, _ = ledoit_wolf(rows[None].double())
        prec = torch.linalg.inv(cov[0])
        chol = torch.linalg.cholesky(0.5 * (prec + prec.T)).float()
        term = TextureTerm(mean[0], chol, 1.0, 1.0, self._texture_head())
        ref = term.distance(sample).median()
        return {"texture_mean": mean[0].float(), "texture_chol": chol, "texture_ref": ref.reshape(1).float()}

    def set_texture_weight(self, weight: float) -> None:
        """Switch the texture term (0 = off) without refitting: the calibration's choice."""
        if weight > 0 and self.texture_stats is None:
            raise ModelError("padim: this profile was fitted without the texture term's statistics; refit it")
        self.options["texture_weight"] = float(weight)
        self._module = None

    def calibration_variants(self) -> list[dict[str, float]]:
        """Settings the calibration may choose between on validation images, first = default."""
        if self.texture_stats is None:
            return []
        return [{"texture_weight": w} for w in TEXTURE_WEIGHTS]

    def apply_variant(self, variant: dict[str, float]) -> None:
        self.set_texture_weight(float(variant["texture_weight"]))

    def _gaussians(self, emb: torch.Tensor, progress: bool):
        n, d, h, w = emb.shape
        k = int(self.options["neighborhood"])
        r = k // 2
        # each position's Gaussian may also see its k x k neighbours: k^2 more samples per
        # estimate and tolerance to position jitter (measured: no IoU gain on the synthetic line)
        padded = F.pad(emb, (r, r, r, r), mode="replicate") if r else emb
        means, chols, shrinks = [], [], []
        rows = max(1, 256 // w)
        bands = range(0, h, rows)
        if self.options["shared"]:
            # one Gaussian for every position: for textures whose pattern shifts from part to part
            x = emb.permute(0, 2, 3, 1).reshape(1, -1, d)
            if x.shape[1] > 200_000:
                pick = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(int(self.options["seed"])))
                x = x[:, pick[:200_000]]
            mean, cov, shrink = ledoit_wolf(x.double())
            prec = torch.linalg.inv(cov)
            chols.append(torch.linalg.cholesky(0.5 * (prec + prec.transpose(1, 2))))
            means.append(mean)
            shrinks.append(shrink)
            bands = range(0)
        for y0 in tqdm(bands, desc="padim gaussians", unit="band", disable=not progress, leave=False):
            y1 = min(h, y0 + rows)
            band = padded[:, :, y0 : y1 + 2 * r, :]
            cols = F.unfold(band, kernel_size=k)  # (N, d*k*k, (y1-y0)*w)
            x = cols.view(n, d, k * k, -1).permute(3, 0, 2, 1).reshape(-1, n * k * k, d)  # (P_band, N k^2, d)
            mean, cov, shrink = ledoit_wolf(x.double())
            prec = torch.linalg.inv(cov)
            prec = 0.5 * (prec + prec.transpose(1, 2))
            chols.append(torch.linalg.cholesky(prec))
            means.append(mean)
            shrinks.append(shrink)
        return means, chols, shrinks

    def _set_chol(self, chol: torch.Tensor) -> None:
        # round through the storage dtype now, so the in-memory model equals the saved/exported one
        self.tri = pack_tril(chol).to(self._storage_dtype())

    @property
    def chol(self) -> torch.Tensor | None:
        """Full (P, d, d) float32 Cholesky factors of the precision matrices (unpacked on demand)."""
        return None if self.tri is None else unpack_tril(self.tri.float(), int(self.options["d"]))

    # -- inference ---------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if self.mean is None or self.tri is None or self.channel_idx is None:
            raise ModelError("padim: model is not fitted")

    def inference_module(self) -> nn.Module:
        self._require_fitted()
        if self._module is None:
            self._module = self._build_module(packed=False)
        return self._module

    def export_module(self) -> nn.Module:
        """Same graph with the factors packed in the storage dtype (what the ONNX file holds)."""
        self._require_fitted()
        return self._build_module(packed=True)

    def _storage_dtype(self) -> torch.dtype:
        return torch.float16 if self.options["storage"] == "float16" else torch.float32

    def _build_module(self, packed: bool) -> PaDiMModule:
        head = MapHead(self.input_size, float(self.options["sigma"]),
                       grid_size(self.input_size, self.options["grid_stride"]))
        d = int(self.options["d"])
        if packed:
            tri = self.tri
            chol = torch.cat([tri, torch.zeros(tri.shape[0], 1, dtype=tri.dtype)], 1)
        else:
            chol = self.chol.float().contiguous()
        texture = None
        w = float(self.options["texture_weight"])
        if w > 0:
            if self.texture_stats is None:
                raise ModelError("padim: texture_weight > 0 but the weights hold no texture statistics; refit")
            t = self.texture_stats
            texture = TextureTerm(t["texture_mean"], t["texture_chol"], float(t["texture_ref"][0]), w,
                                  self._texture_head())
        return PaDiMModule(self._features(self.channel_idx), self.mean, chol, head, packed, d, texture).eval()

    # -- persistence ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._require_fitted()
        return {"mean": self.mean, "chol_tril": self.tri,
                "channel_idx": self.channel_idx.to(torch.int64), **(self.texture_stats or {})}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = {"mean", "chol_tril", "channel_idx"} - set(tensors)
        if missing:
            raise ModelError(f"padim: weights lack {sorted(missing)}")
        mean, tri, idx = tensors["mean"], tensors["chol_tril"], tensors["channel_idx"]
        g = grid_size(self.input_size, self.options["grid_stride"])
        p, d = (1 if self.options["shared"] else g[0] * g[1]), int(self.options["d"])
        if tuple(mean.shape) != (p, d) or tuple(tri.shape) != (p, d * (d + 1) // 2) or tuple(idx.shape) != (d,):
            raise ModelError(f"padim: weights shapes mean {tuple(mean.shape)} chol_tril {tuple(tri.shape)} do not "
                             f"match the config (positions {p}, d {d})")
        self.mean = mean.float()
        self.tri = tri.to(self._storage_dtype())
        self.channel_idx = idx.long()
        self.texture_stats = None
        if "texture_mean" in tensors:
            t = {k: tensors[k].float() for k in ("texture_mean", "texture_chol", "texture_ref")}
            c = t["texture_mean"].shape[0]
            if tuple(t["texture_chol"].shape) != (c, c) or tuple(t["texture_ref"].shape) != (1,):
                raise ModelError(f"padim: texture statistics of shapes {tuple(t['texture_chol'].shape)} / "
                                 f"{tuple(t['texture_ref'].shape)} do not match {c} channels")
            self.texture_stats = t
        if float(self.options["texture_weight"]) > 0 and self.texture_stats is None:
            raise ModelError("padim: texture_weight > 0 but the weights hold no texture statistics")
        self._module = None
