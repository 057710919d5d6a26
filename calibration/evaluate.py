"""Evaluate calibrated models on a test set: every threshold method, per category and per
background class, threshold-free metrics beside them, threshold regret, and the arrays the
report plots need.

Groups: ``all`` (every test image); ``category=<c>`` (the normal test images plus the
anomalous ones of category c -- so false alarms on normal frames still count); and
``background=with|without`` (by the images' background flag, when known).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.data import GOOD, LabelledSet
from calibration.metrics import (aupro, image_auroc, image_counts, pixel_auroc, summarize_counts,
                                 threshold_regret)
from calibration.thresholds import METHOD_TITLES, METHODS, PixelCurves, ThresholdReport, pixel_curves
from linewatch.messages import CATEGORIES


@dataclass
class ModelEvaluation:
    """One model on one product's test set (rows are plain dicts, ready for CSV/Markdown)."""

    name: str  # e.g. "padim"
    product: str
    chosen: str
    thresholds: dict[str, float | None]
    rows: list[dict[str, Any]]  # long format: one per (group, method)
    summary: list[dict[str, Any]]  # wide format: one per group
    test_curves: PixelCurves
    val_report: ThresholdReport | None
    val_curves: PixelCurves | None
    test: LabelledSet
    maps: np.ndarray
    category_eval: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    served_masks: np.ndarray | None = None  # the worker's masks at the chosen threshold (learned extent on)

    def headline(self) -> dict[str, Any]:
        """The numbers that decide: overall row, category-averaged IoU at the chosen method."""
        overall = next(r for r in self.summary if r["group"] == "all")
        cats = [r for r in self.summary if r["group"].startswith("category=") and r.get(f"iou_{self.chosen}") is not None]
        avg = float(np.mean([r[f"iou_{self.chosen}"] for r in cats])) if cats else None
        return {"model": self.name, "product": self.product, "pixel_auroc": overall["pixel_auroc"],
                **({"pixel_metrics": overall["pixel_metrics"], "n_masked": overall["n_masked"]}
                   if "pixel_metrics" in overall else {}),
                "aupro": overall["aupro"], "image_auroc": overall["image_auroc"],
                "chosen": self.chosen, "threshold": self.thresholds.get(self.chosen),
                "iou": overall.get(f"iou_{self.chosen}"), "iou_category_mean": avg,
                "regret": overall.get(f"regret_{self.chosen}"),
                # at the served verdict (linewatch.inspection.verdict.judge); calibration.frame_kpis
                **{k: self.extra.get("frame_kpis", {}).get(k) for k in ("escape_rate", "false_reject_rate")}}


NEEDS_MASKS = "needs masks"


def groups_of(test: LabelledSet) -> list[tuple[str, np.ndarray]]:
    cats = np.array(test.categories)
    normal = cats == GOOD
    out = [("all", np.ones(len(test), bool))]
    for c in CATEGORIES:
        if (cats == c).any():
            out.append((f"category={c}", normal | (cats == c)))
    if (cats == "unknown").any():
        out.append(("category=unknown", normal | (cats == "unknown")))
    for flag, label in ((True, "with"), (False, "without")):
        rows = np.array([b is flag for b in test.background], dtype=bool)
        if rows.any():
            out.append((f"background={label}", rows))
    return out


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else round(float(x), nd)


def evaluate_maps(name: str, product: str, test: LabelledSet, maps: np.ndarray, scores: np.ndarray,
                  thresholds: dict[str, float | None], chosen: str, val_report: ThresholdReport | None = None,
                  val_curves: PixelCurves | None = None, raw_maps: np.ndarray | None = None) -> ModelEvaluation:
    """All metrics for one model's test maps; ``thresholds`` maps method -> pixel threshold.

    ``maps`` are what gets thresholded (after any region refinement); ``raw_maps``, when given,
    are the model's own maps, used for the threshold-free pixel AUROC and AUPRO (refinement
    drops pixels to the map floor, which would understate the model's ranking quality).

    Pixel figures (pixel AUROC, AUPRO, IoU, regret, the pixel curves) use only the images whose
    pixels are labelled (``LabelledSet.pixel_rows``); image AUROC uses every labelled image. A
    group with defects but no mask says ``pixel_metrics: "needs masks"`` instead of a figure
    computed on nothing.
    """
    known = test.pixel_rows
    masks = test.masks
    raw = maps if raw_maps is None else raw_maps
    usable = {m: t for m, t in thresholds.items() if t is not None}
    curves = pixel_curves(maps[known], masks[known], extra=list(usable.values()))
    counts = {m: image_counts(maps, masks, t) for m, t in usable.items()}
    labels = test.anomalous
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for group, sel in groups_of(test):
        psel = sel & known
        g_maps, g_masks = raw[psel], masks[psel]
        n_masked, n_def = int((labels & psel).sum()), int((labels & sel).sum())
        wide: dict[str, Any] = {"model": name, "product": product, "group": group,
                                "n_images": int(sel.sum()), "n_anomalous": n_def,
                                "pixel_auroc": _r(pixel_auroc(g_maps, g_masks)) if n_masked else None,
                                "aupro": _r(aupro(g_maps, g_masks)) if n_masked else None,
                                "image_auroc": _r(image_auroc(scores[sel], labels[sel]))}
        if n_masked < n_def:
            wide["pixel_metrics"] = NEEDS_MASKS if not n_masked else f"on the {n_masked} of {n_def} masked defects"
            wide["n_masked"] = n_masked
        has_anom = bool(n_masked)
        for method in METHODS:
            t = usable.get(method)
            if t is None:
                wide[f"iou_{method}"] = None
                continue
            s = summarize_counts(counts[method], t, psel)
            regret = threshold_regret(threshold=t, curves=curves, rows=psel[known]) if has_anom else None
            rows.append({"model": name, "product": product, "group": group, "method": method,
                         "chosen": method == chosen, "threshold": _r(t, 6), "iou": _r(s.iou),
                         "dice": _r(s.dice), "pooled_iou": _r(s.pooled_iou), "pooled_dice": _r(s.pooled_dice),
                         "precision": _r(s.precision), "recall": _r(s.recall),
                         "normal_false_alarm_rate": _r(s.normal_false_alarm_rate),
                         "oracle_iou": _r(regret.oracle_iou) if regret else None,
                         "regret": _r(regret.regret) if regret else None})
            wide[f"iou_{method}"] = _r(s.iou)
            wide[f"regret_{method}"] = _r(regret.regret) if regret else None
        wide["oracle_iou"] = next((r["oracle_iou"] for r in rows if r["group"] == group), None)
        summary.append(wide)
    return ModelEvaluation(name, product, chosen, dict(thresholds), rows, summary, curves, val_report,
                           val_curves, test, maps)


