"""Image-level labels, partial masks, the operating curve and --target-escape-rate, on a tiny
synthetic line (meandiff model, no backbone), and their bad inputs: one line, exit 2, nothing
published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from linewatch.cli import main
from linewatch.profiles import Registry

SIZE = 64


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    from linewatch.synth import generate_dataset

    root = tmp_path_factory.mktemp("line")
    generate_dataset(root, products=["pcb"], size=SIZE, seed=3, n_train=8, n_test_good=9,
                     n_test_per_category=5, progress=False)
    return root


@pytest.fixture()
def data(line, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(line, dst)
    return dst


def run(*argv) -> int:
    return main(["calibrate", *map(str, argv)])


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _plain(data: Path, tmp: Path) -> tuple[Path, Path, Path]:
    """The product as three plain folders: normal (fit), defects (by category), normal test."""
    normal, defects, normal_test = tmp / "normal", tmp / "defects", tmp / "normal-test"
    shutil.copytree(data / "pcb" / "train" / "good", normal)
    shutil.copytree(data / "pcb" / "test" / "good", normal_test)
    for d in (data / "pcb" / "test").iterdir():
        if d.name != "good":
            shutil.copytree(d, defects / d.name)
    return normal, defects, normal_test


def _args(reg: Path, *extra) -> list:
    return ["--model-kind", "meandiff", "--input-size", SIZE, "--registry", reg, "--no-onnx", "-q", *extra]


def test_run_on_image_labels_only_folders(data, tmp_path, capsys):
    normal, defects, normal_test = _plain(data, tmp_path)
    reg, rep = tmp_path / "reg", tmp_path / "rep"
    assert run("run", "--product", "pcb", "--normal-dir", normal, "--defect-dir", defects,
               "--normal-test-dir", normal_test, "--report", rep, *_args(reg)) == 0
    out = capsys.readouterr().out
    assert "pixel AUROC, AUPRO, IoU: needs masks" in out and "image-level labels only" in out
    assert "escape rate" in out and "false reject rate" in out
    prof = Registry(reg).read_profile("pcb")
    assert prof.threshold_method == "normal_quantile" and "image-level labels only" in prof.threshold_reason
    assert prof.image_threshold is not None
    test = prof.calibration_metrics["test"]
    assert test["pixel_metrics"] == "needs masks" and test["pixel_auroc"] is None and test["iou"] is None
    assert 0.0 <= test["image_auroc"] <= 1.0 and test["escape_rate"]["n"] > 0
    assert "normal images' statistics" in prof.calibration_metrics["labels"]["pixel_threshold"]
    # the categories came from the sub-folders: trained at frame level on the predicted regions, or said absent
    assert prof.categorizer is not None or any(n.startswith("no categorizer") for n in prof.calibration_metrics["notes"])
    metrics = json.loads((rep / "metrics.json").read_text())[0]
    assert metrics["headline"]["pixel_metrics"] == "needs masks"
    assert metrics["operating_curve"]["test"] and (rep / "pcb_meandiff_operating_curve.png").stat().st_size > 1000
    html = (rep / "index.html").read_text()
    assert "needs masks" in html and "Operating curve" in html
    # calibrate show says where the pixel threshold came from
    assert run("show", "--product", "pcb", "--registry", reg) == 0
    assert "normal images' statistics" in capsys.readouterr().out


def test_run_on_mvtec_defects_without_ground_truth(data, tmp_path, capsys):
    shutil.rmtree(data / "pcb" / "ground_truth")
    reg = tmp_path / "reg"
    assert run("run", "--dataset", data, "--product", "pcb", *_args(reg)) == 0
    prof = Registry(reg).read_profile("pcb")
    assert prof.threshold_method == "normal_quantile" and prof.calibration_metrics["test"]["pixel_metrics"] == "needs masks"


def test_run_on_a_partially_masked_dataset(data, tmp_path, capsys):
    for cat in ("surface", "combined"):  # two defect folders lose their masks: image-level labels
        shutil.rmtree(data / "pcb" / "ground_truth" / cat)
    reg = tmp_path / "reg"
    assert run("run", "--dataset", data, "--product", "pcb", *_args(reg)) == 0
    prof = Registry(reg).read_profile("pcb")
    m = prof.calibration_metrics
    assert prof.threshold_method == "iou"  # masks exist: the pixel methods run on the masked images
    assert "pixel masks on" in m["labels"]["validation"] and "of" in m["labels"]["validation"]
    test = m["test"]
    assert test["pixel_auroc"] is not None and test["pixel_metrics"].startswith("on the ")
    # every labelled image counts for the frame KPIs: 10 surface+combined test defects without masks included
    from calibration.data import load_product_splits

    _, split = load_product_splits(data, "pcb", SIZE, progress=False)
    assert test["escape_rate"]["n"] == int(split.anomalous.sum()) > int((split.anomalous & split.mask_known).sum())


def test_target_escape_rate_honoured_on_validation_and_refused_when_unsupported(data, tmp_path, capsys):
    from calibration.data import load_product_splits
    from calibration.operating_curve import (check_target_supported, defective_images_needed,
                                             threshold_for_escape_rate)
    from linewatch.errors import UserError

    # library: honoured on the validation scores, and the lowest false-reject point that meets it
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 40), rng.normal(2, 1, 40)])
    y = np.r_[np.zeros(40, bool), np.ones(40, bool)]
    for target in (0.1, 0.25, 0.5):
        t, _ = threshold_for_escape_rate(scores, y, target)
        esc = (y & (scores < t)).sum() / y.sum()
        assert esc <= target
        fr = (~y & (scores >= t)).sum()
        for c in np.unique(scores[scores > t]):  # no higher threshold meets the target with fewer false rejects
            assert (y & (scores < c)).sum() / y.sum() > target or (~y & (scores >= c)).sum() == fr
    with pytest.raises(UserError) as e:
        check_target_supported(0.01, 10, "val")
    assert "10 defective" in str(e.value) and f"at least {defective_images_needed(0.01)}" in str(e.value)
    check_target_supported(0.5, 10, "val")
    # CLI: honoured on validation
    reg = tmp_path / "reg"
    assert run("run", "--dataset", data, "--product", "pcb", "--target-escape-rate", 0.5, *_args(reg)) == 0
    prof = Registry(reg).read_profile("pcb")
    assert "target escape rate 0.5" in prof.threshold_reason
    val, _ = load_product_splits(data, "pcb", SIZE, progress=False)
    from calibration.workflow import load_model_dir

    _, model = Registry(reg).load("pcb")
    _, s = model.predict(val.images)
    assert (val.anomalous & (s < prof.image_threshold)).sum() / val.anomalous.sum() <= 0.5
    # refused: one line, exit 2, nothing published
    reg2 = tmp_path / "reg2"
    assert run("run", "--dataset", data, "--product", "pcb", "--target-escape-rate", 0.01, *_args(reg2)) == 2
    line = err_line(capsys)
    assert "--target-escape-rate 0.01 cannot be shown" in line and "defective validation image" in line
    assert Registry(reg2).products() == []


def _refused(rc: int, capsys, reg: Path, *needles) -> None:
    assert rc == 2
    line = err_line(capsys)
    for n in needles:
        assert str(n) in line, line
    assert Registry(reg).products() == []


def test_bad_image_label_inputs(data, tmp_path, capsys):
    normal, defects, normal_test = _plain(data, tmp_path)
    reg = tmp_path / "reg"
    # defect images but no normal ones
    _refused(run("run", "--product", "pcb", "--normal-dir", normal, "--defect-dir", defects, *_args(reg)),
             capsys, reg, defects, "no normal test images")
    shutil.rmtree(data / "pcb" / "ground_truth")
    shutil.rmtree(data / "pcb" / "test" / "good")
    _refused(run("run", "--dataset", data, "--product", "pcb", *_args(reg)), capsys, reg,
             data / "pcb" / "test", "defect images but no normal ones")
    # empty folders
    (tmp_path / "empty").mkdir()
    _refused(run("run", "--product", "pcb", "--normal-dir", tmp_path / "empty", "--defect-dir", defects,
                 "--normal-test-dir", normal_test, *_args(reg)), capsys, reg, tmp_path / "empty", "is empty")
    (tmp_path / "empty2").mkdir()
    _refused(run("run", "--product", "pcb", "--normal-dir", normal, "--defect-dir", tmp_path / "empty2",
                 "--normal-test-dir", normal_test, *_args(reg)), capsys, reg, tmp_path / "empty2", "is empty")
    # a category outside the four
    (defects / "surface").rename(defects / "scratch")
    _refused(run("run", "--product", "pcb", "--normal-dir", normal, "--defect-dir", defects,
                 "--normal-test-dir", normal_test, *_args(reg)), capsys, reg, "scratch",
             "structural, surface, contamination, combined")
    (defects / "scratch").rename(defects / "surface")
    # unreadable image
    (defects / "structural" / "000.png").write_bytes(b"not a png")
    _refused(run("run", "--product", "pcb", "--normal-dir", normal, "--defect-dir", defects,
                 "--normal-test-dir", normal_test, *_args(reg)), capsys, reg, "000.png", "not a readable image")


def test_bad_csv_naming_missing_files_and_a_csv_without_masks(tmp_path, line, capsys):
    base = tmp_path / "csvset"
    base.mkdir()
    rows = ["path,category"]
    for i, f in enumerate(sorted((line / "pcb" / "train" / "good").iterdir())):
        shutil.copy(f, base / f"n{i}.png")
        rows.append(f"n{i}.png,good")
    for i, f in enumerate(sorted((line / "pcb" / "test" / "good").iterdir())):
        shutil.copy(f, base / f"t{i}.png")
        rows.append(f"t{i}.png,good,")
    rows = [r if r.count(",") == 1 else r.rstrip(",") for r in rows]
    for cat in ("structural", "contamination"):
        for i, f in enumerate(sorted((line / "pcb" / "test" / cat).iterdir())):
            shutil.copy(f, base / f"{cat}{i}.png")
            rows.append(f"{cat}{i}.png,{cat}")
    # normal test images need split=test so they are not fitted on
    text = "path,category,split\n" + "\n".join(
        r + (",train" if r.startswith("n") else ",test") for r in rows[1:]) + "\n"
    (base / "data.csv").write_text(text)
    from calibration.datasets import load_folder_csv

    ds = load_folder_csv(base / "data.csv")  # no mask column: image-level labels
    assert sum(i.anomalous for i in ds.test) == 10 and all(i.mask_path is None for i in ds.test)
    (base / "data.csv").write_text(text + "missing.png,surface,test\n")
    reg = tmp_path / "reg"
    _refused(run("run", "--dataset", base / "data.csv", "--product", "pcb", *_args(reg)), capsys, reg,
             "missing.png", "image file does not exist")
    (base / "data.csv").write_text("path,category,split,mask\n" + text.split("\n", 1)[1]
                                   .replace("structural0.png,structural,test", "structural0.png,structural,test,gone.png"))
    _refused(run("run", "--dataset", base / "data.csv", "--product", "pcb", *_args(reg)), capsys, reg,
             "gone.png", "mask does not exist")


def test_step_by_step_on_plain_folders_and_recalibrate_with_a_target(data, tmp_path, capsys):
    normal, defects, normal_test = _plain(data, tmp_path)
    reg, work = tmp_path / "reg", tmp_path / "work"
    assert run("fit", "--normal-dir", normal, "--product", "pcb", "--model-kind", "meandiff", "--input-size", SIZE,
               "--out", work, "-q") == 0
    assert run("threshold", "--model", work, "--defect-dir", defects, "--normal-test-dir", normal_test,
               "--target-escape-rate", 0.3, "--publish", "--registry", reg, "--no-onnx", "-q") == 0
    out = capsys.readouterr().out
    assert "chosen: normal_quantile" in out and "target escape rate 0.3" in out
    assert run("evaluate", "--model", work, "--defect-dir", defects, "--normal-test-dir", normal_test,
               "--report", tmp_path / "rep", "-q") == 0
    head = json.loads((tmp_path / "rep" / "metrics.json").read_text())[0]["headline"]
    assert head["pixel_metrics"] == "needs masks" and head["escape_rate"]["n"] == 20
    assert (~np.isnan([head["image_auroc"]])).all()
    # recalibrate: refused below what 20 defective images can show, nothing new published
    assert run("recalibrate", "--product", "pcb", "--defect-dir", defects, "--normal-test-dir", normal_test,
               "--target-escape-rate", 0.05, "--registry", reg, "-q") == 2
    assert "cannot be shown with 20 defective" in err_line(capsys)
    assert Registry(reg).current_version("pcb") == 1
    assert run("recalibrate", "--product", "pcb", "--defect-dir", defects, "--normal-test-dir", normal_test,
               "--target-escape-rate", 0.2, "--registry", reg, "-q") == 0
    prof = Registry(reg).read_profile("pcb")
    assert prof.version == 2 and "target escape rate 0.2" in prof.threshold_reason
