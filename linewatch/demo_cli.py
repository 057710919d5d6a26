"""`linewatch demo` (the README's main command)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the synthetic production line end to end (broker, producers, workers, sink, dashboard)",
        description="Generate the synthetic line, fit and calibrate a profile per product (first run "
        "only), start a real Kafka broker, the sink, workers, synthetic camera producers and the "
        "dashboard, print the dashboard URL, and stop everything on Ctrl-C. State lives in --home; "
        "a second run reuses the data and profiles.",
    )
    p.add_argument("--home", type=Path, default=Path.home() / ".linewatch" / "demo",
                   help="folder for data, profiles, DuckDB, broker and logs (default ~/.linewatch/demo)")
    p.add_argument("--products", default="cap,brick",
                   help="synthetic products, comma-separated (default cap,brick: one object on a backdrop, one texture)")
    p.add_argument("--cameras", type=int, default=2, help="cameras per product (default 2)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second per camera (default 2)")
    p.add_argument("--frame-size", type=int, default=256, help="camera frame size in pixels (default 256)")
    p.add_argument("--input-size", type=int, default=128,
                   help="model input size for newly fitted profiles (default 128)")
    p.add_argument("--train-images", type=int, default=60,
                   help="defect-free training images per product for newly fitted profiles (default 60)")
    p.add_argument("--defect-rate", type=float, default=0.25, help="share of defective frames (default 0.25)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--model", default="padim", help="model family for new profiles (default padim)")
    p.add_argument("--port", type=int, default=8501, help="dashboard port on 127.0.0.1 (default 8501)")
    p.add_argument("--kafka-port", type=int, default=9092, help="Kafka client port (default 9092)")
    p.add_argument("--controller-port", type=int, default=9093, help="KRaft controller port (default 9093)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until Ctrl-C)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from linewatch.demo import DemoConfig, run_demo
    from linewatch.errors import UserError

    products = tuple(p.strip() for p in args.products.split(",") if p.strip())
    if not products:
        raise UserError("--products: give at least one product")
    checks = [("--cameras", args.cameras >= 1, "must be at least 1"),
              ("--workers", args.workers >= 1, "must be at least 1"),
              ("--fps", args.fps > 0, "must be greater than 0"),
              ("--defect-rate", 0.0 <= args.defect_rate <= 1.0, "must be within 0..1"),
              ("--frame-size", 64 <= args.frame_size <= 2048, "must be within 64..2048"),
              ("--input-size", 32 <= args.input_size <= 1024, "must be within 32..1024"),
              ("--train-images", args.train_images >= 2, "must be at least 2"),
              ("--duration", args.duration is None or args.duration > 0, "must be greater than 0"),
              ("--port", len({args.port, args.kafka_port, args.controller_port}) == 3,
               "--port, --kafka-port and --controller-port must differ")]
    for flag, ok, why in checks:
        if not ok:
            raise UserError(f"{flag}: {why}")
    cfg = DemoConfig(home=args.home.expanduser(), products=products, cameras_per_product=args.cameras,
                     fps=args.fps, frame_size=args.frame_size, defect_rate=args.defect_rate,
                     input_size=args.input_size, n_train=args.train_images,
                     workers=args.workers, model_kind=args.model, dashboard_port=args.port,
                     kafka_port=args.kafka_port, controller_port=args.controller_port,
                     duration_s=args.duration, seed=args.seed)
    run_demo(cfg)
    return 0
