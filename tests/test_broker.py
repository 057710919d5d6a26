"""The embedded Kafka broker: config rendering, install cache, start/stop/status, CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linewatch.kafka.broker import Broker, BrokerError, _kafka_cluster_id, free_port, port_is_free
from linewatch.settings import BrokerSettings

V_BIN = Path(sys.executable).parent


def _broker(tmp_path: Path, **kw) -> Broker:
    return Broker(BrokerSettings(home=tmp_path / "broker", port=free_port(), controller_port=free_port(),
                                 heap_mb=256, start_timeout_s=120, **kw))


def test_server_properties_loopback_and_limits(tmp_path):
    b = _broker(tmp_path)
    b._render_config()
    props = dict(
        line.split("=", 1) for line in b.properties_file.read_text().splitlines() if line and not line.startswith("#")
    )
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{b.settings.port},CONTROLLER://127.0.0.1:{b.settings.controller_port}"
    assert props["controller.quorum.bootstrap.servers"] == f"127.0.0.1:{b.settings.controller_port}"
    assert props["message.max.bytes"] == props["replica.fetch.max.bytes"] == str(10 * 1024 * 1024)
    assert props["auto.create.topics.enable"] == "false"
    assert props["log.dirs"] == str(b.data_dir)
    assert (b.home / "log4j2.xml").is_file()


def test_cluster_id_looks_like_kafka_uuid():
    for _ in range(50):
        cid = _kafka_cluster_id()
        assert re.fullmatch(r"[A-Za-z0-9_\-]{22}", cid) and not cid.startswith("-")


def test_install_is_cached(tmp_path):
    b = _broker(tmp_path)
    b.install()  # cold only on a fresh machine; bootstrap.sh already ran it
    t0 = time.monotonic()
    lib = b.install()
    assert time.monotonic() - t0 < 1.0
    jars = {p.name for p in lib.glob("*.jar")}
    assert "kafka_2.13-4.1.1.jar" in jars
    assert {"log4j-slf4j-impl-2.24.3.jar", "log4j-core-2.24.3.jar", "slf4j-api-1.7.36.jar"} <= jars


def test_status_of_a_broker_that_never_ran(tmp_path):
    st = _broker(tmp_path).status()
    assert not st.running and st.pid is None and not st.answering


@pytest.mark.integration
@pytest.mark.slow
def test_start_is_idempotent_and_stop_is_clean(tmp_path):
    b = _broker(tmp_path)
    try:
        st = b.start(die_with_parent=True)
        assert st.running and st.answering and st.pid
        assert b.pid_file.read_text().strip() == str(st.pid)
        assert "Kafka Server started" in b.log_file.read_text()
        assert not port_is_free("127.0.0.1", b.settings.port)

        again = Broker(b.settings).start()  # a second handle (like a second CLI call)
        assert again.pid == st.pid

        # a different home on the same ports is refused with a clear message
        other = Broker(b.settings.model_copy(update={"home": tmp_path / "other"}))
        with pytest.raises(BrokerError, match=rf"broker.port 127.0.0.1:{b.settings.port} is already in use"):
            other.start()

        # status from a fresh handle (what `linewatch broker status` does)
        st2 = Broker(b.settings).status()
        assert st2.running and st2.pid == st.pid and st2.log_file == b.log_file
    finally:
        stopped = Broker(b.settings).stop()  # stop by pid from the pid file, not our Popen
    assert stopped
    if b._proc is not None:
        b._proc.wait(timeout=30)
    assert not b.pid_file.exists()
    assert not b.status().running
    assert port_is_free("127.0.0.1", b.settings.port)
    assert "shut down completed" in b.log_file.read_text().lower() or "shutdown" in b.log_file.read_text().lower()
    assert Broker(b.settings).stop() is False  # stopping twice is fine


@pytest.mark.integration
@pytest.mark.slow
def test_cli_start_status_topics_stop(tmp_path):
    home = tmp_path / "clibroker"
    port, cport = free_port(), free_port()
    env = {**os.environ, "LINEWATCH_BROKER__HOME": str(home), "LINEWATCH_BROKER__PORT": str(port),
           "LINEWATCH_BROKER__CONTROLLER_PORT": str(cport), "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
           "LINEWATCH_BROKER__HEAP_MB": "256"}

    def lw(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(V_BIN / "linewatch"), *args], env=env, capture_output=True, text=True, timeout=180)

    try:
        r = lw("broker", "start")
        assert r.returncode == 0, r.stderr
        assert f"127.0.0.1:{port}" in r.stdout and str(home / "logs" / "server.log") in r.stdout
        assert "frames, results, frames.dlq, alerts, reviews, profiles created" in r.stdout
        r = lw("broker", "status")
        assert r.returncode == 0 and "running" in r.stdout
        r = lw("broker", "topics", "--list")
        assert r.returncode == 0
        assert re.search(r"^frames\s+partitions=8\s+max.message.bytes=10485760", r.stdout, re.M), r.stdout
    finally:
        r = lw("broker", "stop")
    assert r.returncode == 0 and "stopped" in r.stdout
    r = lw("broker", "status")
    assert r.returncode == 1 and "stopped" in r.stdout


def test_cli_help_is_complete():
    out = subprocess.run([str(V_BIN / "linewatch"), "broker", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for action in ("install", "start", "stop", "status", "topics"):
        assert action in out.stdout
    out = subprocess.run([str(V_BIN / "linewatch"), "broker", "start", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert "--port" in out.stdout and "--home" in out.stdout and "--no-topics" in out.stdout
