"""End-to-end worker throughput against a real broker (library for ``linewatch bench worker``).

``measure_worker`` produces ``n_frames`` copies of the given encoded frames to fresh topics,
runs one worker (``run_worker``) until it has handled all of them, and reports wall-clock
frames/s, the worker process's CPU time per frame (all threads; on a shared machine this is
the honest figure: ``2 / cpu_s_per_frame`` is what two free cores would sustain if the work
parallelised perfectly) and the per-stage split.

``python -m workers.throughput`` reproduces the figure in the worker's report: a small PaDiM
(EfficientNet-Lite0, 256 px) fitted on synthetic caps, 1024 x 1024 JPEG frames, a broker
started on free ports.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from linewatch.settings import Settings


def measure_worker(settings: Settings, frames: Sequence[bytes], product: str, n_frames: int,
                   overlap: bool = True, encoding: str = "jpeg") -> dict[str, Any]:
    """Produce ``n_frames`` (cycling through ``frames``) to fresh topics, then time one worker.

    ``settings`` gives the broker, registry and worker options; topic and group names are
    replaced by unique ones so repeated runs never see each other's records."""
    from linewatch.kafka_io import ensure_topics, make_producer, send_nowait
    from linewatch.messages import FrameHeaders
    from workers.worker import run_worker

    tag = uuid.uuid4().hex[:8]
    s = settings.model_copy(update={
        "topics": settings.topics.model_copy(update={
            "frames": f"bench-frames-{tag}", "results": f"bench-results-{tag}", "dlq": f"bench-dlq-{tag}"}),
        "worker": settings.worker.model_copy(update={"group_id": f"bench-{tag}"}),
    })
    ensure_topics(s)
    producer = make_producer(s)
    try:
        pending = []
        for i in range(n_frames):
            cam = f"cam{i % 4}"
            h = FrameHeaders(frame_id=f"{cam}-{i}-{tag}", product=product, camera=cam, line="bench", seq=i,
                             capture_ts_ms=int(time.time() * 1000), encoding=encoding)  # type: ignore[arg-type]
            pending.append(send_nowait(producer, s.topics.frames, frames[i % len(frames)], key=cam,
                                       headers=h.to_kafka()))
        producer.flush()
        for p in pending:
            p.result(timeout=60)
    finally:
        producer.close()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    stats = run_worker(s, worker_id=f"bench-{tag}", max_frames=n_frames, create_topics=False, overlap=overlap)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "frames": stats.frames, "results": stats.results, "defects": stats.defects, "dlq": stats.dlq,
        "frames_per_s_wall": round(stats.frames_per_s, 1), "elapsed_s": round(stats.elapsed_s, 2),
        "total_wall_s": round(wall, 2), "cpu_ms_per_frame": round(cpu / max(1, n_frames) * 1000, 2),
        "frames_per_s_per_free_core": round(n_frames / cpu, 1) if cpu > 0 else None,
        "load_avg_1m": round(os.getloadavg()[0], 1), "overlap": overlap, "engines": stats.engines,
        "batch": s.worker.max_batch, "stage_s": {k: round(v, 3) for k, v in stats.stage_s.items()},
    }


def _demo_profile(registry_dir, input_size: int, frame_size: int, n_train: int) -> tuple[str, list[bytes]]:
    """Fit and publish a PaDiM for synthetic caps decoded like the worker decodes them; return
    the product and a mix of normal and defective frames (JPEG, frame_size px)."""
    import cv2
    import numpy as np

    from linewatch.models.padim import PaDiM
    from linewatch.profiles import Profile, Registry
    from linewatch.synth import SyntheticProduct
    from workers.pipeline import decode_frame

    def jpeg(img: np.ndarray) -> bytes:
        return cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()

    sp = SyntheticProduct("cap", size=frame_size, seed=0)
    normals = np.stack([decode_frame(jpeg(sp.normal(100 + i).image), input_size, 10**9)[0] for i in range(n_train)])
    model = PaDiM(input_size=input_size).fit(normals, progress=False)
    frames = [jpeg(sp.normal(i).image if i % 4 else sp.defective(i, "surface").image) for i in range(12)]
    _, scores = model.predict(np.stack([decode_frame(f, input_size, 10**9)[0] for f in frames]))
    normal_scores = [float(sc) for i, sc in enumerate(scores) if i % 4]
    threshold = max(normal_scores) * 1.05  # the normal frames pass, so the mix is realistic
    Registry(registry_dir).publish(Profile(product="cap", model_kind="padim", backbone="efficientnet_lite0",
                                           input_size=input_size, threshold=threshold,
                                           threshold_method="manual", notes="throughput benchmark"), model)
    return "cap", frames


def main(argv: list[str] | None = None) -> int:
    import tempfile
    from pathlib import Path

    from linewatch.broker import Broker, free_port
    from linewatch.settings import BrokerSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--input-size", type=int, default=256)
    ap.add_argument("--frame-size", type=int, default=1024)
    ap.add_argument("--modes", default="overlap,serial", help="comma list of overlap / serial runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lw-throughput-") as tmp:
        root = Path(tmp)
        product, frames = _demo_profile(root / "profiles", args.input_size, args.frame_size, 24)
        broker = Broker(BrokerSettings(home=root / "broker", port=free_port(), controller_port=free_port()))
        broker.start()
        try:
            settings = Settings(kafka={"bootstrap_servers": broker.bootstrap_servers},
                                storage={"registry_dir": str(root / "profiles")},
                                topics={"frames_partitions": 4},
                                worker={"max_batch": args.batch, "engine": args.engine})
            for mode in args.modes.split(","):
                out = measure_worker(settings, frames, product, args.frames, overlap=mode.strip() == "overlap")
                print(json.dumps(out), flush=True)
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
