"""The bridges (`linewatch bridge mqtt|opcua`): every verdict of `results` reaches the line once,
in order per camera, committed only after the target acknowledged; late verdicts say so; bad
records are skipped; an outage is waited out. Unit tests drive ``run_bridge`` with in-process
fakes; the integration tests use a real Kafka broker, Debian's mosquitto and asyncua's own OPC
UA server (tests/mqtt_broker.py, tests/opcua_server.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
from pydantic import SecretStr

from bridges.loop import BridgeOutage, PublishError, run_bridge
from bridges.mqtt import check_template, topic_for
from bridges.verdicts import CameraOrder, make_verdict
from linewatch.errors import UserError
from linewatch.messages import InspectionResult, Verdict, now_ms
from linewatch.settings import Settings
from result_factory import make_result


def _result(i: int, camera: str = "cam1", capture_ts_ms: int | None = None, **kw) -> InspectionResult:
    return make_result(i, camera=camera, frame_id=f"{camera}-{i}-x", with_images=False,
                       capture_ts_ms=capture_ts_ms if capture_ts_ms is not None else now_ms(), **kw)


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# -- unit: verdicts and ordering ---------------------------------------------------------------
def test_late_by_window_and_by_order():
    r = _result(5, capture_ts_ms=1_000)
    assert not make_verdict(r, 1_900, 1_000, stale=False).late
    v = make_verdict(r, 2_001, 1_000, stale=False)
    assert v.late and v.latency_ms == 1_001 and v.score == r.image_score and v.reject_window_ms == 1_000
    assert make_verdict(r, 1_001, 1_000, stale=True).late
    order = CameraOrder(remember=2)
    newer, older = _result(2, capture_ts_ms=2_000), _result(1, capture_ts_ms=1_000)
    order.mark(newer)
    assert order.seen(newer) and not order.seen(older) and order.is_stale(older)
    assert not order.is_stale(_result(1, camera="cam2", capture_ts_ms=1_000))  # per camera
    order.mark(_result(3, capture_ts_ms=3_000))
    order.mark(_result(4, capture_ts_ms=4_000))
    assert not order.seen(newer)  # bounded memory


def test_topic_template():
    v = make_verdict(_result(1, camera="camA"), now_ms(), 1000, False)
    assert topic_for("plant/{line}/{camera}/{product}", v) == "plant/line-A/camA/widget"
    for bad in ("x/{station}", "x/+/{camera}", "#", "x/{"):
        with pytest.raises(UserError, match="topic_template"):
            check_template(bad)


class _Rec:
    def __init__(self, partition: int, offset: int, value: bytes, topic: str = "results"):
        self.topic, self.partition, self.offset, self.value = topic, partition, offset, value
        self.key, self.headers = b"", []


class FakeConsumer:
    """poll/commit/pause of a KafkaConsumer over a fixed list of records (one partition each
    camera); ``committed`` is the count of records consumed at each commit."""

    def __init__(self, records: list[_Rec]) -> None:
        self.records, self.pos, self.committed, self._paused = records, 0, [], set()

    def poll(self, timeout_ms=0, max_records=None):
        if self._paused or self.pos >= len(self.records):
            time.sleep(min(timeout_ms, 20) / 1000)
            return {}
        batch = self.records[self.pos:self.pos + (max_records or len(self.records))]
        self.pos += len(batch)
        out: dict = {}
        for r in batch:
            out.setdefault(r.partition, []).append(r)
        return out

    def commit(self):
        self.committed.append(self.pos)

    def assignment(self):
        return {0, 1}

    def pause(self, *tps):
        self._paused |= set(tps)

    def paused(self):
        return set(self._paused)

    def resume(self, *tps):
        self._paused -= set(tps)

    def close(self, autocommit=False):
        pass


class FakePublisher:
    """Acknowledges verdicts; ``down`` makes connect and publish fail; ``ack_only`` acknowledges
    only that many of the next publish (then fails)."""

    target, where = "fake", "fake target"

    def __init__(self) -> None:
        self.got: list[Verdict] = []
        self.down = False
        self.ack_only: int | None = None
        self.connects = 0
        self.consumer: FakeConsumer | None = None
        self.committed_at_publish: list[int] = []

    def connect(self):
        self.connects += 1
        if self.down:
            raise PublishError("connection refused")

    def publish(self, verdicts):
        if self.consumer is not None:
            self.committed_at_publish.append(len(self.consumer.committed))
        if self.down:
            raise PublishError("connection lost")
        k = len(verdicts) if self.ack_only is None else min(self.ack_only, len(verdicts))
        self.got.extend(verdicts[:k])
        if k < len(verdicts):
            self.ack_only, self.down = None, True
            raise PublishError(f"{len(verdicts) - k} not acknowledged", k)

    def close(self):
        pass


def _settings(**bridge) -> Settings:
    return Settings(bridge={"retry_backoff_max_s": 0.05, "reject_window_ms": 60_000, **bridge})


def test_bad_records_and_duplicates_are_skipped_the_rest_published_in_order():
    good = [_result(i, camera=f"cam{i % 2}") for i in range(6)]
    recs = [_Rec(i % 2, i, r.to_bytes()) for i, r in enumerate(good)]
    recs.insert(3, _Rec(0, 99, b'{"frame_id": 1}'))  # fails the schema
    recs.insert(4, _Rec(1, 100, b"\xff\xfe"))  # not JSON
    recs.append(_Rec(0, 101, good[2].to_bytes()))  # a replayed result
    consumer, pub = FakeConsumer(recs), FakePublisher()
    stats = run_bridge(_settings(), pub, "g", consumer=consumer, max_records=len(recs))
    _per_camera_in_order([v.model_dump() for v in pub.got], good)
    assert (stats.records, stats.published, stats.invalid, stats.duplicates, stats.late) == (9, 6, 2, 1, 0)
    assert consumer.committed and consumer.committed[-1] == len(recs)
    assert stats.percentile(50) is not None and "6 verdicts published" in stats.stop_line()


def test_outage_partial_ack_then_recovery_delivers_the_rest_in_order_and_commits_after():
    good = [_result(i) for i in range(8)]
    consumer, pub = FakeConsumer([_Rec(0, i, r.to_bytes()) for i, r in enumerate(good)]), FakePublisher()
    pub.consumer = consumer
    pub.ack_only = 3  # the target acknowledges 3 of the batch, then goes away
    stop = threading.Event()

    def revive():
        _wait(lambda: pub.connects >= 3, 10, "reconnect attempts")
        assert consumer.committed == []  # nothing committed while 5 verdicts wait
        pub.down = False

    t = threading.Thread(target=revive)
    t.start()
    stats = run_bridge(_settings(), pub, "g", consumer=consumer, max_records=8, stop_event=stop)
    t.join()
    assert [v.frame_id for v in pub.got] == [r.frame_id for r in good]  # once each, in order
    assert stats.outages == 1 and stats.publish_failures >= 2 and consumer.committed == [8]
    assert consumer.paused() == set()  # resumed after the outage


def test_outage_past_the_limit_exits_with_one_line_and_commits_nothing():
    consumer, pub = FakeConsumer([_Rec(0, 0, _result(0).to_bytes())]), FakePublisher()
    pub.ack_only = 0  # connects, then the first publish fails and the target stays down
    t0 = time.monotonic()
    with pytest.raises(BridgeOutage, match=r"fake target unreachable for \d+ s \(connection refused\); "
                                           "1 verdicts not delivered and not committed"):
        run_bridge(_settings(outage_limit_s=0.5), pub, "g", consumer=consumer, max_records=1)
    assert time.monotonic() - t0 < 10 and consumer.committed == []
    pub = FakePublisher()
    pub.down = True  # down from the start
    with pytest.raises(BridgeOutage, match="nothing consumed yet"):
        run_bridge(_settings(outage_limit_s=0.3), pub, "g", consumer=FakeConsumer([]))


def test_a_verdict_that_waited_past_the_window_is_late():
    consumer = FakeConsumer([_Rec(0, i, _result(i, capture_ts_ms=now_ms() - lag).to_bytes())
                             for i, lag in enumerate((5_000, 10, 10))])
    pub = FakePublisher()
    stats = run_bridge(_settings(reject_window_ms=2_000), pub, "g", consumer=consumer, max_records=3)
    # the old one is late by the window; the two fresh ones are older than nothing yet published
    assert [v.late for v in pub.got] == [True, False, False] and stats.late == 1


# -- integration: real Kafka, mosquitto, asyncua ----------------------------------------------
def _produce_results(settings: Settings, results: list[InspectionResult]) -> None:
    from linewatch.kafka.io import make_producer, send_nowait

    producer = make_producer(settings)
    try:
        pending = [send_nowait(producer, settings.topics.results, r.to_bytes(), key=r.camera,
                               headers=[("frame_id", r.frame_id.encode()), ("camera", r.camera.encode())])
                   for r in results]
        producer.flush()
        for p in pending:
            p.result(timeout=30)
    finally:
        producer.close()


def _committed_all(settings: Settings, group: str) -> bool:
    from kafka import TopicPartition

    from linewatch.kafka.io import make_consumer

    c = make_consumer(settings, group)
    try:
        tps = [TopicPartition(settings.topics.results, p) for p in c.partitions_for_topic(settings.topics.results)]
        return all((c.committed(tp) or 0) == end for tp, end in c.end_offsets(tps).items())
    finally:
        c.close()


def _with_target(kafka_settings: Settings, target: str, **section) -> Settings:
    """The test broker's settings with a fast retry, a 3 s reject window and ``section`` set on
    ``bridge.<target>``."""
    bridge = kafka_settings.bridge
    return kafka_settings.model_copy(update={"bridge": bridge.model_copy(update={
        "retry_backoff_max_s": 0.5, "reject_window_ms": 3_000,
        target: getattr(bridge, target).model_copy(update=section)})})


class _BridgeThread:
    def __init__(self, settings: Settings, publisher, group: str) -> None:
        from bridges.metrics import BridgeMetrics

        self.stop = threading.Event()
        self.box: dict = {}
        self.metrics = BridgeMetrics(publisher.target)

        def run():
            try:
                self.box["stats"] = run_bridge(settings, publisher, group, stop_event=self.stop, metrics=self.metrics)
            except BaseException as exc:  # surfaced by finish()
                self.box["error"] = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self):
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "bridge did not stop"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["stats"]


def _per_camera_in_order(verdicts: list[dict], expected: list[InspectionResult]) -> None:
    ids = [v["frame_id"] for v in verdicts]
    assert sorted(ids) == sorted(r.frame_id for r in expected) and len(set(ids)) == len(ids), "each verdict once"
    for cam in {r.camera for r in expected}:
        seqs = [v["seq"] for v in verdicts if v["camera"] == cam]
        assert seqs == sorted(seqs), f"{cam} out of order: {seqs}"


@pytest.fixture
def mosquitto(tmp_path):
    from linewatch.kafka.broker import free_port
    from mqtt_broker import Mosquitto

    broker = Mosquitto(tmp_path / "mosquitto", free_port())
    broker.start()
    yield broker
    broker.stop()


class _Subscriber:
    """A QoS 1 subscriber with a persistent session (as a PLC gateway would run it)."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"plc-{port}", clean_session=False)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, json.loads(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
