"""The benchmarks' model folder: a PaDiM (or another family) fitted once on the synthetic line,
exported to ONNX and cached under ``~/.cache/linewatch/bench``, then published into a throwaway
registry. Shared by ``bench worker``, ``bench models --compare-anomalib`` and ``bench latency``
(its own module so those benchmarks import it without importing each other)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

BENCH_PRODUCT = "benchcap"
PROFILE_VERSION_TAG = "1"  # bump when the cached profile recipe changes


def cache_dir(root: Path | None = None) -> Path:
    """Where fitted bench profiles are kept (``~/.cache/linewatch/bench`` by default)."""
    if root is not None:
        return Path(root)
    from linewatch.kafka.broker import cache_root

    return cache_root() / "bench"


# -- profile -------------------------------------------------------------------------------------
def _profile_key(kind: str, input_size: int, product: str, fit_images: int, options: dict[str, Any]) -> str:
    blob = json.dumps([PROFILE_VERSION_TAG, kind, input_size, product, fit_images, options], sort_keys=True)
    return f"{kind}-{input_size}-{product}-{fit_images}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def fitted_profile_dir(kind: str = "padim", input_size: int = 256, product: str = "cap", fit_images: int = 60,
                       options: dict[str, Any] | None = None, refit: bool = False,
                       progress: bool = True, cache: Path | None = None) -> tuple[Path, bool]:
    """A cached model folder (model.json, weights, model.onnx, bench.json with the threshold);
    fitted on the synthetic ``product`` the first time. Returns (folder, reused)."""
    from linewatch.models.export import export_onnx
    from linewatch.models.registry import build_model
    from linewatch.synth import SyntheticProduct

    options = dict(options or {})
    folder = cache_dir(cache) / _profile_key(kind, input_size, product, fit_images, options)
    meta = folder / "bench.json"
    if meta.is_file() and (folder / "model.onnx").is_file() and not refit:
        return folder, True
    synth = SyntheticProduct(product, size=input_size, seed=0)
    train = np.stack([synth.normal(i).image for i in range(fit_images)])
    model = build_model(kind, input_size=input_size, **options)
    t0 = time.perf_counter()
    model.fit(train, progress=progress)
    fit_s = time.perf_counter() - t0
    held_out = np.stack([synth.normal(50_000 + i).image for i in range(8)])
    maps, scores = model.predict(held_out, batch_size=8)
    # threshold just above every held-out normal pixel: normal frames are "ok" and cheap,
    # defect frames go through regions + artefacts (the expensive post-processing path)
    threshold = float(maps.max()) * 1.05
    tmp = folder.with_name(folder.name + f".tmp-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        model.save(tmp)
        export_onnx(model, tmp / "model.onnx")
        (tmp / "bench.json").write_text(json.dumps({
            "kind": kind, "backbone": model.backbone_name, "input_size": input_size, "product": product,
            "fit_images": fit_images, "fit_s": round(fit_s, 2), "threshold": threshold, "options": options}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    return folder, False


def publish_bench_profile(folder: Path, registry_dir: Path, product: str = BENCH_PRODUCT, geometry: Any = None):
    """Publish the cached model folder as ``product``'s profile (files copied, ONNX included);
    ``geometry`` (a ``linewatch.inspection.geometry.Geometry``) makes it a tiled profile."""
    from linewatch.profiles import Profile, Registry

    meta = json.loads((folder / "bench.json").read_text())
    extra = {"geometry": geometry} if geometry is not None else {}
    profile = Profile(product=product, model_kind=meta["kind"], backbone=meta["backbone"],
                      input_size=meta["input_size"], threshold=meta["threshold"], threshold_method="manual",
                      notes="linewatch bench worker", **extra)
    return Registry(registry_dir).publish(profile, source_dir=folder)
