"""Producers: sources (unit) and frames into the real broker (integration): byte-identical
values, headers parsed back into FrameHeaders, per-camera order, oversized frames refused by
name while the rest get through, a bounded failure without a broker, SIGTERM flushes."""

from __future__ import annotations

import functools
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.errors import UserError
from linewatch.kafka.io import BrokerUnavailable, make_consumer
from linewatch.messages import FrameHeaders
from linewatch.settings import Settings
from producers.producer import CameraConfig, FrameProducer, camera_configs
from producers.sources import (
    CameraSource,
    FolderSource,
    SyntheticSource,
    VideoSource,
    encode_image,
    open_source,
    source_kind,
)

V_BIN = Path(sys.executable).parent


# ---- helpers ---------------------------------------------------------------------------
def write_images(folder: Path, n: int, size: int = 64, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + n):
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        path = folder / f"img_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def write_video(path: Path, n: int = 12) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    assert w.isOpened()
    for i in range(n):
        img = np.full((120, 160, 3), i * 20, np.uint8)
        cv2.putText(img, str(i), (40, 80), cv2.FONT_HERSHEY_SIMPLEX, 2, (0, 0, 255), 3)
        w.write(img)
    w.release()
    return path


def decoded_video_jpegs(path: Path, quality: int = 90) -> list[bytes]:
    """What the producer must send for a video: each decoded frame as JPEG (independent read)."""
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        out.append(encode_image(img, "jpeg", quality))
    cap.release()
    return out


