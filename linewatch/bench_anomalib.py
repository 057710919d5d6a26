"""``--compare-anomalib``: anomalib's PaDiM measured in the same run as ours, when anomalib is
importable. anomalib is an optional extra, never a dependency: without it the comparison says
so and carries the figures published in issue 6 instead (measured on this 2-core machine,
anomalib 2.7.0, torch 2.14 CPU, 2 threads, 256 px, median of three rounds).

What is measured (same input size, same thread count, same ONNX Runtime session options as
our engine): anomalib's ``PadimModel`` (random-init backbone: speed does not depend on the
weights, and nothing downloads) fitted on a few synthetic normal images, then timed at batch 1
through torch and through its ONNX export on ONNX Runtime; our PaDiM's ONNX graph is timed the
same way right after, so the ratio is of one run.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# issue 6: anomalib 2.7.0 on this machine (images/s)
PUBLISHED: dict[str, dict[str, float]] = {
    "resnet18": {"e2e_torch": 10.2, "e2e_onnxruntime": 19.7, "model_onnxruntime_batch1": 28.4},
    "efficientnet_lite0": {"e2e_torch": 11.7, "e2e_onnxruntime": 26.0, "model_onnxruntime_batch1": 45.4},
    "patchcore_wide_resnet50": {"e2e_torch": 3.6, "e2e_onnxruntime": 4.5},
}
# timm layer names anomalib's TimmFeatureExtractor accepts (strides 4, 8, 16)
LAYERS = {"resnet18": ["layer1", "layer2", "layer3"], "efficientnet_lite0": ["blocks.1", "blocks.2", "blocks.4"]}


def anomalib_version() -> str | None:
    try:
        import anomalib
    except Exception:  # not installed, or broken: the comparison is skipped either way
        return None
    return str(getattr(anomalib, "__version__", "unknown"))


def _rate(fn, batch: int, seconds: float, rounds: int) -> tuple[float, float]:
    fn()  # warm-up
    rates, cpu = [], []
    for _ in range(rounds):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += batch
        rates.append(n / (time.perf_counter() - t0))
        cpu.append(n / max(time.process_time() - c0, 1e-9))
    return round(statistics.median(rates), 1), round(statistics.median(cpu), 1)


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as workers.engines does
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compare_anomalib(input_size: int = 256, threads: int = 2, backbone: str = "efficientnet_lite0",
                     ours_onnx: Path | None = None, seconds: float = 2.0, rounds: int = 3,
                     fit_images: int = 16) -> dict[str, Any]:
    """anomalib's PaDiM vs ours at batch 1 (images/s, and per CPU-second); see the module doc."""
    out: dict[str, Any] = {"backbone": backbone, "input_size": input_size, "threads": threads,
                           "published_issue6": PUBLISHED,
                           "load_average": [round(x, 2) for x in os.getloadavg()]}
    version = anomalib_version()
    out["anomalib_version"] = version
    if version is None:
        out["measured"] = False
        out["reason"] = "anomalib is not importable in this environment (optional extra; not installed)"
        return out
    try:
        out.update(_measure(input_size, threads, backbone, ours_onnx, seconds, rounds, fit_images))
        out["measured"] = True
    except Exception as exc:  # an anomalib API change must not break the benchmark
        out["measured"] = False
        out["reason"] = f"anomalib {version} failed: {type(exc).__name__}: {exc}"
    return out


