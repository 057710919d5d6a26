"""CFLOW: the flow is a proper density (log-det checked against autograd's Jacobian), trains
with early stopping on held-out normals, persists exactly, and finds synthetic defects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linewatch.models.registry import load_model
from linewatch.models.base import ModelError
from linewatch.models.cflow import CFlow, ConditionalFlow, positional_encoding_2d

torch.set_num_threads(1)
SIZE = 64
FAST = {"epochs": 3, "steps_per_epoch": 8, "positions_per_batch": 256, "coupling_blocks": 2, "hidden": 32}


@pytest.fixture(scope="module")
def brick():
    from linewatch.synth import SyntheticProduct

    prod = SyntheticProduct("brick", size=SIZE, seed=5)
    train = np.stack([prod.normal(i).image for i in range(12)])
    bad = [prod.defective(i, c) for i, c in enumerate(["structural", "contamination"])]
    return train, np.stack([s.image for s in bad]), np.stack([s.mask > 0 for s in bad])


@pytest.fixture(scope="module")
def fitted(brick):
    return CFlow(input_size=SIZE, **FAST).fit(brick[0], progress=False)


def test_flow_nll_is_exact_change_of_variables():
    """nll per dim == (0.5|z|^2 + 0.5 D log 2pi - log|det dz/dx|) / D, log-det from autograd."""
    torch.manual_seed(0)
    flow = ConditionalFlow(6, 4, 16, 3, 1.9, torch.Generator().manual_seed(0))
    for p in flow.parameters():  # leave the identity start
        torch.nn.init.normal_(p, std=0.3)
    x, c = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    flow = flow.double()

    def z_of(v):
        out = v.view(1, 6)
        for blk in flow.blocks:
            out, _ = blk(out, c)
        return out.view(6)

    jac = torch.autograd.functional.jacobian(z_of, x.view(6))
    z = z_of(x.view(6))
    expected = (0.5 * (z * z).sum() + 3 * np.log(2 * np.pi) - torch.linalg.slogdet(jac)[1]) / 6
    assert flow(x, c).item() == pytest.approx(expected.item(), rel=1e-9)


def test_positional_encoding_distinguishes_positions():
    pe = positional_encoding_2d(16, 8, 8).flatten(1).T
    assert pe.shape == (64, 16)
    assert torch.cdist(pe, pe).add(torch.eye(64) * 10).min() > 0.1
    with pytest.raises(ModelError, match="multiple of 4"):
        positional_encoding_2d(6, 4, 4)


def test_training_uses_held_out_split_and_early_stopping(fitted):
    info = fitted.fit_info
    assert info["held_out"] >= 1 and 1 <= info["epochs_run"] <= FAST["epochs"]
    train_nll = [h[0] for h in info["history"]]
    assert train_nll[-1] < 1.4189  # below the untrained identity flow's NLL of N(0,1) data (0.5 log 2 pi e)
    assert info["best_val_nll"] == pytest.approx(min(h[1] for h in info["history"]), abs=1e-3) or \
        info["best_val_nll"] <= min(h[1] for h in info["history"])


def test_save_load_identical_maps(fitted, brick, tmp_path):
    _, bad, _ = brick
    maps, scores = fitted.predict(bad)
    fitted.save(tmp_path / "c")
    loaded = load_model(tmp_path / "c")
    assert isinstance(loaded, CFlow)
    m2, s2 = loaded.predict(bad)
    assert np.array_equal(maps, m2) and np.array_equal(scores, s2)
    for f in (tmp_path / "c").iterdir():
        head = f.read_bytes()[:4]
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", f.name


def test_map_is_higher_inside_defects(fitted, brick):
    from sklearn.metrics import roc_auc_score

    _, bad, masks = brick
    maps, _ = fitted.predict(bad)
    assert roc_auc_score(masks.ravel(), maps.ravel()) > 0.8
    for m, gt in zip(maps, masks):
        assert m[gt].mean() > m[~gt].mean()


def test_batch_independent_maps(fitted, brick):
    _, bad, _ = brick
    both, _ = fitted.predict(bad)
    one, _ = fitted.predict(bad[:1])
    np.testing.assert_allclose(both[0], one[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs(fitted, tmp_path):
    with pytest.raises(ModelError, match="at least 3"):
        CFlow(input_size=SIZE).fit(np.zeros((2, SIZE, SIZE, 3), np.uint8), progress=False)
    with pytest.raises(ModelError, match="unknown option"):
        CFlow(input_size=SIZE, flows=3)
    fitted.save(tmp_path / "c")
    cfg = (tmp_path / "c" / "model.json").read_text().replace('"hidden": 32', '"hidden": 64')
    (tmp_path / "c" / "model.json").write_text(cfg)
    with pytest.raises(ModelError, match="do not match"):
        load_model(tmp_path / "c")
