"""``linewatch bench producer``: frames/s and MB/s into a real Kafka broker for 1024x1024
JPEG frames, through the same FrameProducer path as ``linewatch produce``.

Two phases, so the numbers say where time goes:
- ``send``: pre-encoded JPEGs -> Kafka (producer + broker throughput, acks=all, every
  delivery checked);
- ``encode+send``: raw RGB frames JPEG-encoded per frame and sent (what a camera producer does).
A warm-up of up to 100 frames (not counted) runs first.

With no ``--bootstrap-servers`` it starts its own broker on free ports in a temp dir and
stops it afterwards, so the figure is reproducible on any machine that ran bootstrap.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class BenchPhase:
    phase: str
    frames: int
    cameras: int
    seconds: float
    frames_per_s: float
    mb_per_s: float
    mean_frame_kb: float
    too_large: int


def _frames_rgb(n: int, size: int, seed: int = 0) -> list:
    """Distinct realistic frames from the synthetic line (mixed products, some defects)."""
    from producers.sources import _synthetic_camera_class

    cls = _synthetic_camera_class()
    products = ["cap", "pcb", "brick", "turf"]
    out = []
    cams = [iter(cls(p, seed=seed, size=size, defect_rate=0.3)) for p in products]
    while len(out) < n:
        out.append(next(cams[len(out) % len(cams)]).image)
    return out


class _MemorySource:
    """Cycles through in-memory frames; pre-encoded (``send``) or encoded per frame."""

    kind = "memory"

    def __init__(self, rgb: list, quality: int, pre_encoded: bool) -> None:
        import cv2

        from producers.sources import encode_image

        self.bgr = [cv2.cvtColor(im, cv2.COLOR_RGB2BGR) for im in rgb]
        self.quality = quality
        self.encoded = [encode_image(b, "jpeg", quality) for b in self.bgr] if pre_encoded else None
        self.name = f"memory:{len(rgb)}x{rgb[0].shape[1]}px"

    def __iter__(self) -> Iterator:
        from producers.sources import SourceFrame, encode_image

        i = 0
        while True:
            k = i % len(self.bgr)
            data = self.encoded[k] if self.encoded is not None else encode_image(self.bgr[k], "jpeg", self.quality)
            yield SourceFrame(data, "jpeg", f"{self.name}#{i}", int(time.time() * 1000))
            i += 1

    def close(self) -> None:
        pass


def bench_producer(bootstrap_servers: str | None = None, *, frames: int = 300, size: int = 1024,
                   quality: int = 90, cameras: int = 1, distinct: int = 8, partitions: int = 8,
                   phases: tuple[str, ...] = ("send", "encode+send")) -> dict:
    """Run the benchmark; returns ``{"phases": [BenchPhase...], ...}`` as a dict."""
    from linewatch.kafka.broker import bench_topics, temporary_broker
    from linewatch.kafka.io import ensure_topics
    from linewatch.settings import Settings
    from producers.producer import CameraConfig, FrameProducer

    broker = None
    with contextlib.ExitStack() as stack:  # stops the temporary broker, removes its directory
        if bootstrap_servers is None:
            broker = stack.enter_context(temporary_broker())
            bootstrap_servers = broker.bootstrap_servers
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            kafka={"bootstrap_servers": bootstrap_servers},
            topics=bench_topics(tag, partitions),
        )
        ensure_topics(settings)
        t0 = time.monotonic()
        rgb = _frames_rgb(distinct, size)
        prep_s = time.monotonic() - t0
        results: list[BenchPhase] = []
        per_cam = max(1, frames // cameras)
        warm = [(CameraConfig(camera="bench-warmup", product="bench", max_frames=min(100, frames)),
                 _MemorySource(rgb, quality, pre_encoded=True))]
        FrameProducer(settings, warm, report_every_s=0).run(handle_signals=False)  # JIT, segments, metadata
        for phase in phases:
            cams = [
                (CameraConfig(camera=f"bench-{phase.replace('+', '-')}-{i}", product="bench", max_frames=per_cam),
                 _MemorySource(rgb, quality, pre_encoded=(phase == "send")))
                for i in range(cameras)
            ]
            stats = FrameProducer(settings, cams, report_every_s=0).run(handle_signals=False)
            results.append(BenchPhase(
                phase=phase, frames=stats.sent, cameras=cameras, seconds=round(stats.elapsed_s, 3),
                frames_per_s=round(stats.fps, 1), mb_per_s=round(stats.mb_per_s, 1),
                mean_frame_kb=round(stats.bytes / max(1, stats.sent) / 1024, 1), too_large=stats.too_large,
            ))
    return {
        "benchmark": "producer",
        "frame_size": f"{size}x{size}",
        "jpeg_quality": quality,
        "distinct_frames": distinct,
        "prepare_frames_s": round(prep_s, 2),
        "bootstrap_servers": "embedded (temporary)" if broker is not None else bootstrap_servers,
        "acks": "all (idempotent), every delivery checked",
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "phases": [asdict(r) for r in results],
    }


def format_result(res: dict) -> str:
    lines = [
        f"producer benchmark: {res['frame_size']} JPEG q{res['jpeg_quality']}, broker {res['bootstrap_servers']}, "
        f"acks={res['acks']}",
        f"{'phase':<12} {'cams':>4} {'frames':>7} {'seconds':>8} {'frames/s':>9} {'MB/s':>7} {'KB/frame':>9}",
    ]
    for p in res["phases"]:
        lines.append(f"{p['phase']:<12} {p['cameras']:>4} {p['frames']:>7} {p['seconds']:>8.2f} "
                     f"{p['frames_per_s']:>9.1f} {p['mb_per_s']:>7.1f} {p['mean_frame_kb']:>9.1f}")
    return "\n".join(lines)


def cmd_bench_producer(args: argparse.Namespace) -> int:
    from linewatch.kafka.io import quiet_kafka_logs

    quiet_kafka_logs(args.verbose)
    res = bench_producer(args.bootstrap_servers, frames=args.frames, size=args.size, quality=args.quality,
                         cameras=args.cameras, distinct=args.distinct)
    print(format_result(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"written {args.json}")
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "producer",
        help="frames/s and MB/s of the camera producer into a real broker (1024x1024 JPEG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--frames", type=int, default=300, help="frames per phase (default 300)")
    q.add_argument("--size", type=int, default=1024, help="frame width = height in pixels (default 1024)")
    q.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    q.add_argument("--cameras", type=int, default=1, help="cameras (threads) sharing one producer (default 1)")
    q.add_argument("--distinct", type=int, default=8, help="distinct synthetic frames cycled (default 8)")
    q.add_argument("--bootstrap-servers", help="use this broker instead of a temporary embedded one")
    q.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    q.set_defaults(func=cmd_bench_producer)
