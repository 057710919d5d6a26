"""``linewatch synth``: write the synthetic production line as an MVTec-AD-layout dataset."""

from __future__ import annotations

import argparse


def _products(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    from linewatch.synth import DEFAULT_PRODUCTS, DEFECT_SCALES, PRODUCTS  # numpy/cv2 only: keeps --help fast

    p = subparsers.add_parser(
        "synth",
        help="generate the synthetic production line (MVTec AD layout + categories.csv)",
        description="Deterministic by seed. Products: "
        + "; ".join(f"{k} ({'object on backdrop' if v.background else 'close-up texture'})" for k, v in PRODUCTS.items()),
    )
    p.add_argument("--out", required=True, help="dataset root to write")
    p.add_argument("--products", type=_products, default=list(DEFAULT_PRODUCTS),
                   help=f"comma-separated (default {','.join(DEFAULT_PRODUCTS)})")
    p.add_argument("--size", type=int, default=256,
                   help="image side in pixels of the square close-ups (default 256; unused with --frame-size)")
    p.add_argument("--frame-size", metavar="WxH",
                   help="camera frames of W x H pixels (e.g. 1024x768): the product's square lies centred in "
                        "the frame on a dark, noisy backdrop, and each product folder gets frame.json "
                        "(frame_size, product_box [x, y, w, h], defect_scale) (default: none, square --size images)")
    p.add_argument("--product-size", type=int, metavar="N",
                   help="side in frame pixels of the product's square with --frame-size (default: the smaller "
                        "frame side * 5/6 rounded down to a multiple of 8, e.g. 640 for 1024x768)")
    p.add_argument("--defect-scale", choices=DEFECT_SCALES, default="model",
                   help="model: defect sizes grow with the rendered product, as in the square close-ups; small: "
                        "fixed sizes in frame pixels as a line camera sees them (holes of radius ~4-10 px, "
                        "scratches 1-2 px wide) (default model)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the line's images (default 0)")
    p.add_argument("--n-train", type=int, default=120, help="normal training images per product (default 120)")
    p.add_argument("--n-test-good", type=int, default=20, help="normal test images per product (default 20)")
    p.add_argument("--n-per-category", type=int, default=12, help="defective test images per category and product (default 12)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linewatch.synth import generate_dataset, parse_frame_size

    frame_size = None if args.frame_size is None else parse_frame_size(args.frame_size)
    if args.product_size is not None and frame_size is None:
        from linewatch.errors import UserError

        raise UserError("--product-size needs --frame-size (square images are --size)")
    root = generate_dataset(args.out, products=args.products, size=args.size, seed=args.seed,
                            n_train=args.n_train, n_test_good=args.n_test_good,
                            n_test_per_category=args.n_per_category, progress=not args.no_progress,
                            frame_size=frame_size, product_size=args.product_size, defect_scale=args.defect_scale)
    print(f"wrote {root} ({', '.join(args.products)}; categories in {root / 'categories.csv'})")
    return 0
