"""`linewatch bench worker`: a tiny end-to-end run against the real broker and a real
``linewatch work`` subprocess; the report has every figure and every frame got one result."""

from __future__ import annotations

import argparse
import json

import pytest

from workers.bench import bench_worker, cpu_between, format_table


def test_cpu_between_interpolates_and_refuses_outside_the_samples():
    samples = [(10.0, 1.0), (11.0, 1.5), (12.0, 2.5)]
    assert cpu_between(samples, 10.5, 11.5) == pytest.approx(0.25 + 0.5)
    assert cpu_between(samples, 9.0, 11.0) is None
    assert cpu_between(samples[:1], 10.0, 10.0) is None


def test_cli_registers_worker_bench():
    from linewatch.cli import build_parser

    args = build_parser().parse_args(["bench", "worker", "--frames", "40", "--max-batch", "8", "--json"])
    assert args.frames == 40 and args.max_batch == 8 and args.json and callable(args.func)


@pytest.mark.slow
@pytest.mark.integration
def test_bench_worker_smoke(kafka_broker, tmp_path):
    n = 24
    res = bench_worker(kafka_broker, frames=n, size=256, input_size=64, fit_images=4, distinct=4,
                       max_batch=8, threads=1, options={"d": 8}, cache=tmp_path / "cache", progress=False)
    w = res["worker"]
    # every frame got exactly one result, nothing went to the DLQ
    assert w["results"] == n and w["frames_with_result"] == n
    assert w["frames_missing"] == 0 and w["duplicates"] == 0 and w["dlq"] == 0
    assert w["frames_per_s"] > 0 and w["first_to_last_result_s"] > 0
    assert w["engine"] == ["onnxruntime-cpu"]
    assert 1 <= w["mean_batch"] <= 8
    assert w["peak_rss_mb"] > 50  # a real process with torch + ONNX Runtime loaded
    assert {"decode", "inference", "post", "publish"} <= set(w["stage_ms_per_frame"])
    assert w["mode"].startswith("subprocess")
    split = res["offline_split"]
    assert set(split["ms_per_frame"]) == {"decode", "preprocess", "model", "post", "pipeline"}
    assert all(v >= 0 for v in split["ms_per_frame"].values()) and split["ms_per_frame"]["model"] > 0
    assert res["profile"]["reused"] is False and res["profile"]["kind"] == "padim"
    table = format_table(res)
    assert "frames/s (first->last result)" in table and "offline split" in table
    json.dumps(res)  # --json

    # the second run reuses the cached profile
    again = bench_worker(kafka_broker, frames=4, size=256, input_size=64, fit_images=4, distinct=4, max_batch=8,
                         threads=1, options={"d": 8}, cache=tmp_path / "cache", split=False, progress=False)
    assert again["profile"]["reused"] is True and again["worker"]["frames_missing"] == 0


def test_compare_anomalib_is_optional():
    """Without anomalib the comparison says why and carries the published figures; never raises."""
    from workers.bench_engines import anomalib_version, compare_anomalib, format_anomalib

    if anomalib_version() is not None:
        pytest.skip("anomalib is installed here: the comparison is measured by the bench itself")
    res = compare_anomalib(input_size=64, threads=1)
    assert res["measured"] is False and "not importable" in res["reason"]
    assert res["published_issue6"]["efficientnet_lite0"]["model_onnxruntime_batch1"] == 45.4
    assert "not measured" in format_anomalib(res)


@pytest.mark.slow
@pytest.mark.integration
def test_bench_latency_smoke(kafka_broker, tmp_path):
    """`linewatch bench latency` on a tiny profile: every frame's latency to Kafka and to DuckDB
    is measured, under both batchings, and the sink's drain rate comes back."""
    from workers.bench_latency import bench_latency, default_batchings, format_latency

    res = bench_latency(kafka_broker, rates=[10], duration_s=2, sink_rows=100, threads=1, progress=False,
                        frame_size=256, input_size=64, fit_images=4, options={"d": 8}, cache=tmp_path / "cache")
    assert [c["batching"] for c in res["cells"]] == [b.name for b in default_batchings()]
    for c in res["cells"]:
        if c["results"] != c["frames"]:  # the worker's log, in full, for the failure report
            print(json.dumps({k: v for k, v in c.items() if k != "sample_results"}, indent=1))
        assert c["frames"] == 20 and c["results"] == 20 and c["rows"] == 20 and c["missing"] == 0, \
            {k: v for k, v in c.items() if k != "sample_results"}
        assert 0 < c["result_p50_ms"] <= c["result_p99_ms"] and c["result_p50_ms"] <= c["db_p50_ms"]
        assert not c["over_capacity"]
    assert all(s["rows"] == 100 and s["rows_per_s"] > 0 for s in res["sink"])
    assert "capture->DuckDB" in format_latency(res)
