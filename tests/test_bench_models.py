"""`linewatch bench models` on a tiny configuration: every figure the report needs is there."""

from __future__ import annotations

import json

import torch

from workers.bench_engines import bench_models, format_table

torch.set_num_threads(1)


def test_bench_models_reports_speed_size_and_memory(tmp_path):
    res = bench_models(["padim"], input_size=64, engines=["onnxruntime-cpu", "torch-cpu"], threads=1,
                       batch_sizes=(1, 2), seconds=0.2, rounds=1, fit_images=4, product="brick", products=2,
                       options={"padim": {"d": 8}}, workdir=tmp_path, progress=False)
    rec = res["models"]["padim"]
    assert rec["fit_s"] > 0 and rec["load_s"] > 0
    assert rec["disk_mb"]["total"] > 0 and "model.onnx" in rec["disk_mb"] and "weights.safetensors" in rec["disk_mb"]
    assert set(rec["engines"]) == {"onnxruntime-cpu", "torch-cpu"}
    for e in rec["engines"].values():
        assert e["batch1"] > 0 and e["best"] >= e["batch1"] and e["best_batch"] in (1, 2)
        assert e["per_cpu_s_batch1"] > 0
    assert rec["serving"]["products"] == 2
    table = format_table(res)
    assert "padim" in table and "onnxruntime-cpu" in table and "MB on disk" in table
    json.dumps(res)  # JSON-able for --json


def test_cli_registers_models_bench():
    import argparse

    from linewatch.cli import build_parser

    args = build_parser().parse_args(["bench", "models", "--model", "padim", "--size", "64", "--batches", "1,2"])
    assert args.model == ["padim"] and args.size == 64 and callable(args.func)
