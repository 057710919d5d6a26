"""``linewatch bench worker``: one worker end to end, 1024x1024 JPEG frames from a real Kafka
broker to ``results``.

Steps (all in one run, so ratios are comparable on a shared machine):

1. a broker: a temporary one on free ports (stopped afterwards) unless ``--bootstrap-servers``;
2. a profile: PaDiM (EfficientNet-Lite0) at 256 px fitted on synthetic normal images,
   thresholded on held-out normal maps, cached under ``~/.cache/linewatch/bench/`` (reruns only
   copy it) and published with its ONNX graph to a temporary registry;
3. frames: ``--frames`` JPEGs (synthetic line rendered at the model size and upscaled to
   1024x1024, a share with defects) produced into a fresh ``frames`` topic *before* the
   worker starts, so the worker is never starved by the producer;
4. ONE worker: a ``linewatch work`` subprocess (default; ``--in-process`` runs ``run_worker``
   in a thread of this process instead) that stops after the N frames;
5. the figure: frames/s from the first result to the last one on ``results`` (the results'
   ``processed_ts_ms``), every frame id checked to have exactly one result; the worker's own
   per-stage times (its ``stage_s``), its peak RSS and the mean batch size;
6. an offline split on the same frames in this process (worker stopped, so it does not compete):
   JPEG decode, pre-processing (layout/float conversion), model (ONNX Runtime session), post-
   processing (threshold, regions, artefacts, result JSON) and decode-to-result per frame.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.bench_profile import BENCH_PRODUCT, fitted_profile_dir, publish_bench_profile


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- frames --------------------------------------------------------------------------------------
def make_frames(n_distinct: int = 16, size: int = 1024, model_size: int = 256, product: str = "cap",
                defect_share: float = 0.25, quality: int = 90) -> tuple[list[bytes], list[bool]]:
    """Distinct JPEG frames of the synthetic line, rendered at ``model_size`` and upscaled to
    ``size`` (bicubic); returns (jpegs, is_defective)."""
    import cv2

    from linewatch.synth import SyntheticProduct

    synth = SyntheticProduct(product, size=model_size, seed=0)
    n_def = int(round(n_distinct * defect_share))
    jpegs, defect = [], []
    for i in range(n_distinct):
        bad = i % max(1, round(1 / defect_share)) == 0 and sum(defect) < n_def if defect_share > 0 else False
        img = synth.defective(70_000 + i, "combined").image if bad else synth.normal(60_000 + i).image
        big = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        jpegs.append(buf.tobytes())
        defect.append(bool(bad))
    return jpegs, defect


def bench_products(n: int) -> list[str]:
    """The product ids of ``n`` published copies of the bench profile."""
    return [BENCH_PRODUCT] + [f"{BENCH_PRODUCT}-{i}" for i in range(2, n + 1)]


def produce_frames(settings: Any, jpegs: list[bytes], n: int, product: str | list[str] = BENCH_PRODUCT,
                   rate: float | None = None, camera: str = "benchcam") -> list[str]:
    """Send ``n`` frames (cycling ``jpegs``, and the products when given several) to
    ``settings.topics.frames``, as fast as possible or paced at ``rate`` frames/s (a camera:
    each frame stamped with its send time as capture time); every delivery is checked.
    Returns the frame ids."""
    from linewatch.kafka.io import make_producer, send_nowait
    from linewatch.messages import FrameHeaders

    producer = make_producer(settings, client_id=f"linewatch-bench-{camera}", linger_ms=0 if rate else 20)
    products = [product] if isinstance(product, str) else list(product)
    ids, pending = [], []
    t0 = time.perf_counter()
    try:
        for seq in range(n):
            if rate:
                wait = t0 + seq / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            fid = FrameHeaders.new_frame_id(camera, seq)
            hdr = FrameHeaders(frame_id=fid, product=products[seq % len(products)], camera=camera, line="bench",
                               seq=seq, capture_ts_ms=int(time.time() * 1000), encoding="jpeg")
            pending.append(send_nowait(producer, settings.topics.frames, jpegs[seq % len(jpegs)], key=fid,
                                       headers=hdr.to_kafka()))
            ids.append(fid)
        producer.flush()
        for p in pending:
            p.result(timeout=60)
    finally:
        producer.close(timeout=5)
    return ids


def read_results(settings: Any, expected: int, timeout_s: float = 60.0) -> list[tuple[dict[str, Any], int]]:
    """Every record on ``results`` (from the beginning) as (result JSON, broker timestamp ms),
    until ``expected`` have arrived or ``timeout_s`` passes."""
    from kafka import TopicPartition

    from linewatch.kafka.io import make_consumer

    consumer = make_consumer(settings, None, client_id="linewatch-bench-worker-reader")
    try:
        deadline = time.monotonic() + timeout_s
        # a fresh client may not know the topic's partitions yet: an empty assignment would read
        # nothing until the deadline, so refresh the metadata until they show
        parts = consumer.partitions_for_topic(settings.topics.results) or set()
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            consumer.topics()
            parts = consumer.partitions_for_topic(settings.topics.results) or set()
        tps = [TopicPartition(settings.topics.results, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[tuple[dict[str, Any], int]] = []
        while len(out) < expected and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                out.extend((json.loads(r.value), r.timestamp) for r in recs)
        return out
    finally:
        consumer.close(autocommit=False)


# -- the worker ----------------------------------------------------------------------------------
@dataclass
class WorkerRun:
    summary: dict[str, Any]
    peak_rss_mb: float
    mode: str
    wall_s: float
    cpu_samples: list[tuple[float, float]]  # (epoch seconds, process CPU seconds, all threads)


class CpuSampler:
    """Samples a process's CPU time (user + system, all threads; psutil) every ``every_s``, so
    the CPU spent between the first and the last result can be cut out of the run (the
    load-independent figure on a shared machine)."""

    def __init__(self, pid: int, every_s: float = 0.05):
        import psutil

        self.pid = pid
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._proc = psutil.Process(pid)
        self._gone = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def _read(self) -> float | None:
        try:
            t = self._proc.cpu_times()
        except self._gone:
            return None
        return t.user + t.system

    def _loop(self) -> None:
        while not self._stop.is_set():
            cpu = self._read()
            if cpu is not None:
                self.samples.append((time.time(), cpu))
            self._stop.wait(self.every_s)

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(2)
        return self.samples


def cpu_between(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    """CPU seconds spent between epoch times ``t0`` and ``t1`` (linear between samples)."""
    if len(samples) < 2 or t1 <= t0:
        return None
    ts = np.array([s[0] for s in samples])
    cs = np.array([s[1] for s in samples])
    if t0 < ts[0] or t1 > ts[-1]:
        return None
    return float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs))


def _worker_subprocess(settings: Any, n: int, max_batch: int, threads: int, engine: str,
                       extra_env: dict[str, str] | None = None, profile_with: str | None = None,
                       profile_out: Path | None = None) -> WorkerRun:
    """``linewatch work`` as a child process; peak RSS from ``wait4``'s rusage of that child."""
    env = dict(os.environ)
    t = settings.topics
    env.update({"LINEWATCH_TOPICS__FRAMES": t.frames, "LINEWATCH_TOPICS__RESULTS": t.results,
                "LINEWATCH_TOPICS__DLQ": t.dlq, "LINEWATCH_TOPICS__ALERTS": t.alerts,
                "LINEWATCH_TOPICS__PROFILES": t.profiles, **(extra_env or {})})
    args = ["work", "--bootstrap-servers", settings.kafka.bootstrap_servers,
            "--registry", str(settings.storage.registry_dir), "--group-id", settings.worker.group_id,
            "--max-batch", str(max_batch), "--threads", str(threads), "--engine", engine,
            "--max-frames", str(n), "--no-create-topics", "--json"]
    launcher = Path(sys.executable).with_name("linewatch")  # the venv's console script
    if profile_with == "pyinstrument":
        full = [str(Path(sys.executable).with_name("pyinstrument")), "-o", str(profile_out), "-r", "text",
                str(launcher), *args]
    else:
        full = [sys.executable, str(launcher), *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = CpuSampler(proc.pid).start()
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
               threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)]  # type: ignore[union-attr]
    for r in readers:
        r.start()
    while True:  # reap only after the sampler has seen the end (a reaped pid has no /proc)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    samples = sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(10)
    wall = time.perf_counter() - t0
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited {proc.returncode}: {stderr.strip()[-1500:]}")
    line = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not line:
        raise RuntimeError(f"worker printed no JSON summary: {stdout[-500:]} {stderr[-1000:]}")
    return WorkerRun(json.loads(line[-1]), usage.ru_maxrss / 1024, "subprocess `linewatch work`", wall, samples)


