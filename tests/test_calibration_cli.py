"""The calibration CLI and its library functions on a tiny synthetic line (meandiff model, so
no backbone is needed), and every bad input: one line naming the file, exit 2, nothing published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.workflow import calibrate_product
from calibration.recommend import recommend_from_categories
from linewatch.cli import main
from linewatch.profiles import Registry

SIZE = 64


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    from linewatch.synth import generate_dataset

    root = tmp_path_factory.mktemp("line")
    generate_dataset(root, products=["pcb", "brick"], size=SIZE, seed=3, n_train=8, n_test_good=6,
                     n_test_per_category=5, progress=False)
    return root


@pytest.fixture()
def data(line, tmp_path) -> Path:
    """A private copy the test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(line, dst)
    return dst


def run(*argv: str) -> int:
    return main(["calibrate", *map(str, argv)])


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_calibrate_product_one_shot(line, tmp_path):
    reg = tmp_path / "reg"
    prof = calibrate_product(line, "pcb", reg, model_kind="meandiff", input_size=SIZE,
                             report_dir=tmp_path / "report", progress=False, export_onnx=False)
    assert prof.version == 1 and prof.product == "pcb" and prof.model_kind == "meandiff"
    assert prof.threshold_method == "iou" and set(prof.thresholds) == {"iou", "f1", "roc", "normal_std",
                                                                       "normal_quantile"}
    assert prof.threshold == prof.thresholds["iou"]
    assert prof.background is True
    # "spurious" (a detector's false blob) is an internal class of the region classifier, never reported
    assert prof.categorizer is not None and set(prof.categorizer["classes"]) <= {"structural", "surface",
                                                                              "contamination", "spurious"}
    assert prof.categorizer["trained_on"]["region_source"] == "predicted" and "expert" not in prof.categorizer
    assert 0.5 < prof.calibration_metrics["test"]["pixel_auroc"] <= 1.0
    # the learned region extent was judged on held-out validation images, and said so
    note = next(n for n in prof.calibration_metrics["notes"] if n.startswith("region extent"))
    assert "held-out validation IoU" in note and "4-fold" in note
    # meandiff's 64 px maps: the forest costs held-out IoU, so the profile serves the thresholded regions
    assert "extent off" in note and prof.extent is None and "extent" not in prof.calibration_metrics
    stored, model = Registry(reg).load("pcb")
    assert stored.threshold == prof.threshold and model.kind == "meandiff"
    html = (tmp_path / "report" / "index.html").read_text()
    for png in ("pcb_meandiff_threshold_curves.png", "pcb_meandiff_pr_roc.png", "pcb_meandiff_overlays.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000 and png in html
    assert "IoU curve" in html
    # frame KPIs at the served verdict, recomputed here with the worker's judge on the stored profile
    from calibration.data import load_product_splits
    from calibration.frame_kpis import frame_kpis
    from linewatch.inspection.verdict import inspect_images

    test = prof.calibration_metrics["test"]
    _, split = load_product_splits(line, "pcb", SIZE, progress=False)
    raw, scores = model.predict(split.images)
    verdicts = inspect_images(split.images, raw, scores, stored)
    expect = frame_kpis([v.verdict == "defect" for v in verdicts], split.anomalous)
    assert test["escape_rate"] == expect["escape_rate"] and test["false_reject_rate"] == expect["false_reject_rate"]
    assert test["escape_rate"]["n"] == int(split.anomalous.sum()) and len(test["false_reject_rate"]["ci95"]) == 2
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics[0]["headline"]["escape_rate"] == test["escape_rate"]  # metrics.json: one entry per model
    assert "Frames at the served verdict" in html and "false reject rate" in html



def test_categorizer_pools_the_labelled_validation_images_of_other_products(line, tmp_path):
    """calibrate_product / `calibrate run --categorizer-products`: the profile's categorizer learns
    from every product's labels (regions from their published profiles), its own weighed up,
    and carries its own product's normal appearance."""
    from linewatch.errors import UserError

    reg = tmp_path / "reg"
    calibrate_product(line, "pcb", reg, model_kind="meandiff", input_size=SIZE, progress=False, export_onnx=False)
    prof = calibrate_product(line, "brick", reg, model_kind="meandiff", input_size=SIZE, progress=False,
                             export_onnx=False, categorizer_products=["all"])
    trained = prof.categorizer["trained_on"]
    assert trained["products"] == ["brick", "pcb"] and trained["weighted_product"] == "brick"
    assert trained["region_source"] == "predicted" and prof.categorizer["normal"]["n_images"] > 0
    alone = Registry(reg).read_profile("pcb").categorizer["trained_on"]
    assert alone["products"] == ["pcb"] and trained["n_frames"] > alone["n_frames"]
    assert run("run", "--dataset", line, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--registry", reg, "--categorizer-products", "brick", "--no-onnx", "-q") == 0
    assert Registry(reg).read_profile("pcb").categorizer["trained_on"]["products"] == ["brick", "pcb"]
    with pytest.raises(UserError, match="nope"):
        calibrate_product(line, "pcb", reg, model_kind="meandiff", input_size=SIZE, progress=False,
                          export_onnx=False, publish=False, categorizer_products=["nope"])
    # step by step: `calibrate threshold --categorizer-products` pools the same way
    work = tmp_path / "work"
    assert run("fit", "--dataset", line, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--out", work, "-q") == 0
    assert run("threshold", "--model", work, "--dataset", line, "--categorizer-products", "all", "-q") == 0
    assert json.loads((work / "categorizer.json").read_text())["trained_on"]["products"] == ["brick", "pcb"]
    assert run("threshold", "--model", work, "--val", Path(line) / "pcb" / "test", "--categorizer-products",
               "brick", "-q") == 2  # the other products are read from --dataset: a one-line error

def test_cli_fit_threshold_evaluate_publish_recalibrate_rollback(line, tmp_path, capsys):
    work, reg, rep = tmp_path / "work", tmp_path / "reg", tmp_path / "rep"
    assert run("fit", "--dataset", line, "--product", "brick", "--model-kind", "meandiff",
               "--input-size", SIZE, "--out", work, "-q") == 0
    assert (work / "weights.safetensors").is_file()
    assert run("threshold", "--model", work, "--dataset", line, "-q") == 0
    out = capsys.readouterr().out
    for name in ("IoU curve", "F1/Dice curve", "ROC Youden J", "normal mean + k*std", "normal quantile", "chosen: iou"):
        assert name in out
    assert run("evaluate", "--model", work, "--dataset", line, "--report", rep, "-q") == 0
    out = capsys.readouterr().out
    assert "category=structural" in out and "IoU@normal_quantile" in out and "AUPRO" in out
    assert (rep / "metrics.csv").is_file() and (rep / "index.html").is_file()
    assert run("evaluate", "--model", work, "--dataset", line, "--report", rep, "--format", "csv", "-q") == 0
    assert capsys.readouterr().out.startswith("model,product,group")
    assert run("publish", "--model", work, "--registry", reg, "--no-onnx") == 0
    assert Registry(reg).current_version("brick") == 1
    # recalibrate on the other split seed: new version, same model files, parent recorded
    assert run("recalibrate", "--registry", reg, "--dataset", line, "--product", "brick", "--seed", "7", "-q") == 0
    p2 = Registry(reg).read_profile("brick")
    assert p2.version == 2 and p2.parent_version == 1
    v1, v2 = Registry(reg).version_dir("brick", 1), Registry(reg).version_dir("brick", 2)
    assert (v1 / "weights.safetensors").read_bytes() == (v2 / "weights.safetensors").read_bytes()
    capsys.readouterr()
    assert run("list", "--registry", reg) == 0
    assert "brick" in capsys.readouterr().out
    assert run("show", "--registry", reg, "--product", "brick") == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    assert run("evaluate", "--profile", "brick", "--registry", reg, "--dataset", line, "--report", rep, "-q") == 0
    assert run("rollback", "--registry", reg, "--product", "brick") == 0
    assert Registry(reg).current_version("brick") == 1


def test_cli_run_one_shot(line, tmp_path, capsys):
    reg = tmp_path / "reg"
    assert run("run", "--dataset", line, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--registry", reg, "--no-onnx", "-q") == 0
    out = capsys.readouterr().out
    assert "published pcb v1" in out and "escape rate" in out and "false reject rate" in out


def test_recommend():
    assert recommend_from_categories(["structural"] * 41 + ["contamination"] * 21 + ["combined"]).model_kind == "padim"
    rec = recommend_from_categories(["surface"] * 6 + ["structural"] * 3 + ["good"] * 9)
    assert rec.model_kind == "cflow" and "surface" in rec.reason
    assert recommend_from_categories([]).model_kind == "padim"


def test_cli_recommend(line, capsys):
    assert run("recommend", "--dataset", line, "--product", "pcb", "-q") == 0
    assert "recommended: padim + iou" in capsys.readouterr().out


# -- bad input: one line naming the file, exit 2, nothing published -----------------------------
def _run_publish(data: Path, reg: Path) -> int:
    return run("run", "--dataset", data, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--registry", reg, "--no-onnx", "-q")


def _assert_failed(rc: int, capsys, reg: Path, *needles: str) -> str:
    assert rc == 2
    line = err_line(capsys)
    for n in needles:
        assert n in line, line
    assert Registry(reg).products() == [] and not (reg / "pcb").exists()
    return line


def test_bad_missing_folder(data, tmp_path, capsys):
    shutil.rmtree(data / "pcb" / "train")
    _assert_failed(_run_publish(data, tmp_path / "reg"), capsys, tmp_path / "reg",
                   f"{data / 'pcb'}: not an MVTec (train/good)")
    _assert_failed(_run_publish(tmp_path / "nowhere", tmp_path / "reg"), capsys, tmp_path / "reg",
                   str(tmp_path / "nowhere"), "does not exist")


def test_bad_empty_folder(data, tmp_path, capsys):
    for f in (data / "pcb" / "train" / "good").iterdir():
        f.unlink()
    _assert_failed(_run_publish(data, tmp_path / "reg"), capsys, tmp_path / "reg", "train/good", "is empty")


def test_bad_non_image_file(data, tmp_path, capsys):
    (data / "pcb" / "test" / "good" / "notes.txt").write_text("hello")
    _assert_failed(_run_publish(data, tmp_path / "reg"), capsys, tmp_path / "reg", "notes.txt", "not an image")


def test_bad_corrupt_image(data, tmp_path, capsys):
    (data / "pcb" / "test" / "surface" / "000.png").write_bytes(b"not a png at all")
    _assert_failed(_run_publish(data, tmp_path / "reg"), capsys, tmp_path / "reg", "000.png", "not a readable image")


def test_bad_mask_size(data, tmp_path, capsys):
    m = data / "pcb" / "ground_truth" / "structural" / "001_mask.png"
    cv2.imwrite(str(m), np.zeros((SIZE // 2, SIZE), np.uint8))
    _assert_failed(_run_publish(data, tmp_path / "reg"), capsys, tmp_path / "reg", "001_mask.png",
                   f"mask is {SIZE}x{SIZE // 2}")


def test_bad_mask_not_binary(data, tmp_path, capsys):
    m = data / "pcb" / "ground_truth" / "contamination" / "002_mask.png"
    cv2.imwrite(str(m), (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 7 * 30).astype(np.uint8))
    _assert_failed(_run_publish(data, tmp_path / "reg"), capsys, tmp_path / "reg", "002_mask.png", "not binary")


def test_bad_category_label(data, tmp_path, capsys):
    csv_path = data / "categories.csv"
    text = csv_path.read_text().replace("pcb/test/surface/001.png,pcb,surface", "pcb/test/surface/001.png,pcb,scratchy")
    csv_path.write_text(text)
    _assert_failed(_run_publish(data, tmp_path / "reg"), capsys, tmp_path / "reg", "categories.csv", "'scratchy'",
                   "structural, surface, contamination, combined")


def test_bad_validation_without_anomalies(data, tmp_path, capsys):
    reg = tmp_path / "reg"
    work = tmp_path / "work"
    assert run("fit", "--dataset", data, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--out", work, "-q") == 0
    for d in (data / "pcb" / "test").iterdir():
        if d.name != "good":
            shutil.rmtree(d)
    rc = run("threshold", "--model", work, "--val", data / "pcb" / "test", "--publish", "--registry", reg, "-q")
    _assert_failed(rc, capsys, reg, str(data / "pcb"), "no anomalous images", "iou, f1 and roc are impossible")
    # asked explicitly for a normal-statistics method it works, and says 1-3 were impossible
    assert run("threshold", "--model", work, "--val", data / "pcb" / "test", "--method", "normal_quantile", "-q") == 0
    out = capsys.readouterr().out
    assert "chosen: normal_quantile" in out and "methods iou, f1 and roc are impossible" in out


def test_bad_weights_wrong_architecture(data, tmp_path, capsys):
    reg = tmp_path / "reg"
    work = tmp_path / "work"
    assert run("fit", "--dataset", data, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--out", work, "-q") == 0
    cfg = json.loads((work / "model.json").read_text())
    cfg["input_size"] = SIZE * 2  # the weights are those of a 64-pixel model
    (work / "model.json").write_text(json.dumps(cfg))
    rc = run("threshold", "--model", work, "--dataset", data, "--publish", "--registry", reg, "-q")
    _assert_failed(rc, capsys, reg, "weights.safetensors", "expected (3, 128, 128)")
    cfg.update(kind="padim", input_size=SIZE, options={})  # a config that does not fit these weights at all
    (work / "model.json").write_text(json.dumps(cfg))
    rc = run("threshold", "--model", work, "--dataset", data, "--publish", "--registry", reg, "-q")
    _assert_failed(rc, capsys, reg, "model.json", "padim")


def test_cli_recommend_measure(line, capsys):
    assert run("recommend", "--dataset", line, "--product", "pcb", "--measure", "--candidate", "meandiff",
               "--input-size", SIZE, "-q") == 0
    out = capsys.readouterr().out
    assert "measured meandiff: IoU" in out and "recommended: meandiff" in out


def test_meandiff_save_load_onnx_identical(line, tmp_path):
    import onnxruntime as ort

    from calibration.data import load_product_splits, load_train
    from linewatch.models.export import export_onnx
    from linewatch.models.registry import build_model, load_model

    train = load_train(line, "pcb", SIZE, progress=False)
    _, test = load_product_splits(line, "pcb", SIZE, progress=False)
    model = build_model("meandiff", input_size=SIZE).fit(train, progress=False)
    maps, scores = model.predict(test.images)
    assert maps.shape == (len(test), SIZE, SIZE) and np.allclose(scores, maps.reshape(len(maps), -1).max(1))
    # higher inside defects than outside, on average
    assert maps[test.masks].mean() > maps[~test.masks].mean()
    model.save(tmp_path / "m")
    again = load_model(tmp_path / "m")
    np.testing.assert_array_equal(again.predict(test.images)[0], maps)
    assert b"pickle" not in (tmp_path / "m" / "weights.safetensors").read_bytes()[:2000]
    export_onnx(model, tmp_path / "m" / "model.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = test.images[:3].transpose(0, 3, 1, 2).astype(np.float32)
    onnx_maps = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(onnx_maps, maps[:3], atol=1e-5)


def test_a_product_without_category_labels_learns_from_the_other_products(line):
    """Calibrating a product whose anomalous validation images have masks but no categories: the
    categorizer learns from the other products' labelled images alone; without them there is no
    categorizer (the profile says so by having none)."""
    from dataclasses import replace

    from calibration.data import load_product_splits
    from calibration.categorizer_samples import _category_samples, fit_categorizer

    def blurred(s):
        return np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), 2) for m in s.masks]) + 0.01

    val, _ = load_product_splits(line, "pcb", SIZE, progress=False)
    pooled = [smp for part in load_product_splits(line, "brick", SIZE, progress=False)  # brick: all its labels
              for smp in _category_samples(part, blurred(part), 0.3, "brick")]
    hidden = replace(val, categories=["good" if c == "good" else "unknown" for c in val.categories])
    params = fit_categorizer(hidden, blurred(val), 0.3, "pcb", pooled=pooled)
    assert params["trained_on"]["n_frames"] == len(pooled) and params["trained_on"]["products"] == ["brick"]
    refined = fit_categorizer(hidden, blurred(val) ** 2, 0.1, "pcb", raw_maps=blurred(val), pooled=pooled)
    assert refined["trained_on"]["n_frames"] == len(pooled)  # no unlabelled view of its own joins
    assert fit_categorizer(hidden, blurred(val), 0.3, "pcb") is None  # nothing labelled to learn from


def test_fit_categorizer_also_trains_on_the_unrefined_view(line):
    """With a refinement on, the validation images' unrefined-map regions join the training (a
    second cut of every labelled defect); without one, nothing is added."""
    from calibration.data import load_product_splits
    from calibration.categorizer_samples import fit_categorizer

    val, _ = load_product_splits(line, "pcb", SIZE, progress=False)
    rng = np.random.default_rng(0)
    raw = np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), 2) for m in val.masks])
    raw = raw + 0.05 * rng.random(raw.shape).astype(np.float32)
    plain = fit_categorizer(val, raw, 0.3, "pcb", raw_maps=raw)
    refined = fit_categorizer(val, raw ** 2, 0.1, "pcb", raw_maps=raw)
    assert plain is not None and refined is not None
    assert refined["trained_on"]["n_frames"] == 2 * plain["trained_on"]["n_frames"] > 0


def test_recommend_says_no_category_dominates_on_a_tie_and_gives_the_measured_shares():
    rec = recommend_from_categories(["structural", "surface", "contamination", "combined"] * 7)
    assert rec.model_kind == "padim" and rec.reason.startswith("no category dominates")
    assert "25%" in rec.reason and "of 28" in rec.reason and "most defects" not in rec.reason
    rec = recommend_from_categories(["structural"] * 3 + ["surface"] * 2)
    assert "most defects are structural (structural 60%, surface 40% of 5)" in rec.reason


def test_fit_needs_only_train_good_in_the_mvtec_and_btad_layouts(data, tmp_path, capsys):
    for sub in ("test", "ground_truth"):
        shutil.rmtree(data / "pcb" / sub)
    assert run("fit", "--dataset", data, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--out", tmp_path / "w", "-q") == 0
    assert "on 8 normal images" in capsys.readouterr().out and (tmp_path / "w" / "fit.json").is_file()
    btad = tmp_path / "btad" / "part" / "train" / "ok"
    btad.mkdir(parents=True)
    for f in sorted((data / "pcb" / "train" / "good").iterdir()):
        shutil.copy(f, btad / f.name)
    assert run("fit", "--dataset", tmp_path / "btad", "--product", "part", "--model-kind", "meandiff",
               "--input-size", SIZE, "--out", tmp_path / "wb", "-q") == 0


def test_fit_from_a_plain_normal_folder_of_mixed_formats_and_sizes(data, tmp_path, capsys):
    folder = tmp_path / "normals"
    folder.mkdir()
    for i, f in enumerate(sorted((data / "pcb" / "train" / "good").iterdir())):
        img = cv2.imread(str(f))
        if i % 2:  # another size and format: resized as the worker resizes a frame
            cv2.imwrite(str(folder / f"{i:03d}.jpg"), cv2.resize(img, (96, 80)))
        else:
            cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    assert run("fit", "--normal-dir", folder, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--out", tmp_path / "w", "-q") == 0
    assert "on 8 normal images" in capsys.readouterr().out
    info = json.loads((tmp_path / "w" / "fit.json").read_text())
    assert info["dataset"] == str(folder) and info["n_train"] == 8


def test_fit_refuses_an_empty_normal_folder_and_a_dataset_without_normal_images(data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run("fit", "--normal-dir", tmp_path / "empty", "--product", "pcb", "--model-kind", "meandiff",
               "--out", tmp_path / "w", "-q") == 2
    line = err_line(capsys)
    assert str(tmp_path / "empty") in line and "is empty" in line
    shutil.rmtree(data / "pcb" / "train")  # defect images, no normal ones
    assert run("fit", "--dataset", data, "--product", "pcb", "--model-kind", "meandiff",
               "--out", tmp_path / "w2", "-q") == 2
    assert "not an MVTec (train/good)" in err_line(capsys) and not (tmp_path / "w2").exists()
