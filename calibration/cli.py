"""``linewatch calibrate …``: the line engineer's commands, thin shells over calibration.workflow.

    fit         fit a model on a product's normal images            -> work folder
    threshold   all five threshold methods on a validation set       -> threshold.json (+ --publish)
    evaluate    metrics per method and category on a test set        -> Markdown/CSV + report folder
    run         fit + threshold + evaluate + publish in one go       -> a published profile
    recommend   which model family / threshold method for a product
    recalibrate new threshold for a published profile, no refit      -> a new version
    publish / list / show / rollback   the profile registry

Heavy imports (torch, sklearn, matplotlib) happen inside handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

METHOD_CHOICES = ("iou", "f1", "roc", "normal_std", "normal_quantile")


def _registry_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "registry", None):
        return Path(args.registry)
    from linewatch.settings import load_settings

    return Path(load_settings().storage.registry_dir)


def _options(pairs: list[str] | None) -> dict[str, Any]:
    from linewatch.errors import UserError

    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise UserError(f"--option {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _add_source(p: argparse.ArgumentParser, which: str) -> None:
    p.add_argument("--dataset", type=Path, help="dataset root in the MVTec AD layout (<root>/<product>/test/...)")
    p.add_argument("--product", help="product name (folder under --dataset)")
    p.add_argument(f"--{which}", dest="folder", type=Path, metavar="DIR",
                   help=f"use this whole folder as the {which} set instead (<DIR>/<defect>/*.png with "
                        "ground_truth/<defect>/*_mask.png beside it)")
    _plain_folders(p, f"the whole {which} set")
    p.add_argument("--categories", type=Path, help="product-agnostic labels CSV (default <dataset>/categories.csv)")
    p.add_argument("--val-fraction", type=float, default=1 / 3, help="share of the test images used for validation (default 1/3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation/test split (default 0)")


def _plain_folders(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--defect-dir", type=Path, metavar="DIR",
                   help=f"a plain folder of defective images, image-level labels only (sub-folders named structural, "
                        f"surface, contamination or combined give the category); with --normal-test-dir it is {role} "
                        "(default: none, the dataset's test images)")
    p.add_argument("--normal-test-dir", type=Path, metavar="DIR",
                   help="a plain folder of defect-free images the model is not fitted on, beside --defect-dir "
                        "(default: none)")


def _geometry_options(p: argparse.ArgumentParser, recorded: bool = False) -> None:
    """--roi, --tiles, --overlap, --stretch (docs/geometry.md). On threshold/evaluate they
    override what the work folder recorded at fit."""
    default = "the geometry recorded at fit" if recorded else None
    p.add_argument("--roi", metavar="X,Y,W,H",
                   help="region of interest in frame pixels of the calibration images (absolute; every image must "
                        "have that size) (default: " + (default or "the whole frame") + ")")
    p.add_argument("--tiles", metavar="RxC",
                   help="rows x columns of model-size tiles over the ROI, for defects a few pixels wide; the tiles' "
                        "maps are stitched into one map (default: " + (default or "1x1, one tile") + ")")
    p.add_argument("--overlap", type=float,
                   help="least overlap between neighbouring tiles, a fraction of a tile 0..0.75 (default: "
                        + (default or "0.25") + ")")
    p.add_argument("--stretch", action="store_true",
                   help="stretch the ROI to the tile grid instead of keeping its aspect ratio (default: aspect "
                        "kept" + (", or as recorded at fit" if recorded else "") + ")")


def _geometry(args: argparse.Namespace, base: Any = None) -> Any:
    """The Geometry the options ask for over ``base`` (None when no option is given and there
    is no base); the bounds are Geometry's own."""
    from pydantic import ValidationError

    from linewatch.errors import UserError
    from linewatch.inspection.geometry import Geometry, GeometryError, Roi, parse_tiles

    if base is None and not (args.roi or args.tiles or args.overlap is not None or args.stretch):
        return None
    update: dict[str, Any] = {}
    try:
        if args.roi:
            update["roi"] = Roi.parse(args.roi)
        if args.tiles:
            update["tiles"] = parse_tiles(args.tiles)
    except GeometryError as exc:
        raise UserError(str(exc)) from None
    if args.overlap is not None:
        update["overlap"] = float(args.overlap)
    if args.stretch:
        update["keep_aspect"] = False
    try:
        return Geometry.model_validate({**(base or Geometry()).model_dump(), **update})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"--{'-'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def _reframed(model: Any, args: argparse.Namespace) -> Any:
    """A work folder's model seen through --roi/--tiles/... when given (else as fitted)."""
    from linewatch.errors import UserError
    from linewatch.inspection.geometry import GeometryError

    geometry = _geometry(args, model.framing.geometry)
    if geometry == model.framing.geometry:
        return model
    try:
        fs = geometry.frame_size
        model.framing = (geometry.resolved(*fs) if fs else geometry).framing(model.input_size)
    except GeometryError as exc:
        raise UserError(str(exc)) from None
    return model


