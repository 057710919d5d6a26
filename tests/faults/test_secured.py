"""The pipeline on a secured broker (issue 26): SASL_SSL, SCRAM-SHA-512 users, deny-by-default
ACLs, and every party as its own role -- the load producer as ``producer``, the workers as
``worker``, the sink as ``sink``, the topics created by ``admin``.

Two rows of the fault table: the reference run (exactly one DuckDB row per frame) and the
broker SIGKILLed and restarted under load (0 missing, 0 duplicated). Each scenario has its own
secured broker (the restart one must own its broker; the reference one starts it anyway so the
faults session's plaintext broker is not needed)."""

from __future__ import annotations

import time

import pytest

from .harness import LoadProducer, Pipeline, camera_ids, good_frames, recovery_times, start_broker, write_report
from .test_broker_restart import _run as broker_restart_run

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]


def _pipeline(name, broker, tmp_path, profile_bank) -> Pipeline:
    return Pipeline(name, broker, tmp_path / name, profile_bank.registry_dir)


def test_secured_end_to_end_one_row_per_frame(profile_bank, frame_bank, tmp_path):
    broker = start_broker(tmp_path / "secured-broker", secured=True)
    p = _pipeline("secured-baseline", broker, tmp_path, profile_bank)
    try:
        p.create_topics()
        sink = p.start_sink()
        w1 = p.start_worker("sec-w1")
        p.wait_assigned(w1)
        p.wait_sink_ready(sink)
        frames = good_frames(frame_bank, 300, "sec", camera_ids())
        prod = LoadProducer(p.as_role("producer"), frames, rate_fps=60)
        t0 = time.time()
        prod.start()
        p.events.append({"t": t0, "kind": "reference point (no fault)"})
        prod.join(timeout=120)
        assert prod.error is None, prod.error
        assert not prod.failed
        acc = p.wait_accounted(prod.sent, timeout=120)
        rows, _ = p.read_db()
        ttr = recovery_times(p.events, prod.sent, rows)
        write_report("7-secured-baseline", "no fault, secured broker (SASL_SSL + SCRAM + ACLs, one user per role)",
                     acc, f"{max(ttr):.1f} s (normal latency)",
                     {"faults": 0, "producer_s": round(prod.finished_at - prod.started_at, 1),
                      "recovery_per_fault_s": ttr})
        assert acc.missing == 0, (acc.missing_ids[:10], p.logs_tail())
        assert acc.duplicated == 0, acc.duplicated_ids[:10]
        assert acc.rows == len(frames) and acc.dlq == 0
        assert all(s.alive() for s in p.services), p.logs_tail()
    finally:
        p.stop_all()
        broker.stop(timeout_s=20)


def test_secured_broker_sigkill_and_restart(profile_bank, frame_bank, tmp_path):
    broker = start_broker(tmp_path / "secured-own-broker", secured=True)
    p = _pipeline("s3-broker-sigkill-secured", broker, tmp_path, profile_bank)
    try:
        broker_restart_run(p, frame_bank, broker, "sigkill", tag="-secured")
    finally:
        p.stop_all()
        broker.stop(timeout_s=20)
