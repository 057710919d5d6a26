"""Recall by defect size for published profiles of one product under several geometries
(docs/results/geometry.md): each GT defect component of the test split (the split
``calibrate run`` used: same seed and fraction) counts as found when the served mask touches
it; sizes are in frame pixels (view area x the ROI-to-view scale squared).

    python scripts/measure_geometry.py --dataset DS --product cap --registry squash=REG1 --registry roi=REG2 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from calibration.data import load_product_splits
from calibration.workflow import served_model
from linewatch.inspection.verdict import inspect_images
from linewatch.profiles import Registry

BINS = ((0, 16, "<16"), (16, 64, "16-64"), (64, 256, "64-256"), (256, 10**12, ">256"))


def measure(dataset: Path, product: str, registry: Path) -> dict:
    prof, bare = Registry(registry).load(product)
    model = served_model(prof, bare)
    _, test = load_product_splits(dataset, product, prof.framing, progress=False)
    maps, scores = model.predict(test.images)
    extent = prof.extent_model()
    verdicts = inspect_images(test.images, maps, scores, prof, extent)
    box = prof.frame_box
    vh, vw = prof.framing.view_hw
    px = (box.w / vw) * (box.h / vh)
    found = {b[2]: [0, 0] for b in BINS}
    for k, v in enumerate(verdicts):
        gt = test.masks[k]
        if not gt.any():
            continue
        served = v.mask > 0 if (v.verdict == "defect" and v.mask is not None) else np.zeros_like(gt)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(gt.astype(np.uint8), connectivity=8)
        for c in range(1, n):
            area = stats[c, cv2.CC_STAT_AREA] * px
            name = next(b[2] for b in BINS if b[0] <= area < b[1])
            found[name][1] += 1
            found[name][0] += int(served[lab == c].any())
    return {"recall_by_size": {k: (f"{a}/{b}" if b else "-") for k, (a, b) in found.items()},
            "image_auroc": prof.calibration_metrics.get("test", {}).get("image_auroc"),
            "iou": prof.calibration_metrics.get("test", {}).get("iou"),
            "view": list(prof.framing.view_hw), "tiles": prof.framing.n_tiles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--product", required=True)
    ap.add_argument("--registry", action="append", required=True, metavar="NAME=DIR")
    a = ap.parse_args()
    for spec in a.registry:
        name, _, d = spec.partition("=")
        print(json.dumps({"product": a.product, "geometry": name, **measure(a.dataset, a.product, Path(d))}))


if __name__ == "__main__":
    main()
