"""Reference run without faults: the same load and the same accounting, so the other rows
of the table have something to be compared with (normal end-to-end time to first row)."""

from __future__ import annotations

import time

import pytest

from .harness import LoadProducer, camera_ids, good_frames, recovery_times, write_report

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_baseline_no_faults(pipeline_factory, frame_bank):
    p = pipeline_factory("baseline")
    p.create_topics()
    sink = p.start_sink()
    w1 = p.start_worker("base-w1")
    p.wait_assigned(w1)
    w2 = p.start_worker("base-w2")
    p.wait_assigned(w2)
    p.wait_sink_ready(sink)
    frames = good_frames(frame_bank, 600, "base", camera_ids())
    prod = LoadProducer(p.settings, frames, rate_fps=60)
    prod.start()
    time.sleep(5)
    p.events.append({"t": time.time(), "kind": "reference point (no fault)"})
    prod.join(timeout=120)
    assert prod.error is None, prod.error
    assert not prod.failed
    acc = p.wait_accounted(prod.sent, timeout=120)
    rows, _ = p.read_db()
    ttr = recovery_times(p.events, prod.sent, rows)
    gens = p.group_generations(p.settings.worker.group_id)
    write_report("0-baseline", "no fault (reference)", acc, f"{max(ttr):.1f} s (normal latency)",
                 {"faults": 0, "producer_s": round(prod.finished_at - prod.started_at, 1),
                  "group_generations": gens, "recovery_per_fault_s": ttr})
    assert acc.missing == 0, (acc.missing_ids[:10], p.logs_tail())
    assert acc.duplicated == 0, acc.duplicated_ids[:10]
    assert acc.rows == len(frames)
