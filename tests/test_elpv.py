"""The real-data benchmark (scripts/elpv_benchmark.py) in small: a few dozen ELPV poly cells
through the project's own CLI on image-level labels (dev dependency elpv-dataset)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("elpv_dataset")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "elpv_benchmark.py"


def _script():
    spec = importlib.util.spec_from_file_location("elpv_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_elpv_benchmark_small(tmp_path, capsys):
    bench = _script()
    cells = bench.elpv_labels()
    poly = [c for c in cells if c[2] == "poly"]
    assert len(cells) == 2624 and {p for _, p, _ in poly} >= {0.0, 1.0}
    assert bench.main(["--out", str(tmp_path), "--limit", "12", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "linewatch calibrate run --product elpv-poly --normal-dir" in out and "--defect-dir" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"] == {"normal": 12, "normal-test": 12, "defects": 12}
    assert summary["pixel_metrics"] == "needs masks" and 0.0 <= summary["image_auroc"] <= 1.0
    for k in ("escape_rate", "false_reject_rate"):
        assert summary[k]["n"] > 0 and len(summary[k]["ci95"]) == 2
    assert Path(summary["operating_curve_png"]).stat().st_size > 1000