@pytest.mark.slow
def test_mqtt_bridge_every_verdict_once_in_order_across_a_broker_restart(kafka_settings, mosquitto):
    from bridges.mqtt import MqttPublisher

    settings = _with_target(kafka_settings, "mqtt", port=mosquitto.port)
    sub = _Subscriber(mosquitto.port, "linewatch/#")
    group = f"bridge-{kafka_settings.topics.results}"
    bridge = _BridgeThread(settings, MqttPublisher(settings.bridge.mqtt, 5.0), group)
    try:
        first = [_result(i, camera=f"cam{i % 3}") for i in range(30)]
        _produce_results(settings, first)
        _wait(lambda: len(sub.messages) >= 30, 60, "the first 30 verdicts")
        mosquitto.stop()
        second = [_result(i, camera=f"cam{i % 3}") for i in range(30, 60)]
        _produce_results(settings, second)
        time.sleep(4.0)  # the bridge retries meanwhile; these verdicts will be late (window 3 s)
        mosquitto.start()
        _wait(lambda: len(sub.messages) >= 60, 60, "all 60 verdicts after the restart")
        time.sleep(1.0)  # catch duplicates
        stats = bridge.finish()
    finally:
        sub.close()
    verdicts = [m for _, m in sub.messages]
    _per_camera_in_order(verdicts, first + second)
    assert {t for t, _ in sub.messages} == {f"linewatch/line-A/cam{k}/verdict" for k in range(3)}
    assert all(t.split("/")[2] == m["camera"] for t, m in sub.messages)
    assert not any(m["late"] for m in verdicts[:30]) and all(m["late"] for m in verdicts[30:])
    assert stats.published == 60 and stats.late == 30 and stats.outages == 1
    assert _committed_all(settings, group)
    text = bridge.metrics.registry
    from prometheus_client import generate_latest

    body = generate_latest(text).decode()
    assert 'linewatch_bridge_verdicts_total{target="mqtt",timing="late"} 30.0' in body
    assert "linewatch_bridge_capture_to_published_p99_ms" in body


