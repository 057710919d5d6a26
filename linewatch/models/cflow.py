"""CFLOW: a conditional normalizing flow per feature scale, conditioned on a 2-D sinusoidal
positional encoding, trained on normal features only.

Each scale's decoder is a stack of affine coupling blocks (RealNVP/Glow style, soft-clamped
scales, fixed channel permutations) written in plain torch, so it exports to ONNX with the rest
of the graph. The anomaly map is the negative log-likelihood per feature dimension at every
position, upsampled to the finest scale's grid and averaged over scales, then upsampled to the
input size and blurred like PaDiM (image score = max). Unlike the original CFLOW map
(``max - sum(exp(logp - batch max))``) it does not depend on the other images of the batch, so
every engine and batch size gives the same map for the same frame.

Training is kept short on a CPU: features are extracted once, each step samples
``positions_per_batch`` random positions per scale, an "epoch" is ``steps_per_epoch`` steps,
and training stops early when the NLL of a held-out normal split stops improving (the best
weights are kept).
"""

from __future__ import annotations

import math
import time
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
    "coupling_blocks": 4,
    "hidden": 128,
    "cond_dim": 32,
    "clamp": 1.9,
    "epochs": 12,
    "steps_per_epoch": 25,
    "positions_per_batch": 1024,
    "lr": 1e-3,
    "val_fraction": 0.15,
    "patience": 2,
    "sigma": 4.0,
    "seed": 0,
    "backbone_weights": None,
    "backbone_sha256": None,
}
_LOG2PI = math.log(2 * math.pi)


def positional_encoding_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """(dim, h, w) sinusoidal encoding: half the channels encode x, half y (as in CFLOW)."""
    if dim % 4:
        raise ModelError(f"cflow: cond_dim must be a multiple of 4, got {dim}")
    pe = torch.zeros(dim, h, w)
    half = dim // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    pos_w = torch.arange(0.0, w).unsqueeze(1)
    pos_h = torch.arange(0.0, h).unsqueeze(1)
    pe[0:half:2] = torch.sin(pos_w * div).T.unsqueeze(1).repeat(1, h, 1)
    pe[1:half:2] = torch.cos(pos_w * div).T.unsqueeze(1).repeat(1, h, 1)
    pe[half::2] = torch.sin(pos_h * div).T.unsqueeze(2).repeat(1, 1, w)
    pe[half + 1 :: 2] = torch.cos(pos_h * div).T.unsqueeze(2).repeat(1, 1, w)
    return pe


class AffineCoupling(nn.Module):
    """y = [x_a, x_b * exp(s(x_a, c)) + t(x_a, c)] after a fixed permutation; log|det| = sum(s)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, clamp: float, perm: torch.Tensor):
        super().__init__()
        self.da = dim // 2
        self.db = dim - self.da
        self.clamp = clamp
        self.register_buffer("perm", perm.long())
        self.net = nn.Sequential(nn.Linear(self.da + cond_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * self.db))
        nn.init.zeros_(self.net[2].weight)  # start as the identity map: stable first steps
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.index_select(x, 1, self.perm)
        xa, xb = x[:, : self.da], x[:, self.da :]
        st = self.net(torch.cat([xa, c], dim=1))
        s = self.clamp * torch.tanh(st[:, : self.db] / self.clamp)
        yb = xb * torch.exp(s) + st[:, self.db :]
        return torch.cat([xa, yb], dim=1), s.sum(dim=1)


class ConditionalFlow(nn.Module):
    """x (M, C), cond (M, K) -> per-sample NLL per dimension (M,)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int, blocks: int, clamp: float, gen: torch.Generator):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(
            AffineCoupling(dim, cond_dim, hidden, clamp, torch.randperm(dim, generator=gen)) for _ in range(blocks))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        logdet = torch.zeros_like(x[:, 0])
        for blk in self.blocks:
            x, ld = blk(x, c)
            logdet = logdet + ld
        nll = 0.5 * (x * x).sum(dim=1) + 0.5 * self.dim * _LOG2PI - logdet
        return nll / self.dim


