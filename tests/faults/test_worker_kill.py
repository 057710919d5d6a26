"""Scenario 1: workers SIGKILLed mid-batch, three times during the run; the other worker of
the group (and a replacement) take their partitions over. Nothing lost, nothing twice."""

from __future__ import annotations

import time

import pytest

from .harness import (
    LoadProducer,
    assigned_partitions,
    camera_ids,
    good_frames,
    kill_when_busy,
    recovery_times,
    write_report,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

KILLS = 3
GAP_S = 30  # each kill has recovered (measured ~12 s) before the next
RATE = 10


def test_worker_sigkill_mid_batch(pipeline_factory, frame_bank):
    p = pipeline_factory("s1-worker-kill")
    p.create_topics()
    sink = p.start_sink()
    workers = [p.start_worker("s1-w1")]
    p.wait_assigned(workers[0])
    workers.append(p.start_worker("s1-w2"))
    p.wait_assigned(workers[1])
    p.wait_sink_ready(sink)

    n = int(RATE * (8 + GAP_S * (KILLS - 1) + 40))
    frames = good_frames(frame_bank, n, "s1", camera_ids())
    prod = LoadProducer(p.settings, frames, rate_fps=RATE)
    prod.start()
    kills = []
    time.sleep(8)
    targets = ["s1-w1", "s1-w2", "s1-w3"]
    for k in range(KILLS):
        victim = next(w for w in workers if w.name == targets[k])
        owned = assigned_partitions(victim)
        ev = kill_when_busy(p, victim)
        ev["partitions"] = owned
        kills.append(ev)
        workers.append(p.start_worker(f"s1-w{3 + k}"))  # a replacement joins the group
        if k < KILLS - 1:
            time.sleep(GAP_S)
    prod.join(timeout=400)
    assert prod.error is None, prod.error
    acc = p.wait_accounted(prod.sent, timeout=150)
    rows, _ = p.read_db()
    ttr = recovery_times(p.events, prod.sent, rows)

    # who served the victim's partitions after each kill
    takeovers = []
    for ev in kills:
        after = {r[3] for r in rows if r[1] in ev["partitions"] and r[4] and r[4] >= ev["t"] * 1000}
        takeovers.append(sorted(after))
    gens = p.group_generations(p.settings.worker.group_id)
    write_report("1-worker-kill", f"worker SIGKILL mid-batch x{KILLS}, replacement joins", acc,
                 f"max {max(ttr):.1f} s (per kill {ttr})",
                 {"faults": KILLS, "killed_busy": [e.get("busy") for e in kills],
                  "victim_partitions": [e["partitions"] for e in kills], "taken_over_by": takeovers,
                  "recovery_per_fault_s": ttr, "group_generations": gens,
                  "producer_retries": prod.retries})
    assert acc.missing == 0, (acc.missing_ids[:10], p.logs_tail())
    assert acc.duplicated == 0, acc.duplicated_ids[:10]
    assert acc.rows == n and acc.dlq == 0
    for ev, who in zip(kills, takeovers):
        assert who and ev["service"] not in who, f"nobody took over {ev}"
