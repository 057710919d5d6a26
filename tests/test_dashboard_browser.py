"""The dashboard in real headless Chromium against a real `streamlit run` server on a free
127.0.0.1 port, over a DuckDB file with known rows: the page loads, the category summary
shows the numbers in the database, changing a filter changes them, rows written while the
page is open appear by auto-refresh, and screenshots are saved to test-artifacts/."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dashboard import queries
from dashboard.cli import streamlit_command
from linewatch import store
from linewatch.messages import Alert, DlqRecord
from result_factory import known_dataset, make_result, write_db

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def demo_db(tmp_path):
    """Known rows: 200 frames in the last hour + 40 surface defects 3 h ago, a raised alert,
    two DLQ events and a calibrated profile."""
    from linewatch.profiles import Profile

    now = int(time.time() * 1000)
    db = tmp_path / "lw.duckdb"
    write_db(db, known_dataset(now))
    dlq = [store.DlqEvent(DlqRecord(frame_id=f"bad-{k}", reason=r, stage="decode", worker_id="w-test",
                                    source_topic="frames", source_partition=0, source_offset=k),
                          product="widget", camera="cam-1")
           for k, r in enumerate(["truncated JPEG", "zero-byte frame"])]
    alert = Alert(product="bottle", kind="defect_rate", state="raised", value=0.35, limit=0.25, window_frames=200,
                  ts_ms=now - 5 * 60_000, message="bottle: defect rate 35.0% over the last 200 frames exceeds "
                  "the limit 25.0%")
    with store.writing(db) as con:
        store.write_batch(con, [], dlq=dlq, alerts=[alert])
    store.record_profile(db, Profile(product="widget", version=1, model_kind="padim", backbone="efficientnet-lite0",
                                     input_size=256, threshold=0.5, threshold_method="iou"))
    return db, now


@pytest.fixture
def server(demo_db, tmp_path):
    db, now = demo_db
    port = _free_port()
    cmd = streamlit_command(db, "127.0.0.1", port, refresh_s=2)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    log = (tmp_path / "streamlit.log").open("w")
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url, db, now
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _expected(db: Path, where: str, params: list) -> dict[str, int]:
    with store.reading(db) as con:
        got = dict(con.execute(f"SELECT category, count(*) FROM inspections WHERE verdict = 'defect' AND {where} "
                               "GROUP BY 1", params).fetchall())
    return {c: got.get(c, 0) for c in queries.ALL_CATEGORIES}


def _shown(page) -> dict[str, int]:
    out = {}
    for c in queries.ALL_CATEGORIES:
        text = page.locator(f".st-key-cat-{c} [data-testid='stMetricValue']").inner_text(timeout=30_000)
        out[c] = int(text.replace(",", "").strip())
    return out


def _wait_for(page, c: str, value: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _shown(page)[c] == value:
                return
        except Exception:  # the element is re-rendered while the script reruns
            pass
        time.sleep(0.25)
    raise AssertionError(f"{c} never showed {value}; page shows {_shown(page)}")


def test_dashboard_in_headless_chromium(server, artifacts_dir):
    from playwright.sync_api import sync_playwright

    url, db, now = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 2600})
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector(".st-key-cat-surface [data-testid='stMetricValue']", timeout=60_000)
            page.wait_for_selector("[data-testid='stImage'] img", timeout=30_000)  # the gallery
            time.sleep(1.5)  # charts finish drawing

            hour = _expected(db, "capture_ts_ms >= ?", [now - 3600_000])
            assert _shown(page) == hour
            body = page.inner_text("body")
            assert "Line quality" in body and "uncategorised — no categorizer in the profile" in body
            assert "ALERT" in body and "bottle" in body
            assert not re.search(r"lock|Traceback|Exception", body, re.IGNORECASE)
            page.screenshot(path=str(artifacts_dir / "dashboard.png"))

            # time range filter: All time brings in the 40 surface defects from 3 h ago
            page.locator("[data-testid='stSidebar']").get_by_text("All time", exact=True).click()
            _wait_for(page, "surface", hour["surface"] + 40)
            assert _shown(page) == _expected(db, "true", [])

            # product filter: pick "bottle" in the multiselect
            page.locator("[data-testid='stSidebar'] [data-testid='stMultiSelect']").first.click()
            page.get_by_role("option", name="bottle").click()
            page.keyboard.press("Escape")
            bottle = _expected(db, "product = ?", ["bottle"])
            _wait_for(page, "surface", bottle["surface"])
            assert _shown(page) == bottle
            assert bottle != hour
            time.sleep(1.0)
            page.screenshot(path=str(artifacts_dir / "dashboard-filtered.png"))

            # auto-refresh: new rows written while the page is open appear without a click
            fresh = [make_result(10_000 + k, product="bottle", camera="cam-3", line="line-B", verdict="defect",
                                 category="surface", capture_ts_ms=int(time.time() * 1000), frame_id=f"new-{k}")
                     for k in range(10)]
            with store.writing(db) as con:
                store.write_batch(con, fresh)
            _wait_for(page, "surface", bottle["surface"] + 10, timeout_s=30)
        finally:
            browser.close()
    assert (artifacts_dir / "dashboard.png").stat().st_size > 50_000
