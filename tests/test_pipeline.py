"""Unit tests of the worker's hot path (no broker): decoding, bombs, regions, verdicts, DLQ."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from linewatch.messages import DlqRecord, InspectionResult
from linewatch.profiles import Profile, ProfileError
from worker_helpers import FakeRecord, encode, frame_headers, plain_image, with_square
from linewatch.inspection.frames import FrameError, _reduced_flag, decode_frame, frame_dims, framing_of
from linewatch.inspection.geometry import Roi
from linewatch.inspection.verdict import find_regions, judge
from workers.pipeline import BatchProcessor

MAX_PX = 64_000_000


def _profile(**kw) -> Profile:
    base = dict(product="widget", version=3, model_kind="padim", backbone="none", input_size=64,
                threshold=0.5, threshold_method="manual", min_region_px=4)
    base.update(kw)
    return Profile(**base)


class RedEngine:
    """Map = red channel / 255 (blurred nothing): a red square is a defect where it is."""

    name = "fake-red"

    def __init__(self):
        self.calls: list[int] = []

    def run(self, images: np.ndarray):
        self.calls.append(len(images))
        maps = images[..., 0].astype(np.float32) / 255.0
        return maps, maps.reshape(len(images), -1).max(1)


def _loaded(profile: Profile, engine) -> SimpleNamespace:
    """What ``workers.profile_cache`` hands the pipeline: the profile, its engine and its extent."""
    return SimpleNamespace(profile=profile, engine=engine, extent=profile.extent_model())


class Profiles:
    def __init__(self, **entries):
        self.entries = entries

    def get(self, product):
        if product not in self.entries:
            raise ProfileError(f"unknown product {product!r}: no published profile")
        return self.entries[product]


# -- decoding ---------------------------------------------------------------------------------
def test_reduced_jpeg_decode_goes_straight_to_model_size():
    assert _reduced_flag(framing_of(256), Roi(x=0, y=0, w=1024, h=1024)) == (4, cv2.IMREAD_REDUCED_COLOR_4)
    assert _reduced_flag(framing_of(256), Roi(x=0, y=0, w=1024, h=768)) == (2, cv2.IMREAD_REDUCED_COLOR_2)
    assert _reduced_flag(framing_of(256), Roi(x=0, y=0, w=4096, h=4096))[0] == 8
    assert _reduced_flag(framing_of(256), Roi(x=0, y=0, w=300, h=300))[0] == 1
    src = cv2.resize(plain_image(128, 90, noise=20), (1024, 1024), interpolation=cv2.INTER_CUBIC)
    src = with_square(src, 400, 200, 160, 240)
    data = encode(src, quality=95)
    out = np.zeros((2, 256, 256, 3), np.uint8)
    img, w, h = decode_frame(data, 256, MAX_PX, "jpeg", out=out[1])
    assert (w, h) == (1024, 1024)
    assert img.shape == (256, 256, 3) and np.shares_memory(img, out)
    assert out[0].max() == 0 and out[1].any()
    # RGB order and the same picture as a full decode + area resize (within JPEG error)
    full = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    ref = cv2.resize(full, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 3.0
    assert img[50 + 20, 100 + 20].tolist() == pytest.approx([240, 240, 240], abs=8)


def test_png_and_non_square_frames_are_squashed_to_the_model_size():
    src = np.zeros((480, 640, 3), np.uint8)
    src[:, :320, 0] = 255  # left half red
    img, w, h = decode_frame(encode(src, "png"), 64, MAX_PX, "png")
    assert (w, h) == (640, 480) and img.shape == (64, 64, 3)
    assert img[10, 5].tolist() == [255, 0, 0] and img[10, 60].tolist() == [0, 0, 0]


def _png_with_declared_size(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    # a real bomb: 9000 x 9000 of zeros is 81 Mpx but only ~80 kB as a PNG
    ok, bomb = cv2.imencode(".png", np.zeros((9000, 9000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok and len(bomb) < 500_000
    with pytest.raises(FrameError, match="decompression bomb") as err:
        decode_frame(bomb.tobytes(), 64, MAX_PX, "png")
    assert err.value.stage == "decode"
    # a huge declared size with a tiny body
    with pytest.raises(FrameError, match="100000x100000"):
        frame_dims(_png_with_declared_size(100_000, 100_000), MAX_PX)
    # the same for a JPEG whose SOF declares 60000 x 60000
    data = bytearray(encode(plain_image(64)))
    i = next(k for k in range(2, len(data) - 1) if data[k] == 0xFF and data[k + 1] in (0xC0, 0xC2))
    data[i + 5 : i + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(FrameError, match="60000x60000"):
        decode_frame(bytes(data), 64, MAX_PX, "jpeg")


@pytest.mark.parametrize("data,match", [
    (b"", "empty frame"),
    (b"\x00" * 100, "not a JPEG or PNG"),
    (bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8)), "not a JPEG or PNG"),
    (b"\xff\xd8\xff", "truncated JPEG"),
    (b"\x89PNG\r\n\x1a\n", "corrupt PNG"),
])
def test_garbage_is_a_decode_error(data, match):
    with pytest.raises(FrameError, match=match) as err:
        decode_frame(data, 64, MAX_PX)
    assert err.value.stage == "decode"


def test_truncated_jpeg_and_png_are_refused():
    jpg = encode(plain_image(256, noise=30))
    with pytest.raises(FrameError, match="truncated JPEG"):
        decode_frame(jpg[: len(jpg) // 2], 64, MAX_PX)
    png = encode(plain_image(128, noise=30), "png")
    with pytest.raises(FrameError, match="truncated PNG"):
        decode_frame(png[: len(png) // 2], 64, MAX_PX)


def test_declared_encoding_must_match_the_data():
    with pytest.raises(FrameError, match="encoding=png but the data is JPEG"):
        decode_frame(encode(plain_image(64)), 64, MAX_PX, "png")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
@pytest.mark.parametrize("size", [64, 256])
def test_offline_image_loading_equals_the_stream_decode_on_the_same_bytes(tmp_path, fmt, size):
    """Calibration's images (``calibration.datasets.load_images``) are the worker's decode of the
    same bytes, pixel for pixel (the JPEG's DCT-reduced decode included), so offline maps equal
    the stream's."""
    from calibration.datasets import load_images

    src = cv2.resize(plain_image(80, 90, noise=40), (640, 480), interpolation=cv2.INTER_CUBIC)
    src = with_square(src, 300, 200, 90, 240)  # a camera-like frame, not square
    data = encode(src, fmt)
    path = tmp_path / f"frame.{'jpg' if fmt == 'jpeg' else 'png'}"
    path.write_bytes(data)
    offline = load_images([path], size)
    stream, w, h = decode_frame(data, size, MAX_PX, fmt)
    assert (w, h) == (640, 480) and offline.shape == (1, size, size, 3) and offline.dtype == np.uint8
    assert np.array_equal(offline[0], stream)
    assert stream.std() > 10  # a real picture, not a blank both sides agree on


# -- regions and verdicts ---------------------------------------------------------------------
def test_regions_on_a_synthetic_map():
    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 8:16] = 0.8            # 10 x 8 = 80 px, peak 0.8
    amap[12, 10] = 0.95                 # its peak
    amap[40:50, 40:45] = 0.6           # 50 px
    amap[60:62, 0:1] = 0.9             # 2 px: below min_region_px
    amap[30, 30] = 0.4                 # below threshold
    regions, mask, labels = find_regions(amap, 0.5, 4, width=640, height=480)
    assert len(regions) == 2
    big, small = sorted(regions, key=lambda r: -r.area_px)
    assert big.bbox == (80, 75, 80, 75)  # x*10, y*7.5, w*10, h*7.5
    assert big.area_px == round(80 * 10 * 7.5) and big.area_frac == pytest.approx(80 / 4096)
    assert big.peak_score == pytest.approx(0.95)
    assert big.mean_score == pytest.approx((79 * 0.8 + 0.95) / 80, rel=1e-5)
    assert small.bbox == (400, 300, 50, 75) and small.peak_score == pytest.approx(0.6)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert (mask > 0).sum() == 130  # the 2-px blob is not in the mask
    assert labels.max() == 2