def consume(settings: Settings, n: int, timeout_s: float = 60.0) -> list:
    """All records of the frames topic, from the beginning, until ``n`` arrived."""
    from kafka import TopicPartition

    consumer = make_consumer(settings, None)
    try:
        topic = settings.topics.frames
        tps = [TopicPartition(topic, p) for p in range(settings.topics.frames_partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records = []
        deadline = time.monotonic() + timeout_s
        while len(records) < n and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                records.extend(recs)
        time.sleep(0.3)  # and make sure nothing extra follows
        for recs in consumer.poll(timeout_ms=500).values():
            records.extend(recs)
        return records
    finally:
        consumer.close()


def produce(settings: Settings, cams: list[tuple[CameraConfig, object]], **kw):
    delivered: list[tuple[FrameHeaders, bytes]] = []
    stats = FrameProducer(settings, cams, on_delivery=lambda h, v, md: delivered.append((h, v)),
                          report_every_s=0, **kw).run(handle_signals=False)
    return stats, delivered


def by_frame_id(records) -> dict[str, tuple[FrameHeaders, bytes, object]]:
    out = {}
    for r in records:
        h = FrameHeaders.from_kafka(r.headers)
        assert r.key == h.camera.encode()
        out[h.frame_id] = (h, r.value, r)
    return out


# ---- sources (unit) --------------------------------------------------------------------
def test_source_kinds_and_bad_paths(tmp_path):
    write_images(tmp_path / "imgs", 2)
    assert source_kind(str(tmp_path / "imgs")) == "folder"
    assert source_kind("synthetic:cap") == "synthetic"
    assert source_kind("camera:0") == "camera" and source_kind("0") == "camera"
    assert source_kind("rtsp://10.0.0.1/s") == "stream"
    with pytest.raises(UserError, match=r"nope: no such file or directory"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    with pytest.raises(UserError, match=r"video .*bad.mp4: unreadable"):
        open_source(str(tmp_path / "bad.mp4"))
    with pytest.raises(UserError, match="camera device 57: could not be opened"):
        open_source("camera:57", open_timeout_s=2)
    with pytest.raises(UserError, match=r"stream http://127.0.0.1:1/x.mjpg: could not be opened"):
        open_source("http://127.0.0.1:1/x.mjpg", open_timeout_s=2)
    with pytest.raises(UserError, match="quality"):
        open_source("synthetic:cap", quality=0)


def test_folder_source_sorted_bytes_and_loop(tmp_path):
    paths = write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    (tmp_path / "imgs" / "img_002b.jpg").write_bytes(b"garbage")  # unreadable: skipped with an error
    frames = list(FolderSource(tmp_path / "imgs"))
    assert [f.label for f in frames] == [str(p) for p in sorted(paths)]
    assert [f.data for f in frames] == [p.read_bytes() for p in sorted(paths)]
    assert [f.encoding for f in frames] == ["png" if p.suffix == ".png" else "jpeg" for p in sorted(paths)]
    looped = FolderSource(tmp_path / "imgs", loop=True)
    it = iter(looped)
    assert [next(it).label for _ in range(9)] == [str(p) for p in sorted(paths)] * 2 + [str(sorted(paths)[0])]


def test_video_source_and_synthetic(tmp_path):
    video = write_video(tmp_path / "v.avi")
    assert [f.data for f in VideoSource(video)] == decoded_video_jpegs(video)
    looped = iter(VideoSource(video, loop=True))
    assert len([next(looped) for _ in range(30)]) == 30
    syn = list(f for _, f in zip(range(3), SyntheticSource("cap", seed=3, size=64)))
    assert all(cv2.imdecode(np.frombuffer(f.data, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3) for f in syn)
    with pytest.raises(UserError, match="unknown synthetic product"):
        open_source("synthetic:nope")


def test_synthetic_source_camera_frames(capsys):
    """The synthetic camera as a line camera: a 1024x768 JPEG with the product centred."""
    src = SyntheticSource("pcb", seed=1, frame_size=(1024, 768), defect_scale="small", defect_rate=0.5)
    frames = list(f for _, f in zip(range(2), src))
    for f in frames:
        assert f.encoding == "jpeg" and f.data[:2] == b"\xff\xd8"
        assert cv2.imdecode(np.frombuffer(f.data, np.uint8), cv2.IMREAD_COLOR).shape == (768, 1024, 3)
    assert src.camera.product.product_box == (192, 64, 640, 640)
    src = open_source("synthetic:cap", frame_size=(400, 300), product_size=240, encoding="png")
    assert cv2.imdecode(np.frombuffer(next(iter(src)).data, np.uint8), cv2.IMREAD_COLOR).shape == (300, 400, 3)
    with pytest.raises(UserError, match="does not fit"):
        open_source("synthetic:cap", frame_size=(400, 300), product_size=320)
    with pytest.raises(UserError, match="needs --frame-size"):
        open_source("synthetic:cap", product_size=320)
    from linewatch.cli import main

    assert main(["produce", "--source", "synthetic:cap", "--frame-size", "1024-768", "--max-frames", "1"]) == 2
    err = capsys.readouterr().err
    assert "frame size '1024-768'" in err and len(err.strip().splitlines()) == 1


def test_camera_configs_pairing_and_validation():
    cfg = camera_configs(1, product="p", line="l", cameras=["a", "b"], count=None, fps=0, max_frames=3,
                         default_products=[None])
    assert [(s, c.camera) for s, c in cfg] == [(0, "a"), (0, "b")]
    cfg = camera_configs(2, product=None, line="l", cameras=None, count=2, fps=0, max_frames=None,
                         default_products=["cap", "pcb"])
    assert [(s, c.camera, c.product) for s, c in cfg] == [(0, "cam-1", "cap"), (0, "cam-2", "cap"),
                                                          (1, "cam-3", "pcb"), (1, "cam-4", "pcb")]
    with pytest.raises(UserError, match="--product is required"):
        camera_configs(1, product=None, line="l", cameras=None, count=None, fps=0, max_frames=None,
                       default_products=[None])
    with pytest.raises(UserError, match="invalid camera 'cam 1'"):
        camera_configs(1, product="p", line="l", cameras=["cam 1"], count=None, fps=0, max_frames=None,
                       default_products=[None])
    with pytest.raises(UserError, match="3 --camera ids for 2 sources"):
        camera_configs(2, product="p", line="l", cameras=["a", "b", "c"], count=None, fps=0, max_frames=None,
                       default_products=[None, None])


def test_producer_without_broker_fails_clearly_within_bound(tmp_path):
    from linewatch.kafka.broker import free_port

    write_images(tmp_path / "imgs", 2)
    settings = Settings(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}", "connect_timeout_s": 3})
    cams = [(CameraConfig(camera="c1", product="p"), FolderSource(tmp_path / "imgs"))]
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"not reachable at 127\.0\.0\.1:\d+ within 3s"):
        FrameProducer(settings, cams, report_every_s=0).run(handle_signals=False)
    assert time.monotonic() - t0 < 8


def test_produce_help_is_complete():
    out = subprocess.run([str(V_BIN / "linewatch"), "produce", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--source", "--camera", "--cameras", "--product", "--line", "--fps", "--quality", "--loop",
                 "--max-frames", "--duration", "synthetic:PRODUCT", "rtsp://", "camera:N", "--bootstrap-servers"):
        assert flag in out.stdout, flag


# ---- into the real broker --------------------------------------------------------------
@pytest.mark.integration
def test_folder_frames_arrive_byte_identical(kafka_settings, tmp_path):
    paths = sorted(write_images(tmp_path / "imgs", 6))
    cams = [(CameraConfig(camera="cam-f", product="bottle", line="l-2"), FolderSource(tmp_path / "imgs"))]
    stats, delivered = produce(kafka_settings, cams)
    assert stats.sent == 6 and stats.too_large == 0
    got = by_frame_id(consume(kafka_settings, 6))
    assert len(got) == 6
    ordered = sorted(got.values(), key=lambda t: t[0].seq)
    assert [v for _, v, _ in ordered] == [p.read_bytes() for p in paths]
    for i, (h, _, _) in enumerate(ordered):
        assert (h.product, h.camera, h.line, h.seq) == ("bottle", "cam-f", "l-2", i)
        assert h.encoding == ("png" if paths[i].suffix == ".png" else "jpeg")
        assert abs(h.capture_ts_ms - time.time() * 1000) < 120_000
    assert {h.frame_id for h, _ in delivered} == set(got)


@pytest.mark.integration
def test_video_and_synthetic_frames_arrive_byte_identical(kafka_settings, tmp_path):
    video = write_video(tmp_path / "v.avi", n=8)
    expected_video = decoded_video_jpegs(video, quality=80)
    syn_expected = [
        encode_image(cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR), "jpeg", 80)
        for _, s in zip(range(5), __import__("linewatch.synth", fromlist=["SyntheticCamera"]).SyntheticCamera(
            "pcb", seed=11, size=96, defect_rate=0.5))
    ]
    cams = [
        (CameraConfig(camera="cam-v", product="pcb"), VideoSource(video, quality=80)),
        (CameraConfig(camera="cam-s", product="pcb", max_frames=5),
         SyntheticSource("pcb", seed=11, size=96, defect_rate=0.5, quality=80)),
    ]
    stats, _ = produce(kafka_settings, cams)
    assert stats.cameras["cam-v"].sent == 8 and stats.cameras["cam-s"].sent == 5
    got = by_frame_id(consume(kafka_settings, 13))
    for cam, expected in (("cam-v", expected_video), ("cam-s", syn_expected)):
        mine = sorted((t for t in got.values() if t[0].camera == cam), key=lambda t: t[0].seq)
        assert [v for _, v, _ in mine] == expected, cam


@pytest.mark.integration
def test_stream_url_frames_arrive_byte_identical(kafka_settings, tmp_path):
    """A live stream through OpenCV: the video served over HTTP by a local server."""
    video = write_video(tmp_path / "v.avi", n=10)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v.avi"
        cams = [(CameraConfig(camera="cam-http", product="cap", max_frames=10), CameraSource(url))]
        stats, _ = produce(kafka_settings, cams)
    finally:
        server.shutdown()
    assert stats.sent == 10
    got = sorted(by_frame_id(consume(kafka_settings, 10)).values(), key=lambda t: t[0].seq)
    assert [v for _, v, _ in got] == decoded_video_jpegs(video)


@pytest.mark.integration
def test_per_camera_order_with_several_cameras(kafka_settings):
    cams = [
        (CameraConfig(camera=f"cam-{i}", product="brick", max_frames=25), SyntheticSource("brick", seed=i, size=64))
        for i in range(3)
    ]
    stats, _ = produce(kafka_settings, cams)
    assert stats.sent == 75
    records = consume(kafka_settings, 75)
    assert len(records) == 75
    by_cam: dict[str, list] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        h = FrameHeaders.from_kafka(r.headers)
        by_cam.setdefault(h.camera, []).append((r.partition, h.seq))
    assert sorted(by_cam) == ["cam-0", "cam-1", "cam-2"]
    for cam, seqs in by_cam.items():
        assert len({p for p, _ in seqs}) == 1, f"{cam} spread over partitions"  # key = camera
        assert [s for _, s in seqs] == list(range(25)), f"{cam} out of order"


@pytest.mark.integration
def test_oversized_frame_refused_by_name_rest_get_through(kafka_settings, tmp_path, caplog):
    folder = tmp_path / "imgs"
    write_images(folder, 4)
    noise = (np.random.default_rng(0).random((2100, 2100, 3)) * 255).astype(np.uint8)
    big = folder / "img_001x_huge.png"  # sorts between img_001 and img_002
    assert cv2.imwrite(str(big), noise, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert big.stat().st_size > 10 * 1024 * 1024
    cams = [(CameraConfig(camera="cam-big", product="p"), FolderSource(folder))]
    with caplog.at_level("ERROR"):
        stats, _ = produce(kafka_settings, cams)
    assert stats.sent == 4 and stats.too_large == 1
    assert any("img_001x_huge.png" in r.getMessage() and "over the limit of 10485760" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    got = sorted(by_frame_id(consume(kafka_settings, 4)).values(), key=lambda t: t[0].seq)
    assert [h.seq for h, _, _ in got] == [0, 1, 3, 4]  # seq 2 (the huge one) is missing, nothing else
    assert all(len(v) < 100_000 for _, v, _ in got)


@pytest.mark.integration
@pytest.mark.slow
def test_cli_produce_sigterm_flushes_and_reports(kafka_settings):
    env = {**os.environ, "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.kafka.bootstrap_servers,
           "LINEWATCH_TOPICS__FRAMES": kafka_settings.topics.frames}
    proc = subprocess.Popen(
        [str(V_BIN / "linewatch"), "produce", "-s", "synthetic:turf", "--cameras", "2", "--fps", "8",
         "--size", "64", "--report-every", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(6)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "[produce]" in err and "frames/s" in err  # periodic throughput lines
    done = [line for line in out.splitlines() if "done (SIGTERM)" in line]
    assert done, out
    sent = int(re.search(r"(\d+) frames ", done[0]).group(1))
    assert sent > 5
    assert len(consume(kafka_settings, sent)) == sent  # everything reported as sent is in Kafka


@pytest.mark.integration
def test_bench_producer_measures_real_deliveries(kafka_broker):
    from producers.bench import bench_producer, format_result

    res = bench_producer(kafka_broker, frames=24, size=128, distinct=4, cameras=2)
    phases = {p["phase"]: p for p in res["phases"]}
    assert set(phases) == {"send", "encode+send"}
    for p in phases.values():
        assert p["frames"] == 24 and p["too_large"] == 0
        assert p["frames_per_s"] > 0 and p["mb_per_s"] > 0 and p["mean_frame_kb"] > 1
    assert "frames/s" in format_result(res)


@pytest.mark.integration
def test_fps_pacing_per_camera(kafka_settings, tmp_path):
    write_images(tmp_path / "imgs", 3)
    cams = [(CameraConfig(camera=f"cam-p{i}", product="p", fps=10, max_frames=12),
             FolderSource(tmp_path / "imgs", loop=True)) for i in range(2)]
    t0 = time.monotonic()
    stats, _ = produce(kafka_settings, cams)
    elapsed = time.monotonic() - t0
    assert stats.sent == 24
    assert elapsed >= 1.05  # 12 frames at 10 frames/s: paced, not a burst (cameras run in parallel)
    assert elapsed < 20
