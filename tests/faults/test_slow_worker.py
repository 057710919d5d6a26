"""Scenario 4: a slow worker. One worker of two is throttled to a fraction of a CPU (SIGSTOP /
SIGCONT duty cycle, as cpulimit does), so its partitions' lag grows while frames arrive
faster than it can serve them, then drains once they stop. No rebalance storm: the group's
generation does not move, and its batches stay below max.poll.interval.ms (set to the
10 s minimum so a batch that ran long would show as a rebalance)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from .harness import LoadProducer, assigned_partitions, camera_ids, good_frames, write_report

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(360)]

RUN_FRACTION = 0.06  # the slow worker gets the CPU 6 % of the time (12 % stopped biting once ORT got faster)
PERIOD_S = 0.1
RATE = 24
PRODUCE_S = 20
MAX_POLL_MS = 10_000


class Throttle(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.stop_event = threading.Event()

    def run(self):
        try:
            while not self.stop_event.is_set():
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(PERIOD_S * RUN_FRACTION)
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(PERIOD_S * (1 - RUN_FRACTION))
        except ProcessLookupError:
            return
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def group_lag(p, group: str) -> dict[int, int]:
    """Per-partition lag of ``group`` on frames: log end - committed, from the broker."""
    from kafka import TopicPartition

    from linewatch.kafka.io import make_consumer

    # a consumer that carries the group id but never joins: committed() reads the group's offsets
    consumer = make_consumer(p.settings, group, None, client_id="faults-lag")
    try:
        tps = [TopicPartition(p.settings.topics.frames, i) for i in range(4)]
        end = consumer.end_offsets(tps)
        committed = {tp: consumer.committed(tp) for tp in tps}
    finally:
        consumer.close(autocommit=False)
    return {tp.partition: end[tp] - (committed[tp] or 0) for tp in tps}


def test_slow_worker_lag_grows_then_drains_without_rebalance_storm(pipeline_factory, frame_bank):
    p = pipeline_factory("s4-slow-worker", worker={"max_poll_interval_ms": MAX_POLL_MS})
    group = p.settings.worker.group_id
    p.create_topics()
    sink = p.start_sink()
    fast = p.start_worker("s4-fast")
    p.wait_assigned(fast)
    slow = p.start_worker("s4-slow")
    slow_parts = p.wait_assigned(slow)
    p.wait_sink_ready(sink)
    time.sleep(1.0)
    gens_before = p.group_generations(group)
    throttle = Throttle(slow.proc.pid)
    throttle.start()
    frames = good_frames(frame_bank, RATE * PRODUCE_S, "s4", camera_ids())
    prod = LoadProducer(p.settings, frames, rate_fps=RATE)
    t0 = time.time()
    prod.start()
    samples = []  # (t, lag on slow partitions, lag on fast partitions)
    drained_at = None
    deadline = time.monotonic() + PRODUCE_S + 150
    while time.monotonic() < deadline:
        lag = group_lag(p, group)
        slow_lag = sum(v for k, v in lag.items() if k in slow_parts)
        samples.append((round(time.time() - t0, 1), slow_lag, sum(lag.values()) - slow_lag))
        if not prod.is_alive() and sum(lag.values()) == 0 and len(prod.sent) == len(frames):
            drained_at = time.time()
            break
        time.sleep(1.0)
    throttle.stop_event.set()
    throttle.join(timeout=5)
    prod.join(timeout=60)
    assert prod.error is None, prod.error
    acc = p.wait_accounted(prod.sent, timeout=120)
    rows, _ = p.read_db()
    gens_after = p.group_generations(group)
    # batch cadence of the slow worker while it had a backlog: gaps between its result times
    times = sorted({r[4] for r in rows if r[3] == "s4-slow" and r[4]})
    gaps = [(b - a) / 1000 for a, b in zip(times, times[1:])]
    max_gap = max(gaps) if gaps else None
    peak = max(s[1] for s in samples)
    peak_t = next(s[0] for s in samples if s[1] == peak)
    drain_s = round(drained_at - prod.finished_at, 1) if drained_at else None
    write_report("4-slow-worker", f"one worker throttled to {RUN_FRACTION:.0%} CPU, {RATE} fps offered", acc,
                 f"lag drained {drain_s} s after the last frame (peak lag {peak} at t={peak_t}s)",
                 {"faults": 1, "slow_partitions": slow_parts, "peak_lag_slow": peak,
                  "peak_lag_fast": max(s[2] for s in samples), "drain_s": drain_s,
                  "generations_before": gens_before, "generations_after": gens_after,
                  "rebalances_during_run": len(gens_after) - len(gens_before),
                  "slow_worker_max_batch_gap_s": max_gap, "max_poll_interval_s": MAX_POLL_MS / 1000,
                  "lag_samples": samples[:: max(1, len(samples) // 30)],
                  "slow_worker_still_assigned": assigned_partitions(slow)})
    assert acc.missing == 0 and acc.duplicated == 0, (acc.missing_ids[:10], acc.duplicated_ids[:10])
    assert peak >= 20, f"the slow worker never fell behind (peak lag {peak}): the scenario did not bite"
    assert drained_at is not None, f"lag never drained: {samples[-5:]}"
    assert len(gens_after) == len(gens_before), f"rebalance(s) during the run: {gens_before} -> {gens_after}"
    # The property: the slow worker polled again within max.poll.interval.ms after every batch, so
    # it was never dropped from the group (the generation check above is the broker's side of it).
    # How far below the limit is speed on this machine (0.7 s alone, 3.9 s in a loaded 2-core CI
    # run): the report above records it, benchmarks measure it; it is not asserted here.
    assert max_gap is not None and max_gap < MAX_POLL_MS / 1000, f"a batch took {max_gap} s"
