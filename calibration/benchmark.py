"""The study's benchmark table on our own data: every model family x every threshold method,
IoU per product-agnostic defect category and per background class, with the threshold-free
metrics (pixel AUROC, AUPRO) and the costs (fit time, inference speed, profile size) beside.

For each product: fit every family on ``train/good`` (normal images only), estimate all five
thresholds on the validation split (``calibration.thresholds``), apply each to the test split
and measure it (``calibration.evaluate.evaluate_maps`` -> ``calibration.metrics``). Products
are then pooled per group: a cell is the mean per-image IoU over every anomalous test image of
that group, across products (each product's group IoU weighted by its anomalous image count).

``run_benchmark`` is the library function; ``linewatch calibrate benchmark`` is its shell.
Outputs in ``out_dir``: ``benchmark.md`` (the table + which family wins per category),
``benchmark.csv`` (the wide table), ``benchmark_long.csv`` (every product x model x method x
group row with Dice/precision/recall/regret), ``benchmark.png`` (IoU heat map) and the fitted
models under ``models/<product>/<family>/``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from calibration.thresholds import METHOD_TITLES, METHODS
from linewatch.errors import UserError
from linewatch.messages import CATEGORIES

GROUPS: tuple[str, ...] = ("all", *(f"category={c}" for c in CATEGORIES), "background=with", "background=without")
GROUP_TITLES = {"all": "all", **{f"category={c}": c for c in CATEGORIES},
                "background=with": "with bg", "background=without": "without bg"}


@dataclass
class BenchmarkTable:
    """The wide table (one row per model x threshold method) and everything it came from."""

    rows: list[dict[str, Any]]
    long_rows: list[dict[str, Any]]
    costs: dict[str, dict[str, Any]]  # model -> fit_s, images_per_s, profile_mb (summed/averaged over products)
    winners: dict[str, dict[str, Any]]  # group -> best model (IoU-curve threshold) and best model x method
    products: list[str]
    families: list[str]
    paths: dict[str, Path] = field(default_factory=dict)

    def cell(self, model: str, method: str, group: str) -> float | None:
        for r in self.rows:
            if r["model"] == model and r["method"] == method:
                return r.get(f"iou[{group}]")
        raise KeyError((model, method))

    def markdown(self) -> str:
        groups = [g for g in GROUPS if any(r.get(f"iou[{g}]") is not None for r in self.rows)]
        head = ["model", "threshold method", *[f"IoU {GROUP_TITLES[g]}" for g in groups],
                "pixel AUROC", "AUPRO", "fit s", "images/s", "profile MB"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r["model"], METHOD_TITLES[r["method"]]]
            cells += [_fmt(r.get(f"iou[{g}]")) for g in groups]
            cells += [_fmt(r["pixel_auroc"]), _fmt(r["aupro"]), _fmt(r["fit_s"], 1), _fmt(r["images_per_s"], 1),
                      _fmt(r["profile_mb"], 2)]
            lines.append("| " + " | ".join(cells) + " |")
        out = ["\n".join(lines), "", "Winners (highest IoU per column):", "",
               "| group | best family (IoU-curve threshold) | IoU | best family x method | IoU |", "|---|---|---|---|---|"]
        for g in groups:
            w = self.winners.get(g)
            if w:
                out.append(f"| {GROUP_TITLES[g]} | {w['model_iou_curve']} | {_fmt(w['iou_iou_curve'])} | "
                           f"{w['model_any']} x {METHOD_TITLES[w['method_any']]} | {_fmt(w['iou_any'])} |")
        return "\n".join(out)


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def _weighted(values: list[tuple[float | None, int]]) -> float | None:
    pairs = [(v, n) for v, n in values if v is not None and n > 0]
    if not pairs:
        return None
    return float(sum(v * n for v, n in pairs) / sum(n for _, n in pairs))


def run_benchmark(dataset_root: str | Path, products: Sequence[str], families: Sequence[str], out_dir: str | Path,
                  input_size: int = 256, val_fraction: float = 1 / 3, seed: int = 0,
                  options: dict[str, dict[str, Any]] | None = None, progress: bool = True,
                  plot: bool = True) -> BenchmarkTable:
    """Fit every family on every product, apply every threshold method, write the table.

    ``options`` maps a family to its model options (e.g. ``{"cflow": {"epochs": 2}}``).
    Raises UserError for an unknown family or a product missing from the dataset.
    """
    from calibration.data import load_product_splits, load_train
    from calibration.evaluate import evaluate_maps
    from calibration.workflow import build, threshold_model
    from linewatch.models.registry import FAMILIES

    products, families = list(products), list(families)
    if not products or not families:
        raise UserError("benchmark: need at least one product and one model family")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise UserError(f"benchmark: unknown model family {unknown[0]!r} (known: {', '.join(sorted(FAMILIES))})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = options or {}

    long_rows: list[dict[str, Any]] = []
    # (model, group) -> [(value, n_anomalous)] for the threshold-free metrics; (model, method, group) for IoU
    iou_acc: dict[tuple[str, str, str], list[tuple[float | None, int]]] = {}
    free_acc: dict[tuple[str, str], list[tuple[float | None, int]]] = {}
    costs: dict[str, dict[str, list[float]]] = {f: {"fit_s": [], "images_per_s": [], "profile_mb": []} for f in families}
    for product in products:
        train = load_train(Path(dataset_root), product, input_size, progress)
        val, test = load_product_splits(Path(dataset_root), product, input_size, val_fraction, seed, progress=progress)
        for family in families:
            model = build(family, input_size, options.get(family))
            t0 = time.perf_counter()
            model.fit(train, progress=progress)
            fit_s = time.perf_counter() - t0
            report, _ = threshold_model(model, val, "iou", require_anomalies=False, extent=False)
            t0 = time.perf_counter()
            maps, scores = model.predict(test.images)
            ips = len(test.images) / max(time.perf_counter() - t0, 1e-9)
            model_dir = out_dir / "models" / product / family
            model.save(model_dir)
            ev = evaluate_maps(family, product, test,
                               report.mask_step.apply_all(maps, test.images), scores,
                               report.thresholds(), report.chosen, report, raw_maps=maps)
            costs[family]["fit_s"].append(fit_s)
            costs[family]["images_per_s"].append(ips)
            costs[family]["profile_mb"].append(_dir_mb(model_dir))
            for r in ev.rows:
                long_rows.append({**r, "fit_s": round(fit_s, 2), "images_per_s": round(ips, 2)})
                iou_acc.setdefault((family, r["method"], r["group"]), []).append(
                    (r["iou"], next(s["n_anomalous"] for s in ev.summary if s["group"] == r["group"])))
            for s in ev.summary:
                for metric in ("pixel_auroc", "aupro"):
                    free_acc.setdefault((family, f"{metric}[{s['group']}]"), []).append((s[metric], s["n_anomalous"]))

    cost_summary = {f: {"fit_s": round(float(np.sum(c["fit_s"])), 2),
                        "images_per_s": round(float(np.mean(c["images_per_s"])), 2),
                        "profile_mb": round(float(np.mean(c["profile_mb"])), 3)} for f, c in costs.items()}
    rows: list[dict[str, Any]] = []
    for family in families:
        for method in METHODS:
            row: dict[str, Any] = {"model": family, "method": method}
            for g in GROUPS:
                acc = iou_acc.get((family, method, g))
                row[f"iou[{g}]"] = None if acc is None else (None if (v := _weighted(acc)) is None else round(v, 4))
            row["pixel_auroc"] = _round(_weighted(free_acc.get((family, "pixel_auroc[all]"), [])))
            row["aupro"] = _round(_weighted(free_acc.get((family, "aupro[all]"), [])))
            row.update(cost_summary[family])
            rows.append(row)

    winners: dict[str, dict[str, Any]] = {}
    for g in GROUPS:
        key = f"iou[{g}]"
        cands = [r for r in rows if r.get(key) is not None]
        if not cands:
            continue
        best_any = max(cands, key=lambda r: r[key])
        iou_rows = [r for r in cands if r["method"] == "iou"]
        best_iou = max(iou_rows, key=lambda r: r[key]) if iou_rows else best_any
        winners[g] = {"model_iou_curve": best_iou["model"], "iou_iou_curve": best_iou[key],
                      "model_any": best_any["model"], "method_any": best_any["method"], "iou_any": best_any[key]}

    table = BenchmarkTable(rows, long_rows, cost_summary, winners, products, families)
    table.paths = write_benchmark(table, out_dir, plot=plot)
    return table


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def write_benchmark(table: BenchmarkTable, out_dir: Path, plot: bool = True) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "benchmark.md", "csv": out_dir / "benchmark.csv",
             "long_csv": out_dir / "benchmark_long.csv", "json": out_dir / "benchmark.json"}
    title = (f"# linewatch benchmark: {', '.join(table.families)} on {', '.join(table.products)}\n\n"
             "Cells: mean per-image IoU over the anomalous test images of the column (all products pooled); "
             "thresholds estimated on the validation split by each method. Pixel AUROC / AUPRO are "
             "threshold-free (all test images). Fit time summed over products; images/s = "
             "`predict` on the test split at batch 16; profile = model weights + config on disk.\n\n")
    paths["markdown"].write_text(title + table.markdown() + "\n")
    for key, rows in (("csv", table.rows), ("long_csv", table.long_rows)):
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        with paths[key].open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    paths["json"].write_text(json.dumps({"rows": table.rows, "winners": table.winners, "costs": table.costs,
                                         "products": table.products, "families": table.families}, indent=2))
    if plot:
        paths["plot"] = plot_benchmark(table, out_dir / "benchmark.png")
    return paths


def plot_benchmark(table: BenchmarkTable, path: Path) -> Path:
    """Heat map: rows model x method, columns the groups, cells IoU (annotated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUPS if any(r.get(f"iou[{g}]") is not None for r in table.rows)]
    data = np.array([[np.nan if r.get(f"iou[{g}]") is None else r[f"iou[{g}]"] for g in groups] for r in table.rows],
                    dtype=float)
    labels = [f"{r['model']} / {METHOD_TITLES[r['method']]}" for r in table.rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) + 4, 0.32 * len(labels) + 1.5))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=max(0.01, float(np.nanmax(data)) if np.isfinite(data).any() else 1),
                   aspect="auto")
    ax.set_xticks(range(len(groups)), [GROUP_TITLES[g] for g in groups], rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] < 0.6 * np.nanmax(data) else "black")
    for k in range(1, len(table.families)):
        ax.axhline(k * len(METHODS) - 0.5, color="white", lw=1.5)
    ax.set_title("IoU per category, model x threshold method")
    fig.colorbar(im, ax=ax, label="IoU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
