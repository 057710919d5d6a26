"""Measure the product-agnostic categorizer on a dataset (the synthetic line by default).

Protocol (issue 5): each product's test images are split into validation/test with
``calibration.datasets.split_validation_test`` (stratified by category, seeded). The categorizer
is trained on validation images and scored on test images, frame level, macro-F1 over the
four categories plus the confusion matrix:

- within product: trained on the validation images of all products (the product's own
  included, weighted up), tested on that product's test images;
- leave-one-product-out: trained on the other products' validation images only (``--pool-products``:
  and these products', which are never tested themselves), as ``calibrate`` does for a product
  without category labels.

Regions come from the ground-truth masks (``--regions gt``) or from PaDiM's thresholded maps
(``--regions padim``: fit on train/good, the IoU-curve threshold of the validation split as
``calibrate`` chooses it;
PaDiM maps are cached as .npy in ``--cache``; ``--regions padim-refined``: the maps after the
calibrated refinement, as the worker thresholds them -- training also sees the validation
images' unrefined-map regions, as ``calibration.categorizer_samples.fit_categorizer`` does; then the learned region
extent reshapes them unless it costs held-out validation IoU, ``--no-extent``: never). Every product's normal appearance
(``linewatch.inspection.categorize.normal_appearance`` of its train/good images, which need no labels) goes
with its samples and with the parameters applied to it, as its profile would carry it.

    python scripts/measure_categories.py --root /tmp/lw_cat --generate --regions gt,padim
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from calibration.categorizer_fit import (CategorySample, category_scores, format_confusion, predict_frames,
                                         train_categorizer)
from calibration.thresholds import estimate_thresholds
from linewatch.inspection.categorize import normal_appearance
from calibration.datasets import load_mvtec, split_validation_test


def padim_maps(root: Path, product: str, size: int, items, cache: Path, val_items=None) -> np.ndarray:
    """PaDiM maps of ``items``; with ``val_items``, PaDiM's own setting (the texture term) is
    first chosen on them as calibrate_product does (calibration.mask_step.choose_variant)."""
    path = cache / f"{root.name}_{product}_{size}_padim{'_chosen' if val_items is not None else ''}.npy"
    if path.is_file():
        return np.load(path).astype(np.float32)
    import torch

    from linewatch.models.registry import build_model

    torch.set_num_threads(2)
    ds = load_mvtec(root, product)
    t0 = time.time()
    model = build_model("padim", input_size=size).fit(ds.train_images(size), progress=False)
    if val_items is not None:
        from calibration.data import LabelledSet
        from calibration.mask_step import calibrate_refinement, choose_variant

        vi, vm = ds.load_images(val_items, size), ds.load_masks(val_items, size)
        val = LabelledSet([it.path for it in val_items], vi, vm, [it.category for it in val_items],
                          [ds.background] * len(vi), [it.category for it in val_items])
        m0, s0 = model.predict(vi)
        note = choose_variant(model, val, m0, s0, calibrate_refinement(m0, vm, vi))[3]
        print(f"  padim {product}: {note}", flush=True)
    maps = model.anomaly_map(ds.load_images(items, size))
    print(f"  padim {product}: fit+maps {time.time() - t0:.0f}s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, maps.astype(np.float16))
    return maps


def build_samples(root: Path, products: list[str], size: int, source: str, cache: Path, val_fraction: float,
                  seed: int, with_normal: bool = True, extent: bool = True):
    out = {}
    for p in products:
        ds = load_mvtec(root, p)
        anomalous = [i for i in ds.test]
        val, test = split_validation_test(anomalous, val_fraction=val_fraction, seed=seed)
        items = val + test
        imgs = ds.load_images(items, size)
        gts = ds.load_masks(items, size)
        bg = ds.background
        normal = normal_appearance(ds.train_images(size)) if with_normal else None
        views: list[CategorySample] = []  # extra training views of the validation images
        if source == "gt":
            maps, masks, thr = [None] * len(items), gts, None
        else:
            allmaps = padim_maps(root, p, size, ds.test, cache, val)
            pos = {it.path: k for k, it in enumerate(ds.test)}
            maps = allmaps[[pos[it.path] for it in items]]
            nv = len(val)
            raw = maps
            if source == "padim-refined":  # the mask refinement calibrate_product uses (validation only)
                from calibration.mask_step import calibrate_refinement

                r = calibrate_refinement(maps[:nv], gts[:nv], imgs[:nv])
                print(f"  {p}: {r.reason}", flush=True)
                maps = r.apply_all(maps, imgs).astype(np.float32)
            thr = estimate_thresholds(maps[:nv], gts[:nv], prefer="iou").threshold  # as calibrate picks it
            masks = maps >= thr
            if source == "padim-refined" and extent:  # the learned region extent, fitted on validation as calibrate does
                from calibration.extent_fit import fit_extent
                from calibration.categorizer_samples import served_mask

                ext = fit_extent(raw[:nv], maps[:nv], imgs[:nv], gts[:nv], thr)
                print(f"  {p}: {ext.reason}", flush=True)
                masks = np.stack([served_mask(maps, k, thr, raw, imgs, ext.params) for k in range(len(items))])
            if source == "padim-refined":  # training only: the unrefined map's regions too (calibrate does this)
                from calibration.categorizer_samples import raw_view_threshold

                raw_thr = raw_view_threshold(raw[:nv], gts[:nv])
                if raw_thr is not None:
                    views = [CategorySample(imgs[k], it.category, raw[k] >= raw_thr, raw[k], raw_thr, bg, p, gts[k],
                                            normal) for k, it in enumerate(items[:nv]) if it.category != "good"]
            maps = raw  # map features from the raw map, as the worker computes them
        samples = [CategorySample(imgs[k], it.category, masks[k], maps[k], thr, bg, p, gts[k], normal)
                   for k, it in enumerate(items) if it.category != "good"]
        nv_anom = sum(it.category != "good" for it in val)
        out[p] = (samples[:nv_anom] + views, samples[nv_anom:])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/lw_cat")
    ap.add_argument("--generate", action="store_true", help="write the synthetic line to --root first if missing")
    ap.add_argument("--products", default="cap,pcb,brick,turf")
    ap.add_argument("--pool-products", default="",
                    help="comma-separated products whose validation images join every training pool but which "
                         "are never tested or held out (a plant's other labelled products; e.g. gravel)")
    ap.add_argument("--n-per-category", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--regions", default="gt", help="comma-separated: gt (true masks), padim (thresholded maps), padim-refined (maps after the calibrated refinement)")
    ap.add_argument("--kind", default="forest", help="ensemble, logreg, forest (comma-separated to compare)")
    ap.add_argument("--frame-model", default="forest", help="forest (frame classifier) or rule (the tuned frame rule)")
    ap.add_argument("--normal", action=argparse.BooleanOptionalAction, default=True,
                    help="novelty features against each product's normal appearance (--no-normal: without)")
    ap.add_argument("--contrast-views", type=int, default=3,
                    help="contrast-scaled copies of the training regions (calibration.categorizer_fit.contrast_views; 0: none)")
    ap.add_argument("--train-seeds", type=int, default=1,
                    help="train N times with different classifier seeds (seed + 1000 k) and print the spread: "
                         "one forest seed moves the pooled figures by a few hundredths")
    ap.add_argument("--extent", action=argparse.BooleanOptionalAction, default=True,
                    help="padim-refined: the learned region extent (workers.extent), fitted on validation as "
                         "calibrate does (--no-extent: the thresholded regions alone)")
    ap.add_argument("--val-fraction", type=float, default=1 / 3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/lw_maps")
    ap.add_argument("--json", default=None, help="write all figures here")
    args = ap.parse_args()
    root = Path(args.root)
    products = args.products.split(",")
    pool = products + [q for q in args.pool_products.split(",") if q and q not in products]  # tested + pool-only
    if args.generate and not (root / "categories.csv").is_file():
        from linewatch.synth import generate_dataset

        generate_dataset(root, pool, size=args.size, seed=args.seed, n_test_per_category=args.n_per_category)
    report: dict = {}
    for source in args.regions.split(","):
        data = build_samples(root, pool, args.size, source, Path(args.cache), args.val_fraction, args.seed,
                             args.normal, args.extent)
        for kind, k in ((kind, k) for kind in args.kind.split(",") for k in range(args.train_seeds)):
            key = f"{source}/{kind}" + (f"/t{k}" if args.train_seeds > 1 else "")
            tseed = args.seed + 1000 * k
            report[key] = {}
            print(f"\n=== regions from {source}, classifier {kind}, training seed {tseed} ===")
            pooled: dict[str, tuple[list[str], list[str]]] = {"within": ([], []), "lopo": ([], [])}  # truth, pred
            all_val = [s for q in pool for s in data[q][0]]
            for p in products:
                other_val = [s for q in pool if q != p for s in data[q][0]]
                test = data[p][1]
                normal = test[0].normal if test else None  # the tested product's own, as its profile holds it
                within = train_categorizer(all_val, kind=kind, product=p, seed=tseed, region_source=source,
                                           normal=normal, frame_model=args.frame_model,
                                           n_contrast_views=args.contrast_views)
                lopo = train_categorizer(other_val, kind=kind, seed=tseed, region_source=source, normal=normal,
                                         frame_model=args.frame_model, n_contrast_views=args.contrast_views)
                truth = [s.category for s in test]
                pw, pl = ([c for c, _ in predict_frames(m, test)] for m in (within, lopo))
                rw, rl = category_scores(truth, pw), category_scores(truth, pl)
                for name, pred in (("within", pw), ("lopo", pl)):
                    pooled[name][0].extend(truth)
                    pooled[name][1].extend(pred)
                report[key][p] = {"within": rw, "lopo": rl, "n_val": len(data[p][0]), "n_test": len(test)}
                print(f"{p:6s} within macro-F1 {rw['macro_f1']:.3f} acc {rw['accuracy']:.3f} | "
                      f"leave-one-product-out macro-F1 {rl['macro_f1']:.3f} acc {rl['accuracy']:.3f} "
                      f"(val {len(data[p][0])}, test {len(test)})")
            for name, (truth, pred) in pooled.items():
                res = category_scores(truth, pred)
                report[key][f"pooled_{name}"] = res
                print(f"\npooled {name}: macro-F1 {res['macro_f1']:.3f} accuracy {res['accuracy']:.3f} (n={len(truth)})")
                print(format_confusion(res))
        if args.train_seeds > 1:
            for kind in args.kind.split(","):
                for name in ("within", "lopo"):
                    v = [report[f"{source}/{kind}/t{k}"][f"pooled_{name}"]["macro_f1"] for k in range(args.train_seeds)]
                    print(f"{source}/{kind} pooled {name} over {len(v)} training seeds: macro-F1 mean {np.mean(v):.3f} "
                          f"sd {np.std(v):.3f} ({' '.join(f'{x:.3f}' for x in v)})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
