"""Bounded fuzzing (hypothesis) of what a hostile camera controls: the Kafka headers and the
frame bytes. Contract: only the module's declared error escapes (HeaderError for headers,
FrameError for frames), a decoded frame is always a model-size RGB uint8 image, decompression
bombs are refused before any pixel is decoded, and nothing hangs (per-example deadline).

Budget: about 10-20 s on 2 cores; raise FUZZ_EXAMPLES for a longer local campaign.
"""

from __future__ import annotations

import os
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linewatch.messages import FrameHeaders, HeaderError

N = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=N, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

GOOD = FrameHeaders(frame_id="cam-1-7-abc", product="widget", camera="cam-1", line="line-A", seq=7,
                    capture_ts_ms=1_764_000_000_000, encoding="jpeg")


# ---------------------------------------------------------------------------------------------
# headers
keys = st.one_of(st.sampled_from(list(GOOD.model_dump())), st.text(max_size=20),
                 st.integers(), st.none(), st.binary(max_size=8))
values = st.one_of(st.binary(max_size=64), st.none(), st.text(max_size=64).map(lambda s: s.encode("utf-8", "surrogatepass")),
                   st.sampled_from([b"", b"-1", b"1e9", b"NaN", b"\xff\xfe", b"jpeg", b"png", b"gif",
                                    b"9" * 400, b"a" * 129, b"../../etc/passwd", b"cam 1", b"\x00"]))


@FUZZ
@given(st.one_of(st.none(), st.lists(st.tuples(keys, values), max_size=12)))
def test_header_parser_only_raises_header_error(headers):
    try:
        h = FrameHeaders.from_kafka(headers)
    except HeaderError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(h, FrameHeaders)


@FUZZ
@given(st.data())
def test_header_parser_on_mutations_of_valid_headers(data):
    base = GOOD.to_kafka()
    op = data.draw(st.sampled_from(["drop", "dup", "replace", "extra", "shuffle"]))
    hs = list(base)
    if op == "drop":
        del hs[data.draw(st.integers(0, len(hs) - 1))]
    elif op == "dup":
        hs.append(hs[data.draw(st.integers(0, len(hs) - 1))])
    elif op == "replace":
        i = data.draw(st.integers(0, len(hs) - 1))
        hs[i] = (hs[i][0], data.draw(values))
    elif op == "extra":
        hs.append((data.draw(st.text(max_size=10)), data.draw(values)))
    else:
        hs = data.draw(st.permutations(hs))
    try:
        h = FrameHeaders.from_kafka(hs)
    except HeaderError:
        assert op != "shuffle", "order of headers must not matter"
        return
    # whatever parsed is valid by the schema (ids match the id pattern, seq >= 0)
    assert h.seq >= 0 and h.capture_ts_ms >= 0 and h.encoding in ("jpeg", "png")
    assert FrameHeaders.from_kafka(h.to_kafka()) == h


# ---------------------------------------------------------------------------------------------
# frame decoder
from linewatch.inspection.frames import FrameError, decode_frame  # noqa: E402
from workers.pipeline import BatchProcessor  # noqa: E402

SIZE = 64
MAX_PIXELS = 4_000_000