class CFlowModule(nn.Module):
    """The whole inference graph: (N,3,H,W) 0..255 -> (maps (N,H,W), scores (N,))."""

    def __init__(self, backbone: nn.Module, flows: nn.ModuleList, feat_mean: list[torch.Tensor],
                 feat_std: list[torch.Tensor], pos: list[torch.Tensor], grid: tuple[int, int], head: MapHead):
        super().__init__()
        self.pre = Preprocess()
        self.backbone = backbone
        self.flows = flows
        self.grid = grid
        self.strides = list(backbone.strides)
        self.head = head
        for j, (m, s, p) in enumerate(zip(feat_mean, feat_std, pos)):
            self.register_buffer(f"mean{j}", m.view(1, -1, 1, 1))
            self.register_buffer(f"std{j}", s.view(1, -1, 1, 1))
            self.register_buffer(f"pos{j}", p)  # (h*w, K)

    def scale_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised features per scale, (N, C, h, w)."""
        feats = self.backbone(self.pre(x).contiguous(memory_format=torch.channels_last))
        return [(f - getattr(self, f"mean{j}")) / getattr(self, f"std{j}") for j, f in enumerate(feats)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.scale_inputs(x)
        with float32_scoring(x):
            return self._score(feats, x.shape[0])

    def _score(self, feats: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        maps = []
        for j, f in enumerate(feats):
            f = f.float()
            _, c, h, w = f.shape
            rows = f.permute(0, 2, 3, 1).reshape(n * h * w, c)
            pos = getattr(self, f"pos{j}")
            cond = pos.unsqueeze(0).expand(n, h * w, pos.shape[1]).reshape(n * h * w, pos.shape[1])
            nll = self.flows[j](rows, cond)
            maps.append(nll.reshape(n, 1, h, w))
        aligned = align_to_grid(maps, self.strides, min(self.strides), self.grid)
        grid_map = torch.stack(aligned, 0).mean(0)
        return self.head(grid_map)


class CFlow(AnomalyModel):
    kind = "cflow"

    def __init__(self, input_size: int = 256, backbone: str = "efficientnet_lite0", **options: Any):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ModelError(f"cflow: unknown option(s) {sorted(unknown)} (known: {sorted(DEFAULTS)})")
        opts = {**DEFAULTS, **options}
        if opts["layers"] is None:
            from linewatch.backbones import DEFAULT_LAYERS

            if backbone not in DEFAULT_LAYERS:
                raise ModelError(f"cflow: unknown backbone {backbone!r} (known: {', '.join(DEFAULT_LAYERS)})")
            opts["layers"] = DEFAULT_LAYERS[backbone]
        opts["layers"] = list(opts["layers"])
        if opts["backbone_weights"] and not opts["backbone_sha256"]:
            from linewatch.backbones import file_sha256

            try:
                opts["backbone_sha256"] = file_sha256(opts["backbone_weights"])
            except OSError as exc:
                raise ModelError(f"{opts['backbone_weights']}: cannot read backbone weights ({exc.strerror})") from None
        super().__init__(input_size, backbone, **opts)
        self.flows: nn.ModuleList | None = None
        self.feat_mean: list[torch.Tensor] = []
        self.feat_std: list[torch.Tensor] = []
        self._module: CFlowModule | None = None
        self.fit_info: dict[str, Any] = {}

    def _backbone(self) -> nn.Module:
        o = self.options
        return shared_backbone(self.backbone_name, weights_path_or_none(o), o["layers"], self.input_size,
                               o.get("backbone_sha256"))

    def _new_flows(self) -> nn.ModuleList:
        o = self.options
        gen = torch.Generator().manual_seed(int(o["seed"]))
        torch.manual_seed(int(o["seed"]))
        return nn.ModuleList(ConditionalFlow(c, int(o["cond_dim"]), int(o["hidden"]), int(o["coupling_blocks"]),
                                             float(o["clamp"]), gen) for c in self._backbone().channels)

    def _positions(self, bb: nn.Module) -> list[torch.Tensor]:
        k = int(self.options["cond_dim"])
        out = []
        for s in bb.strides:
            h, w = grid_size(self.input_size, s)
            out.append(positional_encoding_2d(k, h, w).flatten(1).T.contiguous())  # (h*w, K)
        return out

    def _build_module(self) -> CFlowModule:
        bb = self._backbone()
        g = grid_size(self.input_size, min(bb.strides))
        head = MapHead(self.input_size, float(self.options["sigma"]), g)
        return CFlowModule(bb, self.flows, self.feat_mean, self.feat_std, self._positions(bb), g, head).eval()

    # -- training ---------------------------------------------------------------------------------
    def fit(self, images: np.ndarray, progress: bool = True, batch_size: int = 16) -> "CFlow":
        o = self.options
        images = check_images(images, self.input_size, "cflow fit")
        if len(images) < 3:
            raise ModelError(f"cflow fit: need at least 3 normal images (training + held-out), got {len(images)}")
        t0 = time.perf_counter()
        bb = self._backbone()
        rng = np.random.default_rng(int(o["seed"]))
        order = rng.permutation(len(images))
        n_val = min(len(images) - 2, max(1, int(round(len(images) * float(o["val_fraction"])))))
        val_idx, train_idx = order[:n_val], order[n_val:]
        pre = Preprocess()
        feats: list[list[torch.Tensor]] = [[] for _ in bb.strides]
        with torch.inference_mode():
            for i in tqdm(range(0, len(images), batch_size), desc="cflow features", unit="batch",
                          disable=not progress, leave=False):
                x = pre(to_tensor(images[i : i + batch_size])).contiguous(memory_format=torch.channels_last)
                for j, f in enumerate(bb(x)):
                    feats[j].append(f.contiguous())
        per_scale = [torch.cat(f) for f in feats]  # (N, C, h, w)
        self.feat_mean = [f[train_idx].mean((0, 2, 3)) for f in per_scale]
        self.feat_std = [f[train_idx].std((0, 2, 3)).clamp_min(1e-3) for f in per_scale]
        pos = self._positions(bb)
        # rows: (N, h*w, C) normalised, positions encoded separately
        data = []
        for j, f in enumerate(per_scale):
            z = (f - self.feat_mean[j].view(1, -1, 1, 1)) / self.feat_std[j].view(1, -1, 1, 1)
            data.append(z.flatten(2).transpose(1, 2).contiguous())
        t_feat = time.perf_counter() - t0
        flows = self._new_flows()
        opt = torch.optim.Adam(flows.parameters(), lr=float(o["lr"]))
        gen = torch.Generator().manual_seed(int(o["seed"]))
        m = int(o["positions_per_batch"])
        tr = torch.as_tensor(train_idx)
        # fixed validation sample: held-out images, up to 4 * m positions per scale
        val = []
        for j, d in enumerate(data):
            hw = d.shape[1]
            vi = torch.as_tensor(val_idx)[torch.randint(len(val_idx), (4 * m,), generator=gen)]
            vp = torch.randint(hw, (4 * m,), generator=gen)
            val.append((d[vi, vp], pos[j][vp]))

        # the flow steps are many small ops: one thread is as fast as two on a quiet machine and
        # far faster on a shared one (no OpenMP barrier waiting for a descheduled thread)
        with torch_threads(1):
            best, best_state, history = self._train(flows, opt, data, pos, val, tr, gen, m, progress)
        if best_state is not None:
            flows.load_state_dict(best_state)
        flows.eval()
        for p in flows.parameters():
            p.requires_grad_(False)
        self.flows = flows
        self._module = None
        self.fit_info = {"n_images": int(len(images)), "held_out": int(n_val), "epochs_run": len(history),
                         "best_val_nll": round(best, 4), "history": [(round(a, 4), round(b, 4)) for a, b in history],
                         "feature_s": round(t_feat, 3), "fit_s": round(time.perf_counter() - t0, 3)}
        return self

    def _train(self, flows, opt, data, pos, val, tr, gen, m, progress):
        o = self.options

        def val_loss() -> float:
            with torch.no_grad():
                return float(sum(flows[j](x, c).mean() for j, (x, c) in enumerate(val)) / len(val))

        best, best_state, bad_epochs, history = val_loss(), None, 0, []
        bar = tqdm(range(int(o["epochs"])), desc="cflow train", unit="epoch", disable=not progress)
        for epoch in bar:
            flows.train()
            run = 0.0
            for _ in range(int(o["steps_per_epoch"])):
                loss = 0.0
                for j, d in enumerate(data):
                    n_img, hw, _ = d.shape
                    ii = tr[torch.randint(len(tr), (m,), generator=gen)]
                    pp = torch.randint(hw, (m,), generator=gen)
                    loss = loss + flows[j](d[ii, pp], pos[j][pp]).mean()
                loss = loss / len(data)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(flows.parameters(), 5.0)
                opt.step()
                run += float(loss.detach())
            flows.eval()
            vl = val_loss()
            history.append((run / int(o["steps_per_epoch"]), vl))
            bar.set_postfix(train=f"{history[-1][0]:.3f}", val=f"{vl:.3f}")
            if vl < best - 1e-4:
                best, bad_epochs = vl, 0
                best_state = {k: v.detach().clone() for k, v in flows.state_dict().items()}
            else:
                bad_epochs += 1
                if bad_epochs >= int(o["patience"]):
                    break
        return best, best_state, history

    # -- inference ---------------------------------------------------------------------------------
    def inference_module(self) -> nn.Module:
        if self.flows is None:
            raise ModelError("cflow: model is not fitted")
        if self._module is None:
            self._module = self._build_module()
        return self._module

    # -- persistence ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.flows is None:
            raise ModelError("cflow: model is not fitted")
        out = {f"flows.{k}": v for k, v in self.flows.state_dict().items()}
        for j, (m, s) in enumerate(zip(self.feat_mean, self.feat_std)):
            out[f"feat_mean.{j}"] = m
            out[f"feat_std.{j}"] = s
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        flows = self._new_flows()
        expected = flows.state_dict()
        got = {k.removeprefix("flows."): v for k, v in tensors.items() if k.startswith("flows.")}
        if set(got) != set(expected) or any(tuple(got[k].shape) != tuple(v.shape) for k, v in expected.items()):
            raise ModelError("cflow: weights do not match the config (coupling blocks, hidden size, layers)")
        flows.load_state_dict(got)
        flows.eval()
        for p in flows.parameters():
            p.requires_grad_(False)
        n = len(self._backbone().channels)
        try:
            self.feat_mean = [tensors[f"feat_mean.{j}"].float() for j in range(n)]
            self.feat_std = [tensors[f"feat_std.{j}"].float() for j in range(n)]
        except KeyError as exc:
            raise ModelError(f"cflow: weights lack {exc.args[0]}") from None
        self.flows = flows
        self._module = None
