"""Security properties (issue 7): Kafka SSL/SASL settings reach every client, services bind to
loopback by default, profiles are never unpickled, SQL filter values are always parameters.

The Kafka client tests replace kafka-python's constructors with recorders: what is checked is
the exact keyword arguments linewatch hands to kafka-python, i.e. what would reach the broker.
"""

from __future__ import annotations

import io
import json
import os
import pickle  # only to BUILD hostile payloads; linewatch itself must never unpickle
import re
import socket
import zipfile
from pathlib import Path
from typing import Any

import pytest

from linewatch.settings import KafkaSettings, Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("linewatch", "workers", "producers", "calibration", "dashboard")


# ---------------------------------------------------------------------------------------------
# Kafka SSL and SASL settings reach every client
class _Recorder:
    """Stands in for a kafka-python client class: records the kwargs, builds nothing."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        type(self).calls.append((type(self).__name__, kwargs))
        self.config = kwargs

    def subscribe(self, topics):  # KafkaConsumer
        self.topics = topics

    def close(self, *a, **k):
        pass


@pytest.fixture
def recorded_clients(monkeypatch):
    import kafka
    import kafka.admin

    calls: list[tuple[str, dict[str, Any]]] = []
    classes = {}
    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
        classes[name] = type(name, (_Recorder,), {"calls": calls})
    monkeypatch.setattr(kafka, "KafkaProducer", classes["KafkaProducer"])
    monkeypatch.setattr(kafka, "KafkaConsumer", classes["KafkaConsumer"])
    monkeypatch.setattr(kafka.admin, "KafkaAdminClient", classes["KafkaAdminClient"])
    monkeypatch.setattr(kafka, "KafkaAdminClient", classes["KafkaAdminClient"], raising=False)
    return calls


def _make_all(settings: Settings | KafkaSettings) -> None:
    from linewatch.kafka.io import make_admin, make_consumer, make_producer

    make_producer(settings)
    make_consumer(settings, "g1", ["frames"])
    make_admin(settings)


SSL_SASL_ENV = {
    "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": "kafka-a.plant:9094,kafka-b.plant:9094",
    "LINEWATCH_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "LINEWATCH_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    "LINEWATCH_KAFKA__SASL_PLAIN_USERNAME": "line-7",
    "LINEWATCH_KAFKA__SASL_PLAIN_PASSWORD": "s3cr3t-pw",
    "LINEWATCH_KAFKA__SSL_CAFILE": "/etc/linewatch/ca.pem",
    "LINEWATCH_KAFKA__SSL_CERTFILE": "/etc/linewatch/client.pem",
    "LINEWATCH_KAFKA__SSL_KEYFILE": "/etc/linewatch/client.key",
    "LINEWATCH_KAFKA__SSL_PASSWORD": "key-pw",
    "LINEWATCH_KAFKA__SSL_CHECK_HOSTNAME": "true",
}
EXPECTED_SSL_SASL = {
    "bootstrap_servers": ["kafka-a.plant:9094", "kafka-b.plant:9094"],
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": "line-7",
    "sasl_plain_password": "s3cr3t-pw",
    "ssl_cafile": "/etc/linewatch/ca.pem",
    "ssl_certfile": "/etc/linewatch/client.pem",
    "ssl_keyfile": "/etc/linewatch/client.key",
    "ssl_password": "key-pw",
    "ssl_check_hostname": True,
}


def test_sasl_ssl_from_env_reaches_producer_consumer_and_admin(monkeypatch, recorded_clients):
    for k, v in SSL_SASL_ENV.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()
    _make_all(settings)
    kinds = [name for name, _ in recorded_clients]
    assert kinds == ["KafkaProducer", "KafkaConsumer", "KafkaAdminClient"]
    for name, kwargs in recorded_clients:
        for key, value in EXPECTED_SSL_SASL.items():
            assert kwargs.get(key) == value, f"{name}: {key}={kwargs.get(key)!r}, expected {value!r}"


@pytest.mark.parametrize(
    "protocol, present, absent",
    [
        ("SSL", {"ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname"},
         {"sasl_mechanism", "sasl_plain_username", "sasl_plain_password"}),
        ("SASL_PLAINTEXT", {"sasl_mechanism", "sasl_plain_username", "sasl_plain_password"},
         {"ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password"}),
        ("PLAINTEXT", set(), {"sasl_mechanism", "sasl_plain_password", "ssl_cafile", "ssl_password"}),
    ],
)
def test_each_protocol_passes_exactly_its_own_settings(recorded_clients, protocol, present, absent):
    ks = KafkaSettings(
        security_protocol=protocol, sasl_mechanism="PLAIN", sasl_plain_username="u", sasl_plain_password="p",
        ssl_cafile=Path("/ca.pem"), ssl_certfile=Path("/c.pem"), ssl_keyfile=Path("/k.pem"), ssl_password="kp",
        ssl_check_hostname=False,
    )
    _make_all(Settings(kafka=ks))
    assert len(recorded_clients) == 3
    for name, kwargs in recorded_clients:
        assert kwargs["security_protocol"] == protocol, name
        assert present <= set(kwargs), f"{name} lacks {present - set(kwargs)}"
        assert not (absent & set(kwargs)), f"{name} got settings of another protocol: {absent & set(kwargs)}"
        if "ssl_check_hostname" in present:
            assert kwargs["ssl_check_hostname"] is False


def test_overrides_do_not_drop_security_settings(recorded_clients):
    """Services pass overrides (client_id, max_poll_records...); security must survive them."""
    from linewatch.kafka.io import make_consumer, make_producer

    ks = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_plain_username="u",
                       sasl_plain_password="p", ssl_cafile=Path("/ca.pem"))
    make_producer(ks, client_id="x-sink", linger_ms=1)
    make_consumer(ks, "grp", ["results"], client_id="x-sink", max_poll_records=7)
    for name, kwargs in recorded_clients:
        assert kwargs["security_protocol"] == "SASL_SSL", name
        assert kwargs["sasl_plain_password"] == "p", name
        assert kwargs["ssl_cafile"] == "/ca.pem", name


def test_secrets_are_not_in_settings_repr():
    ks = KafkaSettings(security_protocol="SASL_SSL", sasl_plain_password="s3cr3t-pw", ssl_password="key-pw")
    text = repr(ks) + str(ks) + repr(Settings(kafka=ks))
    assert "s3cr3t-pw" not in text and "key-pw" not in text


_CLIENTS = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient"}


def test_no_service_builds_kafka_clients_around_the_helpers():
    """A client built directly (not through linewatch.kafka.io) would silently skip the
    SSL/SASL settings: every construction must go through make_producer/consumer/admin."""
    import ast

    offenders = []
    for d in SOURCE_DIRS:
        for path in (REPO / d).rglob("*.py"):
            if path.relative_to(REPO).as_posix() == "linewatch/kafka/io.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                    if name in _CLIENTS:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}(...)")
    assert not offenders, "Kafka clients built outside linewatch.kafka.io:\n" + "\n".join(offenders)


# ---------------------------------------------------------------------------------------------
# services bind 127.0.0.1 by default
def test_default_bind_addresses_are_loopback():
    s = Settings()
    assert s.dashboard.host == "127.0.0.1"
    assert s.worker.metrics_host == "127.0.0.1"
    assert s.broker.host == "127.0.0.1"
    assert s.kafka.bootstrap_servers.split(":")[0] == "127.0.0.1"


def test_rendered_broker_properties_listen_on_loopback_only(tmp_path):
    from linewatch.kafka.broker import Broker
    from linewatch.settings import BrokerSettings

    b = Broker(BrokerSettings(home=tmp_path / "broker", port=19092, controller_port=19093))
    b._render_config()
    props = dict(
        line.split("=", 1) for line in b.properties_file.read_text().splitlines()
        if line.strip() and not line.startswith("#") and "=" in line
    )
    for key in ("listeners", "advertised.listeners"):
        for listener in props[key].split(","):
            host = listener.split("://", 1)[1].rsplit(":", 1)[0]
            assert host == "127.0.0.1", f"{key}: {listener}"
    assert props["controller.quorum.bootstrap.servers"].startswith("127.0.0.1:")
    assert props["auto.create.topics.enable"] == "false"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_ip() -> str | None:
    """An address of this machine that is not loopback (None when it has none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_worker_metrics_endpoint_binds_loopback_by_default():
    metrics = pytest.importorskip("workers.metrics")
    port = _free_port()
    m = metrics.WorkerMetrics("w-sec", port=port)  # host left at its default
    try:
        server = m._server
        assert server is not None, "metrics server did not start"
        assert server.server_address[0] == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        other = _non_loopback_ip()
        if other:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=1).close()
    finally:
        m.close()