def test_judge_verdicts():
    p = _profile(threshold=0.5, min_region_px=4)
    quiet = np.full((64, 64), 0.1, np.float32)
    fv = judge(quiet, 0.1, p, 64, 64)
    assert fv.verdict == "ok" and fv.regions == [] and fv.mask is None
    speck = quiet.copy()
    speck[5, 5] = 0.9  # above threshold but smaller than min_region_px
    assert judge(speck, 0.9, p, 64, 64).verdict == "ok"
    blob = quiet.copy()
    blob[5:10, 5:10] = 0.9
    fv = judge(blob, 0.9, p, 64, 64)
    assert fv.verdict == "defect" and len(fv.regions) == 1 and fv.defect_area_frac == pytest.approx(25 / 4096)
    # an explicit image threshold decides by the image score alone
    strict = _profile(threshold=0.5, image_threshold=0.95)
    assert judge(blob, 0.9, strict, 64, 64).verdict == "ok"
    loose = _profile(threshold=0.5, image_threshold=0.05)
    fv = judge(quiet, 0.1, loose, 64, 64)
    assert fv.verdict == "defect" and fv.regions == [] and fv.mask is not None


# -- a whole batch ----------------------------------------------------------------------------
def _processor(profiles) -> BatchProcessor:
    return BatchProcessor(profiles, worker_id="w-test", results_topic="results", dlq_topic="frames.dlq",
                          max_frame_pixels=MAX_PX, thumbnail_size=48, decode_threads=2)


