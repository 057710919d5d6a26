"""Shared fixtures. Integration fixtures (real Kafka broker, DuckDB file) live here so every
test module uses the same ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave things a person may want to look at (screenshots, reports)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never let a test read the developer's linewatch.toml or write to ~/.linewatch."""
    home = tmp_path_factory.mktemp("lwhome")
    monkeypatch.setenv("LINEWATCH_HOME", str(home))
    monkeypatch.delenv("LINEWATCH_CONFIG", raising=False)
    for key in list(os.environ):
        if key.startswith("LINEWATCH_") and key not in ("LINEWATCH_HOME", "LINEWATCH_CACHE"):
            monkeypatch.delenv(key, raising=False)


# ---- real Kafka broker (linewatch/kafka/broker.py) ---------------------------------------
@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> str:
    """A real Kafka 4.1 broker (KRaft, one node) for the whole session; yields its
    bootstrap servers string, e.g. ``"127.0.0.1:41234"``. Use it as
    ``Settings(kafka={"bootstrap_servers": kafka_broker})`` or take ``kafka_settings``.

    Free ports and a fresh temp dir per attempt, so several pytest processes can each run
    one at the same time; stopped by pid (SIGTERM) at the end. The broker log is
    ``<tmp>/kafka-*/logs/server.log`` (the path is printed on a start failure).
    """
    from linewatch.kafka.broker import Broker, BrokerError, free_port
    from linewatch.settings import BrokerSettings

    last: Exception | None = None
    for _attempt in range(3):  # another process may grab a "free" port before Kafka binds it
        home = tmp_path_factory.mktemp("kafka")
        broker = Broker(
            BrokerSettings(home=home, port=free_port(), controller_port=free_port(), heap_mb=384,
                           start_timeout_s=120)
        )
        try:
            broker.start(die_with_parent=True)  # a killed pytest leaves no JVM behind
        except BrokerError as exc:
            last = exc
            continue
        try:
            yield broker.bootstrap_servers
        finally:
            broker.stop()
        return
    pytest.fail(f"could not start the test Kafka broker: {last}")


@pytest.fixture
def kafka_settings(kafka_broker, request):
    """Settings pointing at ``kafka_broker`` with topic names unique to this test (so tests
    sharing the session broker never see each other's records); the topics exist already."""
    import uuid

    from linewatch.kafka.io import ensure_topics
    from linewatch.settings import Settings

    tag = uuid.uuid4().hex[:8]
    topics = {name: f"{name}-{tag}" for name in ("frames", "results", "alerts", "profiles", "reviews")}
    topics["dlq"] = f"frames.dlq-{tag}"
    settings = Settings(
        kafka={"bootstrap_servers": kafka_broker, "connect_timeout_s": 20},
        topics={**topics, "frames_partitions": 4, "results_partitions": 2},
    )
    ensure_topics(settings)
    return settings


@pytest.fixture(scope="session")
def synth_samples():
    """Ground-truth regions of synthetic defects (cap and turf, every category, 6 each), 128 px,
    for the categorizer tests (shared; tests must not modify them)."""
    from calibration.categorizer_fit import CategorySample
    from linewatch.messages import CATEGORIES
    from linewatch.synth import SyntheticProduct

    out = []
    for prod in ("cap", "turf"):
        sp = SyntheticProduct(prod, 128, seed=0)
        for cat in CATEGORIES:
            for i in range(6):
                s = sp.defective(i, cat)
                out.append(CategorySample(s.image, cat, s.mask > 0, None, None, s.background, prod))
    return out
