"""Figures of the drift alert (docs/results/review-loop.md): the window, the time to alert on a
drifting synthetic camera, the time to clear once the lighting is back, and false alerts on a
steady camera over 10 minutes.

Run: ``python -m workers.bench_drift [--fps 5] [--steady-min 10] [--gain G ...] [--scores S.npz] [--out FILE]``;
``--from-scores S.npz [--raise-at K --clear-at K]`` judges saved scores again without the model.
Kafka-free: frames of the synthetic line (``linewatch.synth``, JPEG q90, decoded the worker's
way) go through the bench's PaDiM (``workers.bench_profile``, fitted once and cached) on the
best engine present, and the verdicts and image scores feed the sink's own
:class:`workers.drift.DriftEvaluator`. Frame times are those of a camera at ``--fps``, so the
times reported are line time, not this machine's. The reference is what calibration records
(``linewatch.drift.reference``): the image scores of 60 normal validation images of the product.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from linewatch.drift import reference
from linewatch.inspection.frames import decode_frame
from linewatch.settings import AlertSettings
from linewatch.synth import SyntheticProduct
from linewatch.synth.exposure import ExposureDrift
from linewatch.synth.line import SyntheticCamera
from workers.bench_profile import fitted_profile_dir
from workers.drift import DriftEvaluator

BATCH = 16


class _Scorer:
    def __init__(self, threads: int = 0) -> None:
        from linewatch.models.registry import load_model
        from workers.engines import select_engine

        folder, _ = fitted_profile_dir()
        meta = json.loads((folder / "bench.json").read_text())
        self.size = int(meta["input_size"])
        self.threshold = float(meta["threshold"])
        self.engine = select_engine(load_model(folder), folder / "model.onnx", "auto", threads, BATCH)

    def scores(self, rgbs: list[np.ndarray]) -> np.ndarray:
        out = []
        buf = np.empty((BATCH, self.size, self.size, 3), np.uint8)
        for lo in range(0, len(rgbs), BATCH):
            chunk = rgbs[lo:lo + BATCH]
            for k, rgb in enumerate(chunk):
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
                decode_frame(jpg.tobytes(), self.size, 64_000_000, "jpeg", out=buf[k])
            _, s = self.engine.run(buf[:len(chunk)])
            out.extend(float(v) for v in s)
        return np.asarray(out)


def _camera(n: int, seed: int, drift: ExposureDrift | None) -> list[np.ndarray]:
    cam = SyntheticCamera("cap", seed=seed, size=256, defect_rate=0.19)
    return [np.ascontiguousarray(drift.apply(next(cam).image, i) if drift else next(cam).image) for i in range(n)]


def _run(ev: DriftEvaluator, scores: np.ndarray, threshold: float, fps: float) -> list[dict]:
    events = []
    for i, s in enumerate(scores):
        verdict = "defect" if s > threshold else "ok"
        for a in ev.observe("cap", 1, verdict, float(s), int(i * 1000 / fps), threshold):
            events.append({"frame": i, "t_s": round(i / fps, 1), "state": a.state, "ks": round(a.value, 3)})
    return events


def _trace(cfg: AlertSettings, ref: dict, scores: np.ndarray, threshold: float) -> list[tuple[int, float]]:
    """(frame, KS distance) each time the evaluator computed one."""
    ev = DriftEvaluator(cfg, lambda p, v: ref)
    out, last = [], None
    for i, s in enumerate(scores):
        ev.observe("cap", 1, "defect" if s > threshold else "ok", float(s), i, threshold)
        d = ev.distance("cap")
        if d is not None and d != last:
            out.append((i, d))
            last = d
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="drift alert figures on the synthetic line")
    p.add_argument("--fps", type=float, default=5.0, help="camera frame rate the times are given in (default 5)")
    p.add_argument("--steady-min", type=float, default=10.0, help="minutes of the steady camera (default 10)")
    p.add_argument("--gain", type=float, action="append",
                   help="exposure gain of a drift run; repeat for several (default 1.1, 0.85 and 1.3)")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    p.add_argument("--scores", type=Path, help="save every image score here (.npz), to re-judge without rescoring")
    p.add_argument("--from-scores", type=Path, help="re-judge the scores saved by --scores (no model run)")
    p.add_argument("--raise-at", type=float, help="KS raise limit to judge with (default: alerts.drift_raise)")
    p.add_argument("--clear-at", type=float, help="KS clear limit to judge with (default: alerts.drift_clear)")
    a = p.parse_args(argv)
    gains = a.gain or [1.15, 0.8, 1.3]
    cfg = AlertSettings()
    cfg = cfg.model_copy(update={k: v for k, v in (("drift_raise", a.raise_at), ("drift_clear", a.clear_at))
                                 if v is not None})
    t0 = time.perf_counter()
    fps = a.fps
    n_steady = int(a.steady_min * 60 * fps)
    start, ramp, hold = int(60 * fps), int(30 * fps), int(150 * fps)
    back = start + ramp + hold
    if a.from_scores:
        saved = np.load(a.from_scores)
        ref_scores, steady, threshold, engine = saved["ref"], saved["steady"], float(saved["threshold"]), "saved"
        gains = [float(g) for g in saved["gains"]]
        runs = {g: saved[f"gain_{i}"] for i, g in enumerate(gains)}
    else:
        scorer = _Scorer()
        threshold, engine = scorer.threshold, scorer.engine.name
        synth = SyntheticProduct("cap", size=256, seed=0)
        ref_scores = scorer.scores([synth.normal(60_000 + i).image for i in range(60)])
        steady = scorer.scores(_camera(n_steady, seed=11, drift=None))
        runs = {g: scorer.scores(_camera(back + int(150 * fps), seed=12, drift=ExposureDrift(start, ramp, g, hold)))
                for g in gains}
        if a.scores:
            np.savez(a.scores, ref=ref_scores, steady=steady, threshold=threshold, gains=np.asarray(gains),
                     **{f"gain_{i}": runs[g] for i, g in enumerate(gains)})
    ref = reference(ref_scores)

    class scorer:  # noqa: N801 - what the judging below reads
        pass
    scorer.threshold, scorer.engine = threshold, type("E", (), {"name": engine})
    ev = DriftEvaluator(cfg, lambda p, v: ref)
    steady_events, ks_steady = [], []
    for i, s in enumerate(steady):
        for al in ev.observe("cap", 1, "defect" if s > scorer.threshold else "ok", float(s), int(i * 1000 / fps),
                             scorer.threshold):
            steady_events.append({"frame": i, "t_s": round(i / fps, 1), "state": al.state, "ks": round(al.value, 3)})
        if ev.distance("cap") is not None:
            ks_steady.append(ev.distance("cap"))
    report = {
        "window_normal_frames": cfg.drift_window, "raise_at_ks": cfg.drift_raise, "clear_at_ks": cfg.drift_clear,
        "fps": fps, "reference_n": ref["n"], "image_threshold": scorer.threshold, "engine": scorer.engine.name,
        "reference_median": round(float(np.interp(0.5, ref["levels"], ref["quantiles"])), 4),
        "steady": {"frames": n_steady, "minutes": a.steady_min, "alerts": steady_events,
                   "false_alerts": sum(e["state"] == "raised" for e in steady_events),
                   "defect_share": round(float(np.mean(steady > scorer.threshold)), 3),
                   "ks_max": round(max(ks_steady), 3) if ks_steady else None,
                   "ks_p50": round(float(np.median(ks_steady)), 3) if ks_steady else None},
        "drift": []}
    # each drifting camera: 1 min steady, a 30 s ramp to the gain, 2.5 min there, then back (lamp replaced) 2.5 min
    for gain in gains:
        drifting = runs[gain]
        events = _run(DriftEvaluator(cfg, lambda p, v: ref), drifting, scorer.threshold, fps)
        trace = _trace(cfg, ref, drifting, scorer.threshold)
        raised = next((e for e in events if e["state"] == "raised"), None)
        cleared = next((e for e in events if e["state"] == "cleared" and e["frame"] >= back), None)
        during = drifting[start + ramp:back]
        report["drift"].append({
            "gain": gain, "start_frame": start, "ramp_frames": ramp, "hold_frames": hold, "events": events,
            "time_to_alert_s": round((raised["frame"] - start) / fps, 1) if raised else None,
            "time_to_clear_s": round((cleared["frame"] - back) / fps, 1) if cleared else None,
            "score_median_before": round(float(np.median(drifting[:start])), 4),
            "score_median_during": round(float(np.median(during)), 4),
            "defect_share_during": round(float(np.mean(during > scorer.threshold)), 3),
            "ks_max_during": round(max((k for i, k in trace if start <= i < back), default=0.0), 3),
            "ks_at_end_of_hold": round(next((k for i, k in reversed(trace) if i < back), 0.0), 3),
            "ks_max_after": round(max((k for i, k in trace if i >= back + 2 * cfg.drift_window), default=0.0), 3)})
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
