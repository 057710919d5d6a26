"""PaDiM (cached maps from measure_categories.py) vs the trivial detector (|image - mean normal|,
channel mean, Gaussian blur sigma 4) on the synthetic line: pixel AUROC, image AUROC, IoU at
the oracle threshold (pooled over the test images) and per category at that threshold.

    python scripts/check_synth_maps.py --root /tmp/lw_cat --cache /tmp/lw_maps
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from calibration.datasets import load_mvtec
from linewatch.messages import CATEGORIES


def iou_curve(maps: np.ndarray, masks: np.ndarray, bins: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    edges = np.linspace(float(maps.min()), float(maps.max()), bins + 1)
    pos = np.histogram(maps[masks], edges)[0][::-1].cumsum()[::-1]
    neg = np.histogram(maps[~masks], edges)[0][::-1].cumsum()[::-1]
    return edges[:-1], pos / np.maximum(masks.sum() + neg, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lw_cat")
    ap.add_argument("--cache", default="/tmp/lw_maps")
    ap.add_argument("--products", default="cap,pcb,brick,turf")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    root = Path(args.root)
    print(f"{'product':7s} {'model':8s} pixAUROC imgAUROC  IoU(oracle) " + " ".join(f"{c[:6]:>6s}" for c in CATEGORIES))
    for p in args.products.split(","):
        ds = load_mvtec(root, p)
        imgs = ds.load_images(ds.test, args.size)
        masks = ds.load_masks(ds.test, args.size)
        cats = np.array([i.category for i in ds.test])
        mean = ds.train_images(args.size).astype(np.float32).mean(0)
        trivial = np.stack([cv2.GaussianBlur(np.abs(im.astype(np.float32) - mean).mean(2), (0, 0), 4) for im in imgs])
        padim = np.load(Path(args.cache) / f"{root.name}_{p}_{args.size}_padim.npy").astype(np.float32)
        for name, maps in (("padim", padim), ("trivial", trivial)):
            sub = np.random.default_rng(0).random(maps.shape) < 0.25
            pix = roc_auc_score(masks[sub], maps[sub])
            anom = masks.reshape(len(masks), -1).any(1)
            img = roc_auc_score(anom, maps.reshape(len(maps), -1).max(1))
            thr, iou = iou_curve(maps, masks)
            t = thr[int(np.argmax(iou))]
            per = []
            for c in CATEGORIES:
                r = cats == c
                pr, gt = maps[r] >= t, masks[r]
                per.append((pr & gt).sum() / max((pr | gt).sum(), 1))
            print(f"{p:7s} {name:8s} {pix:8.3f} {img:8.3f} {iou.max():11.3f}  " + " ".join(f"{v:6.2f}" for v in per))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