def _worker_in_process(settings: Any, n: int) -> WorkerRun:
    """``run_worker`` in a thread of this process; peak RSS is this whole process's."""
    from workers.worker import run_worker

    t0 = time.perf_counter()
    box: dict[str, Any] = {}

    def target() -> None:
        box["stats"] = run_worker(settings, max_frames=n, create_topics=False, install_signals=False)

    th = threading.Thread(target=target, name="bench-worker")
    sampler = CpuSampler(os.getpid()).start()
    th.start()
    th.join()
    samples = sampler.stop()
    if "stats" not in box:
        raise RuntimeError("in-process worker failed (see the log)")
    s = box["stats"]
    summary = {"worker_id": s.worker_id, "frames": s.frames, "results": s.results, "defects": s.defects,
               "dlq": s.dlq, "batches": s.batches, "replays": s.replays, "elapsed_s": round(s.elapsed_s, 3),
               "frames_per_s": round(s.frames_per_s, 1), "engines": s.engines,
               "stage_s": {k: round(v, 3) for k, v in s.stage_s.items()}}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return WorkerRun(summary, peak, "in-process run_worker (thread)", time.perf_counter() - t0, samples)


# -- offline split -------------------------------------------------------------------------------
@dataclass
class _Rec:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class _OneProfile:
    def __init__(self, loaded: Any):
        self.loaded = loaded

    def get(self, product: str) -> Any:
        return self.loaded


