"""ONNX export and the engines: every engine present gives the same maps as torch within a
stated tolerance and the same masks at a threshold, for every model family; the fallback
chain says what it chose and why. TensorRT tests skip where tensorrt is absent (the optional extra `gpu`)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from linewatch.errors import UserError
from linewatch.models.export import export_onnx
from workers.engines import (ENGINE_NAMES, Engine, OnnxRuntimeEngine, TorchEngine, available_engines,
                             select_engine)

torch.set_num_threads(1)
SIZE = 64
# float32 ORT vs torch: different kernels/summation order; maps are O(10), so 1e-3 relative
RTOL, ATOL = 1e-3, 1e-3


def _frames(n: int, seed: int = 0) -> np.ndarray:
    from linewatch.synth import SyntheticProduct

    prod = SyntheticProduct("brick", size=SIZE, seed=seed)
    good = [prod.normal(100 + i).image for i in range(n - 1)]
    return np.stack(good + [prod.defective(0, "contamination").image])


def _fit(kind: str):
    from linewatch.models.registry import build_model
    from linewatch.synth import SyntheticProduct

    prod = SyntheticProduct("brick", size=SIZE, seed=0)
    train = np.stack([prod.normal(i).image for i in range(8)])
    opts = {"padim": {"d": 16}, "padim-texture": {"d": 16, "texture_weight": 0.5},
            "cflow": {"epochs": 1, "coupling_blocks": 2, "positions_per_batch": 256}}[kind]
    return build_model(kind.split("-")[0], input_size=SIZE, **opts).fit(train, progress=False)


@pytest.fixture(scope="module", params=["padim", "padim-texture", "cflow"])
def exported(request, tmp_path_factory):
    model = _fit(request.param)
    path = export_onnx(model, tmp_path_factory.mktemp(request.param) / "model.onnx")
    return model, path


def _separating_threshold(maps: np.ndarray, tol: float) -> float:
    """A high threshold with no map value within ``tol`` of it, so 'same mask' is a fair test."""
    v = np.sort(maps.ravel())
    start = int(0.97 * len(v))
    gaps = v[start + 1 :] - v[start:-1]
    i = start + int(np.argmax(gaps > 2 * tol))
    assert gaps[i - start] > 2 * tol, "no clean gap in the map values"
    return float((v[i] + v[i + 1]) / 2)


def test_onnx_graph_is_one_file_with_dynamic_batch(exported):
    import onnx

    model, path = exported
    proto = onnx.load(str(path))
    inp = proto.graph.input[0]
    assert inp.name == "images"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in proto.graph.output] == ["maps", "scores"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["linewatch.kind"] == model.kind
    engine = OnnxRuntimeEngine(path, SIZE, "cpu", threads=1)
    frames = _frames(3)
    m1, s1 = engine.run(frames[:1])
    m3, s3 = engine.run(frames)
    assert m1.shape == (1, SIZE, SIZE) and m3.shape == (3, SIZE, SIZE) and s3.shape == (3,)
    np.testing.assert_allclose(m1[0], m3[0], rtol=RTOL, atol=ATOL)


def test_every_engine_matches_torch_maps_and_masks(exported):
    model, path = exported
    frames = _frames(4)
    ref_maps, ref_scores = model.predict(frames)
    engines, missing = available_engines(model, path, threads=1, max_batch=3)
    names = [e.name for e in engines]
    assert "onnxruntime-cpu" in names and "torch-cpu" in names, missing
    tol = ATOL + RTOL * float(np.abs(ref_maps).max())
    thr = _separating_threshold(ref_maps, tol)
    for engine in engines:
        assert isinstance(engine, Engine)
        maps, scores = engine.run(frames)  # max_batch 3: also proves chunking
        assert maps.dtype == np.float32 and scores.dtype == np.float32
        if engine.precision == "fp32":
            np.testing.assert_allclose(maps, ref_maps, rtol=RTOL, atol=ATOL, err_msg=engine.name)
            np.testing.assert_allclose(scores, ref_scores, rtol=RTOL, atol=ATOL, err_msg=engine.name)
            assert np.array_equal(maps >= thr, ref_maps >= thr), engine.name
        else:  # float16 backbone (torch-cuda, TensorRT): close maps, masks differ on boundary pixels only
            assert engine.precision == "fp16-backbone", engine.precision
            _assert_half_precision_close(maps, scores, ref_maps, ref_scores, engine.name)
    assert (ref_maps >= thr).any()


def test_tiled_batches_match_between_engines_and_the_offline_model(exported):
    """A 2x2-tiled profile: the tiles of several frames go through each engine as one batch
    (chunked by max_batch) and are stitched; the stitched maps and scores equal the offline
    TiledModel's (torch, as calibration computes them)."""
    from linewatch.inspection.geometry import Geometry, Roi, TiledModel

    model, path = exported
    big = np.stack([np.tile(f, (2, 2, 1)) for f in _frames(3)])  # 3 frames of 2*SIZE px
    side = big.shape[1]
    framing = Geometry(roi=Roi(x=0, y=0, w=side, h=side), tiles=(2, 2)).resolved(side, side).framing(SIZE)
    views = np.stack([framing.view(f, framing.geometry.roi) for f in big])
    ref_maps, ref_scores = TiledModel(model, framing).predict(views)
    assert ref_maps.shape == (3, *framing.view_hw)
    engines, missing = available_engines(model, path, threads=1, max_batch=5)
    assert {"onnxruntime-cpu", "torch-cpu"} <= {e.name for e in engines}, missing
    for engine in engines:
        tile_maps, _ = engine.run(framing.tile(views))  # 12 tiles, max_batch 5: chunked
        maps, scores = framing.stitch(tile_maps)
        if engine.precision == "fp32":
            np.testing.assert_allclose(maps, ref_maps, rtol=RTOL, atol=ATOL, err_msg=engine.name)
            np.testing.assert_allclose(scores, ref_scores, rtol=RTOL, atol=ATOL, err_msg=engine.name)
        else:
            _assert_half_precision_close(maps, scores, ref_maps, ref_scores, engine.name)