@pytest.mark.integration
@pytest.mark.slow
def test_mqtt_bridge_cli_skips_a_bad_record_and_reports_latency(kafka_settings, mosquitto, capsys):
    from linewatch.cli.main import main as cli_main
    from linewatch.kafka.io import make_producer

    sub = _Subscriber(mosquitto.port, "plant/#")
    results = [_result(i, camera="camX") for i in range(5)]
    _produce_results(kafka_settings, results[:2])
    p = make_producer(kafka_settings)
    p.send(kafka_settings.topics.results, b'{"frame_id": "broken"}', key=b"camX").get(30)
    p.close()
    _produce_results(kafka_settings, results[2:])
    import os

    env = {"LINEWATCH_TOPICS__RESULTS": kafka_settings.topics.results}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rc = cli_main(["bridge", "mqtt", "--bootstrap-servers", kafka_settings.kafka.bootstrap_servers,
                       "--port", str(mosquitto.port), "--topic-template", "plant/{camera}", "--max-records", "6",
                       "--group-id", f"cli-{kafka_settings.topics.results}", "--json"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and (out["published"], out["invalid"]) == (5, 1)
    assert out["capture_to_published_p50_ms"] <= out["capture_to_published_p99_ms"]
    _wait(lambda: len(sub.messages) >= 5, 20, "5 verdicts")
    sub.close()
    assert [m["seq"] for _, m in sub.messages] == [0, 1, 2, 3, 4]


@pytest.mark.integration
@pytest.mark.slow
def test_opcua_bridge_every_verdict_once_in_order_across_a_server_restart(kafka_settings):
    from bridges.opcua import OpcuaPublisher
    from linewatch.kafka.broker import free_port
    from opcua_server import OpcuaTestServer

    server = OpcuaTestServer(free_port())
    server.start()
    settings = _with_target(kafka_settings, "opcua", endpoint=server.endpoint, username="linewatch",
                            password=SecretStr("s3cret-pw"))
    group = f"opcua-{kafka_settings.topics.results}"
    bridge = _BridgeThread(settings, OpcuaPublisher(settings.bridge.opcua, 5.0), group)
    try:
        first = [_result(i, camera=f"cam{i % 2}") for i in range(20)]
        _produce_results(settings, first)
        _wait(lambda: len(server.verdicts) >= 20, 60, "the first 20 verdicts")
        server.stop()
        second = [_result(i, camera=f"cam{i % 2}") for i in range(20, 40)]
        _produce_results(settings, second)
        time.sleep(4.0)
        server.start()  # a fresh server: the bridge creates its nodes again
        _wait(lambda: len(server.verdicts) >= 40, 60, "all 40 verdicts after the restart")
        time.sleep(1.0)
        stats = bridge.finish()
    finally:
        server.stop()
    _per_camera_in_order(server.verdicts, first + second)
    assert not any(v["late"] for v in server.verdicts[:20]) and all(v["late"] for v in server.verdicts[20:])
    assert stats.published == 40 and stats.outages == 1 and _committed_all(settings, group)


@pytest.mark.integration
def test_opcua_wrong_password_is_one_clear_line():
    from bridges.opcua import OpcuaPublisher
    from linewatch.kafka.broker import free_port
    from linewatch.settings import OpcuaSettings
    from opcua_server import OpcuaTestServer

    server = OpcuaTestServer(free_port())
    server.start()
    try:
        for user, pw in ((None, None), ("linewatch", "wrong")):
            pub = OpcuaPublisher(OpcuaSettings(endpoint=server.endpoint, username=user, password=pw), 5.0)
            with pytest.raises(PublishError, match="BadUserAccessDenied|BadIdentityToken"):
                pub.connect()
            pub.close()
    finally:
        server.stop()
