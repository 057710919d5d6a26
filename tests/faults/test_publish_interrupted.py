"""Scenario 6: a profile publish killed half-way (at fixed points inside Registry.publish and
at random moments) while a worker serves the product: the previous version stays in force,
no half-written version is ever listed or loaded, and the worker never processes a frame with
anything but a complete profile. Then calibration with bad inputs: exit 2, nothing published."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import REPO, LoadProducer, camera_ids, good_frames, write_report

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

# A child that re-publishes the current cap profile with a new threshold and SIGKILLs itself
# at a chosen point of Registry.publish (or runs normally when the point is "none").
PUBLISH_CHILD = r'''
import os, signal, sys, json
import torch
torch.set_num_threads(1)
from linewatch.profiles import Registry
import linewatch.profiles as P
import linewatch.models.base as B

root, point = sys.argv[1], sys.argv[2]
reg = Registry(root)
profile, model = reg.load("cap")

def die():
    sys.stdout.write("DYING at " + point + "\n"); sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if point == "after-weights":          # weights written, profile.json not yet
    real_save = B.AnomalyModel.save
    def save(self, d):
        real_save(self, d); die()
    B.AnomalyModel.save = save
elif point == "before-rename":        # complete temp folder, not yet renamed to vNNNN
    real_rename = os.rename
    P.os.rename = lambda a, b: die() if ".tmp-" in str(a) else real_rename(a, b)
elif point == "before-current":       # version folder in place, CURRENT not flipped
    real_replace = os.replace
    P.os.replace = lambda a, b: die() if ".CURRENT.tmp" in str(a) else real_replace(a, b)
elif point == "mid-current-write":    # the CURRENT temp file half-written
    real_write = P.Path.write_text
    def wt(self, text, *a, **k):
        if ".CURRENT.tmp" in self.name:
            with open(self, "w") as f:
                f.write(text[:1]); f.flush()
            die()
        return real_write(self, text, *a, **k)
    P.Path.write_text = wt
new = profile.model_copy(update={"threshold": profile.threshold * 1.01, "version": 0, "notes": "republish " + point})
stored = reg.publish(new, model, export_onnx=True)
print("PUBLISHED", stored.version, flush=True)
'''


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def check_registry(root: Path, expect_current: int) -> dict:
    """The invariants a reader relies on, checked the way the worker reads."""
    from linewatch.profiles import Registry

    reg = Registry(root)
    cur = reg.current_version("cap")
    assert cur == expect_current, f"CURRENT moved to {cur}"
    prof, _model = reg.load("cap")  # what the worker would load now
    assert prof.version == expect_current
    for v in reg.versions("cap"):  # every listed version is complete and loadable
        reg.load("cap", v)
    leftovers = sorted(p.name for p in (root / "cap").iterdir() if p.name.startswith("."))
    return {"current": cur, "versions": reg.versions("cap"), "leftover_tmp": leftovers}


def test_publish_killed_half_way_keeps_the_previous_profile(pipeline_factory, frame_bank):
    p = pipeline_factory("s6-publish-kill")
    p.create_topics()
    sink = p.start_sink()
    w1 = p.start_worker("s6-w1")
    p.wait_assigned(w1)
    p.wait_sink_ready(sink)
    cams = camera_ids()
    frames = good_frames(frame_bank, 1200, "s6", cams)
    prod = LoadProducer(p.settings, frames, rate_fps=10)
    prod.start()
    root = p.registry_dir
    outcomes = []
    # fixed kill points
    for point in ("after-weights", "before-rename", "before-current", "mid-current-write"):
        t = time.time()
        r = subprocess.run([sys.executable, "-c", PUBLISH_CHILD, str(root), point], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stdout[-500:], r.stderr[-1500:])
        state = check_registry(root, 1)
        outcomes.append({"kill": point, "rc": r.returncode, **state})
        p.events.append({"t": t, "kind": f"publish killed {point}"})
    # random moments
    rng = random.Random(11)
    made_current = {1}  # every version that was ever CURRENT: the only ones a worker may serve
    for _ in range(3):
        t = time.time()
        child = subprocess.Popen([sys.executable, "-c", PUBLISH_CHILD, str(root), "none"], cwd=REPO, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(1.5, 5.0)
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
        published = [int(x.split()[1]) for x in out.splitlines() if x.startswith("PUBLISHED")]
        from linewatch.profiles import Registry

        cur = Registry(root).current_version("cap")
        state = check_registry(root, cur)
        outcomes.append({"kill": f"random {delay:.1f}s", "rc": child.returncode, "published": published, **state})
        if published:  # the publish finished before the kill: that version is now in force
            assert cur == published[0]
            made_current.add(published[0])
    from linewatch.profiles import Registry

    in_force_before_final = Registry(root).current_version("cap")
    t_interrupt_end = time.time()
    # a clean publish: the worker hot-reloads it (and only a complete one)
    r = subprocess.run([sys.executable, "-c", PUBLISH_CHILD, str(root), "none"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    final_version = int(r.stdout.split("PUBLISHED")[1].split()[0])
    t_final = (root / "cap" / "CURRENT").stat().st_mtime  # the moment the pointer flipped
    prod.join(timeout=300)
    assert prod.error is None, prod.error
    acc = p.wait_accounted(prod.sent, timeout=150)
    rows, dlq = p.read_db()
    cap_rows = [r for r in rows if r[0] in {s.frame.fid for s in prod.sent if s.frame.product == "cap"}]
    versions_served = sorted({r[6] for r in cap_rows})
    served_during = sorted({r[6] for r in cap_rows if r[4] and r[4] < t_interrupt_end * 1000})
    reload_after_s = None
    newer = [r[4] for r in cap_rows if r[6] == final_version]
    if newer:
        reload_after_s = round(min(newer) / 1000 - t_final, 1)
    write_report("6-publish-kill", "profile publish SIGKILLed at 4 fixed points + 3 random moments", acc,
                 f"n/a (v1 never left service); clean publish hot-reloaded {reload_after_s} s later",
                 {"faults": len(outcomes), "outcomes": outcomes, "versions_served": versions_served,
                  "served_while_interrupting": served_during, "final_version": final_version,
                  "dlq_rows": len(dlq)})
    assert acc.missing == 0 and acc.duplicated == 0, (acc.missing_ids[:10], acc.duplicated_ids[:10])
    assert acc.dlq == 0, "a frame was DLQ'd: a half-written profile was loaded?"
    assert in_force_before_final in made_current
    made_current.add(final_version)
    assert set(versions_served) <= made_current, f"served a version that never was CURRENT: {versions_served}"
    assert final_version in versions_served, "the worker never hot-reloaded the clean publish"


def _mini_dataset(root: Path) -> Path:
    from linewatch.synth import generate_dataset

    return generate_dataset(root, products=["cap"], size=64, n_train=6, n_test_good=3, n_test_per_category=2,
                            progress=False)


def test_calibration_with_bad_inputs_exits_2_and_publishes_nothing(profile_bank, tmp_path):
    import shutil

    from linewatch.profiles import Registry

    reg_root = tmp_path / "profiles"
    shutil.copytree(profile_bank.registry_dir, reg_root)
    before = {p: (Registry(reg_root).current_version(p), Registry(reg_root).versions(p)) for p in ("cap", "pcb")}
    good = _mini_dataset(tmp_path / "ds-good")

    def variant(name: str, damage) -> Path:
        d = tmp_path / f"ds-{name}"
        shutil.copytree(good, d)
        damage(d)
        return d

    def corrupt_train(d):
        (d / "cap" / "train" / "good" / "000.png").write_bytes(b"this is not a png")

    def empty_train(d):
        for f in (d / "cap" / "train" / "good").iterdir():
            f.unlink()

    def defects_without_normals(d):
        # defect images without masks are image-level labels now (issue 22), but without normal
        # test images there is nothing to set the image threshold against
        shutil.rmtree(d / "cap" / "ground_truth")
        shutil.rmtree(d / "cap" / "test" / "good")

    def category_outside_the_four(d):
        lines = (d / "categories.csv").read_text().splitlines()
        path, product, _, background = lines[1].split(",")
        lines[1] = ",".join((path, product, "cosmetic", background))
        (d / "categories.csv").write_text("\n".join(lines) + "\n")

    def wrong_mask_size(d):
        import cv2
        import numpy as np

        for f in (d / "cap" / "ground_truth").rglob("*_mask.png"):
            cv2.imwrite(str(f), np.zeros((13, 17), np.uint8))

    def pickled_image(d):
        import pickle

        (d / "cap" / "train" / "good" / "001.png").write_bytes(pickle.dumps({"x": 1}))

    cases = {
        "missing-dataset": (tmp_path / "nope", []),
        "corrupt-train-image": (variant("corrupt", corrupt_train), []),
        "empty-train": (variant("empty", empty_train), []),
        "defects-without-normals": (variant("nonormal", defects_without_normals), []),
        "category-outside-the-four": (variant("category", category_outside_the_four), []),
        "wrong-mask-size": (variant("masksize", wrong_mask_size), []),
        "pickle-as-image": (variant("pickle", pickled_image), []),
        "bad-input-size": (good, ["--input-size", "7"]),
        "bad-option": (good, ["--option", "d=999999"]),
        "unknown-model-kind": (good, ["--model-kind", "nosuchmodel"]),
    }
    results = {}
    for name, (ds, extra) in cases.items():
        r = subprocess.run([sys.executable, "-m", "linewatch.cli", "calibrate", "run", "--dataset", str(ds),
                            "--product", "cap", "--input-size", "64", "--option", "d=16", "-q", "--no-onnx",
                            "--registry", str(reg_root), *extra],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        err = r.stderr.strip().splitlines()
        results[name] = {"rc": r.returncode, "stderr_last": err[-1][:200] if err else ""}
    after = {p: (Registry(reg_root).current_version(p), Registry(reg_root).versions(p)) for p in ("cap", "pcb")}
    (REPO / "test-artifacts" / "faults").mkdir(parents=True, exist_ok=True)
    (REPO / "test-artifacts" / "faults" / "6b-calibration-bad-inputs.json").write_text(
        json.dumps({"cases": results, "registry_before": before, "registry_after": after}, indent=2))
    bad = {k: v for k, v in results.items() if v["rc"] != 2 or "Traceback" in v["stderr_last"]}
    assert after == before, f"something was published: {before} -> {after}"
    assert not bad, json.dumps(bad, indent=1)
    for name, v in results.items():
        assert v["stderr_last"].startswith("linewatch: error:"), (name, v)
