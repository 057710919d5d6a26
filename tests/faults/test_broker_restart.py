"""Scenario 3: the broker stopped and restarted during the run (its own broker, same ports
and data). Producers buffer and retry within a bound; workers and sink resume."""

from __future__ import annotations

import signal
import time

import pytest

from .harness import LoadProducer, camera_ids, good_frames, recovery_times, start_broker, write_report

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

DOWN_S = 8
RATE = 20


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_broker_stop_and_restart(pipeline_factory, frame_bank, tmp_path, how):
    broker = start_broker(tmp_path / "own-broker")
    p = pipeline_factory(f"s3-broker-{how}", broker=broker)
    try:
        _run(p, frame_bank, broker, how)
    finally:
        p.stop_all()  # before the broker goes, so the services can leave their groups
        broker.stop(timeout_s=20)


def _run(p, frame_bank, broker, how, tag: str = ""):
    """Scenario 3 on ``p`` (``tag`` marks the report row, e.g. "-secured"; on a secured broker
    the load producer runs as the producer role)."""
    p.create_topics()
    sink = p.start_sink()
    w1 = p.start_worker("s3-w1")
    p.wait_assigned(w1)
    w2 = p.start_worker("s3-w2")
    p.wait_assigned(w2)
    p.wait_sink_ready(sink)
    n = RATE * 45
    frames = good_frames(frame_bank, n, f"s3{how[-4:]}{tag}", camera_ids())
    prod = LoadProducer(p.as_role("producer"), frames, rate_fps=RATE, retry_s=120)
    prod.start()
    time.sleep(10)
    t_stop = time.time()
    if how == "sigterm":
        broker.stop(timeout_s=30)
    else:
        pid = broker._read_pid()
        import os

        os.kill(pid, signal.SIGKILL)
        broker._wait_exit(pid, 15)
    p.events.append({"t": t_stop, "kind": f"broker {how}"})
    time.sleep(DOWN_S)
    t_up0 = time.time()
    broker.start(timeout_s=120)
    t_up = time.time()
    prod.join(timeout=300)
    assert prod.error is None, prod.error
    acc = p.wait_accounted(prod.sent, timeout=180)
    rows, _ = p.read_db()
    ttr = recovery_times(p.events, prod.sent, rows)
    alive = {s.name: s.alive() for s in p.services}
    secured = " (SASL_SSL + SCRAM + ACLs, every service as its own role)" if p.secured else ""
    write_report(f"3-broker-{how}{tag}", f"broker stopped ({how}) {DOWN_S} s, restarted{secured}", acc,
                 f"{ttr[0]:.1f} s after the stop (broker down {t_up - t_stop:.1f} s)",
                 {"faults": 1, "broker_down_s": round(t_up - t_stop, 1), "broker_start_s": round(t_up - t_up0, 1),
                  "producer_retries": prod.retries, "producer_failed": len(prod.failed),
                  "services_alive_after": alive, "recovery_per_fault_s": ttr})
    assert not prod.failed, prod.failed[:3]
    assert acc.missing == 0, (acc.missing_ids[:10], p.logs_tail())
    assert acc.duplicated == 0, acc.duplicated_ids[:10]
    assert acc.rows == n
    assert all(alive.values()), f"a service died with the broker: {alive}\n{p.logs_tail()}"