def _measure(input_size: int, threads: int, backbone: str, ours_onnx: Path | None, seconds: float, rounds: int,
             fit_images: int) -> dict[str, Any]:
    import torch

    from anomalib.models.image.padim.torch_model import PadimModel  # type: ignore[import-not-found]

    from linewatch.synth import SyntheticProduct

    torch.set_num_threads(threads)
    synth = SyntheticProduct("cap", size=input_size, seed=0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def prep(imgs: np.ndarray) -> torch.Tensor:  # what anomalib's pre-processor feeds the model
        return (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    import random

    random.seed(0)  # anomalib draws its channel subset with the random module
    torch.manual_seed(0)  # random-init backbone: same weights every run
    model = PadimModel(backbone=backbone, layers=LAYERS.get(backbone, LAYERS["resnet18"]), pre_trained=False,
                       n_features=100)
    model.train()
    train = np.stack([synth.normal(i).image for i in range(fit_images)])
    with torch.no_grad():
        for i in range(0, len(train), 8):
            model(prep(train[i : i + 8]))
    if hasattr(model, "fit_gaussian"):
        model.fit_gaussian()
    else:  # anomalib 2.0-2.1: embeddings kept in a list, fitted by the Lightning module
        bank = model.memory_bank
        model.gaussian.fit(torch.vstack(bank) if isinstance(bank, list) else bank)
    model.eval()
    x1 = prep(np.stack([synth.normal(90_000).image]))
    x8 = prep(np.stack([synth.normal(90_000 + i).image for i in range(8)]))
    res: dict[str, Any] = {}
    with torch.inference_mode():
        res["anomalib_torch_batch1"] = _rate(lambda: model(x1), 1, seconds, rounds)

    class _Export(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor):
            r = self.m(x)
            return r.anomaly_map, r.pred_score

    with tempfile.TemporaryDirectory(prefix="lw-anomalib-") as tmp:
        path = Path(tmp) / "anomalib_padim.onnx"
        with torch.no_grad():
            torch.onnx.export(_Export(model), (x1,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["anomaly_map", "pred_score"],
                              dynamic_axes={"input": {0: "batch"}})
        res["anomalib_onnx_mb"] = round(path.stat().st_size / 2**20, 1)
        sess = _ort_session(path, threads)
        xn = x1.numpy()
        res["anomalib_onnxruntime_batch1"] = _rate(lambda: sess.run(None, {"input": xn}), 1, seconds, rounds)
        xn8 = x8.numpy()
        res["anomalib_onnxruntime_batch8"] = _rate(lambda: sess.run(None, {"input": xn8}), 8, seconds, rounds)
    if ours_onnx is not None and Path(ours_onnx).is_file():
        ours = _ort_session(Path(ours_onnx), threads)
        name = ours.get_inputs()[0].name
        imgs = np.stack([synth.normal(90_000 + i).image for i in range(8)])
        xo = np.ascontiguousarray(imgs[:1].transpose(0, 3, 1, 2), np.float32)
        xo8 = np.ascontiguousarray(imgs.transpose(0, 3, 1, 2), np.float32)
        res["ours_onnxruntime_batch1"] = _rate(lambda: ours.run(None, {name: xo}), 1, seconds, rounds)
        res["ours_onnxruntime_batch8"] = _rate(lambda: ours.run(None, {name: xo8}), 8, seconds, rounds)
        for b in ("1", "8"):
            a, o = res[f"anomalib_onnxruntime_batch{b}"], res[f"ours_onnxruntime_batch{b}"]
            res[f"ratio_ours_vs_anomalib_ort_batch{b}"] = {"wall": round(o[0] / a[0], 2),
                                                            "per_cpu_s": round(o[1] / a[1], 2)}
    return res


def format_anomalib(res: dict[str, Any]) -> str:
    pub = res["published_issue6"].get(res["backbone"], {})
    head = f"anomalib PaDiM comparison ({res['backbone']}, {res['input_size']} px, {res['threads']} threads): "
    if not res.get("measured"):
        return head + f"not measured: {res['reason']}.\n  published (issue 6, same machine): " + \
            ", ".join(f"{k} {v} img/s" for k, v in pub.items())
    lines = [head + f"anomalib {res['anomalib_version']}, load average {res['load_average']}",
             "  images/s (wall, per CPU-second), model alone:"]
    for k in ("anomalib_torch_batch1", "anomalib_onnxruntime_batch1", "anomalib_onnxruntime_batch8",
              "ours_onnxruntime_batch1", "ours_onnxruntime_batch8"):
        if k in res:
            lines.append(f"    {k:30s} {res[k][0]:>7} {res[k][1]:>7}")
    for b in ("1", "8"):
        r = res.get(f"ratio_ours_vs_anomalib_ort_batch{b}")
        if r:
            lines.append(f"  ours / anomalib on ONNX Runtime, batch {b}: {r['wall']}x wall, {r['per_cpu_s']}x per "
                         "CPU-second (target >= 2x)")
    lines.append("  published (issue 6): " + ", ".join(f"{k} {v}" for k, v in pub.items()))
    return "\n".join(lines)