def _assert_half_precision_close(maps, scores, ref_maps, ref_scores, name: str) -> None:
    scale = float(np.abs(ref_maps).max())
    np.testing.assert_allclose(maps, ref_maps, rtol=2e-2, atol=2e-2 * scale, err_msg=name)
    np.testing.assert_allclose(scores, ref_scores, rtol=2e-2, atol=2e-2 * scale, err_msg=name)
    thr = float(np.quantile(ref_maps, 0.95))  # a mask of a few percent of the pixels
    ref_mask, mask = ref_maps >= thr, maps >= thr
    iou = (ref_mask & mask).sum() / (ref_mask | mask).sum()
    assert iou >= 0.97, f"{name}: mask IoU {iou:.4f} against the float32 reference"


def test_auto_chain_picks_best_present_and_says_why(exported, caplog):
    model, path = exported
    with caplog.at_level(logging.INFO, logger="workers.engines"):
        engine = select_engine(model, path, "auto", threads=1)
    expected = next(n for n in ENGINE_NAMES if n in {e.name for e in available_engines(model, path, 1)[0]})
    assert engine.name == expected
    assert f"chose {engine.name}" in caplog.text
    if engine.name == "onnxruntime-cpu":
        assert set(engine.skipped) == {"tensorrt", "onnxruntime-cuda", "torch-cuda"}
        assert "tensorrt" in engine.reason
    # no ONNX export: ends at torch
    assert select_engine(model, None, "auto").name.startswith("torch")
    assert select_engine(model, path, "torch", threads=1).name.startswith("torch")
    assert select_engine(model, path, "onnxruntime", threads=1).name.startswith("onnxruntime")


def test_explicit_unavailable_engine_is_a_user_error(exported):
    model, path = exported
    try:
        import tensorrt  # noqa: F401

        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if not has_trt:
        with pytest.raises(UserError, match="tensorrt"):
            select_engine(model, path, "tensorrt")
    with pytest.raises(UserError, match="unknown"):
        select_engine(model, path, "openvino")
    with pytest.raises(UserError, match="no ONNX export"):
        select_engine(model, None, "onnxruntime-cpu")


def test_engine_rejects_wrong_input(exported):
    model, _ = exported
    engine = TorchEngine(model, "cpu")
    with pytest.raises(ValueError, match="uint8"):
        engine.run(np.zeros((1, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError, match=f"{SIZE}, {SIZE}, 3"):
        engine.run(np.zeros((1, 32, 32, 3), np.uint8))
    m, s = engine.run(np.zeros((0, SIZE, SIZE, 3), np.uint8))
    assert m.shape == (0, SIZE, SIZE) and s.shape == (0,)


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(exported, tmp_path):
    trt = pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from workers.engines import TensorRTEngine

    model, path = exported
    frames = _frames(4)
    ref, _ = OnnxRuntimeEngine(path, SIZE).run(frames)
    engine = TensorRTEngine(path, SIZE, max_batch=4, cache_dir=tmp_path)
    assert engine.precision == "fp16-backbone"
    maps, scores = engine.run(frames)
    ref_scores = OnnxRuntimeEngine(path, SIZE).run(frames)[1]
    _assert_half_precision_close(maps, scores, ref, ref_scores, engine.name)
    cached = list(tmp_path.glob("*.engine"))
    assert len(cached) == 1 and trt.__version__ in cached[0].name
    again = TensorRTEngine(path, SIZE, max_batch=4, cache_dir=tmp_path)  # reuses the cache
    np.testing.assert_allclose(again.run(frames)[0], maps, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_torch_cuda_half_matches_cpu(exported):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model, _ = exported
    frames = _frames(3)
    ref, ref_scores = model.predict(frames)
    engine = TorchEngine(model, "cuda")
    assert engine.precision == "fp16-backbone"
    maps, scores = engine.run(frames)
    _assert_half_precision_close(maps, scores, ref, ref_scores, engine.name)
    # scoring stays float32 under the backbone's autocast: the maps are not float16-rounded
    assert not np.array_equal(maps, maps.astype(np.float16).astype(np.float32))