def _img(w: int = 160, h: int = 120) -> np.ndarray:
    rng = np.random.default_rng(w * 1000 + h)
    img = cv2.resize(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8), (w, h))
    cv2.circle(img, (w // 2, h // 2), min(w, h) // 4, (10, 200, 30), -1)
    return img


JPEG = cv2.imencode(".jpg", _img(), [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
JPEG_PROG = cv2.imencode(".jpg", _img(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
PNG = cv2.imencode(".png", _img())[1].tobytes()
SEEDS = [JPEG, JPEG_PROG, PNG]


def _check_decode(data: bytes, encoding: str | None = None) -> None:
    try:
        img, w, h = decode_frame(data, SIZE, MAX_PIXELS, encoding)
    except FrameError as exc:
        assert exc.stage == "decode" and exc.reason and "\n" not in exc.reason
        return
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert 0 < w * h <= MAX_PIXELS


def test_valid_seeds_decode():
    for data, enc in ((JPEG, "jpeg"), (JPEG_PROG, "jpeg"), (PNG, "png")):
        img, w, h = decode_frame(data, SIZE, MAX_PIXELS, enc)
        assert (w, h) == (160, 120) and img.shape == (SIZE, SIZE, 3)


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from([None, "jpeg", "png"]))
def test_decoder_on_random_bytes(data, encoding):
    _check_decode(data, encoding)


@FUZZ
@given(st.binary(max_size=512), st.sampled_from([b"\xff\xd8", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n",
                                                 b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"]))
def test_decoder_on_random_bytes_behind_a_valid_magic(tail, magic):
    _check_decode(magic + tail)


@FUZZ
@given(st.data())
def test_decoder_on_mutated_real_frames(data):
    buf = bytearray(data.draw(st.sampled_from(SEEDS)))
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dims"]))
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del buf[i : i + data.draw(st.integers(1, 64))]
        else:  # rewrite the declared size wherever the codec keeps it
            w, h = data.draw(st.integers(0, 65535)), data.draw(st.integers(0, 65535))
            sof = buf.find(b"\xff\xc0")
            if sof < 0:
                sof = buf.find(b"\xff\xc2")
            if sof >= 0 and sof + 9 <= len(buf):
                buf[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
            ihdr = buf.find(b"IHDR")
            if ihdr >= 0 and ihdr + 12 <= len(buf):
                buf[ihdr + 4 : ihdr + 12] = struct.pack(">II", w, h)
    _check_decode(bytes(buf), data.draw(st.sampled_from([None, "jpeg", "png"])))


def _png(w: int, h: int, idat: bytes, ctype: int = 2) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_png_decompression_bomb_is_refused_before_decoding():
    # 20000 x 20000 RGB = 1.2 GB of pixels from a ~1 MB (valid) zlib stream of zero rows
    w = h = 20_000
    row = b"\x00" + b"\x00" * (3 * w)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(200)) + comp.flush()
    bomb = _png(w, h, idat)
    assert len(bomb) < 2_000_000
    with pytest.raises(FrameError, match="(?i)bomb|over the limit"):
        decode_frame(bomb, SIZE, 64_000_000, "png")


def test_real_png_over_the_pixel_limit_is_refused():
    big = cv2.imencode(".png", np.zeros((2500, 2000, 3), np.uint8))[1].tobytes()  # 5 MP, tiny file
    with pytest.raises(FrameError, match="(?i)bomb|over the limit"):
        decode_frame(big, SIZE, MAX_PIXELS, "png")


def test_jpeg_declaring_a_huge_size_is_refused():
    buf = bytearray(JPEG)
    sof = buf.find(b"\xff\xc0")
    buf[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    with pytest.raises(FrameError, match="(?i)bomb|over the limit"):
        decode_frame(bytes(buf), SIZE, 64_000_000, "jpeg")


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (JPEG[: len(JPEG) // 2], "truncated"),
    (PNG[: len(PNG) // 2], "truncated"),
    (JPEG[:2], "truncated"),
    (b"GIF89a" + b"\x00" * 40, "not a JPEG or PNG"),
])
def test_named_bad_frames_give_a_reason(data, why):
    with pytest.raises(FrameError, match=f"(?i){why}"):
        decode_frame(data, SIZE, MAX_PIXELS)


def test_encoding_header_must_match_the_bytes():
    with pytest.raises(FrameError, match="encoding"):
        decode_frame(PNG, SIZE, MAX_PIXELS, "jpeg")


# ---------------------------------------------------------------------------------------------
# the whole batch step: every record, however hostile, gets exactly one outgoing record
class _Engine:
    name = "fake"

    def run(self, images):
        n = len(images)
        return np.zeros((n, SIZE, SIZE), np.float32), np.zeros((n,), np.float32)


class _Profiles:
    def __init__(self):
        from linewatch.profiles import Profile

        self.loaded = SimpleNamespace(
            profile=Profile(product="widget", version=1, model_kind="fake", backbone="none", input_size=SIZE,
                            threshold=0.5, threshold_method="manual"),
            engine=_Engine(), extent=None)

    def get(self, product):
        from linewatch.profiles import ProfileError

        if product == "widget":
            return self.loaded
        raise ProfileError(f"unknown product {product!r}")


@settings(max_examples=max(30, N // 5), deadline=5000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(
    st.one_of(st.just("good"), st.just("hdr"), st.just("bytes"), st.just("product")),
    st.binary(max_size=256)), min_size=1, max_size=12))
def test_batch_processor_accounts_for_every_record(items):
    proc = BatchProcessor(_Profiles(), worker_id="w-fuzz", results_topic="results", dlq_topic="frames.dlq",
                                   max_frame_pixels=MAX_PIXELS, thumbnail_size=64, decode_threads=1)
    records = []
    for k, (kind, junk) in enumerate(items):
        hdr = GOOD.model_copy(update={"frame_id": f"f-{k}"})
        headers = hdr.to_kafka()
        value = JPEG
        if kind == "hdr":
            headers = [(h, junk[:8]) if h == "seq" else (h, v) for h, v in headers]
        elif kind == "bytes":
            value = junk
        elif kind == "product":
            headers = [(h, b"nosuch") if h == "product" else (h, v) for h, v in headers]
        records.append(SimpleNamespace(topic="frames", partition=0, offset=k, key=b"cam-1", value=value,
                                       headers=headers))
    out = proc.process(records).out
    proc.close()
    assert len(out) == len(records)
    for (kind, _), rec, o in zip(items, records, out):
        assert o.offset == rec.offset
        if kind == "good":  # a valid frame of a known product is judged, never dead-lettered
            assert o.kind == "ok", o.reason
        if o.kind == "dlq":
            assert o.topic == "frames.dlq" and o.value == (rec.value or b"") and o.reason
            assert any(k == "dlq" for k, _ in o.headers)
        else:
            assert o.topic == "results" and o.key == dict(rec.headers)["camera"]
