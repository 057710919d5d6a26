"""Which model and threshold method to use for a new product.

The study's guidance: PaDiM with the IoU-curve threshold as the starting point; CFLOW when
surface defects are more likely (here: surface is the largest share of the labelled defects
and at least ``SURFACE_DOMINATES`` of them). With ``measure``, candidates are fitted and the
one with the best measured IoU at its IoU-curve threshold wins.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from linewatch.messages import CATEGORIES

SURFACE_DOMINATES = 0.4


class Recommendation(BaseModel):
    model_kind: str
    threshold_method: str = "iou"
    reason: str
    proportions: dict[str, float]
    counts: dict[str, int]
    label_source: str = "labels"  # "labels" | "predicted"
    measured: list[dict[str, Any]] = []

    def text(self) -> str:
        props = ", ".join(f"{c} {self.counts.get(c, 0)} ({self.proportions.get(c, 0):.0%})" for c in CATEGORIES)
        lines = [f"defect categories ({self.label_source}): {props}",
                 f"recommended: {self.model_kind} + {self.threshold_method} threshold -- {self.reason}"]
        for m in self.measured:
            lines.append(f"  measured {m['model']}: IoU {m['iou']:.4f} at {m['method']} threshold "
                         f"(pixel AUROC {m['pixel_auroc']}, fit {m['fit_seconds']} s)")
        return "\n".join(lines)


def recommend_from_categories(categories: list[str], label_source: str = "labels") -> Recommendation:
    """From the anomalous validation images' categories (normal/unknown ones are ignored)."""
    counts = Counter(c for c in categories if c in CATEGORIES)
    total = sum(counts.values())
    props = {c: (counts[c] / total if total else 0.0) for c in CATEGORIES}
    full_counts = {c: int(counts[c]) for c in CATEGORIES}
    if total == 0:
        return Recommendation(model_kind="padim", reason="no labelled defects: the study's default for a new product",
                              proportions=props, counts=full_counts, label_source=label_source)
    shares = ", ".join(f"{c} {props[c]:.0%}" for c in sorted(CATEGORIES, key=lambda c: -props[c]) if counts[c])
    best = max(props.values())
    leaders = [c for c in CATEGORIES if counts[c] and props[c] == best]
    if len(leaders) > 1:  # a tie: no category may be called "most"
        return Recommendation(model_kind="padim",
                              reason=f"no category dominates ({shares} of {total}); PaDiM with the IoU-curve "
                                     "threshold is the study's recommendation unless surface defects dominate",
                              proportions=props, counts=full_counts, label_source=label_source)
    top = leaders[0]
    if top == "surface" and props["surface"] >= SURFACE_DOMINATES:
        return Recommendation(model_kind="cflow",
                              reason=f"surface defects dominate ({shares} of {total}); the study found "
                                     "CFLOW better than PaDiM on surface defects",
                              proportions=props, counts=full_counts, label_source=label_source)
    return Recommendation(model_kind="padim",
                          reason=f"most defects are {top} ({shares} of {total}); PaDiM with the IoU-curve "
                                 "threshold is the study's recommendation unless surface defects dominate",
                          proportions=props, counts=full_counts, label_source=label_source)


def recommend_measured(dataset_root: Path, product: str, candidates: list[str] | None = None,
                       input_size: int = 256, val_fraction: float = 1 / 3, seed: int = 0,
                       progress: bool = True) -> Recommendation:
    """Fit each candidate family, threshold on validation (IoU curve), measure IoU on test."""
    from calibration.data import load_product_splits, load_train
    from calibration.workflow import evaluate_model, fit_model, threshold_model
    from linewatch.models.registry import FAMILIES

    candidates = candidates or [k for k in ("padim", "cflow") if k in FAMILIES]
    train = load_train(Path(dataset_root), product, input_size, progress)
    val, test = load_product_splits(Path(dataset_root), product, input_size, val_fraction, seed, progress=progress)
    base = recommend_from_categories(val.categories)
    measured = []
    for kind in candidates:
        try:
            model, secs = fit_model(train, kind, input_size, progress=progress)
        except ImportError as exc:  # family not written yet
            measured.append({"model": kind, "iou": float("nan"), "method": "iou", "pixel_auroc": None,
                             "fit_seconds": None, "error": str(exc)})
            continue
        report, vmaps = threshold_model(model, val, "iou")
        ev = evaluate_model(kind, product, model, test, report, val, vmaps)
        h = ev.headline()
        measured.append({"model": kind, "iou": h["iou"], "method": "iou", "pixel_auroc": h["pixel_auroc"],
                         "iou_category_mean": h["iou_category_mean"], "fit_seconds": round(secs, 2)})
    ok = [m for m in measured if m["iou"] == m["iou"]]
    if not ok:
        return base
    best = max(ok, key=lambda m: m["iou"])
    reason = (f"highest measured IoU on the test split ({best['iou']:.4f}); "
              f"the category rule alone would say {base.model_kind}")
    return base.model_copy(update={"model_kind": best["model"], "reason": reason, "measured": measured})
