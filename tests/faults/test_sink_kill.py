"""Scenario 2: the sink SIGKILLed while it holds DuckDB's write lock (mid-transaction),
restarted at once, twice. The database still has every frame exactly once."""

from __future__ import annotations

import time

import pytest

from .harness import LoadProducer, camera_ids, good_frames, kill_while_writing, recovery_times, write_report

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(360)]

KILLS = 2
GAP_S = 40
RATE = 12


def test_sink_sigkill_mid_transaction(pipeline_factory, frame_bank):
    p = pipeline_factory("s2-sink-kill", sink={"max_batch": 100, "max_wait_ms": 300})
    p.create_topics()
    sink = p.start_sink("sink-1")
    w1 = p.start_worker("s2-w1")
    p.wait_assigned(w1)
    w2 = p.start_worker("s2-w2")
    p.wait_assigned(w2)
    p.wait_sink_ready(sink)
    n = int(RATE * (8 + GAP_S * (KILLS - 1) + 40))
    frames = good_frames(frame_bank, n, "s2", camera_ids())
    prod = LoadProducer(p.settings, frames, rate_fps=RATE)
    prod.start()
    time.sleep(8)
    kills = []
    for k in range(KILLS):
        kills.append(kill_while_writing(p, sink))
        sink = p.start_sink(f"sink-{k + 2}")
        if k < KILLS - 1:
            time.sleep(GAP_S)
    prod.join(timeout=300)
    assert prod.error is None, prod.error
    acc = p.wait_accounted(prod.sent, timeout=150)
    rows, _ = p.read_db()
    ttr = recovery_times(p.events, prod.sent, rows)
    write_report("2-sink-kill", f"sink SIGKILL holding the DuckDB write lock x{KILLS}, restarted", acc,
                 f"max {max(ttr):.1f} s (per kill {ttr})",
                 {"faults": KILLS, "killed_in_transaction": [e.get("in_transaction") for e in kills],
                  "recovery_per_fault_s": ttr,
                  "sink_group_generations": p.group_generations(p.settings.sink.group_id)})
    assert acc.missing == 0, (acc.missing_ids[:10], p.logs_tail())
    assert acc.duplicated == 0, acc.duplicated_ids[:10]
    assert acc.rows == n
    assert any(e.get("in_transaction") for e in kills), "never caught the sink inside a write"