def test_batch_results_and_dlq_reasons():
    engine = RedEngine()
    prof = _profile(threshold=0.5)
    proc = _processor(Profiles(widget=_loaded(profile=prof, engine=engine)))
    good = np.zeros((200, 300, 3), np.uint8)
    bad = good.copy()
    bad[50:100, 150:210, 0] = 255  # red block -> defect at x 150..210, y 50..100
    records = []

    def add(value, headers, key=b"cam1"):
        records.append(FakeRecord(value, headers, offset=len(records), key=key))

    add(encode(good, "png"), frame_headers("widget", 0, encoding="png").to_kafka())
    add(encode(bad, "png"), frame_headers("widget", 1, encoding="png", frame_id="cam1-1-x").to_kafka())
    add(encode(good, "png"), frame_headers("nosuch", 2, encoding="png").to_kafka())           # unknown product
    add(b"\xff\xd8garbage", frame_headers("widget", 3).to_kafka())                              # undecodable
    add(encode(good, "png"), [("frame_id", b"x"), ("product", b"widget")])                     # headers
    add(encode(good, "png"), None)                                                              # no headers
    hdr = frame_headers("widget", 6).to_kafka() + [("extra", None)]
    add(encode(good), hdr)                                                                      # unknown header
    try:
        out = proc.process(records).out
    finally:
        proc.close()
    assert [o.kind for o in out] == ["ok", "defect", "dlq", "dlq", "dlq", "dlq", "dlq"]
    assert engine.calls == [2]  # one engine call for the product group, bad frames excluded
    assert [o.offset for o in out] == list(range(7))

    ok = InspectionResult.from_bytes(out[0].value)
    assert ok.verdict == "ok" and ok.regions == [] and ok.mask_png_b64 is None and ok.thumbnail_jpeg_b64 is None
    assert (ok.width, ok.height, ok.profile_version, ok.engine, ok.worker_id) == (300, 200, 3, "fake-red", "w-test")
    assert ok.kafka_offset == 0 and ok.latency_ms >= 0 and out[0].topic == "results"

    d = InspectionResult.from_bytes(out[1].value)
    assert out[1].key == b"cam1" and d.frame_id == "cam1-1-x"  # keyed by camera: in order per camera
    assert d.verdict == "defect" and len(d.regions) == 1 and d.category == "unknown"
    x, y, w, h = d.regions[0].bbox
    assert abs(x - 150) <= 5 and abs(y - 50) <= 4 and abs(w - 60) <= 10 and abs(h - 50) <= 8
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(d.mask_png_b64), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (48, 48) and mask.max() == 255
    thumb = cv2.imdecode(np.frombuffer(base64.b64decode(d.thumbnail_jpeg_b64), np.uint8), cv2.IMREAD_COLOR)
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(d.heatmap_png_b64), np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape == (48, 48, 3) and heat.shape == (32, 32, 3)
    assert len(out[1].value) < 20_000

    reasons = {}
    for o, rec in zip(out[2:], records[2:]):
        assert o.topic == "frames.dlq" and o.value == rec.value and o.key == rec.key
        original = [(k, v if v is not None else b"") for k, v in (rec.headers or [])]
        assert o.headers[:-1] == original  # original headers kept, in order
        name, raw = o.headers[-1]
        assert name == "dlq"
        dlq = DlqRecord.model_validate_json(raw)
        assert dlq.worker_id == "w-test" and dlq.source_offset == rec.offset and dlq.source_topic == "frames"
        reasons[rec.offset] = (dlq.stage, dlq.reason)
    assert reasons[2][0] == "profile" and "unknown product 'nosuch'" in reasons[2][1]
    assert reasons[3][0] == "decode"
    assert reasons[4][0] == "headers" and "camera" in reasons[4][1]
    assert reasons[5] == ("headers", "missing headers")
    assert reasons[6][0] == "headers" and "extra" in reasons[6][1]
    assert json.loads(out[3].headers[-1][1])["frame_id"] is not None


