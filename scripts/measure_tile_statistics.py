"""Shared statistics across tiles (what linewatch ships) against per-tile-position statistics
(one model per tile position, anomalib's tiled ensemble), on one product and one tiling
(docs/results/geometry.md, "Shared or per-position statistics").

Both variants see the same framing, the same training views, the same validation/test split
and the same calibration (``threshold_model`` with the mask step, no setting choice and no
extent, so that only the statistics differ); the test metrics are ``evaluate_model``'s. The
paired per-image IoU difference (positional - shared) over the defective test images is given
with its standard error.

    python scripts/measure_tile_statistics.py --dataset DS --product cap --roi 192,64,640,640 --tiles 3x3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from calibration.data import load_product_splits, open_product
from calibration.workflow import build, evaluate_model, resolve_framing, threshold_model
from linewatch.inspection.geometry import Framing, Geometry, Roi, TiledModel, parse_tiles


class PositionalTiledModel(TiledModel):
    """One model per tile position: tile k of every view trains and is scored by model k."""

    def __init__(self, models: list[object], framing: Framing):
        super().__init__(models[0], framing)
        self.models = models

    def fit(self, views: np.ndarray, progress: bool = True) -> "PositionalTiledModel":
        tiles, t = self.framing.tile(views), self.framing.n_tiles
        for k, m in enumerate(self.models):
            m.fit(tiles[k::t], progress=progress)  # type: ignore[attr-defined]
        return self

    def predict(self, views: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        tiles, t = self.framing.tile(views), self.framing.n_tiles
        maps = np.empty(tiles.shape[:3], np.float32)
        for k, m in enumerate(self.models):
            maps[k::t] = m.predict(tiles[k::t], batch_size=batch_size)[0]  # type: ignore[attr-defined]
        return self.framing.stitch(maps)


def per_image_iou(served: np.ndarray, gt: np.ndarray) -> float:
    inter = np.logical_and(served, gt).sum()
    union = np.logical_or(served, gt).sum()
    return float(inter / union) if union else 1.0


def run(dataset: Path, product: str, roi: str | None, tiles: str, kind: str, input_size: int) -> dict:
    geometry = Geometry(roi=Roi.parse(roi) if roi else None, tiles=parse_tiles(tiles))
    ds = open_product(dataset, product)
    framing = resolve_framing(geometry, input_size, ds.train[0].path)
    train = ds.train_images(framing, progress=False)
    val, test = load_product_splits(dataset, product, framing, progress=False)
    out: dict = {"product": product, "roi": roi, "tiles": tiles, "view": list(framing.view_hw),
                 "n_train": len(train), "n_test": len(test)}
    ious = {}
    for name in ("shared", "positional"):
        t0 = time.perf_counter()
        if name == "shared":
            model = TiledModel(build(kind, input_size), framing)
        else:
            model = PositionalTiledModel([build(kind, input_size) for _ in range(framing.n_tiles)], framing)
        model.fit(train, progress=False)
        report, val_maps = threshold_model(model, val, "iou", choose_setting=False, extent=False)
        ev = evaluate_model(kind, product, model, test, report, val, val_maps)
        maps = report.mask_step.apply_all(model.predict(test.images)[0], test.images)
        rows = np.flatnonzero(test.anomalous & np.array([m.any() for m in test.masks]))
        ious[name] = np.array([per_image_iou(maps[i] > report.threshold, test.masks[i] > 0) for i in rows])
        h = ev.headline()
        out[name] = {"image_auroc": h.get("image_auroc"), "pixel_auroc": h.get("pixel_auroc"),
                     "iou": h.get("iou"), "seconds": round(time.perf_counter() - t0, 1),
                     "statistics_bytes": int(sum(_stat_bytes(m) for m in
                                                 getattr(model, "models", [model.model])))}
    d = ious["positional"] - ious["shared"]
    out["paired_iou_gain"] = {"mean": round(float(d.mean()), 4),
                              "se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4), "n": int(len(d))}
    return out


def _stat_bytes(model: object) -> int:
    """Bytes of what fit() learned (``state_tensors``: what a profile stores)."""
    return sum(int(v.numel() * v.element_size()) for v in model.state_tensors().values())  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True, help="dataset root (required)")
    ap.add_argument("--product", required=True, help="product folder under the dataset (required)")
    ap.add_argument("--roi", default=None, help="X,Y,W,H in frame pixels (default: the whole frame)")
    ap.add_argument("--tiles", default="3x3", help="RxC tile grid (default: 3x3)")
    ap.add_argument("--model", default="padim", help="model family (default: padim)")
    ap.add_argument("--input-size", type=int, default=256, help="tile side in pixels (default: 256)")
    a = ap.parse_args()
    print(json.dumps(run(a.dataset, a.product, a.roi, a.tiles, a.model, a.input_size)))


if __name__ == "__main__":
    main()