def _target_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-escape-rate", type=float, metavar="R",
                   help="place the image threshold at the lowest validation false-reject point whose validation "
                        "escape rate is <= R (refused when the validation set has too few defective images to show "
                        "R: Wilson rule, docs/calibration.md); default: the image ROC's Youden point")


def _load_set(args: argparse.Namespace, which: str, size: int, progress: bool = True):
    from calibration.data import load_plain_sets, load_product_splits, load_validation_folder
    from linewatch.errors import UserError

    if getattr(args, "defect_dir", None) is not None or getattr(args, "normal_test_dir", None) is not None:
        if args.defect_dir is None:
            raise UserError(f"{args.normal_test_dir}: --normal-test-dir needs --defect-dir (the defective images)")
        return load_plain_sets(args.product or "product", args.defect_dir, args.normal_test_dir, size, progress)
    if args.folder is not None:
        return load_validation_folder(args.folder, size, args.categories, progress)
    if args.dataset is None or not args.product:
        raise UserError(f"{which} set: pass --dataset and --product, or --{which} DIR")
    val, test = load_product_splits(args.dataset, args.product, size, args.val_fraction, args.seed,
                                    args.categories, progress)
    return val if which == "val" else test


# -- handlers ---------------------------------------------------------------------------------------
def cmd_fit(args: argparse.Namespace) -> int:
    from calibration.workflow import fit_product

    out = args.out or Path("calibration-work") / f"{args.product}-{args.model_kind}"
    model, info = fit_product(args.dataset, args.product, out, args.model_kind, args.input_size,
                              _options(args.option), progress=not args.quiet, normal_dir=args.normal_dir,
                              geometry=_geometry(args))
    print(f"fitted {info.model_kind} for {info.product} on {info.n_train} normal images in "
          f"{info.fit_seconds} s -> {out}")
    return 0


