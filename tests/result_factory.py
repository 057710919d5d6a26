"""Build realistic InspectionResult records for sink/store/dashboard tests (no worker needed):
real JPEG thumbnails and PNG masks/heat maps made with OpenCV, deterministic by seed."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np

from linewatch.messages import InspectionResult, Region, b64

CATS = ("structural", "surface", "contamination", "combined", "unknown")


def images(seed: int, size: int = 96) -> tuple[bytes, bytes, bytes]:
    """(thumbnail JPEG, mask PNG, heat map PNG) with a blob defect at a seeded place."""
    rng = np.random.default_rng(seed)
    base = np.full((size, size, 3), 150, np.uint8)
    cv2.circle(base, (size // 2, size // 2), size // 3, (90, 110, 130), -1)
    base = cv2.add(base, rng.integers(0, 25, base.shape, dtype=np.uint8))
    cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (cx, cy), (size // 8, size // 12), float(rng.integers(0, 180)), 0, 360, 255, -1)
    dist = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), size / 12)
    heat = cv2.applyColorMap(cv2.normalize(dist, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8), cv2.COLORMAP_JET)
    base[mask > 0] = (40, 40, 60)
    return (
        cv2.imencode(".jpg", base)[1].tobytes(),
        cv2.imencode(".png", mask)[1].tobytes(),
        cv2.imencode(".png", heat)[1].tobytes(),
    )


def make_result(
    i: int,
    *,
    product: str = "widget",
    camera: str = "cam-1",
    line: str = "line-A",
    verdict: str = "ok",
    category: str = "unknown",
    capture_ts_ms: int = 1_764_000_000_000,
    profile_version: int = 1,
    threshold: float = 0.5,
    latency_ms: float = 40.0,
    with_images: bool = True,
    frame_id: str | None = None,
) -> InspectionResult:
    defect = verdict == "defect"
    regions = []
    thumb = mask = heat = None
    if defect:
        n = 2 if category == "combined" else 1
        regions = [
            Region(area_px=120 + 10 * k, area_frac=0.01, bbox=(10 + k, 12, 20, 14), peak_score=0.9, mean_score=0.7,
                   category=category, confidence=0.8)
            for k in range(n)
        ]
        if with_images:
            thumb, mask, heat = images(i)
    return InspectionResult(
        frame_id=frame_id or f"{camera}-{i}-{product}",
        product=product,
        camera=camera,
        line=line,
        seq=i,
        capture_ts_ms=capture_ts_ms,
        processed_ts_ms=capture_ts_ms + int(latency_ms),
        image_score=0.9 if defect else 0.1,
        threshold=threshold,
        image_threshold=threshold,
        verdict=verdict,
        defect_area_frac=0.01 if defect else 0.0,
        regions=regions,
        category=category if defect else "unknown",
        category_confidence=0.8 if defect and category != "unknown" else 0.0,
        profile_version=profile_version,
        model_kind="padim",
        engine="onnxruntime-cpu",
        worker_id="w-test",
        latency_ms=latency_ms,
        inference_ms=12.0,
        kafka_partition=i % 4,
        kafka_offset=i,
        width=256,
        height=256,
        mask_png_b64=b64(mask),
        thumbnail_jpeg_b64=b64(thumb),
        heatmap_png_b64=b64(heat),
    )


def known_dataset(now_ms: int, n: int = 200, seed: int = 7) -> list[InspectionResult]:
    """A fixed mix across 2 products, 3 cameras, 2 lines, all categories, spread over the
    last 50 minutes (so 'last hour' holds all of them), plus 40 frames 3 hours ago."""
    rng = random.Random(seed)
    out = []
    products = [("widget", "line-A", ("cam-1", "cam-2")), ("bottle", "line-B", ("cam-3",))]
    for i in range(n):
        product, line, cams = products[i % 2]
        defect = rng.random() < 0.3
        cat = CATS[rng.randrange(len(CATS))] if defect else "unknown"
        ts = now_ms - int((n - i) / n * 50 * 60_000)
        out.append(make_result(i, product=product, camera=cams[(i // 2) % len(cams)], line=line,
                               verdict="defect" if defect else "ok", category=cat, capture_ts_ms=ts,
                               latency_ms=20 + rng.random() * 80))
    for j in range(40):
        i = n + j
        out.append(make_result(i, product="widget", camera="cam-1", line="line-A",
                               verdict="defect", category="surface", capture_ts_ms=now_ms - 3 * 3600_000 + j * 1000))
    return out


def write_db(path: Path, results: list[InspectionResult]) -> None:
    from linewatch import store

    store.init_db(path)
    with store.writing(path) as con:
        store.write_batch(con, results)
