"""``linewatch produce``: camera sources -> the `frames` topic (thin shell over producers.producer)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Send camera frames to the Kafka `frames` topic: key = camera id, value = the encoded image
(JPEG by default), headers = frame_id, product, camera, line, seq, capture_ts_ms, encoding.
The producer is idempotent with acks=all and checks every delivery; a frame over the message
limit (10 MB) is reported by name and skipped. Ctrl-C / SIGTERM flush and stop. A throughput
line is printed every --report-every seconds. The broker comes from the settings
(kafka.bootstrap_servers, env LINEWATCH_KAFKA__BOOTSTRAP_SERVERS, or --bootstrap-servers);
an unreachable broker is an error after kafka.connect_timeout_s (default 15 s).
"""


SPEC_HELP = """\
SOURCE is one of:
  DIR                    a folder of images, sorted by name (--loop to repeat)
  FILE                   a video file (mp4, avi, mkv, ...; --loop to repeat)
  camera:N | N           a live camera by device index (e.g. camera:0 = /dev/video0)
  rtsp://... http://...  a live stream URL
  synthetic:PRODUCT      the synthetic line (cap, pcb, brick, turf; --size, --defect-rate, --seed,
                         --frame-size, --product-size, --defect-scale)"""

EXAMPLES = """\
examples:
  linewatch produce --source synthetic:cap --fps 5 --cameras 2
  linewatch produce --source ./images --product bottle --camera cam-a --loop --fps 10
  linewatch produce --source line1.mp4 --product pcb --line line-1 --max-frames 500
  linewatch produce --source rtsp://10.0.0.7/stream --source camera:0 --product cap \\
                    --camera dock-1 --camera dock-2
"""


def cmd_produce(args: argparse.Namespace) -> int:
    from linewatch.kafka.io import quiet_kafka_logs
    from linewatch.settings import load_settings
    from producers.producer import FrameProducer, camera_configs
    from linewatch.synth.exposure import ExposureDrift
    from producers.sources import open_source, source_kind

    quiet_kafka_logs(args.verbose)
    overrides: dict = {}
    kafka: dict = {}
    if args.bootstrap_servers:
        kafka["bootstrap_servers"] = args.bootstrap_servers
    if args.connect_timeout is not None:
        kafka["connect_timeout_s"] = args.connect_timeout
    if kafka:
        overrides["kafka"] = kafka
    if args.topic:
        overrides["topics"] = {"frames": args.topic}
    settings = load_settings(**overrides)

    specs: list[str] = args.source
    kinds = [source_kind(s) for s in specs]  # fails early on an unknown path
    default_products = [s.split(":", 1)[1] if k == "synthetic" else None for s, k in zip(specs, kinds)]
    configs = camera_configs(
        len(specs), product=args.product, line=args.line, cameras=args.camera, count=args.cameras,
        fps=args.fps, max_frames=args.max_frames, default_products=default_products,
    )
    frame_size = None
    if args.frame_size is not None:
        from linewatch.synth.frame import parse_frame_size

        frame_size = parse_frame_size(args.frame_size)
    opened = []
    try:
        for i, (src_index, cfg) in enumerate(configs):
            source = open_source(
                specs[src_index], loop=args.loop, encoding=args.encoding, quality=args.quality,
                reencode=args.reencode, seed=args.seed + i, size=args.size, defect_rate=args.defect_rate,
                open_timeout_s=args.open_timeout,
                exposure=ExposureDrift.parse(args.exposure_drift) if args.exposure_drift else None,
                frame_size=frame_size, product_size=args.product_size, defect_scale=args.defect_scale,
            )
            opened.append((cfg, source))
    except BaseException:
        for _, source in opened:
            source.close()
        raise
    cams = ", ".join(f"{c.camera}<-{s.name}" for c, s in opened)
    print(f"[produce] {len(opened)} camera(s) -> {settings.topics.frames} @ {settings.kafka.bootstrap_servers}: {cams}",
          flush=True)
    producer = FrameProducer(settings, opened, report_every_s=args.report_every)
    stats = producer.run(duration_s=args.duration)
    print(f"[produce] done ({stats.stopped_by}): {stats.line()}", flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "produce",
        help="send camera frames (folder, video, camera/stream, synthetic) to the frames topic",
        description=DESCRIPTION + "\n" + SPEC_HELP,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("sources and cameras")
    g.add_argument("--source", "-s", action="append", required=True, metavar="SOURCE",
                   help="where frames come from (repeatable; see SOURCE above)")
    g.add_argument("--camera", "-c", action="append", metavar="ID",
                   help="camera id = Kafka key (repeatable: one per source, or several cameras on one source; "
                        "default cam-1, cam-2, ...)")
    g.add_argument("--cameras", type=int, metavar="N", help="run N cameras per source (ids cam-1..cam-N)")
    g.add_argument("--product", "-p", help="product id in the headers (default for synthetic:PRODUCT: PRODUCT; "
                                           "required otherwise)")
    g.add_argument("--line", default="line-1", help="production line id in the headers (default line-1)")
    g.add_argument("--loop", action="store_true", help="repeat a folder or video at its end")
    g.add_argument("--open-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for a camera/stream to open (default 10)")

    g = p.add_argument_group("rate and encoding")
    g.add_argument("--fps", type=float, default=5.0, help="target frames per second per camera; 0 = as fast as possible "
                                                          "(default 5)")
    g.add_argument("--max-frames", type=int, metavar="N", help="stop each camera after N frames")
    g.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    g.add_argument("--encoding", choices=["jpeg", "png"], default="jpeg", help="frame encoding (default jpeg)")
    g.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    g.add_argument("--reencode", action="store_true",
                   help="re-encode folder images too (default: JPEG/PNG files are sent byte for byte)")

    g = p.add_argument_group("synthetic camera")
    g.add_argument("--size", type=int, default=256,
                   help="synthetic frame size in pixels, square close-ups (default 256; unused with --frame-size)")
    g.add_argument("--frame-size", metavar="WxH",
                   help="synthetic camera frames of W x H pixels (e.g. 1024x768) with the product's square centred "
                        "on a dark, noisy backdrop (default: none, square --size frames)")
    g.add_argument("--product-size", type=int, metavar="N",
                   help="side in frame pixels of the product's square with --frame-size (default: the smaller "
                        "frame side * 5/6 rounded down to a multiple of 8, e.g. 640 for 1024x768)")
    g.add_argument("--defect-scale", choices=["model", "small"], default="model",
                   help="model: synthetic defects grow with the rendered product; small: fixed sizes in frame "
                        "pixels as a line camera sees them (holes of radius ~4-10 px) (default model)")
    g.add_argument("--defect-rate", type=float, default=0.2, help="share of defective synthetic frames (default 0.2)")
    g.add_argument("--seed", type=int, default=0, help="synthetic seed; camera i uses seed+i (default 0)")
    g.add_argument("--exposure-drift", metavar="START:RAMP:GAIN[:HOLD]",
                   help="lighting drift of the synthetic camera: from frame START the gain moves from 1 to GAIN over "
                        "RAMP frames, stays HOLD frames (0 = for good) and returns to 1 (default: none, steady)")

    g = p.add_argument_group("Kafka")
    g.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    g.add_argument("--topic", help="override topics.frames")
    g.add_argument("--connect-timeout", type=float, metavar="S", help="override kafka.connect_timeout_s")
    g.add_argument("--report-every", type=float, default=5.0, metavar="S",
                   help="print a throughput line every S seconds (default 5; 0 = never)")
    p.set_defaults(func=cmd_produce)