def cmd_threshold(args: argparse.Namespace) -> int:
    from calibration.workflow import load_model_dir, publish_work_dir, read_fit_info, save_threshold, threshold_model

    model = _reframed(load_model_dir(args.model), args)
    info = read_fit_info(args.model)
    if args.product is None and info is not None:
        args.product = info.product
    val = _load_set(args, "val", model.framing, not args.quiet)
    pooled = _categorizer_pool(args, model.input_size)  # first: a bad pool leaves the work folder untouched
    fitted_config = json.dumps(model.config(), sort_keys=True)  # a copy: the options dict is live
    report, val_maps = threshold_model(model, val, args.method, args.k_std, args.quantile, progress=not args.quiet,
                                       target_escape_rate=args.target_escape_rate)
    if json.dumps(model.config(), sort_keys=True) != fitted_config:  # the calibration chose a model setting (PaDiM's texture term)
        model.save(args.model)
    if info is not None and model.framing.geometry != info.geometry:  # --roi/--tiles: what publish serves
        (Path(args.model) / "fit.json").write_text(
            info.model_copy(update={"geometry": model.framing.geometry}).model_dump_json(indent=2))
        print(f"geometry: {model.framing.geometry.describe()} (recorded in {Path(args.model) / 'fit.json'})")
    path = save_threshold(args.model, report)
    from calibration.categorizer_samples import CATEGORIZER_FILE, fit_categorizer, save_categorizer

    why: list[str] = []
    cat = fit_categorizer(val, report.mask_step.apply_all(val_maps, val.images),
                          report.threshold, args.product or "product", raw_maps=val_maps,
                          normal=_normal_appearance(info, args.product, model.framing),
                          pooled=pooled, extent=report.extent, why=why)
    if why:
        report = report.model_copy(update={"notes": [*report.notes, *why]})
        path = save_threshold(args.model, report)
    cat_path = Path(args.model) / CATEGORIZER_FILE
    if cat is not None:
        save_categorizer(args.model, cat)
    elif cat_path.exists():
        cat_path.unlink()  # a stale categorizer from an earlier threshold run would not match
    print(report.table())
    print(f"\nchosen: {report.chosen} = {report.threshold:.6g} -- {report.reason}")
    if report.image_threshold is not None:
        print(f"image threshold {report.image_threshold:.6g} -- {report.image_threshold_reason}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"saved {path}")
    if args.publish:
        prof = publish_work_dir(args.model, _registry_dir(args), args.product, export_onnx=not args.no_onnx)
        print(f"published {prof.product} v{prof.version} to {_registry_dir(args)}")
    return 0


def _normal_appearance(info: Any, product: str | None, size: Any) -> dict[str, Any] | None:
    """The product's normal appearance for its categorizer, from the normal images the work
    folder was fitted on (None, said in the log, when they are not where fit.json says)."""
    import logging

    from calibration.data import load_train
    from linewatch.inspection.categorize import normal_appearance
    from linewatch.errors import UserError

    if info is None or not product:
        return None
    try:
        src = Path(info.dataset)
        if src.is_dir() and not (src / product).is_dir():  # a plain --normal-dir folder
            from calibration.datasets import load_normal_folder

            return normal_appearance(load_normal_folder(src, product).train_images(size))
        return normal_appearance(load_train(src, product, size, False))
    except (UserError, OSError) as exc:
        logging.getLogger(__name__).info("categorizer without normal appearance: %s", exc)
        return None


def _categorizer_pool(args: argparse.Namespace, size: int) -> list:
    """Other products' labelled validation samples for the categorizer (--categorizer-products)."""
    from calibration.categorizer_samples import pooled_category_samples, resolve_categorizer_products
    from linewatch.errors import UserError

    names = [n for n in (args.categorizer_products or "").split(",") if n]
    if not names:
        return []
    if args.dataset is None:
        raise UserError("--categorizer-products needs --dataset (the other products are read from there)")
    pool = resolve_categorizer_products(args.dataset, args.product, names)
    return pooled_category_samples(args.dataset, pool, size, _registry_dir(args), args.val_fraction, args.seed)


def _categorizer_products_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--categorizer-products", metavar="P1,P2|all",
                   help="other products under --dataset whose labelled validation images also train the defect "
                        "categorizer (categories are product-agnostic); their regions come from their profiles in "
                        "the registry when published, else from their masks. 'all' = every product there")


