"""A service that stops making progress can be asked where it waits: every ``linewatch``
command writes all its threads' stacks to stderr on SIGUSR1 (linewatch/cli/main.py). The
fault harness uses it when a worker never finishes its group join."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def test_sigusr1_dumps_every_thread_stack_and_the_service_keeps_running(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: the sink keeps retrying its broker
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update(LINEWATCH_HOME=str(tmp_path), LINEWATCH_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{port}")
    log = tmp_path / "sink.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "sink"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "results ->" not in log.read_text(errors="replace"):  # past imports, handler installed
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while "Current thread" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        assert "Current thread" in text and 'linewatch' in text.split("Current thread", 1)[1], text[-3000:]
        assert proc.poll() is None, "SIGUSR1 must not stop the service"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