def test_engine_failure_sends_the_group_to_the_dlq_and_other_products_go_on():
    class Broken:
        name = "broken"

        def run(self, images):
            raise RuntimeError("out of memory")

    proc = _processor(Profiles(a=_loaded(profile=_profile(product="a"), engine=Broken()),
                               b=_loaded(profile=_profile(product="b"), engine=RedEngine())))
    img = encode(np.zeros((64, 64, 3), np.uint8))
    recs = [FakeRecord(img, frame_headers(p, i).to_kafka(), offset=i) for i, p in enumerate("abab")]
    out = proc.process(recs).out
    proc.close()
    assert [o.kind for o in out] == ["dlq", "ok", "dlq", "ok"]
    assert "out of memory" in DlqRecord.model_validate_json(out[0].headers[-1][1]).reason


def test_categorizer_is_called_for_defect_frames(monkeypatch):
    import linewatch.inspection.categorize as cz
    import workers.results

    seen = {}

    def fake(image, amap, labels, params, *, threshold=None, background=None, regions=None):
        seen.update(n=len(regions), labels=int(labels.max()), shape=image.shape, params=params,
                    amap=amap.shape, threshold=threshold)
        regs = [r.model_copy(update={"category": "surface", "confidence": 0.8}) for r in regions]
        return cz.FrameCategories("surface", 0.8, [("surface", 0.8)] * len(regs), regs)

    monkeypatch.setattr(workers.results, "categorize_frame", fake)
    prof = _profile(threshold=0.5, categorizer={"classes": ["surface"]})
    proc = _processor(Profiles(widget=_loaded(profile=prof, engine=RedEngine())))
    img = np.zeros((64, 64, 3), np.uint8)
    img[10:20, 10:20, 0] = 255
    img[40:50, 40:50, 0] = 255
    out = proc.process([FakeRecord(encode(img, "png"), frame_headers("widget", 0, encoding="png").to_kafka())]).out
    proc.close()
    r = InspectionResult.from_bytes(out[0].value)
    assert seen == {"n": 2, "labels": 2, "shape": (64, 64, 3), "params": {"classes": ["surface"]},
                    "amap": (64, 64), "threshold": 0.5}
    assert r.category == "surface" and r.category_confidence == 0.8
    assert [x.category for x in r.regions] == ["surface", "surface"]