def _eval_models(args: argparse.Namespace):
    """(name, model, ThresholdReport) for every --model folder and --profile."""
    from calibration.categorizer_samples import read_categorizer
    from calibration.workflow import load_model_dir, read_fit_info, read_threshold
    from calibration.thresholds import METHOD_TITLES, MethodResult, ThresholdReport
    from linewatch.errors import UserError
    from linewatch.profiles import Registry

    out = []
    from calibration.workflow import served_model

    for d in args.model or []:
        model = _reframed(load_model_dir(d), args)
        info = read_fit_info(d)
        cat = read_categorizer(Path(d))
        out.append([model.kind, model, read_threshold(d), info.product if info else None, Path(d).name, cat])
    for spec in args.profile or []:
        product, _, ver = spec.partition("@")
        prof, bare = Registry(_registry_dir(args)).load(product, int(ver) if ver else None)
        model = _reframed(served_model(prof, bare), args)
        methods = [MethodResult(method=m, title=METHOD_TITLES[m], available=prof.thresholds.get(m) is not None,
                                threshold=prof.thresholds.get(m)) for m in METHOD_CHOICES]
        chosen = prof.threshold_method if prof.threshold_method in METHOD_CHOICES else "iou"
        rep = ThresholdReport(methods=methods, chosen=chosen, threshold=prof.threshold, reason=prof.threshold_reason,
                              n_images=0, n_anomalous=int(prof.calibration_metrics.get("n_val_anomalous", 0)),
                              n_normal=int(prof.calibration_metrics.get("n_val_normal", 0)), n_pixels=0, exact=False,
                              k_std=3.0, quantile=0.999, mask_step=prof.mask_step, extent=prof.extent)
        out.append([prof.model_kind, model, rep, prof.product, f"{prof.product}-v{prof.version}", prof.categorizer])
    if not out:
        raise UserError("evaluate: pass at least one --model DIR or --profile PRODUCT[@VERSION]")
    names = [o[0] for o in out]
    for o in out:  # disambiguate two models of one kind
        if names.count(o[0]) > 1:
            o[0] = o[4]
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from calibration.evaluate import summary_markdown, write_tables
    from calibration.workflow import evaluate_model
    from calibration.report import write_report
    from linewatch.errors import UserError

    models = _eval_models(args)
    if args.product is None:
        args.product = next((m[3] for m in models if m[3]), None)
    views = {m[1].framing.view_hw for m in models}
    if len(views) > 1:
        raise UserError(f"evaluate: models see different views {sorted(views)} (input size, ROI or tiles); "
                        "evaluate them separately")
    size = models[0][1].framing
    test = _load_set(args, "test", size, not args.quiet)
    if not test.anomalous.any():
        raise UserError(f"{test.paths[0].parent.parent}: test set has no anomalous images; nothing to evaluate")
    val = None
    if args.folder is None and args.dataset is not None:
        from calibration.data import load_product_splits

        val, _ = load_product_splits(args.dataset, args.product, size, args.val_fraction, args.seed,
                                     args.categories, progress=False)
    from tqdm.auto import tqdm

    evals = []
    for name, model, rep, _, _, cat in tqdm(models, desc="evaluate", unit="model", disable=args.quiet):
        evals.append(evaluate_model(name, args.product or "product", model, test, rep, val, categorizer=cat))
    out = args.report or Path("calibration-report") / (args.product or "product")
    paths = write_tables(evals, out)
    index = write_report(evals, out, title=f"linewatch calibration: {args.product}")
    if args.format == "csv":
        sys.stdout.write(paths["summary_csv"].read_text())
    else:
        print(summary_markdown(evals))
    print(f"\nreport: {index}  tables: {paths['markdown']} {paths['csv']}")
    for d, e in zip(args.model or [], evals):
        (Path(d) / "evaluation.json").write_text(json.dumps(e.headline(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from calibration.workflow import calibrate_product

    prof = calibrate_product(args.dataset, args.product, _registry_dir(args), args.model_kind,
                             input_size=args.input_size, method=args.method, options=_options(args.option),
                             val_fraction=args.val_fraction, seed=args.seed, report_dir=args.report,
                             publish=not args.no_publish, export_onnx=not args.no_onnx, progress=not args.quiet,
                             categorizer_products=(args.categorizer_products or "").split(","),
                             normal_dir=args.normal_dir, defect_dir=args.defect_dir,
                             normal_test_dir=args.normal_test_dir, target_escape_rate=args.target_escape_rate,
                             geometry=_geometry(args))
    test = prof.calibration_metrics.get("test", {})
    labels = prof.calibration_metrics.get("labels", {})
    if test.get("pixel_metrics") == "needs masks":
        pixel = "pixel AUROC, AUPRO, IoU: needs masks"
    else:
        pixel = (f"pixel AUROC {test.get('pixel_auroc')}, AUPRO {test.get('aupro')}, IoU {test.get('iou')}, "
                 f"regret {test.get('regret')}" + (f" ({test['pixel_metrics']})" if test.get("pixel_metrics") else ""))
    print(f"{prof.product}: {prof.model_kind}, threshold {prof.threshold_method} = {prof.threshold:.6g}; "
          f"test image AUROC {test.get('image_auroc')}, {pixel}")
    if labels:
        print(f"{prof.product}: labels: validation {labels.get('validation')}; test {labels.get('test')}; "
              f"{labels.get('pixel_threshold')}")
    from calibration.frame_kpis import format_kpi

    print(f"{prof.product}: test frames at the served verdict: {format_kpi('escape_rate', test.get('escape_rate'))}; "
          f"{format_kpi('false_reject_rate', test.get('false_reject_rate'))}")
    if args.no_publish:
        print("not published (--no-publish)")
    else:
        print(f"published {prof.product} v{prof.version} to {_registry_dir(args)}")
    if args.report:
        print(f"report: {Path(args.report) / 'index.html'}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from calibration.recommend import recommend_from_categories, recommend_measured

    if args.measure:
        rec = recommend_measured(args.dataset, args.product, args.candidate, args.input_size,
                                 args.val_fraction, args.seed, progress=not args.quiet)
    else:
        val = _load_set(args, "val", 64, not args.quiet)
        rec = recommend_from_categories(val.categories)
    print(rec.text())
    return 0


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from calibration.workflow import recalibrate
    from linewatch.profiles import Registry

    from linewatch.errors import UserError

    if not args.product:
        raise UserError("recalibrate: --product is required (the published profile to recalibrate)")
    if args.from_reviews:
        return _recalibrate_from_reviews(args)
    if args.publish or args.since or args.db:
        raise UserError("recalibrate: --publish, --since and --db go with --from-reviews")
    reg = Registry(_registry_dir(args))
    current = reg.read_profile(args.product)
    val = _load_set(args, "val", current.input_size, not args.quiet)
    prof, report = recalibrate(reg.root, args.product, val, args.method, args.k_std, args.quantile,
                               target_escape_rate=args.target_escape_rate)
    print(report.table())
    print(f"\nchosen: {report.chosen} = {report.threshold:.6g} (was {current.threshold:.6g} in v{current.version})")
    print(f"published {prof.product} v{prof.version} (model files of v{current.version}, not refitted)")
    return 0


def parse_since(text: str) -> int:
    """``--since``: epoch milliseconds, an ISO 8601 time (UTC unless it says otherwise), or a
    span back from now (``90m``, ``24h``, ``7d``)."""
    import re
    import time
    from datetime import datetime, timezone

    from linewatch.errors import UserError

    t = text.strip()
    if re.fullmatch(r"\d{12,}", t):
        return int(t)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", t)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int((time.time() - float(m.group(1)) * unit) * 1000)
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise UserError(f"--since {text!r}: not epoch ms, an ISO time or a span like 24h / 7d") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def _recalibrate_from_reviews(args: argparse.Namespace) -> int:
    from calibration.from_reviews import recalibrate_from_reviews
    from linewatch.settings import load_settings

    settings = load_settings()
    db = args.db or settings.storage.db_path
    out = recalibrate_from_reviews(db, _registry_dir(args), args.product,
                                   since_ms=parse_since(args.since) if args.since else 0, publish=args.publish,
                                   evidence_dir=settings.evidence.dir, method=args.method,
                                   target_escape_rate=args.target_escape_rate, created_by=args.by)
    print(out.table())
    if out.published is not None:
        print(f"published {out.product} v{out.published.version} (model files of v{out.current.version}, not "
              f"refitted; {len(out.reviewed.review_ids)} reviews recorded in it); workers hot-reload it")
    else:
        print("not published (add --publish to publish it)")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from calibration.workflow import publish_work_dir

    prof = publish_work_dir(args.model, _registry_dir(args), args.product, export_onnx=not args.no_onnx)
    print(f"published {prof.product} v{prof.version} ({prof.model_kind}, {prof.threshold_method} = "
          f"{prof.threshold:.6g}) to {_registry_dir(args)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from calibration.evaluate import markdown_table
    from linewatch.profiles import Registry

    reg = Registry(_registry_dir(args))
    products = [args.product] if args.product else reg.products()
    rows = [{"product": p, **r} for p in products for r in reg.describe(p)]
    if not rows:
        print(f"no profiles in {reg.root}")
        return 0
    print(markdown_table(rows, ["product", "version", "current", "model", "method", "threshold", "created_at",
                                "created_by"]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from linewatch.profiles import Registry

    prof = Registry(_registry_dir(args)).read_profile(args.product, args.version)
    print(prof.model_dump_json(indent=2))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from linewatch.profiles import Registry

    reg = Registry(_registry_dir(args))
    before = reg.current_version(args.product)
    v = reg.rollback(args.product, args.to)
    print(f"{args.product}: CURRENT v{before} -> v{v}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from calibration.benchmark import run_benchmark
    from linewatch.models.registry import FAMILIES

    families = args.family or sorted(FAMILIES)
    table = run_benchmark(args.dataset, args.product, families, args.out, args.input_size,
                          progress=not args.quiet)
    print(table.markdown())
    print("written: " + ", ".join(str(p) for p in table.paths.values()))
    return 0


# -- registration -------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    cal = subparsers.add_parser("calibrate", help="fit, threshold, evaluate and publish product profiles",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = cal.add_subparsers(dest="calibrate_command", metavar="STEP")
    cal.set_defaults(func=lambda a: (cal.print_help(), 2)[1])

    def common(p: argparse.ArgumentParser, registry: bool = False) -> None:
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if registry:
            p.add_argument("--registry", type=Path, help="profile registry folder (default: settings storage.registry_dir)")

    def thresholds(p: argparse.ArgumentParser, default: str | None = "iou") -> None:
        p.add_argument("--method", choices=METHOD_CHOICES, default=default,
                       help="threshold method to choose (all five are computed and shown; default "
                       + (f"{default})" if default else "the profile's own method)"))
        p.add_argument("--k-std", type=float, default=3.0, help="k of the normal mean + k*std method (default 3.0)")
        p.add_argument("--quantile", type=float, default=0.999, help="quantile of the normal-quantile method (default 0.999)")

    p = sub.add_parser("fit", help="fit a model on a product's normal images",
                       description="Fit a model on defect-free images only: a dataset's train/good (MVTec) "
                       "or train/ok (BTAD) -- its test/ and ground_truth/ folders are not needed -- or a "
                       "plain folder of normal images (--normal-dir; any format OpenCV reads, mixed sizes "
                       "are resized to the model input the way the worker resizes a frame).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", type=Path,
                     help="dataset root: MVTec AD (<root>/<product>/train/good), BTAD (train/ok), or folder+CSV")
    src.add_argument("--normal-dir", type=Path, metavar="DIR",
                     help="a plain folder of defect-free images of the product (instead of --dataset)")
    p.add_argument("--product", required=True, help="product name (a folder under --dataset; the profile's name)")
    p.add_argument("--model-kind", default="padim", help="model family: padim (default), cflow, patchcore, reconstruction, attribution, meandiff (trivial baseline)")
    p.add_argument("--input-size", type=int, default=256,
                   help="model input side in pixels: one square tile (default 256)")
    _geometry_options(p)
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="model option (JSON value), repeatable")
    p.add_argument("--out", type=Path, help="work folder (default calibration-work/<product>-<kind>)")
    common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("threshold", help="all five threshold methods on a validation set; one chosen")
    p.add_argument("--model", type=Path, required=True, help="work folder written by `calibrate fit`")
    _add_source(p, "val")
    thresholds(p)
    _target_option(p)
    _categorizer_products_option(p)
    _geometry_options(p, recorded=True)
    p.add_argument("--publish", action="store_true", help="publish the result as the product's next profile")
    p.add_argument("--no-onnx", action="store_true", help="do not export model.onnx when publishing")
    common(p, registry=True)
    p.set_defaults(func=cmd_threshold)

    p = sub.add_parser("evaluate", help="metrics per threshold method and category on a test set + report")
    p.add_argument("--model", type=Path, action="append", help="thresholded work folder (repeatable)")
    p.add_argument("--profile", action="append", metavar="PRODUCT[@VERSION]", help="a published profile (repeatable)")
    _add_source(p, "test")
    p.add_argument("--report", type=Path, help="report folder (default calibration-report/<product>)")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="table printed on stdout (default markdown)")
    _geometry_options(p, recorded=True)
    common(p, registry=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="fit + threshold + evaluate + publish a product in one go",
                       description="Fit, threshold, evaluate and publish a product from a dataset (MVTec AD, "
                       "BTAD, folder+CSV; defects with or without masks) or from plain folders: --normal-dir "
                       "(fit) + --defect-dir + --normal-test-dir (image-level labels, split into validation and "
                       "test).")
    p.add_argument("--dataset", type=Path,
                   help="dataset root: MVTec AD (<root>/<product>/train/good, test/, ground_truth/), BTAD, or "
                        "folder+CSV (default: none; then --normal-dir, --defect-dir and --normal-test-dir)")
    p.add_argument("--product", required=True, help="product name (a folder under --dataset; the profile's name)")
    p.add_argument("--normal-dir", type=Path, metavar="DIR",
                   help="a plain folder of defect-free images to fit on, instead of the dataset's train/good "
                        "(default: none)")
    _plain_folders(p, "split into validation and test like a dataset's test images")
    _target_option(p)
    p.add_argument("--model-kind", default="padim", help="model family: padim (default), cflow, patchcore, reconstruction, attribution, meandiff (trivial baseline)")
    p.add_argument("--input-size", type=int, default=256,
                   help="model input side in pixels: one square tile (default 256)")
    _geometry_options(p)
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="model option (JSON value), repeatable (default: the family's own defaults)")
    p.add_argument("--val-fraction", type=float, default=1 / 3,
                   help="share of the test images used for validation, the rest for the test figures (default 1/3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation/test split (default 0)")
    p.add_argument("--report", type=Path, help="write the evaluation report here (default: no report)")
    p.add_argument("--no-publish", action="store_true",
                   help="fit, threshold and evaluate only; publish nothing (default: publish the next version)")
    p.add_argument("--no-onnx", action="store_true",
                   help="do not export model.onnx when publishing (default: exported, so workers run ONNX Runtime)")
    _categorizer_products_option(p)
    thresholds(p)
    common(p, registry=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("recommend", help="recommend a model family and threshold method for a product")
    _add_source(p, "val")
    p.add_argument("--measure", action="store_true", help="fit the candidates and recommend from measured IoU")
    p.add_argument("--candidate", action="append", help="model kinds to measure (default padim, cflow)")
    p.add_argument("--input-size", type=int, default=256, help="model input side in pixels (default 256)")
    common(p)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("recalibrate", help="new threshold for a published profile from new validation images "
                       "or from operators' reviews")
    _add_source(p, "val")
    thresholds(p, default=None)
    _target_option(p)
    p.add_argument("--from-reviews", action="store_true",
                   help="validation set from the reviewed frames kept as evidence: confirmed defects anomalous, "
                        "false calls and sampled normal frames normal (docs/review-loop.md); default: off, the "
                        "validation images given by --dataset/--val/--defect-dir")
    p.add_argument("--since", metavar="T",
                   help="with --from-reviews: only reviews (and sampled frames) from T on: epoch ms, an ISO time "
                        "or a span back from now such as 7d (default: all)")
    p.add_argument("--publish", action="store_true",
                   help="with --from-reviews: publish the new version (default: only show old vs new)")
    p.add_argument("--db", type=Path, help="with --from-reviews: the DuckDB file (default: storage.db_path setting)")
    p.add_argument("--by", help="with --from-reviews: who recalibrates, recorded in the version "
                   "(default: the login name)")
    common(p, registry=True)
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser("publish", help="publish a fitted + thresholded work folder")
    p.add_argument("--model", type=Path, required=True, help="fitted + thresholded work folder to publish")
    p.add_argument("--product", help="product name (default: the one recorded by `calibrate fit`)")
    p.add_argument("--no-onnx", action="store_true",
                   help="do not export model.onnx (default: exported, so workers run ONNX Runtime)")
    common(p, registry=True)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("list", help="list profiles and versions")
    p.add_argument("--product", help="only this product (default: all)")
    common(p, registry=True)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="print a profile (current version by default)")
    p.add_argument("--product", required=True, help="product name")
    p.add_argument("--version", type=int, help="version to print (default: the current one)")
    common(p, registry=True)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rollback", help="point CURRENT at an earlier version")
    p.add_argument("--product", required=True, help="product name")
    p.add_argument("--to", type=int, help="version to roll back to (default: the one before)")
    common(p, registry=True)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("benchmark", help="every model family x every threshold method: the study's table",
                       description="Fit every family on each product, apply all five threshold methods, and "
                       "write the study's table (rows model x method, columns per category and with/without "
                       "background; IoU, pixel AUROC, AUPRO; fit/inference time, profile size) as Markdown, "
                       "CSV and a plot.")
    p.add_argument("--dataset", type=Path, required=True, help="dataset root (MVTec AD layout)")
    p.add_argument("--product", action="append", required=True, help="product (repeatable)")
    p.add_argument("--family", action="append", help="model family (repeatable; default: all registered)")
    p.add_argument("--out", type=Path, default=Path("reports/benchmark"), help="output folder (default reports/benchmark)")
    p.add_argument("--input-size", type=int, default=256, help="model input side in pixels (default 256)")
    common(p)
    p.set_defaults(func=cmd_benchmark)
