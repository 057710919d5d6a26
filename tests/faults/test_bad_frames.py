"""Scenario 5: bad frames mixed into a stream of good ones. Each lands in the DLQ with a
reason that names the problem; every good frame around them is processed; no worker dies."""

from __future__ import annotations

import random
import struct
import time
import zlib

import pytest

from linewatch.messages import FrameHeaders

from .harness import Frame, LoadProducer, camera_ids, good_frames, now_ms, write_report

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def png_bomb(side: int = 12_000) -> bytes:
    """A VALID PNG of side x side black RGB pixels (432 MB decoded) in well under 1 MB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _hdr(fid, cam, product="cap", encoding="jpeg", **over) -> list[tuple[str, bytes]]:
    h = dict(frame_id=fid, product=product, camera=cam, line="line-F", seq=1, capture_ts_ms=now_ms(),
             encoding=encoding)
    h.update(over)
    return [(k, str(v).encode()) for k, v in h.items()]


def bad_frames(jpeg: bytes, cams: list[str]) -> list[Frame]:
    rng = random.Random(5)
    sof = jpeg.find(b"\xff\xc0")
    huge = bytearray(jpeg)
    huge[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    bomb = png_bomb()
    cam = cams[0]
    specs = [  # (kind, value, headers or None for normal, stage, reason regex)
        ("zero-bytes", b"", None, "decode", r"empty frame"),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], None, "decode", r"truncated JPEG"),
        ("png-bomb", bomb, "png", "decode", r"decompression bomb|over the limit"),
        ("huge-declared-size", bytes(huge), None, "decode", r"60000x60000.*over the limit"),
        ("random-bytes", bytes(rng.getrandbits(8) for _ in range(3000)), None, "decode", r"not a JPEG or PNG"),
        ("encoding-mismatch", jpeg, "png", "decode", r"encoding=png"),
        ("missing-headers", jpeg, [], "headers", r"missing headers"),
        ("malformed-seq", jpeg, "seq", "headers", r"seq"),
        ("malformed-frame-id", jpeg, "frame_id", "headers", r"frame_id"),
        ("non-utf8-header", jpeg, "utf8", "headers", r"UTF-8"),
        ("unknown-product", jpeg, "unknown", "profile", r"unknown product|no published profile"),
        ("corrupt-profile", jpeg, "corrupt", "profile", r"safetensors|weights|corrupt"),
    ]
    out = []
    for i, (kind, value, how, stage, regex) in enumerate(specs):
        fid = f"s5-bad-{kind}"
        if how is None:
            headers = None
        elif how == []:
            headers = []
        elif how == "png":
            headers = _hdr(fid, cam, encoding="png")
        elif how == "seq":
            headers = _hdr(fid, cam, seq="abc")
        elif how == "frame_id":
            headers = _hdr(fid, cam, frame_id="bad id with spaces/../")
        elif how == "utf8":
            headers = [(k, v) if k != "camera" else (k, b"\xff\xfe\xfa") for k, v in _hdr(fid, cam)]
        elif how == "unknown":
            headers = _hdr(fid, cam, product="nosuchproduct")
        elif how == "corrupt":
            headers = _hdr(fid, cam, product="corrupt")
        f = Frame(fid, cam, "cap", value, kind=kind, headers=headers, expect=regex)
        f.stage = stage  # type: ignore[attr-defined]
        out.append(f)
    return out


def test_bad_frames_go_to_the_dlq_with_a_reason(pipeline_factory, frame_bank):
    p = pipeline_factory("s5-bad-frames")
    p.create_topics()
    sink = p.start_sink()
    w1 = p.start_worker("s5-w1")
    p.wait_assigned(w1)
    w2 = p.start_worker("s5-w2")
    p.wait_assigned(w2)
    p.wait_sink_ready(sink)
    cams = camera_ids()
    good = good_frames(frame_bank, 400, "s5", cams)
    bad = bad_frames(frame_bank.jpegs["cap"][0], cams)
    frames = list(good)
    for k, b in enumerate(bad):  # spread through the stream, two rounds (so the DLQ sees each kind twice)
        frames.insert(20 + k * 30, b)
    for k, b in enumerate(bad):
        b2 = Frame(b.fid + "-2", cams[(k + 1) % len(cams)], b.product, b.value, b.kind, b.headers, b.expect)
        b2.stage = b.stage  # type: ignore[attr-defined]
        if b2.headers:
            b2.headers = [(kk, (b2.fid.encode() if kk == "frame_id" and v == b.fid.encode() else v))
                          for kk, v in b2.headers]
        frames.insert(min(len(frames), 30 + k * 30 + len(bad)), b2)
    prod = LoadProducer(p.settings, frames, rate_fps=40)
    prod.start()
    prod.join(timeout=200)
    assert prod.error is None, prod.error
    acc = p.wait_accounted(prod.sent, timeout=120)
    rows, dlq = p.read_db()
    dlq_at = {(d[0], d[1]): d for d in dlq}
    bad_sent = [s for s in prod.sent if s.frame.kind != "good"]
    per_kind = {}
    problems = []
    for s in bad_sent:
        d = dlq_at.get((s.partition, s.offset))
        import re

        if d is None:
            problems.append(f"{s.frame.kind}: not in the DLQ")
            continue
        stage, reason = d[3], d[4]
        per_kind.setdefault(s.frame.kind, []).append(f"{stage}: {reason}")
        if stage != s.frame.stage or not re.search(s.frame.expect, reason, re.I):  # type: ignore[attr-defined]
            problems.append(f"{s.frame.kind}: stage={stage} reason={reason!r}")
    alive = {s.name: s.alive() for s in p.services}
    write_report("5-bad-frames", f"{len(bad_sent)} bad frames ({len(bad)} kinds x2) among {len(good)} good", acc,
                 "n/a (no outage; workers never stopped)",
                 {"faults": len(bad_sent), "dlq_reasons": {k: v[0] for k, v in per_kind.items()},
                  "problems": problems, "services_alive_after": alive})
    assert acc.missing == 0, (acc.missing_ids[:10], p.logs_tail())
    assert acc.duplicated == 0, acc.duplicated_ids[:10]
    assert acc.rows == len(good), "a good frame was lost or DLQ'd"
    assert acc.dlq == len(bad_sent)
    assert not problems, problems
    assert all(alive.values()), alive