# -- tables --------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ["model", "product", "group", "n_images", "n_anomalous", "pixel_auroc", "aupro", "image_auroc",
                   *[f"iou_{m}" for m in METHODS], "oracle_iou"]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str], headers: dict[str, str] | None = None) -> str:
    headers = headers or {}
    out = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def summary_markdown(evals: list[ModelEvaluation]) -> str:
    rows = []
    for e in evals:
        for r in e.summary:
            rr = dict(r)
            rr["regret"] = r.get(f"regret_{e.chosen}")
            rr["chosen"] = e.chosen
            rows.append(rr)
    heads = {f"iou_{m}": f"IoU@{m}" for m in METHODS}
    heads.update({"pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "image_auroc": "image AUROC",
                  "n_images": "n", "n_anomalous": "n anom", "oracle_iou": "oracle IoU",
                  "regret": "regret (chosen)"})
    return markdown_table(rows, SUMMARY_COLUMNS + ["chosen", "regret"], heads)


def _wide_columns(rows: list[dict[str, Any]]) -> list[str]:
    present = {k for r in rows for k in r}
    return [c for c in SUMMARY_COLUMNS if c in present] + sorted(present - set(SUMMARY_COLUMNS))


def write_tables(evals: list[ModelEvaluation], out_dir: Path) -> dict[str, Path]:
    """metrics.md (wide), metrics.csv (long: group x method), summary.csv, metrics.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    long_rows = [r for e in evals for r in e.rows]
    wide_rows = [r for e in evals for r in e.summary]
    paths = {"markdown": out_dir / "metrics.md", "csv": out_dir / "metrics.csv",
             "summary_csv": out_dir / "summary.csv", "json": out_dir / "metrics.json"}
    long_cols = list(long_rows[0].keys()) if long_rows else []
    for path, rows, cols in ((paths["csv"], long_rows, long_cols),
                             (paths["summary_csv"], wide_rows, _wide_columns(wide_rows))):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        path.write_text(buf.getvalue())
    md = ["# Evaluation", "", "IoU = mean per-image IoU over the anomalous test images of the group "
          "(normal test images are in every group and count for pooled IoU, precision, false alarms). "
          "Regret = oracle IoU on this test set minus IoU at the calibrated threshold.", "",
          summary_markdown(evals), ""]
    for e in evals:
        md += [f"## {e.name} on {e.product}: thresholds", ""]
        if e.val_report is not None:
            md += [e.val_report.table(), "", f"Chosen: **{e.chosen}** -- {e.val_report.reason}", ""]
            md += [f"- {n}" for n in e.val_report.notes] + [""]
        md += [f"### {e.name} on {e.product}: every method, overall", "",
               markdown_table([r for r in e.rows if r["group"] == "all"],
                              ["method", "threshold", "iou", "dice", "pooled_iou", "precision", "recall",
                               "normal_false_alarm_rate", "oracle_iou", "regret"]), ""]
        if e.category_eval and e.category_eval.get("n"):
            ce = e.category_eval
            md += [f"### {e.name} on {e.product}: defect categories (regions from the thresholded map)", "",
                   f"accuracy {ce['accuracy']:.4f}, macro-F1 {ce['macro_f1']:.4f} over {ce['n']} anomalous images "
                   "(rows = truth, columns = prediction)", "",
                   markdown_table([{"truth": lab, **{p: row[j] for j, p in enumerate(ce["labels"])}}
                                   for lab, row in zip(CATEGORIES, ce["confusion"])], ["truth", *ce["labels"]]), ""]
    paths["markdown"].write_text("\n".join(md))
    payload = [{"model": e.name, "product": e.product, "chosen": e.chosen, "thresholds": e.thresholds,
                "headline": e.headline(), "summary": e.summary, "rows": e.rows,
                "threshold_report": e.val_report.model_dump() if e.val_report else None,
                "categories": e.category_eval, **e.extra} for e in evals]
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    return paths


def method_title(m: str) -> str:
    return METHOD_TITLES.get(m, m)