def test_dashboard_cli_passes_loopback_to_streamlit():
    """`linewatch dashboard` must hand Streamlit the configured host (127.0.0.1 by default)."""
    path = REPO / "dashboard" / "cli.py"
    if not path.is_file():
        pytest.skip("dashboard/cli.py not written yet")
    text = path.read_text(encoding="utf-8")
    assert "server.address" in text or "serverAddress" in text, \
        "dashboard/cli.py never sets Streamlit's server.address: Streamlit binds 0.0.0.0 by default"


# ---------------------------------------------------------------------------------------------
# a profile crafted to execute code when unpickled is refused, nothing executes
class _Evil:
    """Unpickling this creates ``marker`` (a harmless but observable side effect)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payloads(marker: Path) -> dict[str, bytes]:
    import torch

    buf = io.BytesIO()
    torch.save({"mean": _Evil(marker)}, buf)  # torch's zip format: a pickle inside
    return {
        "pickle-p0": pickle.dumps(_Evil(marker), protocol=0),  # ASCII
        "pickle-p2": pickle.dumps(_Evil(marker), protocol=2),
        "pickle-p5": pickle.dumps(_Evil(marker), protocol=5),
        "torch-save": buf.getvalue(),
    }


def test_payloads_are_live(tmp_path):
    """Guard against a vacuous test: each payload really runs code when unpickled."""
    import torch

    for name in _payloads(tmp_path / "unused"):
        probe = tmp_path / f"probe-{name}"
        data = _payloads(probe)[name]
        if name == "torch-save":
            torch.load(io.BytesIO(data), weights_only=False)  # deliberately unsafe, in the test only
        else:
            pickle.loads(data)
        assert probe.exists(), f"payload {name} did not execute when unpickled"


def _published_registry(root: Path):
    """A registry with one real, tiny, loadable profile, published through the public API
    (the trivial meandiff family: no backbone needed, so this stays fast)."""
    import numpy as np

    from linewatch.models.meandiff import MeanDiff
    from linewatch.profiles import Profile, Registry

    reg = Registry(root)
    imgs = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    model = MeanDiff(input_size=64).fit(imgs, progress=False)
    prof = Profile(product="widget", model_kind="meandiff", backbone="none", input_size=64,
                   threshold=0.2, threshold_method="manual")
    reg.publish(prof, model, export_onnx=False)
    return reg


@pytest.mark.parametrize("target", ["weights.safetensors", "model.json", "profile.json"])
@pytest.mark.parametrize("payload", ["pickle-p0", "pickle-p2", "pickle-p5", "torch-save"])
def test_pickled_profile_file_is_refused_without_executing(tmp_path, target, payload):
    from linewatch.profiles import ProfileError

    reg = _published_registry(tmp_path / "reg")
    reg.load("widget")  # the untouched profile loads
    marker = tmp_path / "PWNED"
    (reg.version_dir("widget", 1) / target).write_bytes(_payloads(marker)[payload])
    with pytest.raises(ProfileError) as info:
        reg.load("widget")
    assert not marker.exists(), f"loading a {payload} {target} EXECUTED the payload"
    msg = str(info.value)
    assert target in msg, f"the error should name the file: {msg}"
    assert "\n" not in msg.strip()


def test_torch_load_is_always_weights_only_and_pickle_is_never_imported():
    """House rule: no pickle anywhere; torch.load only with weights_only=True."""
    bad = []
    for d in SOURCE_DIRS:
        for path in (REPO / d).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for n, line in enumerate(text.splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"^\s*(import\s+(c?pickle|dill|joblib|shelve)\b|from\s+(c?pickle|dill|joblib|shelve)\s+import)", code):
                    bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
                if "allow_pickle=True" in code:
                    bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
            for m in re.finditer(r"torch\.load\s*\(", text):
                call = text[m.start(): m.start() + 300]
                depth, end = 0, None
                for i, ch in enumerate(call):
                    depth += ch == "("
                    depth -= ch == ")"
                    if depth == 0 and ch == ")":
                        end = i
                        break
                if "weights_only=True" not in call[: end or len(call)]:
                    n = text[: m.start()].count("\n") + 1
                    bad.append(f"{path.relative_to(REPO)}:{n}: torch.load without weights_only=True")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# SQL: hostile filter values are data, never SQL
HOSTILE = [
    "widget' OR '1'='1",
    "x'); DROP TABLE inspections; --",
    "'; DELETE FROM inspections; SELECT '",
    "widget\" OR 1=1 --",
    "%",
    "*",
    "\\' OR 1=1; --",
    "widget\x00",
    "' UNION SELECT frame_id, frame_id, frame_id FROM inspections --",
]


@pytest.fixture
def dashboard_db(tmp_path):
    pytest.importorskip("dashboard.queries")
    from result_factory import known_dataset, write_db

    from linewatch.messages import now_ms

    path = tmp_path / "lw.duckdb"
    rows = known_dataset(now_ms())
    write_db(path, rows)
    return path, rows


def test_hostile_filter_values_match_nothing_and_change_nothing(dashboard_db):
    from dashboard.queries import Filters, load_snapshot

    from linewatch import store

    path, rows = dashboard_db
    baseline = load_snapshot(path, Filters())
    assert baseline.kpis["frames"] == len(rows)
    for value in HOSTILE:
        for field in ("products", "cameras", "lines"):
            snap = load_snapshot(path, Filters(**{field: [value]}))
            assert snap.kpis["frames"] == 0, f"{field}={value!r} matched rows: it was read as SQL"
            assert snap.gallery == []
            assert int(snap.categories["defects"].sum()) == 0
        # a hostile value next to a real one: exactly the real one's rows
        snap = load_snapshot(path, Filters(products=["widget", value]))
        assert snap.kpis["frames"] == sum(r.product == "widget" for r in rows)
    assert store.count_rows(path) == len(rows), "a hostile filter modified the table"
    assert load_snapshot(path, Filters()).kpis == baseline.kpis


def test_breakdown_column_is_whitelisted(dashboard_db):
    from dashboard.queries import Filters, breakdown

    from linewatch import store

    path, rows = dashboard_db
    with store.reading(path) as con:
        for bad in ("product; DROP TABLE inspections", "product FROM inspections --", "frame_id"):
            with pytest.raises(ValueError):
                breakdown(con, Filters(), bad)
    assert store.count_rows(path) == len(rows)


def test_hostile_values_are_stored_verbatim_by_the_sink_store(tmp_path):
    """Hostile strings arriving in results (product, camera, reason) are stored as data."""
    from result_factory import make_result

    from linewatch import store
    from linewatch.messages import DlqRecord

    path = tmp_path / "lw.duckdb"
    store.init_db(path)
    # ids are pattern-checked by FrameHeaders upstream; the store must still be safe on its own
    r = make_result(1, product="p'); DROP TABLE inspections; --", camera="c' OR '1'='1", line="l\"--")
    dlq = store.DlqEvent(DlqRecord(frame_id="f'--", reason="'); DROP TABLE dlq_events; --", stage="decode",
                                   worker_id="w", source_topic="frames", source_partition=0, source_offset=1))
    with store.writing(path) as con:
        store.write_batch(con, [r], dlq=[dlq])
    with store.reading(path) as con:
        got = con.execute("SELECT product, camera, line FROM inspections").fetchall()
        reasons = con.execute("SELECT reason FROM dlq_events").fetchall()
    assert got == [(r.product, r.camera, r.line)]
    assert reasons == [("'); DROP TABLE dlq_events; --",)]


@pytest.mark.parametrize("content", ["[]", '"padim"', '{"kind": "meandiff"}', '{"kind": "meandiff", "input_size": "x"}',
                                     '{"kind": "meandiff", "input_size": 64, "backbone": "none", "options": {"evil": 1}}',
                                     '{"kind": "os:system", "input_size": 64, "backbone": "none"}'])
def test_malformed_model_json_is_a_profile_error(tmp_path, content):
    """A model.json that is JSON but not a model config must end in ProfileError naming the
    file (what the CLI prints as one line), not KeyError/AttributeError/TypeError."""
    from linewatch.profiles import ProfileError

    reg = _published_registry(tmp_path / "reg")
    (reg.version_dir("widget", 1) / "model.json").write_text(content)
    with pytest.raises(ProfileError):
        reg.load("widget")
