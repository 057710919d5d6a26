"""The evaluation report a line engineer opens: PNG plots and one self-contained-folder HTML page.

Plots per model: IoU and F1 vs threshold on validation (every method's threshold marked, the
chosen one highlighted) with the test IoU curve beside it (the oracle point shows the regret);
pixel PR and ROC curves on test; overlays of true (green) and predicted (red) defect outlines
with the heat map on a sample of test images; the category confusion matrix when present.
"""

from __future__ import annotations

import html
from pathlib import Path

import cv2
import numpy as np

from calibration.evaluate import ModelEvaluation, markdown_table, summary_markdown
from calibration.thresholds import METHOD_TITLES, METHODS

COLORS = {"iou": "tab:red", "f1": "tab:orange", "roc": "tab:purple", "normal_std": "tab:brown",
          "normal_quantile": "tab:gray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _saved(plt, fig, path: Path, dpi: int = 90) -> Path:
    """Lay out, write and close one figure (every plot of the report ends so)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_threshold_curves(e: ModelEvaluation, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, curves, title in ((axes[0], e.val_curves, "validation"), (axes[1], e.test_curves, "test")):
        if curves is None:
            ax.set_axis_off()
            continue
        t = curves.thresholds
        ax.plot(t, curves.mean_image_iou(), label="IoU (mean per image)", color="tab:blue")
        ax.plot(t, curves.pooled_f1(), label="F1 / Dice (pooled)", color="tab:green", alpha=0.8)
        iou = curves.mean_image_iou()
        for m in METHODS:
            thr = e.thresholds.get(m)
            if thr is None:
                continue
            y = iou[curves.index_of(thr)]
            chosen = m == e.chosen
            ax.axvline(thr, color=COLORS[m], lw=2.2 if chosen else 1, ls="-" if chosen else "--",
                       label=f"{m}{' (chosen)' if chosen else ''} = {thr:.4g}")
            ax.plot([thr], [y], "o", color=COLORS[m], ms=8 if chosen else 5)
        if title == "test" and not np.isnan(iou).all():
            b = int(np.nanargmax(iou))
            ax.plot([t[b]], [iou[b]], "k*", ms=12, label=f"oracle IoU {iou[b]:.3f}")
        lo, hi = np.quantile(t, [0.02, 1.0])
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, 1)
        ax.set_xlabel("pixel threshold")
        ax.set_title(f"{e.name} / {e.product}: IoU and F1 vs threshold ({title})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    return _saved(plt, fig, path)


def plot_pr_roc(e: ModelEvaluation, path: Path) -> Path:
    plt = _plt()
    tp, fp, p, n = e.test_curves.pooled()
    recall = tp / max(p, 1)
    precision = np.divide(tp, tp + fp, out=np.ones(len(tp)), where=(tp + fp) > 0)
    fpr = fp / max(n, 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    axes[0].plot(recall, precision, color="tab:blue")
    axes[1].plot(np.append(fpr, 0), np.append(recall, 0), color="tab:blue")
    axes[1].plot([0, 1], [0, 1], ":", color="gray")
    for m in METHODS:
        thr = e.thresholds.get(m)
        if thr is None:
            continue
        i = e.test_curves.index_of(thr)
        axes[0].plot([recall[i]], [precision[i]], "o", color=COLORS[m], label=m)
        axes[1].plot([fpr[i]], [recall[i]], "o", color=COLORS[m], label=m)
    axes[0].set(xlabel="recall", ylabel="precision", title=f"{e.name} / {e.product}: pixel PR (test)", xlim=(0, 1), ylim=(0, 1.02))
    axes[1].set(xlabel="false positive rate", ylabel="true positive rate", title="pixel ROC (test)", xlim=(0, 1), ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left" if ax is axes[0] else "lower right")
    return _saved(plt, fig, path)


def plot_operating_curve(e: ModelEvaluation, path: Path) -> Path | None:
    """Escape rate against false-reject rate over the image threshold, test (and validation)
    curves, the served image threshold marked: what each escape rate costs in rejected good frames."""
    oc = e.extra.get("operating_curve") or {}
    if not oc.get("test") or oc["test"][0]["escape_rate"] is None or oc["test"][0]["false_reject_rate"] is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, style in (("validation", ":"), ("test", "-")):
        pts = oc.get(key)
        if not pts or pts[0]["escape_rate"] is None or pts[0]["false_reject_rate"] is None:
            continue
        ax.step([p["false_reject_rate"] for p in pts], [p["escape_rate"] for p in pts], style, where="post",
                label=f"{key} ({pts[0]['n_defective']} defective, {pts[0]['n_normal']} normal)")
    kpis = e.extra.get("frame_kpis") or {}
    esc, fr = kpis.get("escape_rate"), kpis.get("false_reject_rate")
    if esc and fr and esc.get("rate") is not None and fr.get("rate") is not None:
        ax.errorbar([fr["rate"]], [esc["rate"]], xerr=[[fr["rate"] - fr["ci95"][0]], [fr["ci95"][1] - fr["rate"]]],
                    yerr=[[esc["rate"] - esc["ci95"][0]], [esc["ci95"][1] - esc["rate"]]], fmt="o", color="tab:red",
                    capsize=3, label="served verdict (test, Wilson intervals)")
    if oc.get("target_escape_rate") is not None:
        ax.axhline(oc["target_escape_rate"], color="gray", ls="--", lw=1, label="target escape rate")
    ax.set(xlabel="false-reject rate (normal frames rejected)", ylabel="escape rate (defective frames passed)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=f"{e.name} / {e.product}: operating curve (image threshold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _saved(plt, fig, path)


def operating_table_markdown(e: ModelEvaluation) -> str | None:
    """The test curve's Pareto points as a Markdown table (calibration.operating_curve.curve_table)."""
    from calibration.operating_curve import curve_table

    pts = (e.extra.get("operating_curve") or {}).get("test")
    if not pts:
        return None
    rows = [{"image threshold": p["threshold"], "escapes": f"{p['escapes']}/{p['n_defective']}",
             "escape rate": p["escape_rate"], "false rejects": f"{p['false_rejects']}/{p['n_normal']}",
             "false-reject rate": p["false_reject_rate"]} for p in curve_table(pts)]
    return markdown_table(rows, ["image threshold", "escapes", "escape rate", "false rejects", "false-reject rate"])


def overlay(image: np.ndarray, mask: np.ndarray, amap: np.ndarray, threshold: float,
            vmin: float, vmax: float, predicted: np.ndarray | None = None) -> np.ndarray:
    """Image | heat map blend, true outline green, predicted outline red (``predicted``, else the
    map thresholded)."""
    pred = (amap >= threshold if predicted is None else predicted).astype(np.uint8)
    heat = np.clip((amap - vmin) / max(vmax - vmin, 1e-9), 0, 1)
    heat = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    left = image.copy()
    right = (0.55 * image + 0.45 * heat).astype(np.uint8)
    for canvas in (left, right):
        cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, cs, -1, (0, 255, 0), 1)
        cs, _ = cv2.findContours(pred, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, cs, -1, (255, 0, 0), 1)
    return np.concatenate([left, np.full((image.shape[0], 4, 3), 255, np.uint8), right], axis=1)


