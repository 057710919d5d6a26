"""Scenario 7, the review loop end to end, in real headless Chromium against a real broker,
sink, worker and DuckDB file: open a defect's detail from the gallery, mark it a false call
while the sink is SIGKILLed (and click twice), restart the sink: the review is in DuckDB exactly
once; `calibrate recalibrate --from-reviews --publish` uses it; the worker serves the new
version; the dashboard's history panel shows it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from linewatch.messages import Review
from linewatch.settings import EvidenceSettings

from .harness import REPO, Frame, LoadProducer, camera_ids, wait_until, write_report

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = [pytest.mark.browser, pytest.mark.timeout(600),
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")]


def _cap_frames(bank, n: int, prefix: str, cams: list[str]) -> list[Frame]:
    jpegs = bank.jpegs["cap"]  # 24 normal, then 8 defective
    return [Frame(f"{prefix}-{i}", cams[i % len(cams)], "cap", jpegs[(i * 5) % len(jpegs)], seq=i // len(cams))
            for i in range(n)]


def _separate(p, bank) -> float:
    """Set cap v1's image threshold between the bank's normal and defective frames' scores (the
    suite's profiles judge by pixel threshold alone, which calls most synthetic frames defects):
    a review loop needs both kinds. Scores are the model's own, decoded the worker's way."""
    import numpy as np

    from linewatch.inspection.frames import decode_frame
    from linewatch.profiles import Registry

    reg = Registry(p.registry_dir)
    prof, model = reg.load("cap")
    imgs = np.stack([decode_frame(j, prof.input_size, 64_000_000, "jpeg")[0] for j in bank.jpegs["cap"]])
    _, scores = model.predict(imgs)
    normal, defect = scores[:24], scores[24:]
    thr = float(np.quantile(normal, 0.9))  # most normals ok; the rest are false calls to review
    path = reg.version_dir("cap", prof.version) / "profile.json"
    data = json.loads(path.read_text())
    data["image_threshold"] = thr
    path.write_text(json.dumps(data))
    assert (defect > thr).sum() >= 4, (normal, defect)
    return thr


def _query(p, sql: str, params=()):
    from linewatch import store

    with store.reading(p.db, timeout_s=30) as con:
        return con.execute(sql, list(params)).fetchall()


def _streamlit(p, tmp: Path):
    from dashboard.cli import streamlit_command

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp / "streamlit.log").open("w")
    proc = subprocess.Popen(streamlit_command(p.db, "127.0.0.1", port, refresh_s=2), stdout=log,
                            stderr=subprocess.STDOUT, env=p.env(), cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200
        except OSError:
            return proc.poll() is not None
    wait_until(up, 90, what="streamlit")
    assert proc.poll() is None, (tmp / "streamlit.log").read_text()[-2000:]
    return proc, url


def test_review_loop_in_chromium_across_a_sink_sigkill(pipeline_factory, frame_bank, tmp_path, artifacts_dir):
    from playwright.sync_api import sync_playwright

    p = pipeline_factory("s7-review", sink={"max_batch": 100, "max_wait_ms": 200})
    # half the normal frames kept as evidence, so a short run has enough normal frames to recalibrate on
    p.settings = p.settings.model_copy(update={"evidence": EvidenceSettings(normal_sample_rate=0.5)})
    _separate(p, frame_bank)
    p.create_topics()
    sink = p.start_sink("sink-1")
    worker = p.start_worker("s7-w1")
    p.wait_assigned(worker)
    p.wait_sink_ready(sink)
    cams = camera_ids()
    prod = LoadProducer(p.settings, _cap_frames(frame_bank, 64, "s7a", cams), rate_fps=16)
    prod.start()
    prod.join(timeout=120)
    assert prod.error is None, prod.error
    acc = p.wait_accounted(prod.sent, timeout=120)
    assert acc.missing == 0 and acc.duplicated == 0, p.logs_tail()
    defects = [r[0] for r in _query(p, "SELECT frame_id FROM inspections WHERE verdict = 'defect' "
                                       "ORDER BY capture_ts_ms DESC, frame_id DESC")]
    samples = _query(p, "SELECT count(*) FROM evidence WHERE reason = 'sample'")[0][0]
    assert len(defects) >= 5 and samples >= 10, (len(defects), samples)

    server, url = _streamlit(p, tmp_path)
    events: dict = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 2400})
                page.goto(url, wait_until="domcontentloaded", timeout=60_000)
                page.get_by_role("button", name="Details").first.click(timeout=60_000)
                header = page.locator("h2").filter(has_text="Frame ").first
                header.wait_for(timeout=30_000)
                frame_id = header.inner_text().split("Frame ", 1)[1].strip()
                assert frame_id == defects[0]  # the gallery's first card: the newest defect
                page.wait_for_selector("text=original frame", timeout=30_000)
                page.get_by_text("Heat map", exact=True).click()
                page.screenshot(path=str(artifacts_dir / "review-detail.png"))
                # the sink dies before it can store the review
                events["kill"] = p.kill(sink, what="sink SIGKILL before the review is stored")
                page.get_by_text("False call", exact=True).click()
                page.get_by_role("textbox", name="Reviewer (required)", exact=True).fill("ana")
                page.get_by_role("textbox", name="Note (optional)", exact=True).fill("shadow of the clamp")
                submit = page.get_by_role("button", name="Submit review")
                submit.click()
                page.wait_for_selector("text=Review recorded", timeout=30_000)
                submit.click()  # a duplicate click
                page.wait_for_selector("text=Already recorded", timeout=30_000)
                page.screenshot(path=str(artifacts_dir / "review-submitted.png"))
                assert _query(p, "SELECT count(*) FROM reviews")[0][0] == 0  # nobody stored it yet
                t_restart = time.time()
                sink = p.start_sink("sink-2")
                wait_until(lambda: _query(p, "SELECT count(*) FROM reviews")[0][0] >= 1, 60, what="the review")
                events["review_stored_after_restart_s"] = round(time.time() - t_restart, 1)
                # and once more: SIGKILL the restarted sink, restart: no second row
                p.kill(sink, what="second sink SIGKILL")
                sink = p.start_sink("sink-3")
                p.wait_sink_ready(sink)
                time.sleep(5)
                rows = _query(p, "SELECT frame_id, verdict, reviewer, note FROM reviews")
                assert rows == [(frame_id, "false_call", "ana", "shadow of the clamp")]
                ins = _query(p, "SELECT verdict, image_score FROM inspections WHERE frame_id = ?", [frame_id])
                assert ins[0][0] == "defect"  # a review never alters the inspection

                # three confirmations through the same publishing path, then recalibrate from the reviews
                from dashboard.reviews import publish

                for fid in defects[1:4]:
                    publish(p.settings, Review(frame_id=fid, product="cap", verdict="confirm", category="surface",
                                               reviewer="bo"))
                wait_until(lambda: _query(p, "SELECT count(*) FROM reviews")[0][0] == 4, 60, what="4 reviews")
                r = subprocess.run([sys.executable, "-m", "linewatch.cli", "calibrate", "recalibrate",
                                    "--from-reviews", "--product", "cap", "--publish", "--by", "eng.kim"],
                                   capture_output=True, text=True, timeout=180, env=p.env(), cwd=REPO)
                assert r.returncode == 0, r.stderr[-3000:]
                assert "published cap v2" in r.stdout and "1 false calls" in r.stdout, r.stdout
                from linewatch.profiles import Registry

                v2 = Registry(p.registry_dir).read_profile("cap")
                browser_review = _query(p, "SELECT review_id FROM reviews WHERE frame_id = ?", [frame_id])[0][0]
                assert v2.version == 2 and browser_review in v2.calibration_metrics["from_reviews"]["review_ids"]
                # the worker hot-reloads v2 and serves it
                t_pub = time.time()
                more = LoadProducer(p.settings, _cap_frames(frame_bank, 24, "s7b", cams), rate_fps=8)
                more.start()
                more.join(timeout=120)
                wait_until(lambda: _query(p, "SELECT count(*) FROM inspections WHERE profile_version = 2")[0][0] > 0,
                           90, what="a frame judged by v2")
                events["v2_served_after_s"] = round(time.time() - t_pub, 1)
                # the history panel shows it
                page.goto(url, wait_until="domcontentloaded", timeout=60_000)
                table = page.locator("[data-testid='stTable']").last
                page.wait_for_function("document.body.innerText.includes('eng.kim')", timeout=60_000)
                text = table.inner_text()
                assert "v2" in text and "eng.kim" in text and "1 false calls" in text, text
                page.screenshot(path=str(artifacts_dir / "review-history.png"), full_page=True)
                assert not re.search(r"Traceback|Exception", page.inner_text("body"))
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    acc = p.wait_accounted(prod.sent + more.sent, timeout=120)
    write_report("7-review-loop", "review in Chromium while the sink is SIGKILLed x2; recalibrate --from-reviews; "
                 "v2 served", acc, f"review stored {events['review_stored_after_restart_s']} s after the restart",
                 {"reviews_rows": 4, "browser_review_rows": 1, "v2_served_after_s": events["v2_served_after_s"]})
    assert acc.missing == 0 and acc.duplicated == 0
    assert os.path.getsize(artifacts_dir / "review-history.png") > 20_000