def offline_split(registry_dir: Path, jpegs: list[bytes], batch: int, threads: int, engine_pref: str,
                  rounds: int = 3) -> dict[str, Any]:
    """Per-frame ms of each stage on the same frames, one stage at a time (median of rounds):
    ``decode`` (reduced JPEG decode to model size, one thread), ``preprocess`` (uint8 NHWC ->
    float32 NCHW, what the ONNX Runtime engine feeds), ``model`` (the engine's session alone),
    ``post`` (threshold, regions, artefacts for defects, result JSON), and ``pipeline`` (the
    worker's BatchProcessor decode -> engine -> results, no Kafka)."""
    import statistics

    from linewatch.messages import FrameHeaders
    from linewatch.profiles import Registry
    from workers.engines import select_engine
    from linewatch.inspection.frames import decode_frame, decode_view
    from linewatch.inspection.verdict import judge
    from workers.pipeline import BatchProcessor
    from workers.profile_cache import LoadedProfile

    reg = Registry(registry_dir)
    profile, model = reg.load(BENCH_PRODUCT)
    onnx = reg.version_dir(BENCH_PRODUCT, profile.version) / "model.onnx"
    engine = select_engine(model, onnx, engine_pref, threads, batch)
    size = profile.input_size
    frames = [jpegs[i % len(jpegs)] for i in range(batch)]
    hdrs = [FrameHeaders(frame_id=f"off-{i}", product=BENCH_PRODUCT, camera="c", line="l", seq=i,
                         capture_ts_ms=0).to_kafka() for i in range(batch)]
    recs = [_Rec("frames", 0, i, None, f, hdrs[i]) for i, f in enumerate(frames)]
    loaded = LoadedProfile(profile, None, engine, 0.0, profile.extent_model())
    proc = BatchProcessor(_OneProfile(loaded), worker_id="bench-offline",
                          results_topic="results", dlq_topic="dlq", max_frame_pixels=64_000_000,
                          decode_threads=min(4, threads))
    imgs = np.empty((batch, size, size, 3), np.uint8)
    dims = []  # (width, height, frame rectangle of the view) per frame, as the worker's decode gives them
    for i, f in enumerate(frames):
        dims.append(decode_view(f, size, 64_000_000, "jpeg", out=imgs[i])[1:])
    maps, scores = engine.run(imgs)  # warm-up
    proc.process(recs)

    cpu_split: dict[str, float] = {}

    def per_frame_ms(fn, name: str) -> float:
        """Median wall ms per frame; the CPU ms (all threads of this process) go to cpu_split."""
        vals, cpus = [], []
        for _ in range(rounds):
            t, c = time.perf_counter(), time.process_time()
            fn()
            vals.append((time.perf_counter() - t) * 1000 / batch)
            cpus.append((time.process_time() - c) * 1000 / batch)
        cpu_split[name] = round(statistics.median(cpus), 3)
        return round(statistics.median(vals), 3)

    def decode_all() -> None:
        for i, f in enumerate(frames):
            decode_frame(f, size, 64_000_000, "jpeg", out=imgs[i])

    sess = getattr(engine, "session", None)
    x = np.ascontiguousarray(imgs.transpose(0, 3, 1, 2), dtype=np.float32)
    split = {"decode": per_frame_ms(decode_all, "decode")}
    if sess is not None:
        inp = sess.get_inputs()[0].name
        split["preprocess"] = per_frame_ms(lambda: np.ascontiguousarray(imgs.transpose(0, 3, 1, 2), dtype=np.float32),
                                           "preprocess")
        split["model"] = per_frame_ms(lambda: sess.run(None, {inp: x}), "model")
    else:
        split["preprocess"] = cpu_split["preprocess"] = 0.0
        split["model"] = per_frame_ms(lambda: engine.run(imgs), "model")

    def post_results() -> None:  # what the worker really does per frame (result JSON for all)
        for k in range(batch):
            w, h, box = dims[k]
            proc._result(recs[k], FrameHeaders.from_kafka(hdrs[k]), loaded, engine.name, imgs[k], maps[k],
                         float(scores[k]), w, h, 1.0, box)

    split["post"] = per_frame_ms(post_results, "post")
    split["pipeline"] = per_frame_ms(lambda: proc.process(recs), "pipeline")
    defects = sum(judge(maps[k], float(scores[k]), profile, 1024, 1024, imgs[k], loaded.extent).verdict == "defect"
                  for k in range(batch))
    proc.close()
    return {"batch": batch, "engine": engine.name, "ms_per_frame": split, "cpu_ms_per_frame": cpu_split,
            "defects_in_batch": defects,
            "note": "one stage at a time in the bench process after the worker stopped; decode on one thread"}


