"""The worker against a real Kafka broker: one result per frame, bad frames to the DLQ, offsets
committed only after results are acknowledged (kill -9 and restart loses nothing), hot reload
of a newly published profile, metrics, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.kafka.broker import free_port
from linewatch.messages import DlqRecord, InspectionResult
from linewatch.settings import Settings
from worker_helpers import encode, frame_headers, plain_image, publish_mean_profile, register_test_family, with_square
from workers.worker import WorkerStats, run_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]
register_test_family()
TESTS = Path(__file__).resolve().parent


# -- helpers ----------------------------------------------------------------------------------
def _settings(kafka_settings: Settings, registry: Path, **worker) -> Settings:
    w = {"max_batch": 8, "max_wait_ms": 30, "reload_interval_s": 0.2, "threads": 1,
         "group_id": f"workers-{kafka_settings.topics.frames}", **worker}
    return kafka_settings.model_copy(update={
        "storage": kafka_settings.storage.model_copy(update={"registry_dir": registry}),
        "worker": kafka_settings.worker.model_copy(update=w),
    })


def _produce(settings: Settings, frames: list[tuple[bytes, list | None, bytes | None]]) -> None:
    from linewatch.kafka.io import make_producer, send_nowait

    producer = make_producer(settings)
    try:
        pending = [send_nowait(producer, settings.topics.frames, value, key=key, headers=headers)
                   for value, headers, key in frames]
        producer.flush()
        for p in pending:
            p.result(timeout=30)
    finally:
        producer.close()


def _read_all(settings: Settings, topic: str, want: int, timeout_s: float = 60.0) -> list:
    """Every record of ``topic`` (from the beginning) once at least ``want`` have arrived."""
    from kafka import TopicPartition

    from linewatch.kafka.io import make_consumer

    consumer = make_consumer(settings, None)
    try:
        deadline = time.monotonic() + timeout_s
        # the worker under test creates its topics in its own thread: wait for them to exist
        # (assigning an empty partition list would read nothing until the deadline)
        parts = consumer.partitions_for_topic(topic) or set()
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            consumer.topics()  # forces a metadata refresh
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list = []
        while time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=300).values():
                out.extend(recs)
            if len(out) >= want:
                # a short grace period to catch records beyond ``want`` (duplicates)
                end = time.monotonic() + 0.5
                while time.monotonic() < end:
                    for recs in consumer.poll(timeout_ms=100).values():
                        out.extend(recs)
                return out
        return out
    finally:
        consumer.close()


def _committed_vs_end(settings: Settings) -> tuple[dict[int, int], dict[int, int]]:
    from kafka import TopicPartition

    from linewatch.kafka.io import make_consumer

    consumer = make_consumer(settings, settings.worker.group_id)  # not subscribed: does not join
    try:
        tps = [TopicPartition(settings.topics.frames, p)
               for p in sorted(consumer.partitions_for_topic(settings.topics.frames) or [])]
        committed = {tp.partition: (consumer.committed(tp) or 0) for tp in tps}
        end = {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
        return committed, end
    finally:
        consumer.close()


def _frame(product: str, seq: int, img: np.ndarray, camera: str = "cam1", fmt: str = "jpeg"):
    h = frame_headers(product, seq, camera=camera, encoding=fmt)
    return encode(img, fmt), h.to_kafka(), camera.encode()


def _run_in_thread(settings: Settings, **kw) -> tuple[threading.Thread, threading.Event, dict]:
    stop = threading.Event()
    box: dict = {}

    def target():
        try:
            box["stats"] = run_worker(settings, stop_event=stop, **kw)
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, stop, box


def _stop(t: threading.Thread, stop: threading.Event, box: dict) -> WorkerStats:
    stop.set()
    t.join(60)
    assert not t.is_alive(), "worker did not stop"
    if "error" in box:
        raise box["error"]
    return box["stats"]


@pytest.fixture
def registry(tmp_path) -> Path:
    reg = tmp_path / "profiles"
    publish_mean_profile(reg, "widget", size=64, threshold=0.25)
    return reg


# -- tests ------------------------------------------------------------------------------------
def test_frames_in_results_out_bad_frames_to_dlq(kafka_settings, registry, tmp_path):
    port = free_port()
    settings = _settings(kafka_settings, registry, metrics_port=port)
    base = plain_image(512, 128, seed=9)
    frames, expect = [], {}
    for i in range(24):
        img = with_square(base, 100 + 5 * i, 200, 96, 250) if i % 3 == 0 else base
        value, headers, key = _frame("widget", i, img, camera=f"cam{i % 3}", fmt="png" if i == 5 else "jpeg")
        frames.append((value, headers, key))
        expect[dict(headers)["frame_id"].decode()] = "defect" if i % 3 == 0 else "ok"
    good_jpeg = frames[1][0]
    ok_bomb, bomb = cv2.imencode(".png", np.zeros((9000, 9000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    bad = [
        (b"", frame_headers("widget", 100).to_kafka(), b"cam1"),                       # zero bytes
        (good_jpeg[: len(good_jpeg) // 2], frame_headers("widget", 101).to_kafka(), b"cam1"),  # truncated
        (os.urandom(3000), frame_headers("widget", 102).to_kafka(), b"cam1"),          # random bytes
        (bomb.tobytes(), frame_headers("widget", 103, encoding="png").to_kafka(), b"cam1"),  # PNG bomb
        (good_jpeg, frame_headers("gizmo", 104).to_kafka(), b"cam1"),                  # unknown product
        (good_jpeg, None, b"cam1"),                                                     # no headers
        (good_jpeg, [("product", b"widget"), ("seq", b"x")], b"cam1"),                  # malformed headers
    ]
    mixed = frames[:10] + bad + frames[10:]
    _produce(settings, mixed)

    seen_metrics: dict = {}

    def on_batch(stats: WorkerStats) -> None:
        if stats.frames >= len(mixed) and "text" not in seen_metrics:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                seen_metrics["text"] = r.read().decode()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
                seen_metrics["ready"] = (r.status, json.loads(r.read()))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                seen_metrics["healthz"] = r.status

    stats = run_worker(settings, worker_id="w-int", max_frames=len(mixed), on_batch=on_batch)
    assert stats.frames == len(mixed) and stats.results == 24 and stats.dlq == len(bad)
    assert stats.defects == 8

    results = [InspectionResult.from_bytes(r.value) for r in _read_all(settings, settings.topics.results, 24)]
    assert sorted(r.frame_id for r in results) == sorted(expect)  # exactly one per frame
    for r in results:
        assert r.verdict == expect[r.frame_id], r.frame_id
        assert r.worker_id == "w-int" and r.profile_version == 1 and (r.width, r.height) == (512, 512)
        if r.verdict == "defect":
            assert r.mask_png_b64 and r.thumbnail_jpeg_b64 and r.heatmap_png_b64
            assert len(r.regions) == 1
            x, y, w, h = r.regions[0].bbox
            assert 180 <= y <= 215 and 80 <= w <= 130 and 80 <= h <= 130
        else:
            assert r.mask_png_b64 is None and r.regions == []

    dlq = _read_all(settings, settings.topics.dlq, len(bad))
    assert len(dlq) == len(bad)
    by_value = {}
    for rec in dlq:
        info = DlqRecord.model_validate_json(dict(rec.headers)["dlq"])
        assert info.worker_id == "w-int" and info.source_topic == settings.topics.frames
        by_value.setdefault(rec.value, []).append((info.stage, info.reason, rec.headers))
    assert by_value[b""][0][:2] == ("decode", "empty frame (0 bytes)")
    assert "truncated JPEG" in by_value[good_jpeg[: len(good_jpeg) // 2]][0][1]
    assert "decompression bomb" in by_value[bomb.tobytes()][0][1]
    stages = sorted(s for s, _, _ in by_value[good_jpeg])
    assert stages == ["headers", "headers", "profile"]
    unknown = next(x for x in by_value[good_jpeg] if x[0] == "profile")
    assert "unknown product 'gizmo'" in unknown[1]
    assert [k for k, _ in unknown[2]][:-1] == [k for k, _ in bad[4][1]]  # original headers kept

    committed, end = _committed_vs_end(settings)
    assert committed == end  # everything handled is committed

    text = seen_metrics["text"]
    # the published profile was loaded and warmed before the first frame: ready, with its version
    status, body = seen_metrics["ready"]
    assert status == 200 and body["ready"] and body["products"] == {"widget": 1} and body["worker_id"] == "w-int"
    assert seen_metrics["healthz"] == 200 and "linewatch_worker_ready 1.0" in text
    assert 'linewatch_worker_frames_total{outcome="defect"} 8.0' in text
    assert 'linewatch_worker_frames_total{outcome="ok"} 16.0' in text
    assert 'linewatch_worker_dlq_total{stage="decode"} 4.0' in text
    assert 'linewatch_worker_engine{engine="torch-cpu",product="widget"} 1.0' in text
    assert "linewatch_worker_batch_size_count" in text and "linewatch_worker_end_to_end_latency_seconds_bucket" in text
    assert "linewatch_worker_consumer_lag_total" in text


def test_kill_9_mid_batch_loses_nothing(kafka_settings, registry):
    """Offsets are committed only after the batch's results are acknowledged: at the moment
    of a SIGKILL every committed frame already has its result, and a restarted worker
    handles the rest."""
    settings = _settings(kafka_settings, registry, max_batch=4)
    base = plain_image(128, 128, seed=3)
    n = 48
    frames = [_frame("widget", i, base, camera=f"cam{i % 4}") for i in range(n)]
    ids = {dict(h)["frame_id"].decode() for _, h, _ in frames}
    _produce(settings, frames)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(TESTS / "worker_proc.py"), json.dumps(settings.model_dump(mode="json")),
           "w-doomed", "0.15"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        got = []
        deadline = time.monotonic() + 90
        while len(got) < 12 and time.monotonic() < deadline:
            got = _read_all(settings, settings.topics.results, 12, timeout_s=2)
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert len(got) >= 12, "the worker produced no results"
        proc.send_signal(signal.SIGKILL)  # mid-batch: every engine call sleeps 0.15 s
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = [InspectionResult.from_bytes(r.value) for r in _read_all(settings, settings.topics.results, 12, 3)]
    committed, end = _committed_vs_end(settings)
    assert sum(committed.values()) < n, "the kill came too late to test anything"
    done = {(r.kafka_partition, r.kafka_offset) for r in before}
    for p, off in committed.items():
        for o in range(off):
            assert (p, o) in done, f"offset {p}:{o} committed without an acknowledged result"

    stats = run_worker(settings, worker_id="w-rescue", max_frames=n - sum(committed.values()),
                       create_topics=False)
    after = [InspectionResult.from_bytes(r.value) for r in _read_all(settings, settings.topics.results, n, 30)]
    assert {r.frame_id for r in after} == ids  # none lost (duplicates are allowed: the sink dedups)
    assert stats.frames == n - sum(committed.values())
    committed, end = _committed_vs_end(settings)
    assert committed == end


def test_hot_reload_picks_up_a_new_version_without_restart(kafka_settings, registry):
    settings = _settings(kafka_settings, registry)
    base = plain_image(128, 128, seed=4)
    marked = with_square(base, 40, 40, 24, 175)  # ~0.18 above the mean: a defect only at 0.1
    t, stop, box = _run_in_thread(settings, worker_id="w-reload")
    try:
        _produce(settings, [_frame("widget", i, marked) for i in range(4)])
        first = [InspectionResult.from_bytes(r.value) for r in _read_all(settings, settings.topics.results, 4, 90)]
        assert len(first) == 4, box
        assert {(r.profile_version, r.verdict) for r in first} == {(1, "ok")}, [
            (r.profile_version, r.verdict, r.image_score) for r in first]
        publish_mean_profile(registry, "widget", size=64, threshold=0.1)  # v2, more sensitive
        deadline = time.monotonic() + 90  # generous: the box may be heavily shared
        seq = 4
        v2 = []
        while time.monotonic() < deadline and not v2:
            _produce(settings, [_frame("widget", seq, marked)])
            seq += 1
            recs = [InspectionResult.from_bytes(r.value) for r in _read_all(settings, settings.topics.results, seq, 5)]
            v2 = [r for r in recs if r.profile_version == 2]
        assert v2, f"the new profile version was never used ({len(recs)} results, worker: {box})"
        assert all(r.verdict == "defect" and r.threshold == pytest.approx(0.1) for r in v2)
        assert all(r.worker_id == "w-reload" for r in recs)
    finally:
        stats = _stop(t, stop, box)
    assert ("widget", 1, 2, True) in stats.reloads


def test_sigterm_finishes_the_batch_commits_and_exits(kafka_settings, registry):
    settings = _settings(kafka_settings, registry, max_batch=4)
    n = 40
    base = plain_image(128, 128, seed=5)
    _produce(settings, [_frame("widget", i, base) for i in range(n)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(TESTS / "worker_proc.py"), json.dumps(settings.model_dump(mode="json")),
           "w-term", "0.2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # SIGTERM only once the worker is consuming (8 results out): signalled earlier, it stops
        # before its first batch and the test proves nothing. The wait covers a loaded machine's
        # startup plus a stalled first join replaced by the watchdog (worker.join_timeout_s) twice.
        got = []
        deadline = time.monotonic() + 60 + 2 * settings.worker.join_timeout_s
        while len(got) < 8 and time.monotonic() < deadline and proc.poll() is None:
            got = _read_all(settings, settings.topics.results, 8, timeout_s=2)
        if len(got) < 8:
            proc.kill()
            out, _ = proc.communicate(timeout=30)
            pytest.fail(f"the worker published {len(got)} results before the deadline, not signalled:\n"
                        + out.decode()[-3000:])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out.decode()[-3000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert 8 <= summary["frames"] < n
    results = _read_all(settings, settings.topics.results, summary["results"], 10)
    committed, _ = _committed_vs_end(settings)
    assert sum(committed.values()) == summary["frames"] == len(results)  # finished, committed, no extra


# -- a real PaDiM profile through the stream vs offline ---------------------------------------
@pytest.fixture(scope="session")
def padim_frames(tmp_path_factory):
    """A tiny PaDiM (64 px, d=16) fitted once on synthetic caps and published with its ONNX
    export; plus JPEG frames (good and defective, 256 px) with the threshold set between
    their scores so both verdicts occur."""
    from linewatch.models.padim import PaDiM
    from linewatch.profiles import Profile, Registry
    from linewatch.synth import SyntheticProduct
    from linewatch.inspection.frames import decode_frame

    root = tmp_path_factory.mktemp("padim-registry")
    sp = SyntheticProduct("cap", size=256, seed=1)

    def jpeg(img):
        return encode(img, "jpeg", 92)

    normals = np.stack([decode_frame(jpeg(sp.normal(100 + i).image), 64, 10**8)[0] for i in range(10)])
    model = PaDiM(input_size=64, d=16).fit(normals, progress=False)
    frames = [jpeg(sp.normal(i).image) for i in range(6)]
    frames += [jpeg(sp.defective(i, cat).image) for i, cat in enumerate(
        ["structural", "surface", "contamination", "combined", "surface", "structural"])]
    decoded = np.stack([decode_frame(f, 64, 10**8)[0] for f in frames])
    _, scores = model.predict(decoded)
    threshold = float(np.median(scores))
    profile = Profile(product="cap", model_kind="padim", backbone="efficientnet_lite0", input_size=64,
                      threshold=threshold, threshold_method="manual", min_region_px=4)
    Registry(root).publish(profile, model)  # with the ONNX export, as calibration publishes
    return root, frames


def test_real_padim_profile_stream_matches_offline(kafka_settings, padim_frames):
    from linewatch.profiles import ONNX_FILE, Registry
    from workers.engines import select_engine
    from linewatch.inspection.frames import decode_frame
    from linewatch.inspection.verdict import judge

    registry, frames = padim_frames
    settings = _settings(kafka_settings, registry, max_batch=5)
    msgs = [_frame("cap", i, np.zeros((1, 1, 3), np.uint8)) for i in range(len(frames))]
    msgs = [(f, h, k) for f, (_, h, k) in zip(frames, msgs)]
    _produce(settings, msgs)
    stats = run_worker(settings, worker_id="w-padim", max_frames=len(frames))
    assert stats.results == len(frames) and stats.engines == {"cap": "onnxruntime-cpu"}
    got = {r.frame_id: r for r in (InspectionResult.from_bytes(x.value)
                                   for x in _read_all(settings, settings.topics.results, len(frames)))}
    assert len(got) == len(frames)

    # offline: the same profile, the same engine choice, the same decoder
    reg = Registry(registry)
    profile, model = reg.load("cap")
    engine = select_engine(model, reg.version_dir("cap", profile.version) / ONNX_FILE, "auto", 1, 16)
    images = np.stack([decode_frame(f, 64, 10**8)[0] for f in frames])
    maps, scores = engine.run(images)
    offline = [judge(maps[k], float(scores[k]), profile, 256, 256) for k in range(len(frames))]
    verdicts = []
    for (_, h, _), ref, score in zip(msgs, offline, scores):
        r = got[dict(h)["frame_id"].decode()]
        assert r.verdict == ref.verdict and len(r.regions) == len(ref.regions)
        assert r.image_score == pytest.approx(float(score), rel=1e-4, abs=1e-4)
        assert r.model_kind == "padim" and r.engine == "onnxruntime-cpu"
        verdicts.append(r.verdict)
    assert "ok" in verdicts and "defect" in verdicts  # the comparison is not vacuous


def test_two_workers_share_the_group_and_lose_nothing(kafka_settings, registry):
    """Scale-out: a second worker joins mid-stream, Kafka rebalances, every frame gets a
    result (a rebalance may duplicate a few, never lose one) and both workers take part."""
    from workers.engines import TorchEngine

    class Slow(TorchEngine):
        def run(self, images):
            time.sleep(0.05)
            return super().run(images)

    def factory(model, onnx_path, profile):
        return Slow(model, max_batch=4)

    settings = _settings(kafka_settings, registry, max_batch=4)
    base = plain_image(96, 128, seed=6)
    frames = [_frame("widget", i, base, camera=f"cam{i % 8}") for i in range(400)]
    handled: dict[str, int] = {}

    def counter(name):
        def on_batch(stats: WorkerStats) -> None:
            handled[name] = stats.frames
        return on_batch

    a = _run_in_thread(settings, worker_id="w-a", engine_factory=factory, create_topics=False,
                       on_batch=counter("a"))
    _produce(settings, frames[:40])
    time.sleep(1.0)
    b = _run_in_thread(settings, worker_id="w-b", engine_factory=factory, create_topics=False,
                       on_batch=counter("b"))
    sent = 40
    # keep the stream going until the rebalance has given the newcomer work (bounded)
    while sent < len(frames) and not (handled.get("a") and handled.get("b")):
        _produce(settings, frames[sent : sent + 8])
        sent += 8
        time.sleep(0.3)
    ids = {dict(h)["frame_id"].decode() for _, h, _ in frames[:sent]}
    try:
        deadline = time.monotonic() + 90
        got: set[str] = set()
        while time.monotonic() < deadline and got != ids:
            recs = _read_all(settings, settings.topics.results, len(ids), timeout_s=3)
            got = {InspectionResult.from_bytes(r.value).frame_id for r in recs}
    finally:
        sa, sb = _stop(*a), _stop(*b)
    assert got == ids
    assert sa.frames > 0 and sb.frames > 0, (sa.frames, sb.frames)
    assert sa.frames + sb.frames >= len(ids)
    committed, end = _committed_vs_end(settings)
    assert committed == end


@pytest.mark.timeout(120)
def test_cli_work_help_and_unreachable_broker(tmp_path):
    linewatch = [sys.executable, "-m", "linewatch.cli"]
    env = {**os.environ, "LINEWATCH_HOME": str(tmp_path), "LINEWATCH_KAFKA__CONNECT_TIMEOUT_S": "2"}
    out = subprocess.run([*linewatch, "work", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "--max-batch" in out.stdout and "--metrics-port" in out.stdout
    from linewatch.kafka.broker import free_port as _free

    out = subprocess.run([*linewatch, "work", "--bootstrap-servers", f"127.0.0.1:{_free()}"],
                         capture_output=True, text=True, env=env, timeout=90)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("linewatch: error: Kafka broker not reachable at 127.0.0.1:")
    bad = subprocess.run([*linewatch, "work", "--max-batch", "0"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "max_batch" in bad.stderr


def test_serial_mode_without_overlap(kafka_settings, registry):
    settings = _settings(kafka_settings, registry, max_batch=3)
    base = plain_image(128, 128, seed=8)
    frames = [_frame("widget", i, with_square(base, 10, 10, 40, 250) if i % 2 else base) for i in range(10)]
    frames.insert(4, (b"junk", frame_headers("widget", 99).to_kafka(), b"cam1"))
    _produce(settings, frames)
    stats = run_worker(settings, worker_id="w-serial", max_frames=len(frames), overlap=False, create_topics=False)
    assert (stats.frames, stats.results, stats.defects, stats.dlq) == (11, 10, 5, 1)
    results = [InspectionResult.from_bytes(r.value) for r in _read_all(settings, settings.topics.results, 10)]
    assert len({r.frame_id for r in results}) == len(results) == 10
    committed, end = _committed_vs_end(settings)
    assert committed == end


def test_a_stalled_group_join_is_replaced_by_a_new_consumer(kafka_settings, registry, monkeypatch):
    """kafka-python 3 can stall in a first group join under load (the broker drops the member,
    the client never rejoins; tests/faults/harness.py dumps the stacks when it happens). The
    first consumer here never completes its join; after ``join_timeout_s`` the worker closes it
    and a new one joins and serves every frame."""
    import linewatch.kafka.io as kio

    real = kio.make_consumer
    made: list[str] = []

    class Stalled:
        """A consumer whose join never completes: no listener call, no records."""

        def __init__(self, inner):
            self.inner, self.closed = inner, False

        def subscribe(self, topics, listener=None):
            pass  # the join never happens

        def poll(self, timeout_ms=0, max_records=None):
            time.sleep(timeout_ms / 1000)
            return {}

        def assignment(self):
            return set()

        def close(self, autocommit=False):
            self.closed = True
            self.inner.close(autocommit=False)

    def make_consumer(*args, **kw):
        c = real(*args, **kw)
        made.append("stalled" if not made else "real")
        return Stalled(c) if len(made) == 1 else c

    monkeypatch.setattr(kio, "make_consumer", make_consumer)
    settings = _settings(kafka_settings, registry, join_timeout_s=5)
    img = plain_image(256, 128, seed=3)
    _produce(settings, [_frame("widget", i, img) for i in range(6)])
    t0 = time.monotonic()
    stats = run_worker(settings, worker_id="w-rejoin", max_frames=6)
    assert made == ["stalled", "real"] and stats.rejoins == 1
    assert stats.frames == 6 and stats.results == 6
    assert time.monotonic() - t0 >= 5  # not before the join timeout
    results = _read_all(settings, settings.topics.results, 6)
    assert len({InspectionResult.from_bytes(r.value).frame_id for r in results}) == 6
