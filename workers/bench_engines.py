"""``linewatch bench models``: the model alone, per family and engine.

For each model kind: fit time on synthetic normal images, profile size on disk (safetensors +
ONNX), load time and resident memory of a loaded profile, and images/s at batch 1 and at the
best batch for every engine present (median of ``rounds`` timed rounds of ``seconds`` each),
plus optionally the memory of a process serving ``--products`` copies (the 20-products budget).
Inputs are synthetic frames already at the model size: decode and post-processing are the
worker benchmark's business.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def rss_mb() -> float:
    """Resident memory of this process now (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def images_per_second(engine: Any, frames: np.ndarray, batch: int, seconds: float = 2.0, rounds: int = 3,
                      ) -> tuple[float, float]:
    """Median over ``rounds`` of (images per wall-second, images per CPU-second of this process)
    running ``engine`` on batches of ``batch`` frames. On a machine shared with other jobs the
    wall figure drops with the load; the CPU figure (x cores used = the quiet-machine rate, for
    a process that keeps its threads busy) does not."""
    x = np.ascontiguousarray(np.resize(frames, (batch, *frames.shape[1:])))
    engine.run(x)  # warm-up (allocations, ORT first-run)
    rates, cpu_rates = [], []
    for _ in range(rounds):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            engine.run(x)
            n += batch
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
        rates.append(n / dt)
        cpu_rates.append(n / max(time.process_time() - c0, 1e-9))
    return float(statistics.median(rates)), float(statistics.median(cpu_rates))


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def _dir_mb(path: Path) -> dict[str, float]:
    return {p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(path.iterdir()) if p.is_file()}


def bench_models(kinds: list[str], input_size: int = 256, engines: list[str] | None = None,
                 threads: int = 2, batch_sizes: tuple[int, ...] = (1, 4, 8, 16), seconds: float = 2.0,
                 rounds: int = 3, fit_images: int = 60, product: str = "cap", products: int = 0,
                 options: dict[str, dict[str, Any]] | None = None, workdir: Path | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Measure each model kind; returns a JSON-able dict (see module docstring)."""
    import torch

    from linewatch.synth import SyntheticProduct

    torch.set_num_threads(threads)
    synth = SyntheticProduct(product, size=input_size, seed=0)
    train = np.stack([synth.normal(i).image for i in range(fit_images)])
    frames = np.stack([synth.normal(10_000 + i).image for i in range(4)]
                      + [synth.defective(i, "combined").image for i in range(4)])
    out: dict[str, Any] = {"input_size": input_size, "threads": threads, "product": product,
                           "fit_images": fit_images, "cpu": os.cpu_count(), "models": {}}
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lw-bench-"))
    try:
        _bench_kinds(out, kinds, tmp, train, frames, input_size, engines, threads, batch_sizes, seconds, rounds,
                     products, options, progress)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _bench_kinds(out: dict[str, Any], kinds: list[str], tmp: Path, train: np.ndarray, frames: np.ndarray,
                 input_size: int, engines: list[str] | None, threads: int, batch_sizes: tuple[int, ...],
                 seconds: float, rounds: int, products: int, options: dict[str, dict[str, Any]] | None,
                 progress: bool) -> None:
    from linewatch.models.registry import load_model
    from linewatch.models.export import export_onnx
    from linewatch.models.registry import build_model
    from workers.engines import ENGINE_NAMES, available_engines

    for kind in kinds:
        rec: dict[str, Any] = {}
        model = build_model(kind, input_size=input_size, **(options or {}).get(kind, {}))
        t0 = time.perf_counter()
        model.fit(train, progress=progress)
        rec["fit_s"] = round(time.perf_counter() - t0, 2)
        rec["fit_info"] = {k: v for k, v in getattr(model, "fit_info", {}).items() if k != "history"}
        vdir = tmp / kind
        model.save(vdir)
        export_onnx(model, vdir / "model.onnx")
        files = _dir_mb(vdir)
        rec["disk_mb"] = {"total": round(sum(files.values()), 2), **files}
        del model
        gc.collect()
        # load cost: the shared backbone cache is cleared so the first load pays for it
        from linewatch.models import _common

        _common._shared_backbone.cache_clear()
        gc.collect()
        before = rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        model = load_model(vdir)
        model.inference_module()  # the torch graph too (backbone built, factors unpacked)
        rec["load_s"] = round(time.perf_counter() - t0, 3)
        rec["load_cpu_s"] = round(time.process_time() - c0, 3)
        rec["loaded_rss_mb"] = round(rss_mb() - before, 1)
        ref_maps, _ = model.predict(frames[:8])  # torch CPU float32: what every engine should give
        engs, missing = available_engines(model, vdir / "model.onnx", threads=threads, max_batch=max(batch_sizes))
        wanted = engines or list(ENGINE_NAMES)
        rec["engines"] = {}
        rec["missing_engines"] = {k: v for k, v in missing.items() if k in wanted}
        for eng in engs:
            if eng.name not in wanted:
                continue
            both = {b: images_per_second(eng, frames, b, seconds, rounds) for b in batch_sizes}
            rates = {b: round(v[0], 1) for b, v in both.items()}
            cpu = {b: round(v[1], 1) for b, v in both.items()}
            best = max(rates, key=rates.get)
            best_cpu = max(cpu, key=cpu.get)
            rec["engines"][eng.name] = {"batch1": rates.get(1), "best": rates[best], "best_batch": best,
                                        "by_batch": rates, "per_cpu_s_batch1": cpu.get(1),
                                        "per_cpu_s_best": cpu[best_cpu], "per_cpu_s_best_batch": best_cpu,
                                        "per_cpu_s_by_batch": cpu, "load_average": load_average(),
                                        "precision": eng.precision, **engine_agreement(eng, frames[:8], ref_maps)}
            if progress:
                print(f"{kind:6s} {eng.name:16s} batch1 {rates.get(1)} img/s, best {rates[best]} img/s "
                      f"@ batch {best}; per CPU-second: batch1 {cpu.get(1)}, best {cpu[best_cpu]} "
                      f"(load average {load_average()})", flush=True)
        del engs
        if products:
            rec["serving"] = _serve_many(vdir, products, threads)
        out["models"][kind] = rec


def engine_agreement(engine: Any, frames: np.ndarray, ref_maps: np.ndarray, quantile: float = 0.99) -> dict[str, float]:
    """How far an engine's maps are from the float32 torch CPU reference: the largest error as a
    fraction of the map range, and the IoU of the two masks at the reference's ``quantile`` (a
    threshold that marks about 1% of the pixels, where boundary pixels decide)."""
    maps, _ = engine.run(frames)
    span = float(ref_maps.max() - ref_maps.min()) or 1.0
    thr = float(np.quantile(ref_maps, quantile))
    ref_mask, mask = ref_maps >= thr, maps >= thr
    union = int((ref_mask | mask).sum())
    return {"max_err_of_range": round(float(np.abs(maps - ref_maps).max()) / span, 6),
            "mask_iou_vs_cpu": round(int((ref_mask & mask).sum()) / union, 5) if union else 1.0}


def _serve_many(vdir: Path, n: int, threads: int) -> dict[str, Any]:
    """Memory of one process holding ``n`` loaded copies of a profile with an ORT engine each."""
    from linewatch.models.registry import load_model
    from workers.engines import select_engine

    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    held = []
    for _ in range(n):
        m = load_model(vdir)
        held.append((m, select_engine(m, vdir / "model.onnx", "onnxruntime-cpu", threads=threads)))
    x = np.zeros((1, held[0][0].input_size, held[0][0].input_size, 3), np.uint8)
    for _, eng in held:
        eng.run(x)
    return {"products": n, "rss_added_mb": round(rss_mb() - before, 1), "rss_total_mb": round(rss_mb(), 1),
            "load_all_s": round(time.perf_counter() - t0, 2)}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"input {result['input_size']}px, {result['threads']} threads, product {result['product']}, "
             f"fit on {result['fit_images']} normal images"]
    lines.append(f"{'model':7s} {'engine':17s} {'batch1 img/s':>13s} {'best img/s':>11s} {'@batch':>7s}"
                 f" | {'img/CPU-s b1':>13s} {'best':>7s} {'@batch':>7s}  load | {'precision':13s} {'max err':>8s}"
                 f" {'mask IoU':>8s}")
    for kind, rec in result["models"].items():
        for name, e in rec["engines"].items():
            lines.append(f"{kind:7s} {name:17s} {e['batch1']!s:>13s} {e['best']!s:>11s} {e['best_batch']!s:>7s}"
                         f" | {e['per_cpu_s_batch1']!s:>13s} {e['per_cpu_s_best']!s:>7s} "
                         f"{e['per_cpu_s_best_batch']!s:>7s}  {e['load_average']} | {e['precision']:13s} "
                         f"{e['max_err_of_range']:8.1e} {e['mask_iou_vs_cpu']:8.4f}")
    lines.append("")
    for kind, rec in result["models"].items():
        lines.append(f"{kind}: fit {rec['fit_s']} s, profile {rec['disk_mb']['total']} MB on disk "
                     f"({', '.join(f'{k} {v}' for k, v in rec['disk_mb'].items() if k != 'total')}), "
                     f"load {rec['load_s']} s ({rec['load_cpu_s']} CPU-s), +{rec['loaded_rss_mb']} MB resident")
        if "serving" in rec:
            s = rec["serving"]
            lines.append(f"{kind}: {s['products']} products with an ORT engine each: +{s['rss_added_mb']} MB "
                         f"(process {s['rss_total_mb']} MB), loaded in {s['load_all_s']} s")
        for name, why in rec.get("missing_engines", {}).items():
            lines.append(f"{kind}: {name} not measured: {why}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from linewatch.errors import UserError

    opts: dict[str, dict[str, Any]] = {}
    if args.options:
        try:
            opts = json.loads(args.options)
        except json.JSONDecodeError as exc:
            raise UserError(f"--options: not valid JSON ({exc.msg})") from None
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise UserError(f"--batches: expected comma-separated integers, got {args.batches!r}") from None
    result = bench_models(args.model, args.size, args.engine, args.threads, batches, args.seconds, args.rounds,
                          args.fit_images, args.product, args.products, opts, progress=not args.quiet)
    text = format_table(result)
    if args.compare_anomalib:  # optional: measured only where anomalib is importable
        from workers.bench_profile import fitted_profile_dir

        # ours = the default PaDiM at this size (the bench profile `bench worker` serves), timed
        # in the same process and run as anomalib's, so the ratio lines are printed below
        folder, _ = fitted_profile_dir(input_size=args.size, progress=not args.quiet)
        result["anomalib"] = compare_anomalib(input_size=args.size, threads=args.threads,
                                              ours_onnx=folder / "model.onnx")
        text += "\n\n" + format_anomalib(result["anomalib"])
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model alone: fit time, profile size/memory, images/s per engine",
                       description=__doc__)
    from linewatch.models.registry import FAMILIES

    p.add_argument("--model", action="append", choices=sorted(FAMILIES),
                   help="repeatable (default: padim and cflow)")
    p.add_argument("--engine", action="append", help="engine name to measure (repeatable; default: all present)")
    p.add_argument("--size", type=int, default=256, help="model input size (default 256)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch / ONNX Runtime (default 2)")
    p.add_argument("--batches", default="1,4,8,16", help="batch sizes to time (default 1,4,8,16)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per timed round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, the median is reported (default 3)")
    p.add_argument("--fit-images", type=int, default=60, help="synthetic normal images to fit on (default 60)")
    p.add_argument("--product", default="cap", help="synthetic product (default cap)")
    p.add_argument("--products", type=int, default=0, help="also load N copies + engines and report memory")
    p.add_argument("--options", help='JSON model options per kind, e.g. \'{"padim": {"d": 64}}\'')
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--compare-anomalib", action="store_true",
                   help="also time anomalib's PaDiM (same size/threads) when anomalib is importable")
    p.set_defaults(func=lambda a: _run(_defaults(a)))


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    args.model = args.model or ["padim", "cflow"]
    return args


# -- --compare-anomalib ------------------------------------------------------------------------
# ``--compare-anomalib``: anomalib's PaDiM measured in the same run as ours, when anomalib is
# importable. anomalib is an optional extra, never a dependency: without it the comparison says
# so and carries the figures published in issue 6 instead (measured on this 2-core machine,
# anomalib 2.7.0, torch 2.14 CPU, 2 threads, 256 px, median of three rounds).
# 
# What is measured (same input size, same thread count, same ONNX Runtime session options as
# our engine): anomalib's ``PadimModel`` (random-init backbone: speed does not depend on the
# weights, and nothing downloads) fitted on a few synthetic normal images, then timed at batch 1
# through torch and through its ONNX export on ONNX Runtime; our PaDiM's ONNX graph is timed the
# same way right after, so the ratio is of one run.
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