def plot_overlays(e: ModelEvaluation, path: Path, per_category: int = 2, seed: int = 0) -> Path:
    plt = _plt()
    cats = np.array(e.test.categories)
    rng = np.random.default_rng(seed)
    picks: list[int] = []
    for c in sorted(set(cats.tolist()), key=lambda c: (c == "good", c)):
        rows = np.flatnonzero(cats == c)
        picks += rng.choice(rows, size=min(per_category, len(rows)), replace=False).tolist()
    thr = e.thresholds[e.chosen]
    vmin, vmax = np.quantile(e.maps, [0.01, 0.999])
    cols = 2
    nrows = int(np.ceil(len(picks) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 5.2, nrows * 2.8))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, picks):
        served = None if e.served_masks is None else e.served_masks[i]
        ax.imshow(overlay(e.test.images[i], e.test.masks[i], e.maps[i], thr, vmin, vmax, served))
        m, t = e.test.masks[i], (e.maps[i] >= thr) if served is None else served
        iou = (m & t).sum() / max((m | t).sum(), 1) if m.any() else None
        ax.set_title(f"{cats[i]} {e.test.paths[i].name}" + (f"  IoU {iou:.2f}" if iou is not None else
                     f"  {int(t.sum())} px flagged"), fontsize=8)
    what = f"predicted at {e.chosen} threshold {thr:.4g}" + (" + learned extent (as served)"
                                                             if e.served_masks is not None else "")
    fig.suptitle(f"{e.name} / {e.product}: green = true defect, red = {what}", fontsize=9)
    return _saved(plt, fig, path, dpi=80)


def plot_confusion(e: ModelEvaluation, path: Path) -> Path | None:
    """Rows = true category, columns = predicted (the last column may be "unknown")."""
    ce = e.category_eval
    if not ce or not ce.get("n"):
        return None
    plt = _plt()
    cm = np.array(ce["confusion"])
    rows = ["structural", "surface", "contamination", "combined"][: cm.shape[0]]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(cm.shape[1]), ce["labels"], rotation=30)
    ax.set_yticks(range(cm.shape[0]), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{e.name} / {e.product}: categories (acc {ce['accuracy']:.3f}, macro-F1 {ce['macro_f1']:.3f})",
                 fontsize=9)
    return _saved(plt, fig, path)


