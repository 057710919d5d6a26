"""calibration.benchmark.run_benchmark on a tiny synthetic line: the study's table (model x
threshold method, IoU per category and background class, threshold-free metrics and costs),
its files, and that it ranks a real model above the trivial baseline."""

from __future__ import annotations

import csv

import pytest
import torch

from calibration.thresholds import METHODS
from linewatch.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from linewatch.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("bench_ds"), ["cap", "brick"], size=128, n_train=12,
                            n_test_good=6, n_test_per_category=4, progress=False)


@pytest.mark.slow
def test_benchmark_table(dataset, tmp_path):
    from calibration.benchmark import GROUPS, run_benchmark

    table = run_benchmark(dataset, ["cap", "brick"], ["meandiff", "patchcore"], tmp_path, input_size=128,
                          progress=False)
    assert [(r["model"], r["method"]) for r in table.rows] == [(m, t) for m in ("meandiff", "patchcore")
                                                               for t in METHODS]
    for r in table.rows:
        for g in GROUPS:  # the synthetic line has every category, with and without background
            assert r[f"iou[{g}]"] is not None and 0.0 <= r[f"iou[{g}]"] <= 1.0, (r["model"], r["method"], g)
        assert 0.5 <= r["pixel_auroc"] <= 1.0 and 0.0 <= r["aupro"] <= 1.0
        assert r["fit_s"] >= 0 and r["images_per_s"] > 0 and r["profile_mb"] > 0
    # PatchCore must beat |image - mean image| overall (otherwise the data or the model is broken)
    assert table.cell("patchcore", "iou", "all") > table.cell("meandiff", "iou", "all")
    assert table.winners["all"]["model_iou_curve"] == "patchcore"
    for key in ("markdown", "csv", "long_csv", "json", "plot"):
        assert table.paths[key].is_file() and table.paths[key].stat().st_size > 0
    md = table.paths["markdown"].read_text()
    assert "| patchcore | IoU curve |" in md and "Winners" in md and "IoU structural" in md
    with table.paths["csv"].open() as fh:
        assert len(list(csv.DictReader(fh))) == 2 * len(METHODS)
    with table.paths["long_csv"].open() as fh:
        long_rows = list(csv.DictReader(fh))
    assert {r["product"] for r in long_rows} == {"cap", "brick"}
    assert (tmp_path / "models" / "cap" / "patchcore" / "weights.safetensors").is_file()


def test_benchmark_rejects_unknown_family(dataset, tmp_path):
    from calibration.benchmark import run_benchmark

    with pytest.raises(UserError, match="unknown model family 'nope'"):
        run_benchmark(dataset, ["cap"], ["nope"], tmp_path)
    with pytest.raises(UserError, match="at least one product"):
        run_benchmark(dataset, [], ["padim"], tmp_path)
