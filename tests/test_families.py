"""The three families of issue 9 (PatchCore, feature reconstruction, attribution) on a small
synthetic product: they localise real defects (map higher inside the true mask than outside),
survive save -> load bit for bit, export to ONNX with the same maps, and reject bad input.

Sizes are kept small (128 px, 24 training images, short training) and torch runs on one
thread: the machine has 2 shared cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from linewatch.models.base import AnomalyModel, ModelError
from linewatch.models.registry import FAMILIES, build_model, load_model, model_class

SIZE = 128
N_TRAIN = 24
CATS = ("structural", "surface", "contamination", "combined")
FAST = {
    "patchcore": {},
    "reconstruction": {"epochs": 25},
    "attribution": {"steps": 150},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def product():
    from linewatch.synth import SyntheticProduct

    return SyntheticProduct("cap", size=SIZE, seed=0)


@pytest.fixture(scope="module")
def data(product):
    train = np.stack([product.normal(i).image for i in range(N_TRAIN)])
    defects = [product.defective(i, c) for c in CATS for i in range(2)]
    good = np.stack([product.normal(500 + i).image for i in range(4)])
    return {"train": train, "defects": np.stack([s.image for s in defects]),
            "masks": np.stack([s.mask > 0 for s in defects]), "good": good}


_FITTED: dict[str, AnomalyModel] = {}


@pytest.fixture(scope="module")
def fitted(data):
    def get(kind: str) -> AnomalyModel:
        if kind not in _FITTED:
            _FITTED[kind] = build_model(kind, input_size=SIZE, **FAST[kind]).fit(data["train"], progress=False)
        return _FITTED[kind]

    yield get
    _FITTED.clear()


KINDS = sorted(FAST)


def test_families_are_registered():
    for kind in KINDS:
        assert kind in FAMILIES
        assert model_class(kind).kind == kind


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_map_is_higher_inside_defects(kind, fitted, data):
    model = fitted(kind)
    maps, scores = model.predict(data["defects"], batch_size=8)
    assert maps.shape == (len(data["defects"]), SIZE, SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all()
    masks = data["masks"]
    inside = np.array([m[k].mean() for m, k in zip(maps, masks)])
    outside = np.array([m[~k].mean() for m, k in zip(maps, masks)])
    assert (inside > outside).sum() >= len(maps) - 1, (kind, inside, outside)
    assert inside.mean() > 1.3 * outside.mean(), (kind, inside.mean(), outside.mean())
    assert roc_auc_score(masks.ravel(), maps.ravel()) > 0.8
    # image score = max of the map (the shared convention), defective frames above good ones on average
    np.testing.assert_allclose(scores, maps.reshape(len(maps), -1).max(1), rtol=1e-6)
    _, good_scores = model.predict(data["good"])
    assert scores.mean() > good_scores.mean()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_identical(kind, fitted, data, tmp_path):
    model = fitted(kind)
    model.save(tmp_path / kind)
    assert not list((tmp_path / kind).glob("*.pt*")) and not list((tmp_path / kind).glob("*.pkl"))
    loaded = load_model(tmp_path / kind)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    a, sa = model.predict(data["defects"][:4])
    b, sb = loaded.predict(data["defects"][:4])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export_gives_the_same_maps(kind, fitted, data, tmp_path):
    import onnxruntime as ort

    from linewatch.models.export import export_onnx

    model = fitted(kind)
    path = export_onnx(model, tmp_path / f"{kind}.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = data["defects"][:3].transpose(0, 3, 1, 2).astype(np.float32)  # batch 3: the batch axis is dynamic
    maps, scores = sess.run(None, {"images": x})
    ref, ref_scores = model.predict(data["defects"][:3])
    tol = 1e-4 * float(np.abs(ref).max())
    np.testing.assert_allclose(maps, ref, atol=tol, rtol=1e-4)
    np.testing.assert_allclose(scores, ref_scores, atol=tol, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# family specifics
# ---------------------------------------------------------------------------------------------
def test_greedy_coreset_covers_better_than_random():
    from linewatch.models.patchcore import greedy_coreset

    gen = torch.Generator().manual_seed(0)
    # many near-duplicates in one cluster, a few rare-but-normal points far away
    x = torch.cat([torch.randn(2000, 32, generator=gen) * 0.1, torch.randn(20, 32, generator=gen) * 0.1 + 5.0])
    idx = greedy_coreset(x, 50, projection_dim=16, seed=0)
    assert len(set(idx.tolist())) == 50
    cover = torch.cdist(x, x[idx]).amin(1).max()
    rand = torch.randperm(len(x), generator=gen)[:50]
    assert cover < torch.cdist(x, x[rand]).amin(1).max()
    assert (idx >= 2000).any(), "the rare cluster must be in the coreset"


@pytest.mark.slow
def test_patchcore_bank_is_capped(data):
    model = build_model("patchcore", input_size=SIZE, max_bank=50, coreset_ratio=1.0, chunk=16)
    model.fit(data["train"][:4], progress=False)
    assert model.bank.shape == (50, model.feature_dim)
    assert model.fit_info["patches"] == 4 * model.grid[0] * model.grid[1]
    maps, _ = model.predict(data["defects"][:2])  # several chunks, one running minimum
    assert np.isfinite(maps).all()


@pytest.mark.slow
def test_attribution_map_is_grad_cam(fitted, data):
    """The exported closed form equals Grad-CAM computed through torch.autograd."""
    model = fitted("attribution")
    images = data["defects"][:4]
    module = model.inference_module()
    from linewatch.models._common import to_tensor

    with torch.no_grad():
        a = model.head.hidden(module.standardise(to_tensor(images)))
        closed = torch.relu((a * model.head.conv2.weight.view(1, -1, 1, 1)).sum(1)).numpy()
    reference = model.gradcam_autograd(images)
    np.testing.assert_allclose(closed, reference, rtol=1e-4, atol=1e-5)
    assert reference.max() > 0
    # the image-level classifier itself separates defective from good frames
    assert model.image_logits(data["defects"]).mean() > model.image_logits(data["good"]).mean()


def test_cutpaste_changes_only_the_pasted_region(data):
    import cv2

    from linewatch.models.attribution import cutpaste

    rng = np.random.default_rng(0)
    img = data["train"][0]
    for scar in (False, True):
        out, mask = cutpaste(img, rng, scar=scar)
        assert out.shape == img.shape and out.dtype == np.uint8 and mask.any()
        near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert np.array_equal(out[~near], img[~near])
        assert np.abs(out[mask].astype(int) - img[mask].astype(int)).mean() > 1


@pytest.mark.slow
def test_reconstruction_learns(fitted):
    info = fitted("reconstruction").fit_info
    assert info["loss_last"] < 0.6 * info["loss_first"], info


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_a_model_error(kind, data, tmp_path):
    with pytest.raises(ModelError, match="unknown option"):
        build_model(kind, input_size=SIZE, no_such_option=1)
    model = build_model(kind, input_size=SIZE)
    with pytest.raises(ModelError, match="not fitted"):
        model.predict(data["good"])
    with pytest.raises(ModelError, match="128x128"):
        model.fit(np.zeros((3, 64, 64, 3), np.uint8), progress=False)
    with pytest.raises(ModelError):
        model.fit(data["train"][:1].astype(np.float32), progress=False)
    # weights that do not match the config
    with pytest.raises(ModelError, match=kind):
        model.load_state_tensors({"bank": torch.zeros(3, 7), "feat_mean": torch.zeros(7), "feat_std": torch.ones(7)})
