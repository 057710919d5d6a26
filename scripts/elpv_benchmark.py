"""Real data: the ELPV electroluminescence solar-cell images through linewatch's own CLI.

Why: the synthetic line cannot say how the image-label path does on a real product. ELPV (the
PyPI package ``elpv-dataset``, data licence CC BY-NC-SA: a dev/test dependency only, never
needed at run time) gives real cells with an image-level defect probability and a cell type.
This script takes the polycrystalline cells, exports them into the plain-folder layout a line
engineer would have -- defect-free cells (probability 0) split by a seeded shuffle into a folder
to fit on and a held-out normal test folder, certainly defective cells (probability 1) into a
defect folder -- and runs ``linewatch calibrate run --normal-dir ... --defect-dir ...
--normal-test-dir ...`` with the defaults (no option tuned to this split). The figures are the
ones ``calibrate run`` reports: image AUROC, escape and false-reject rates with their intervals
(``docs/results/real-elpv.md``).

    python scripts/elpv_benchmark.py --out /tmp/elpv            # every poly cell
    python scripts/elpv_benchmark.py --out /tmp/elpv --limit 40 --input-size 64   # a quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def elpv_labels() -> list[tuple[Path, float, str]]:
    """(image path, defect probability, cell type) of every ELPV cell, read from the package's
    own labels file (no image is decoded here)."""
    import elpv_dataset

    base = Path(elpv_dataset.__file__).parent / "data"
    out = []
    for line in (base / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((base / parts[0], float(parts[1]), parts[2]))
    return out


def export(out: Path, cell_type: str = "poly", limit: int | None = None, seed: int = 0,
           train_share: float = 2 / 3) -> dict[str, Path]:
    """The plain-folder layout: ``normal/`` (fit), ``normal-test/`` (held-out defect-free),
    ``defects/`` (probability 1). ``limit`` caps each folder (a quick run); ``train_share`` of
    the defect-free cells are fitted on."""
    import numpy as np

    cells = [c for c in elpv_labels() if c[2] == cell_type]
    good = sorted(p for p, prob, _ in cells if prob == 0.0)
    bad = sorted(p for p, prob, _ in cells if prob == 1.0)
    order = np.random.default_rng(seed).permutation(len(good))
    k = int(round(len(good) * train_share))
    groups = {"normal": [good[i] for i in order[:k]], "normal-test": [good[i] for i in order[k:]],
              "defects": [bad[i] for i in np.random.default_rng(seed + 1).permutation(len(bad))]}
    folders = {}
    for name, files in groups.items():
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for f in files[:limit] if limit else files:
            shutil.copy(f, d / f.name)
        folders[name] = d
    return folders


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work folder (data, registry, report)")
    ap.add_argument("--limit", type=int, help="at most this many images per folder (default: all)")
    ap.add_argument("--input-size", type=int, default=256, help="model input side (default 256, the CLI's default)")
    ap.add_argument("--model-kind", default="padim", help="model family (default padim, the CLI's default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the normal fit/test shuffle and the split (default 0)")
    ap.add_argument("--target-escape-rate", type=float,
                    help="passed to calibrate run (default: none, the image ROC's Youden point)")
    args = ap.parse_args(argv)
    from linewatch.cli import main as linewatch

    folders = export(args.out / "data", limit=args.limit, seed=args.seed)
    cmd = ["calibrate", "run", "--product", "elpv-poly", "--normal-dir", str(folders["normal"]),
           "--defect-dir", str(folders["defects"]), "--normal-test-dir", str(folders["normal-test"]),
           "--model-kind", args.model_kind, "--input-size", str(args.input_size), "--seed", str(args.seed),
           "--registry", str(args.out / "registry"), "--report", str(args.out / "report"), "--no-onnx", "-q"]
    if args.target_escape_rate is not None:
        cmd += ["--target-escape-rate", str(args.target_escape_rate)]
    print("linewatch " + " ".join(cmd), flush=True)
    rc = linewatch(cmd)
    if rc:
        return rc
    metrics = json.loads((args.out / "report" / "metrics.json").read_text())[0]
    head = metrics["headline"]
    summary = {"image_auroc": head["image_auroc"], "escape_rate": head["escape_rate"],
               "false_reject_rate": head["false_reject_rate"], "pixel_metrics": head.get("pixel_metrics"),
               "counts": {k: len(list(v.iterdir())) for k, v in folders.items()},
               "operating_curve_png": str(args.out / "report" / f"elpv-poly_{args.model_kind}_operating_curve.png")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
