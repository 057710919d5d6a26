"""linewatch.kafka.io against the real broker: topics, size limits, bounded waits."""

from __future__ import annotations

import threading
import time

import pytest

from linewatch.kafka import io as kafka_io
from linewatch.kafka.broker import free_port
from linewatch.settings import KafkaSettings, Settings


def _dead_kafka(timeout_s: float = 2.0) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", connect_timeout_s=timeout_s)


def test_wait_for_broker_is_bounded_and_clear():
    ks = _dead_kafka(2.0)
    t0 = time.monotonic()
    with pytest.raises(kafka_io.BrokerUnavailable, match=r"not reachable at 127\.0\.0\.1:\d+ within 2s"):
        kafka_io.wait_for_broker(ks)
    assert time.monotonic() - t0 < 6.0


def test_make_producer_and_consumer_fail_clearly_without_broker():
    ks = _dead_kafka(1.5)
    for make in (lambda: kafka_io.make_producer(ks), lambda: kafka_io.make_consumer(ks, "g", ["frames"])):
        t0 = time.monotonic()
        with pytest.raises(kafka_io.BrokerUnavailable, match="linewatch broker start"):
            make()
        assert time.monotonic() - t0 < 5.0


def test_topic_specs_follow_settings():
    s = Settings(topics={"frames": "f1", "frames_partitions": 12})
    specs = {t.name: t for t in kafka_io.topic_specs(s)}
    assert set(specs) == {"f1", "results", "frames.dlq", "alerts", "profiles", "reviews"}
    assert specs["f1"].partitions == 12
    assert all(t.configs["max.message.bytes"] == str(10 * 1024 * 1024) for t in specs.values())
    assert specs["profiles"].configs["cleanup.policy"] == "compact"


@pytest.mark.integration
def test_ensure_topics_creates_all_idempotently_and_concurrently(kafka_broker):
    s = Settings(
        kafka={"bootstrap_servers": kafka_broker},
        topics={"frames": "t-frames", "results": "t-results", "dlq": "t-dlq", "alerts": "t-alerts",
                "profiles": "t-profiles", "reviews": "t-reviews", "frames_partitions": 6, "results_partitions": 3},
    )
    errors: list[BaseException] = []

    def create():
        try:
            kafka_io.ensure_topics(s)
        except BaseException as exc:  # noqa: BLE001 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]  # racing creators
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert kafka_io.ensure_topics(s) == []  # nothing left to create
    present = kafka_io.describe_topics(s, ["t-frames", "t-results", "t-dlq", "t-alerts", "t-profiles", "t-reviews"])
    assert present == {"t-frames": 6, "t-results": 3, "t-dlq": 3, "t-alerts": 1, "t-profiles": 1, "t-reviews": 1}

    from kafka.admin import ConfigResource, ConfigResourceType

    admin = kafka_io.make_admin(s)
    try:
        resp = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "t-frames")])
    finally:
        admin.close()
    assert "10485760" in str(resp) and "max.message.bytes" in str(resp)


@pytest.mark.integration
def test_large_record_round_trip_and_oversized_refused(kafka_settings):
    topic = kafka_settings.topics.frames
    producer = kafka_io.make_producer(kafka_settings)
    big = bytes(range(256)) * (9 * 1024 * 1024 // 256)  # 9 MB: under the limit
    try:
        md = kafka_io.send_checked(producer, topic, big, key="cam-9", headers=[("frame_id", b"f-9mb")])
        assert md.offset >= 0
        with pytest.raises(kafka_io.RecordTooLarge, match=r"f-11mb is 11534336 bytes, over the limit of 10485760"):
            kafka_io.send_checked(producer, topic, b"\0" * (11 * 1024 * 1024), key="cam-9",
                                  headers=[("frame_id", b"f-11mb")])
        kafka_io.send_checked(producer, topic, b"after", key="cam-9", headers=[("frame_id", b"f-after")])
    finally:
        producer.close()

    from kafka import TopicPartition

    consumer = kafka_io.make_consumer(kafka_settings, None)
    try:
        tp = TopicPartition(topic, md.partition)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=1000).values():
                got.extend(recs)
    finally:
        consumer.close()
    assert [r.headers for r in got] == [[("frame_id", b"f-9mb")], [("frame_id", b"f-after")]]
    assert got[0].value == big and got[0].key == b"cam-9"


@pytest.mark.integration
def test_ensure_topics_raises_a_small_size_limit_of_an_existing_topic(kafka_broker):
    from kafka.admin import ConfigResource, ConfigResourceType

    s = Settings(kafka={"bootstrap_servers": kafka_broker},
                 topics={"frames": "small-frames", "results": "small-results", "dlq": "small-dlq",
                         "alerts": "small-alerts", "profiles": "small-profiles", "reviews": "small-reviews"})
    admin = kafka_io.make_admin(s)
    try:
        admin.create_topics({"small-frames": {"num_partitions": 2, "replication_factor": -1,
                                              "configs": {"max.message.bytes": "1048576"}}})
        kafka_io.ensure_topics(s)
        cfg = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "small-frames",
                                                     {"max.message.bytes": None})], config_filter="all")
    finally:
        admin.close()
    assert cfg["topic"]["small-frames"]["max.message.bytes"]["value"] == "10485760"


def test_poll_rides_out_a_broker_that_went_away(caplog):
    """kafka-python 3 raises connection errors out of poll while the broker restarts; a service
    must wait them out (empty poll, a warning), while any other error still propagates."""
    from kafka import errors

    from linewatch.kafka.io import NotAuthorized, poll_records

    class Flaky:
        def __init__(self, exc):
            self.exc, self.calls = exc, 0

        def poll(self, timeout_ms, max_records=None):
            self.calls += 1
            if self.calls == 1:
                raise self.exc
            return {"tp": ["r1"]}

    c = Flaky(errors.KafkaConnectionError("111 ECONNREFUSED"))
    with caplog.at_level("WARNING", logger="linewatch.kafka.io"):
        assert poll_records(c, 10, 5, backoff_s=0.01) == {}
    assert poll_records(c, 10, 5) == {"tp": ["r1"]}
    assert "KafkaConnectionError" in caplog.text
    assert poll_records(Flaky(errors.NotLeaderForPartitionError()), 10, backoff_s=0.01) == {}  # retriable
    with pytest.raises(NotAuthorized, match="not authorized: .* use topic results"):  # not retried: the user must act
        poll_records(Flaky(errors.TopicAuthorizationFailedError({"results"})), 10)
    with pytest.raises(ValueError):
        poll_records(Flaky(ValueError("a bug")), 10)
