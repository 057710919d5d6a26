"""PaDiM: statistics against scikit-learn, the fast pieces against their textbook forms,
persistence (identical maps, no pickle, size), and that it finds synthetic defects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from linewatch.models._common import MapHead, reference_upsample_blur
from linewatch.models.registry import load_model
from linewatch.models.base import ModelError
from linewatch.models.padim import PaDiM, ledoit_wolf, pack_tril, unpack_tril
from linewatch.profiles import Profile, Registry

torch.set_num_threads(1)
SIZE = 128


@pytest.fixture(scope="module")
def brick():
    from linewatch.synth import SyntheticProduct

    prod = SyntheticProduct("brick", size=SIZE, seed=3)
    train = np.stack([prod.normal(i).image for i in range(16)])
    bad = [prod.defective(i, c) for i, c in enumerate(["structural", "contamination", "surface"])]
    return train, np.stack([s.image for s in bad]), np.stack([s.mask > 0 for s in bad])


@pytest.fixture(scope="module")
def fitted(brick):
    train, _, _ = brick
    return PaDiM(input_size=SIZE, d=32).fit(train, progress=False)


def test_ledoit_wolf_matches_sklearn():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 30, 12, generator=g, dtype=torch.float64) * torch.rand(12, generator=g, dtype=torch.float64)
    mean, cov, shrink = ledoit_wolf(x)
    for p in range(4):
        ref = LedoitWolf().fit(x[p].numpy())
        np.testing.assert_allclose(cov[p].numpy(), ref.covariance_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mean[p].numpy(), ref.location_, rtol=1e-12)
        assert shrink[p].item() == pytest.approx(ref.shrinkage_, rel=1e-9)


def test_matrix_head_equals_upsample_then_blur():
    g = torch.rand(2, 1, 16, 16)
    maps, scores = MapHead(64, 4.0, (16, 16))(g)
    ref = reference_upsample_blur(g, 64, 4.0)
    torch.testing.assert_close(maps, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, ref.flatten(1).amax(1))


def test_cholesky_distance_is_mahalanobis(fitted, brick):
    """|(x - mu) L|^2 with L the Cholesky factor of the precision == (x-mu)^T S^-1 (x-mu)."""
    m = fitted
    full = m.chol[7].double()
    prec = full @ full.T
    diff = torch.randn(32, dtype=torch.float64)
    assert (diff @ full).pow(2).sum().item() == pytest.approx((diff @ prec @ diff).item(), rel=1e-9)
    assert torch.equal(unpack_tril(pack_tril(m.chol), 32), m.chol)


def test_save_load_gives_identical_maps(fitted, brick, tmp_path):
    _, bad, _ = brick
    maps1, scores1 = fitted.predict(bad)
    fitted.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, PaDiM)
    maps2, scores2 = loaded.predict(bad)
    assert np.array_equal(maps1, maps2) and np.array_equal(scores1, scores2)
    assert maps1.shape == (3, SIZE, SIZE) and maps1.dtype == np.float32
    assert np.allclose(scores1, maps1.reshape(3, -1).max(1))


def _looks_pickled(data: bytes) -> bool:
    # pickle protocol 2+ starts with 0x80 <proto>; torch.save writes a zip holding data.pkl
    return (len(data) > 1 and data[0] == 0x80 and data[1] <= 5) or data[:4] == b"PK\x03\x04"


def test_published_profile_has_no_pickle_and_is_small(fitted, tmp_path):
    reg = Registry(tmp_path / "reg")
    prof = reg.publish(Profile(product="brick", model_kind="padim", backbone="efficientnet_lite0",
                               input_size=SIZE, threshold=1.0, threshold_method="manual"), fitted)
    vdir = reg.version_dir("brick", prof.version)
    files = {p.name: p.read_bytes() for p in vdir.iterdir() if p.is_file()}
    assert {"weights.safetensors", "model.json", "profile.json", "model.onnx"} <= set(files)
    for name, data in files.items():
        assert not _looks_pickled(data), name
    header_len = int.from_bytes(files["weights.safetensors"][:8], "little")
    assert files["weights.safetensors"][8:9] == b"{" and header_len < len(files["weights.safetensors"])
    # float16 packed triangles: P * d(d+1)/2 * 2 bytes (+ means)
    p = (SIZE // 4) ** 2
    assert len(files["weights.safetensors"]) < p * (32 * 33 // 2 * 2 + 32 * 4) + 4096
    _, model = reg.load("brick")
    assert np.array_equal(model.predict(np.zeros((1, SIZE, SIZE, 3), np.uint8))[0],
                          fitted.predict(np.zeros((1, SIZE, SIZE, 3), np.uint8))[0])


def test_map_is_higher_inside_defects(fitted, brick):
    from sklearn.metrics import roc_auc_score

    _, bad, masks = brick
    maps, _ = fitted.predict(bad)
    for m, gt in zip(maps, masks):
        assert m[gt].mean() > np.percentile(m[~gt], 90)
    assert roc_auc_score(masks.ravel(), maps.ravel()) > 0.9


def test_bad_inputs():
    with pytest.raises(ModelError, match="unknown option"):
        PaDiM(input_size=SIZE, colour="red")
    m = PaDiM(input_size=SIZE, d=8)
    with pytest.raises(ModelError, match="expects 128x128"):
        m.fit(np.zeros((4, 64, 64, 3), np.uint8), progress=False)
    with pytest.raises(ModelError, match="at least 2"):
        m.fit(np.zeros((1, SIZE, SIZE, 3), np.uint8), progress=False)
    with pytest.raises(ModelError, match="not fitted"):
        m.inference_module()
    with pytest.raises(ModelError, match="d=999"):
        PaDiM(input_size=SIZE, d=999).fit(np.zeros((2, SIZE, SIZE, 3), np.uint8), progress=False)


def test_load_refuses_mismatched_weights(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    cfg = (tmp_path / "m" / "model.json").read_text().replace('"d": 32', '"d": 16')
    (tmp_path / "m" / "model.json").write_text(cfg)
    with pytest.raises(ModelError, match="do not match"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ModelError, match="weights.safetensors"):
        load_model(tmp_path / "m")


def test_wrong_architecture_backbone_weights_name_the_file():
    from linewatch.backbones import _effnet_weights_file

    effnet = _effnet_weights_file()
    with pytest.raises(ModelError, match=rf"{effnet.name}: not resnet18 weights"):
        PaDiM(input_size=SIZE, backbone="resnet18", backbone_weights=str(effnet), d=8).fit(
            np.zeros((2, SIZE, SIZE, 3), np.uint8), progress=False)
    with pytest.raises(ModelError, match="missing.pth: cannot read backbone weights"):
        PaDiM(input_size=SIZE, backbone="resnet18", backbone_weights="/nonexistent/missing.pth")


def test_tap_d_draws_a_fixed_share_per_tap(brick):
    train, _, _ = brick
    m = PaDiM(input_size=SIZE, layers=["block2", "block4", "block10"], tap_d=[24, 8, 8]).fit(train[:4], progress=False)
    assert m.options["d"] == 40 and m.mean.shape == (len(m.mean), 40)
    idx = m.channel_idx
    assert ((idx >= 0) & (idx < 24)).sum() == 24  # every block2 channel
    assert ((idx >= 24) & (idx < 64)).sum() == 8 and (idx >= 64).sum() == 8
    with pytest.raises(ModelError, match="tap_d"):
        PaDiM(input_size=SIZE, layers=["block2", "block4"], tap_d=[8])
    with pytest.raises(ModelError, match="block2, which has 24"):
        PaDiM(input_size=SIZE, layers=["block2", "block4"], tap_d=[30, 2]).fit(train[:2], progress=False)


def test_default_taps_and_old_configs():
    from linewatch.models.padim import PADIM_TAPS

    layers, share = PADIM_TAPS["efficientnet_lite0"]
    m = PaDiM(input_size=SIZE)
    assert m.options["layers"] == list(layers) and m.options["tap_d"] == list(share)
    assert m.options["d"] == sum(share)
    assert PaDiM(input_size=SIZE, d=32).options["tap_d"] is None  # an explicit d: random over the taps
    # a profile saved before tap_d existed (explicit layers and d): loaded exactly as it was fitted
    old = PaDiM(input_size=SIZE, layers=["block2", "block4", "block10"], d=64)
    assert old.options["tap_d"] is None and old.options["d"] == 64


def test_texture_term_is_the_shared_gaussian_of_the_finest_tap(fitted, brick, tmp_path):
    """Fitted with every model; off (weight 0) the maps are PaDiM's own; on, they are PaDiM's map
    times (t / t_normal)^w, with t the Mahalanobis distance to one Gaussian over the finest tap
    (checked against scikit-learn); saved, loaded and exported with the weight."""
    import copy

    from linewatch.models.export import export_onnx
    from workers.engines import OnnxRuntimeEngine

    train, bad, _ = brick
    model = copy.deepcopy(fitted)
    t = model.texture_stats
    assert t is not None and t["texture_chol"].shape == (24, 24)  # block2 of EfficientNet-Lite0: 24 channels
    plain, _ = model.predict(bad)
    model.set_texture_weight(0.5)
    maps, scores = model.predict(bad)
    feats = model._features(model.channel_idx)
    with torch.inference_mode():
        fine = feats.embed(torch.from_numpy(bad).permute(0, 3, 1, 2).float())[1]
    rows = fine.permute(0, 2, 3, 1).reshape(-1, 24).double().numpy()
    lw = LedoitWolf().fit(rows[::3])  # the statistics' form (not their sample): distances to a Gaussian
    term = model.inference_module().texture
    prec = torch.from_numpy(np.linalg.inv(lw.covariance_)).float()
    chol = torch.linalg.cholesky(prec)
    d_ref = np.sqrt(np.einsum("ij,jk,ik->i", rows - lw.location_, prec.double().numpy(), rows - lw.location_))
    with torch.inference_mode():
        y = (fine.float().reshape(len(bad), 24, -1).transpose(1, 2) - torch.from_numpy(lw.location_).float()) @ chol
    np.testing.assert_allclose(y.pow(2).sum(-1).sqrt().numpy().ravel(),
                               d_ref.reshape(len(bad), fine.shape[2], fine.shape[3]).ravel(), rtol=1e-3, atol=1e-3)
    with torch.inference_mode():
        factor = term(fine).numpy()
    np.testing.assert_allclose(maps, plain * factor, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores, maps.reshape(len(bad), -1).max(1), rtol=1e-6)
    model.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.options["texture_weight"] == 0.5
    np.testing.assert_allclose(again.predict(bad)[0], maps, rtol=1e-5, atol=1e-5)
    onnx_maps, _ = OnnxRuntimeEngine(export_onnx(again, tmp_path / "m.onnx"), SIZE).run(bad)
    np.testing.assert_allclose(onnx_maps, maps, rtol=1e-3, atol=1e-3 * float(maps.max()))
    model.set_texture_weight(0.0)
    np.testing.assert_array_equal(model.predict(bad)[0], plain)


def test_profiles_from_before_the_texture_term_load_with_it_off(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    fitted.save(tmp_path / "m")
    tensors = {k: v for k, v in load_file(str(tmp_path / "m" / "weights.safetensors")).items()
               if not k.startswith("texture_")}
    save_file(tensors, str(tmp_path / "m" / "weights.safetensors"))
    old = load_model(tmp_path / "m")
    assert old.texture_stats is None and old.calibration_variants() == []
    with pytest.raises(ModelError, match="refit"):
        old.set_texture_weight(0.5)
    with pytest.raises(ModelError, match="texture_weight"):
        PaDiM(input_size=SIZE, texture_weight=-1)