# -- the benchmark -------------------------------------------------------------------------------
def bench_worker(bootstrap_servers: str | None = None, *, frames: int = 600, size: int = 1024,
                 input_size: int = 256, kind: str = "padim", fit_images: int = 60, product: str = "cap",
                 max_batch: int = 16, threads: int = 0, engine: str = "auto", distinct: int = 16,
                 defect_share: float = 0.25, partitions: int = 4, in_process: bool = False,
                 refit: bool = False, split: bool = True, options: dict[str, Any] | None = None,
                 worker_env: dict[str, str] | None = None, profile_with: str | None = None,
                 profile_out: Path | None = None, progress: bool = True,
                 cache: Path | None = None, products: int = 1, tiles: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns a JSON-able dict. ``products``:
    the profile is published under that many product ids and the frames cycle over them, so
    the worker holds that many loaded profiles (its peak RSS is then the multi-product one).
    ``tiles``: the profile tiles the whole frame R x C (docs/geometry.md): the cost of tiling;
    the model and its threshold stay the untiled bench profile's, so more frames may read as
    defects (the defect count is in the figures)."""
    from linewatch.inspection.geometry import Geometry
    from linewatch.kafka.broker import bench_topics, temporary_broker
    from linewatch.kafka.io import ensure_topics
    from linewatch.settings import Settings

    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    out: dict[str, Any] = {"benchmark": "worker", "frames": frames, "frame_size": f"{size}x{size}",
                           "input_size": input_size, "model": kind, "max_batch": max_batch, "threads": threads,
                           "products": products, "tiles": f"{tiles[0]}x{tiles[1]}",
                           "cpus": os.cpu_count(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
                           "load_average_start": load_average()}
    t0 = time.perf_counter()
    folder, reused = fitted_profile_dir(kind, input_size, product, fit_images, options, refit, progress,
                                        cache)
    out["profile"] = {"cache": str(folder), "reused": reused, "prepare_s": round(time.perf_counter() - t0, 2),
                      "disk_mb": round(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20, 2),
                      **json.loads((folder / "bench.json").read_text())}
    t0 = time.perf_counter()
    jpegs, defect = make_frames(distinct, size, input_size, product, defect_share)
    out["jpeg_kb_mean"] = round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1)
    out["distinct_frames"] = distinct
    out["defective_distinct"] = sum(defect)
    out["make_frames_s"] = round(time.perf_counter() - t0, 2)

    broker = None
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-worker-"))
    stack = contextlib.ExitStack()
    try:
        if bootstrap_servers is None:
            broker = stack.enter_context(temporary_broker(tmp / "kafka"))
            bootstrap_servers = broker.bootstrap_servers
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            kafka={"bootstrap_servers": bootstrap_servers},
            topics=bench_topics(tag, partitions),
            storage={"registry_dir": tmp / "registry", "db_path": tmp / "bench.duckdb"},
            worker={"group_id": f"bench-workers-{tag}", "max_batch": max_batch, "threads": threads,
                    "engine": engine},
        )
        ensure_topics(settings)
        names = bench_products(products)
        geometry = Geometry(tiles=tiles).resolved(size, size) if tuple(tiles) != (1, 1) else None
        for name in names:
            publish_bench_profile(folder, tmp / "registry", name, geometry)
        t0 = time.perf_counter()
        ids = produce_frames(settings, jpegs, frames, names)
        out["produce_s"] = round(time.perf_counter() - t0, 2)
        out["bootstrap_servers"] = "embedded (temporary)" if broker is not None else bootstrap_servers
        out["load_average_worker_start"] = load_average()
        if in_process:
            run = _worker_in_process(settings, frames)
        else:
            run = _worker_subprocess(settings, frames, max_batch, threads, engine, worker_env, profile_with,
                                     profile_out)
        out["load_average_worker_end"] = load_average()
        results = read_results(settings, frames)
        out["worker"] = _worker_figures(run, results, ids)
        if split and geometry is None:  # the offline split runs untiled frames only
            out["offline_split"] = offline_split(tmp / "registry", jpegs, max_batch, threads, engine)
            out["load_average_end"] = load_average()
    finally:
        stack.close()  # stops the temporary broker
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _worker_figures(run: WorkerRun, results: list[tuple[dict[str, Any], int]], ids: list[str]) -> dict[str, Any]:
    s = run.summary
    got = [r for r, _ in results]
    seen: dict[str, int] = {}
    for r in got:
        seen[r["frame_id"]] = seen.get(r["frame_id"], 0) + 1
    expected = set(ids)
    ts = sorted(r["processed_ts_ms"] for r in got)
    span_s = (ts[-1] - ts[0]) / 1000 if len(ts) > 1 else 0.0
    fps = (len(ts) - 1) / span_s if span_s > 0 else 0.0
    cpu = cpu_between(run.cpu_samples, ts[0] / 1000, ts[-1] / 1000) if len(ts) > 1 else None
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    frames = max(1, s.get("frames", 0))
    stage_ms = {k: round(v * 1000 / frames, 3) for k, v in s.get("stage_s", {}).items()}
    return {
        "mode": run.mode,
        "frames_per_s": round(fps, 1),
        "first_to_last_result_s": round(span_s, 3),
        "worker_reported_frames_per_s": s.get("frames_per_s"),
        "cpu_s_in_window": round(cpu, 3) if cpu else None,
        "cpu_ms_per_frame": round(cpu * 1000 / (len(ts) - 1), 2) if cpu else None,
        "cpu_share": round(cpu / span_s, 2) if cpu and span_s else None,  # cores it really got
        "frames_per_s_if_idle": round((len(ts) - 1) / cpu * ncpu, 1) if cpu else None,
        "results": len(got),
        "frames_with_result": len(expected & set(seen)),
        "frames_missing": len(expected - set(seen)),
        "duplicates": sum(v - 1 for v in seen.values() if v > 1),
        "defects": sum(1 for r in got if r.get("verdict") == "defect"),
        "dlq": s.get("dlq", 0),
        "batches": s.get("batches", 0),
        "mean_batch": round(frames / max(1, s.get("batches", 1)), 2),
        "engine": sorted({r.get("engine") for r in got} - {None}),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "process_wall_s": round(run.wall_s, 2),
        "stage_ms_per_frame": stage_ms,
        "latency_ms_median": round(float(np.median([r["latency_ms"] for r in got])), 1) if got else None,
    }


def format_table(res: dict[str, Any]) -> str:
    w = res["worker"]
    p = res["profile"]
    lines = [
        f"worker benchmark: {res['frames']} x {res['frame_size']} JPEG ({res['jpeg_kb_mean']} KB mean, "
        f"{res['defective_distinct']}/{res['distinct_frames']} distinct frames defective), broker "
        f"{res['bootstrap_servers']}",
        f"profile: {p['kind']} {p['backbone']} @ {p['input_size']} px, {p['disk_mb']} MB, "
        f"{'reused from' if p['reused'] else 'fitted into'} {p['cache']}"
        + (f", published as {res['products']} products" if res.get("products", 1) > 1 else "")
        + (f", tiles {res['tiles']}" if res.get("tiles", "1x1") != "1x1" else ""),
        f"worker: {w['mode']}, engine {', '.join(w['engine'])}, max batch {res['max_batch']} "
        f"(mean {w['mean_batch']}), {res['threads']} threads, {res['cpus']} CPUs",
        "",
        f"{'frames/s (first->last result)':34s} {w['frames_per_s']:>9.1f}",
        f"{'frames/s (worker: first poll->commit)':34s} {w['worker_reported_frames_per_s']!s:>9s}",
        f"{'worker CPU ms/frame (all threads)':34s} {w['cpu_ms_per_frame']!s:>9s}   cores it got: "
        f"{w['cpu_share']}",
        f"{'frames/s if it had all cores':34s} {w['frames_per_s_if_idle']!s:>9s}   "
        f"(= frames per CPU-second x {res['cpus']} CPUs, upper bound)",
        f"{'results / frames (missing, dup)':34s} {w['results']:>5d}/{res['frames']} ({w['frames_missing']}, "
        f"{w['duplicates']})",
        f"{'defects / DLQ':34s} {w['defects']:>5d} / {w['dlq']}",
        f"{'peak RSS of the worker':34s} {w['peak_rss_mb']:>7.1f} MB",
        f"{'median latency capture->result':34s} {w['latency_ms_median']!s:>7s} ms "
        "(frames were queued before the worker started)",
        f"load average: start {res['load_average_start']}, worker {res['load_average_worker_start']} -> "
        f"{res['load_average_worker_end']}",
        "",
        "worker stage times (its own perf_counter, ms per frame; inference runs in its own thread, "
        "overlapped with poll/decode/post):",
        "  " + "  ".join(f"{k} {v}" for k, v in w["stage_ms_per_frame"].items()),
    ]
    if "offline_split" in res:
        o = res["offline_split"]
        sp, cp = o["ms_per_frame"], o["cpu_ms_per_frame"]
        lines += ["", f"offline split, same frames, batch {o['batch']}, {o['engine']}, one stage at a time "
                      "(ms per frame; CPU = all threads of the process):",
                  f"  {'':5s} {'decode':>8s} {'preproc':>8s} {'model':>8s} {'post':>8s} | {'pipeline':>8s}",
                  f"  {'wall':5s} {sp['decode']:>8.2f} {sp['preprocess']:>8.2f} {sp['model']:>8.2f} {sp['post']:>8.2f} | "
                  f"{sp['pipeline']:>8.2f}",
                  f"  {'CPU':5s} {cp['decode']:>8.2f} {cp['preprocess']:>8.2f} {cp['model']:>8.2f} {cp['post']:>8.2f} | "
                  f"{cp['pipeline']:>8.2f}",
                  f"  pipeline = the worker's BatchProcessor without Kafka and without overlap; "
                  f"load average after: {res.get('load_average_end')}"]
    return "\n".join(lines)


def _tiles(text: str) -> tuple[int, int]:
    from linewatch.errors import UserError
    from linewatch.inspection.geometry import GeometryError, parse_tiles

    try:
        return parse_tiles(text)
    except GeometryError as exc:
        raise UserError(f"--tiles: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    from linewatch.errors import UserError
    from linewatch.kafka.io import quiet_kafka_logs

    quiet_kafka_logs(0)
    options: dict[str, Any] = {}
    if args.options:
        try:
            options = json.loads(args.options)
        except json.JSONDecodeError as exc:
            raise UserError(f"--options: not valid JSON ({exc.msg})") from None
    if args.frames < 2:
        raise UserError("--frames: need at least 2 frames")
    res = bench_worker(args.bootstrap_servers, frames=args.frames, size=args.size, input_size=args.input_size,
                       kind=args.model, fit_images=args.fit_images, product=args.product, max_batch=args.max_batch,
                       threads=args.threads, engine=args.engine, distinct=args.distinct,
                       defect_share=args.defect_share, in_process=args.in_process, refit=args.refit,
                       split=not args.no_split, options=options,
                       profile_with="pyinstrument" if args.pyinstrument else None,
                       profile_out=Path(args.pyinstrument) if args.pyinstrument else None,
                       progress=not args.quiet, products=args.products, tiles=_tiles(args.tiles))
    if args.compare_anomalib:
        from workers.bench_engines import compare_anomalib

        res["anomalib"] = compare_anomalib(input_size=args.input_size, threads=res["threads"],
                                           ours_onnx=Path(res["profile"]["cache"]) / "model.onnx")
    text = format_table(res)
    if "anomalib" in res:
        from workers.bench_engines import format_anomalib

        text += "\n\n" + format_anomalib(res["anomalib"])
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="one worker end to end: 1024x1024 JPEG frames from Kafka to results",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=600, help="frames pre-produced into `frames` (default 600)")
    p.add_argument("--size", type=int, default=1024, help="frame width = height (default 1024)")
    p.add_argument("--input-size", type=int, default=256, help="model input size (default 256)")
    p.add_argument("--model", default="padim", help="model kind (default padim, EfficientNet-Lite0)")
    p.add_argument("--options", help='JSON model options, e.g. \'{"d": 64}\'')
    p.add_argument("--fit-images", type=int, default=60, help="synthetic normal images to fit on (default 60)")
    p.add_argument("--product", default="cap", help="synthetic product (default cap)")
    p.add_argument("--products", type=int, default=1,
                   help="publish the profile under N product ids and cycle the frames over them (default 1)")
    p.add_argument("--tiles", default="1x1",
                   help="serve the frames through an RxC-tiled whole-frame profile: the cost of tiling, no offline "
                        "split (default 1x1, untiled)")
    p.add_argument("--max-batch", type=int, default=16, help="worker.max_batch (default 16)")
    p.add_argument("--threads", type=int, default=0, help="worker.threads, 0 = all cores (default 0)")
    p.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "torch", "tensorrt"],
                   help="inference engine of the worker under test (default auto: the first that loads of TensorRT, ONNX Runtime CUDA, torch CUDA, ONNX Runtime CPU, torch CPU)")
    p.add_argument("--distinct", type=int, default=16, help="distinct frames cycled (default 16)")
    p.add_argument("--defect-share", type=float, default=0.25, help="share of distinct frames with defects (default 0.25)")
    p.add_argument("--bootstrap-servers", help="use this broker instead of a temporary embedded one")
    p.add_argument("--in-process", action="store_true", help="run_worker in a thread instead of a subprocess")
    p.add_argument("--refit", action="store_true", help="refit the cached bench profile")
    p.add_argument("--no-split", action="store_true", help="skip the offline per-stage split")
    p.add_argument("--pyinstrument", metavar="PATH", help="run the worker under pyinstrument, text report to PATH")
    p.add_argument("--compare-anomalib", action="store_true",
                   help="also measure anomalib's PaDiM (same backbone and size) when anomalib is importable")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    p.add_argument("--json-out", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
