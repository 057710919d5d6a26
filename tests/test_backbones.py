"""Backbones: offline pretrained EfficientNet-Lite0 (shapes, really pretrained), and the
user-weights path for ResNet-18 / WideResNet-50-2 with clear errors for the wrong file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from linewatch.backbones import (DEFAULT_LAYERS, _effnet_weights_file, _ResNet, _BasicBlock, build_backbone)
from linewatch.models.base import ModelError

torch.set_num_threads(1)


def test_efficientnet_lite0_taps_have_documented_strides_and_channels():
    bb = build_backbone("efficientnet_lite0", layers=["block2", "block4", "block10", "block15"], input_size=128)
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, 128, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 32, 32), (40, 16, 16), (112, 8, 8), (320, 4, 4)]
    assert bb.strides == (4, 8, 16, 32) and bb.channels == (24, 40, 112, 320)
    # truncated after the deepest tap: nothing beyond block 10 is kept when block10 is deepest
    short = build_backbone("efficientnet_lite0", layers=["block2", "block10"], input_size=128)
    assert len(short.blocks) == 11


def test_efficientnet_lite0_is_pretrained_it_recognises_a_cat():
    """Known-output check: the shipped ImageNet classifier calls skimage's cat photo a cat."""
    from efficientnet_lite_pytorch import EfficientNet
    from skimage import data
    import cv2

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(_effnet_weights_file(), map_location="cpu", weights_only=True))
    net.eval()
    img = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = net(x).topk(5).indices[0].tolist()
    assert set(top5) & {281, 282, 283, 284, 285}, top5  # ImageNet cat classes


def test_folded_batchnorm_matches_unfolded():
    a = build_backbone(input_size=64, fold_bn=True)
    b = build_backbone(input_size=64, fold_bn=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for fa, fb in zip(a(x), b(x)):
            assert torch.allclose(fa, fb, atol=1e-3, rtol=1e-3)


def test_resnet_needs_a_local_weights_file():
    with pytest.raises(ModelError, match="local weights file"):
        build_backbone("resnet18")


def _trained_like(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = net.state_dict()
    for k, v in sd.items():
        if k.endswith("running_mean"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.3
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
    return sd


def test_resnet18_from_user_safetensors(tmp_path):
    net = _ResNet(_BasicBlock, [2, 2, 2, 2])
    sd = _trained_like(net)
    sd["fc.weight"] = torch.zeros(1000, 512)  # torchvision files carry the classifier: ignored
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    bb = build_backbone("resnet18", path, input_size=64)
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert bb.layers == DEFAULT_LAYERS["resnet18"]


def test_wrong_architecture_weights_name_the_file(tmp_path):
    net = _ResNet(_BasicBlock, [2, 2, 2, 2])
    path = tmp_path / "r18.pth"
    torch.save(_trained_like(net), path)
    with pytest.raises(ModelError, match=r"r18\.pth: not wide_resnet50_2 weights"):
        build_backbone("wide_resnet50_2", path)
    with pytest.raises(ModelError, match=r"r18\.pth: not efficientnet_lite0 weights"):
        build_backbone("efficientnet_lite0", path)


def test_random_weights_are_refused(tmp_path):
    path = tmp_path / "random.safetensors"
    net = _ResNet(_BasicBlock, [2, 2, 2, 2])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    with pytest.raises(ModelError, match="look untrained"):
        build_backbone("resnet18", path)


def test_unreadable_or_pickled_object_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"bad\.pth: cannot read weights"):
        build_backbone("resnet18", bad)
    with pytest.raises(ModelError, match="not found"):
        build_backbone("resnet18", tmp_path / "missing.safetensors")


def test_unknown_names():
    with pytest.raises(ModelError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(ModelError, match="unknown layer"):
        build_backbone("efficientnet_lite0", layers=["layer1"])
