"""What keeping evidence frames costs the sink, per 1000 frames, and whether retention holds
its cap (figures: docs/results/review-loop.md).

Run: ``python -m workers.bench_evidence [--frames 1000] [--long 20000] [--out DIR]``. Kafka-free
on purpose: it feeds the sink's own ``handle_batch`` (the code a real sink runs per polled batch)
with results built from synthetic-line JPEGs (``linewatch.synth``), once without and once with
the original frames attached by the worker's rule (``linewatch.evidence``), so the difference is
the cost of evidence alone. It also stores the same bytes as DuckDB blobs and deletes half of
them, to show what the other design would cost on disk.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from linewatch import store
from linewatch.evidence import keep_reason
from linewatch.messages import InspectionResult
from linewatch.settings import Settings
from linewatch.synth.line import SyntheticCamera
from workers.sink import Sink

BATCH = 100


def _frames(n: int, defect_rate: float, seed: int = 0) -> list[tuple[bytes, bool]]:
    cam = SyntheticCamera("cap", seed=seed, size=256, defect_rate=defect_rate)
    out = []
    for _ in range(n):
        s = next(cam)
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(s.image), cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append((jpg.tobytes(), s.category != "good"))
    return out


def _results(frames: list[tuple[bytes, bool]], rate: float | None, t0: int, tag: str) -> list[InspectionResult]:
    out = []
    for i, (data, defect) in enumerate(frames):
        fid = f"bench-{tag}-{i}"
        verdict = "defect" if defect else "ok"
        reason = keep_reason(fid, verdict, rate) if rate is not None else None
        out.append(InspectionResult(
            frame_id=fid, product="cap", camera="cam-1", line="l1", seq=i, capture_ts_ms=t0 + i * 100,
            image_score=0.9 if defect else 0.1, threshold=0.5, image_threshold=0.5, verdict=verdict,
            defect_area_frac=0.01 if defect else 0.0, profile_version=1, model_kind="padim", engine="onnxruntime",
            worker_id="bench", latency_ms=10, inference_ms=5, kafka_partition=0, kafka_offset=i, width=256,
            height=256, frame_b64=base64.b64encode(data).decode() if reason else None,
            frame_encoding="jpeg" if reason else None, evidence=reason))
    return out


def _feed(sink: Sink, results: list[InspectionResult]) -> tuple[float, int]:
    """(seconds in handle_batch, bytes of the records on `results`)."""
    wire = 0
    t = time.perf_counter()
    for lo in range(0, len(results), BATCH):
        recs = []
        for k, r in enumerate(results[lo:lo + BATCH]):
            value = r.to_bytes()
            wire += len(value)
            recs.append(SimpleNamespace(topic="results", partition=0, offset=lo + k, key=b"c", value=value, headers=[]))
        sink.handle_batch(recs)
    return time.perf_counter() - t, wire


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _settings(root: Path, **evidence) -> Settings:
    s = Settings()
    return s.model_copy(update={
        "storage": s.storage.model_copy(update={"db_path": root / "lw.duckdb", "registry_dir": root / "reg"}),
        "evidence": s.evidence.model_copy(update=evidence)})


def cost(n: int, defect_rate: float, rate: float, work: Path) -> dict:
    frames = _frames(n, defect_rate)
    t0 = int(time.time() * 1000)
    out: dict = {"frames": n, "defect_rate": defect_rate, "normal_sample_rate": rate,
                 "mean_frame_bytes": int(np.mean([len(f) for f, _ in frames]))}
    for name, r in (("without", None), ("with", rate)):
        root = work / name
        root.mkdir()
        sink = Sink(_settings(root))
        sink.start()
        # warm the connection path and Arrow schemas outside the timing
        _feed(sink, _results(frames[:BATCH], r, t0 - 10**7, f"warm-{name}"))
        db0, ev0 = _du(root / "lw.duckdb"), _du(store.evidence_root(root / "lw.duckdb"))
        seconds, wire = _feed(sink, _results(frames, r, t0, name))
        out[name] = {"sink_seconds": round(seconds, 3), "results_topic_bytes": wire,
                     "db_bytes_added": _du(root / "lw.duckdb") - db0,
                     "evidence_bytes_added": _du(store.evidence_root(root / "lw.duckdb")) - ev0,
                     "kept": sink.stats.evidence_kept}
    w, wo = out["with"], out["without"]
    out["per_1000"] = {k: round((w[k] - wo[k]) * 1000 / n, 3) for k in ("sink_seconds", "results_topic_bytes",
                                                                          "db_bytes_added", "evidence_bytes_added")}
    out["per_1000"]["frames_kept"] = round(w["kept"] * 1000 / n, 1)
    # the other design: the same bytes as blobs, then half deleted
    import duckdb

    blob_db = work / "blobs.duckdb"
    con = duckdb.connect(str(blob_db))
    con.execute("CREATE TABLE ev (frame_id VARCHAR PRIMARY KEY, data BLOB)")
    kept = [(r.frame_id, base64.b64decode(r.frame_b64)) for r in _results(frames, rate, t0, "blob") if r.frame_b64]
    con.executemany("INSERT INTO ev VALUES (?, ?)", kept)
    con.execute("CHECKPOINT")
    before = _du(blob_db)
    con.execute("DELETE FROM ev WHERE frame_id IN (SELECT frame_id FROM ev ORDER BY frame_id LIMIT ?)", [len(kept) // 2])
    con.execute("CHECKPOINT")
    con.close()
    out["blob_design"] = {"blobs": len(kept), "blob_bytes": sum(len(b) for _, b in kept),
                          "db_file_bytes": before, "db_file_bytes_after_deleting_half": _du(blob_db)}
    return out


def long_run(n: int, defect_rate: float, rate: float, cap: int, work: Path) -> dict:
    """``n`` frames through one sink with a cap far below what they would keep."""
    root = work / "long"
    root.mkdir()
    sink = Sink(_settings(root, max_bytes=cap, normal_sample_rate=rate))
    sink.start()
    ev_root = store.evidence_root(root / "lw.duckdb")
    frames = _frames(500, defect_rate, seed=1)  # reused images, new frame ids: same bytes per frame
    t0 = int(time.time() * 1000) - n * 100
    peak_index = peak_disk = 0
    samples = []
    for lo in range(0, n, BATCH):
        chunk = [frames[i % len(frames)] for i in range(lo, lo + BATCH)]
        res = _results(chunk, rate, t0 + lo * 100, f"long-{lo}")
        _feed(sink, res)
        peak_index = max(peak_index, sink._evidence_total)
        disk = _du(ev_root)
        peak_disk = max(peak_disk, disk)
        samples.append(disk)
    return {"frames": n, "cap_bytes": cap, "peak_indexed_bytes": peak_index, "peak_disk_bytes": peak_disk,
            "final_disk_bytes": samples[-1], "kept_total": sink.stats.evidence_kept,
            "deleted_total": sink.stats.evidence_deleted, "files_now": sum(1 for _ in ev_root.glob("*/*"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="cost of evidence frames per 1000 frames; retention under a cap")
    p.add_argument("--frames", type=int, default=1000, help="frames for the cost run (default 1000)")
    p.add_argument("--defect-rate", type=float, default=0.19, help="share of defect frames (default 0.19, the demo's)")
    p.add_argument("--sample-rate", type=float, default=Settings().evidence.normal_sample_rate,
                   help="normal frames kept (default: evidence.normal_sample_rate)")
    p.add_argument("--long", type=int, default=20000, help="frames for the retention run (default 20000)")
    p.add_argument("--cap", type=int, default=2_000_000, help="retention cap in bytes for that run (default 2000000)")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lw-bench-evidence-"))
    try:
        report = {"cost": cost(a.frames, a.defect_rate, a.sample_rate, work),
                  "retention": long_run(a.long, a.defect_rate, a.sample_rate, a.cap, work),
                  "cpu_count": os.cpu_count()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