def test_non_finite_scores_and_post_processing_bugs_go_to_the_dlq(monkeypatch):
    class NaNEngine:
        name = "nan"

        def run(self, images):
            maps = np.zeros(images.shape[:3], np.float32)
            scores = np.zeros(len(images), np.float32)
            scores[0] = np.nan
            maps[1] = 0.9  # a defect whose image rendering will blow up
            scores[1] = 0.9
            return maps, scores

    def broken(*args, **kwargs):
        raise cv2.error("rendering bug")

    import workers.pipeline

    monkeypatch.setattr(workers.pipeline, "render_artifacts", broken)
    proc = _processor(Profiles(widget=_loaded(profile=_profile(), engine=NaNEngine())))
    img = encode(np.zeros((64, 64, 3), np.uint8))
    recs = [FakeRecord(img, frame_headers("widget", i).to_kafka(), offset=i) for i in range(3)]
    out = proc.process(recs).out
    proc.close()
    assert [o.kind for o in out] == ["dlq", "dlq", "ok"]
    assert out[0].stage == "inference" and "non-finite" in out[0].reason
    assert out[1].stage == "other" and "post-processing" in out[1].reason


def test_evidence_frames_ride_on_defects_and_a_hashed_sample():
    """Every defect result carries the original bytes; normal ones only when the frame-id hash
    falls in the sample, and a replay of the same frame decides the same way."""
    from linewatch.evidence import sampled

    prof = _profile(threshold=0.5)
    good = np.zeros((64, 64, 3), np.uint8)
    bad = good.copy()
    bad[10:30, 10:30, 0] = 255
    ids = [f"cam1-{i}-evid" for i in range(200)]
    records = [FakeRecord(encode(bad if i == 0 else good, "png"),
                          frame_headers("widget", i, encoding="png", frame_id=fid).to_kafka(), offset=i)
               for i, fid in enumerate(ids)]
    proc = BatchProcessor(Profiles(widget=_loaded(profile=prof, engine=RedEngine())), worker_id="w-test",
                          results_topic="results", dlq_topic="frames.dlq", max_frame_pixels=MAX_PX,
                          thumbnail_size=48, decode_threads=1, evidence_rate=0.05)
    try:
        out = [InspectionResult.from_bytes(o.value) for o in proc.process(records).out]
        again = [InspectionResult.from_bytes(o.value) for o in proc.process(records[:50]).out]
    finally:
        proc.close()
    assert out[0].verdict == "defect" and out[0].evidence == "defect"
    assert base64.b64decode(out[0].frame_b64) == records[0].value and out[0].frame_encoding == "png"
    kept = [r.frame_id for r in out[1:] if r.evidence == "sample"]
    assert kept == [fid for fid in ids[1:] if sampled(fid, 0.05)] and 0 < len(kept) < 30
    assert all(r.frame_b64 is None and r.frame_encoding is None for r in out[1:] if r.evidence is None)
    assert [r.evidence for r in again] == [r.evidence for r in out[:50]]
    # over the size limit: the result goes out without the bytes
    proc = BatchProcessor(Profiles(widget=_loaded(profile=prof, engine=RedEngine())), worker_id="w-test",
                          results_topic="results", dlq_topic="frames.dlq", max_frame_pixels=MAX_PX,
                          thumbnail_size=48, decode_threads=1, evidence_max_bytes=10)
    try:
        big = InspectionResult.from_bytes(proc.process(records[:1]).out[0].value)
    finally:
        proc.close()
    assert big.verdict == "defect" and big.frame_b64 is None and big.evidence is None
