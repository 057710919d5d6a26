"""Is the synthetic line a fair test? Fit PaDiM and the trivial mean-difference detector per
product and print pixel AUROC and IoU (oracle threshold on the test set, and per category).

    python scripts/check_synth_line.py /tmp/lw_synth --products cap,brick --models padim,meandiff
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from linewatch.datasets import load_mvtec
from linewatch.messages import CATEGORIES


def iou_curve(maps: np.ndarray, masks: np.ndarray, bins: int = 512) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = float(maps.min()), float(maps.max())
    edges = np.linspace(lo, hi, bins + 1)
    pos = np.histogram(maps[masks], edges)[0][::-1].cumsum()[::-1]
    neg = np.histogram(maps[~masks], edges)[0][::-1].cumsum()[::-1]
    tp, fp, fn = pos, neg, masks.sum() - pos
    return edges[:-1], tp / np.maximum(tp + fp + fn, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--products", default="cap,pcb,brick,turf")
    ap.add_argument("--models", default="padim,trivial")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--save-maps", default=None, help="folder to save the test maps (.npy) in")
    args = ap.parse_args()
    from sklearn.metrics import roc_auc_score

    from linewatch.models.registry import build_model as create_model

    torch.set_num_threads(2)
    for product in args.products.split(","):
        ds = load_mvtec(Path(args.root), product, size=args.size)
        train = ds.train_images()
        test = ds.test
        imgs = ds.load_images(test)
        masks = ds.load_masks(test)
        cats = np.array([s.category for s in test])
        for kind in args.models.split(","):
            t0 = time.time()
            if kind == "trivial":  # |image - mean normal image|, channel mean, Gaussian blur sigma 4
                mean = train.astype(np.float32).mean(0)
                maps = np.stack([cv2.GaussianBlur(np.abs(im.astype(np.float32) - mean).mean(2), (0, 0), 4)
                                 for im in imgs])
            else:
                model = create_model(kind, input_size=args.size)
                model.fit(train, progress=False)
                maps, _ = model.predict(imgs)
            if args.save_maps:
                np.save(Path(args.save_maps) / f"{product}_{kind}.npy", maps.astype(np.float16))
            sub = np.random.default_rng(0).random(maps.shape) < 0.25
            auroc = roc_auc_score(masks[sub], maps[sub])
            thr, iou = iou_curve(maps, masks)
            t = thr[np.argmax(iou)]
            per = []
            for c in CATEGORIES:
                r = cats == c
                pr, gt = maps[r] >= t, masks[r]
                per.append(f"{c[:6]} {(pr & gt).sum() / max((pr | gt).sum(), 1):.2f}")
            anom = masks.reshape(len(masks), -1).any(1)
            img_auc = roc_auc_score(anom, maps.reshape(len(maps), -1).max(1))
            print(f"{product:6s} {kind:8s} pixAUROC {auroc:.3f} imgAUROC {img_auc:.3f} oracleIoU {iou.max():.3f} | "
                  + " | ".join(per) + f"  ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