def _md_to_html_table(md: str) -> str:
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return f"<pre>{html.escape(md)}</pre>"
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(evals: list[ModelEvaluation], out_dir: Path, title: str = "linewatch calibration report") -> Path:
    """All plots as PNG under ``out_dir`` and ``out_dir/index.html`` linking them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>IoU = mean per-image IoU over the anomalous test images of a group; every category group also "
             "holds the normal test images. Regret = oracle IoU on the test set minus IoU at the calibrated "
             "threshold.</p>", "<h2>Summary</h2>", _md_to_html_table(summary_markdown(evals))]
    for e in evals:
        stem = f"{e.product}_{e.name}"
        figs = [plot_threshold_curves(e, out_dir / f"{stem}_threshold_curves.png"),
                plot_pr_roc(e, out_dir / f"{stem}_pr_roc.png"),
                plot_overlays(e, out_dir / f"{stem}_overlays.png")]
        cm = plot_confusion(e, out_dir / f"{stem}_confusion.png")
        if cm:
            figs.append(cm)
        oc_png = plot_operating_curve(e, out_dir / f"{stem}_operating_curve.png")
        if oc_png:
            figs.append(oc_png)
        parts.append(f"<h2>{html.escape(e.name)} on {html.escape(e.product)}</h2>")
        overall = next((r for r in e.summary if r["group"] == "all"), {})
        if overall.get("pixel_metrics"):
            parts.append(f"<p><b>Pixel metrics: {html.escape(str(overall['pixel_metrics']))}</b> "
                         f"({overall.get('n_masked', 0)} of {overall.get('n_anomalous')} defective test images have a "
                         "pixel mask; pixel AUROC, AUPRO and IoU are computed on the masked ones only, image AUROC "
                         "and the frame figures on every labelled image).</p>")
        if e.val_report is not None:
            parts.append(f"<p><b>Chosen threshold:</b> {html.escape(METHOD_TITLES.get(e.chosen, e.chosen))} = "
                         f"{e.thresholds[e.chosen]:.5g}. {html.escape(e.val_report.reason)}</p>")
            parts.append("<h3>Validation: all five methods</h3>" + _md_to_html_table(e.val_report.table()))
            if e.val_report.notes:
                parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in e.val_report.notes) + "</ul>")
        parts.append("<h3>Test: every method, overall</h3>" + _md_to_html_table(markdown_table(
            [r for r in e.rows if r["group"] == "all"],
            ["method", "threshold", "iou", "dice", "pooled_iou", "precision", "recall", "normal_false_alarm_rate",
             "oracle_iou", "regret"])))
        kpis = e.extra.get("frame_kpis")
        if kpis:
            from calibration.frame_kpis import format_kpi

            parts.append("<h3>Frames at the served verdict (test)</h3><ul>"
                         + "".join(f"<li>{html.escape(format_kpi(k, kpis.get(k)))}</li>"
                                   for k in ("escape_rate", "false_reject_rate"))
                         + "</ul><p>escape = a defective frame judged normal; false reject = a normal frame "
                           "judged defective; intervals are Wilson 95 %.</p>")
        table = operating_table_markdown(e)
        if table:
            parts.append("<h3>Operating curve (test, image threshold)</h3><p>Each escape rate at its lowest "
                         "false-reject rate; every point is in metrics.json under operating_curve.</p>"
                         + _md_to_html_table(table))
        ext = e.extra.get("extent")
        if ext and ext.get("iou_served") is not None:
            parts.append(f"<p><b>Region extent</b> (learned on the validation masks, reshapes the thresholded "
                         f"regions): test IoU at the chosen threshold {ext['iou_thresholded']:.4f} &rarr; "
                         f"{ext['iou_served']:.4f} as served over {ext['n_anomalous']} anomalous images "
                         f"(the overlays below show the served regions). {html.escape(ext.get('reason', ''))}</p>")
        ce = e.category_eval
        if ce and ce.get("n"):
            parts.append(f"<h3>Defect categories</h3><p>accuracy {ce['accuracy']:.3f}, macro-F1 {ce['macro_f1']:.3f} "
                         f"over {ce['n']} anomalous test images (regions as the worker serves them; "
                         "confusion matrix below)</p>")
        for f in figs:
            parts.append(f'<p><img src="{html.escape(f.name)}" alt="{html.escape(f.stem)}" style="max-width:100%"></p>')
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;font-size:12px;"
             "margin:0.5em 0} td,th{border:1px solid #ccc;padding:3px 6px;text-align:right} th{background:#eee}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    index = out_dir / "index.html"
    index.write_text(page)
    return index
