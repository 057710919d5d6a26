"""Security against a real secured broker (issue 26): SASL_SSL with SCRAM-SHA-512 users, a
certificate from linewatch's local CA, KRaft's StandardAuthorizer denying what no ACL grants.

One secured broker for the module. What is proven here, not assumed:
- every bad input (wrong password, unknown user, no CA, a certificate for another host, the
  producer's credential used on ``results``) fails with one line naming the cause, within a
  bound, and writes nothing; the worker and the sink exit 2 on such a refusal instead of spinning;
- the ACL matrix: each role x each topic x read / write, attempted for real;
- no password in any repr, client log or broker log.
The figures land in test-artifacts/security/*.json; docs/results/security.md has them. The
end-to-end run and the broker restart on a secured broker are tests/faults/test_secured.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from linewatch.kafka.acls import READ, ROLE_GRANTS, WRITE, bindings, group_id, role_topics
from linewatch.kafka.security import BROKER_ROLE, ROLES
from linewatch.settings import Settings, TopicSettings

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "security"
TOPIC_FIELDS = ("frames", "results", "dlq", "alerts", "profiles", "reviews")
BOUND_S = 10.0  # a refusal must be reported well within the 15 s connect timeout

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def _record(name: str, key: str, value) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# the broker, its topics and ACLs, one probe record per topic
@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    from linewatch.kafka.acls import apply_acls
    from linewatch.kafka.broker import temporary_broker
    from linewatch.kafka.io import ensure_topics, make_admin

    home = tmp_path_factory.mktemp("secured-broker")
    with temporary_broker(home, heap_mb=384, start_timeout_s=120, secured=True, stop_timeout_s=20) as broker:
        settings = Settings(kafka=broker.kafka_settings(), topics=TopicSettings(frames_partitions=2,
                                                                                results_partitions=1))
        admin = make_admin(settings)
        try:
            apply_acls(admin, bindings(settings, broker.secrets.users()))
        finally:
            admin.close()
        ensure_topics(settings.model_copy(update={"kafka": broker.kafka_settings("admin")}), timeout_s=60)
        producer = _producer(broker.kafka_settings())
        for field in TOPIC_FIELDS:
            producer.send(getattr(settings.topics, field), b"probe", key=b"probe", partition=0).get(timeout=30)
        producer.close()
        yield broker, settings


def _producer(ks):
    from linewatch.kafka.io import make_producer

    return make_producer(ks, linger_ms=0)


def _as(broker, role: str, **kw) -> Settings:
    return Settings(kafka=broker.kafka_settings(role, connect_timeout_s=15, **kw),
                    topics=TopicSettings(frames_partitions=2, results_partitions=1))


def end_offsets(broker, topic: str) -> int:
    """Records on ``topic`` (all partitions), read as the broker's super user."""
    from kafka import TopicPartition

    from linewatch.kafka.io import make_consumer

    consumer = make_consumer(broker.kafka_settings(), None, None)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.end_offsets([TopicPartition(topic, p) for p in parts]).values())
    finally:
        consumer.close()


def try_write(settings: Settings, topic: str) -> tuple[bool, str]:
    """(allowed, what happened): one record sent and acknowledged, or the refusal line."""
    from linewatch.kafka.io import NotAuthorized, send_checked

    producer = _producer(settings)
    try:
        send_checked(producer, topic, b"acl-probe", key="probe", timeout=20)
        return True, "acknowledged"
    except NotAuthorized as exc:
        return False, str(exc)
    finally:
        producer.close(timeout=5)


def try_read(settings: Settings, topic: str, group: str | None, timeout_s: float = 20.0) -> tuple[bool, str]:
    """(allowed, what happened): the probe record fetched -- subscribed in ``group``, or with
    no group by assigning partition 0 -- or the refusal. A refused topic shows as NotAuthorized
    from the poll, or (no group, no DESCRIBE either) as the client's metadata marking it
    unauthorized; silence until the timeout is neither and fails the test."""
    from kafka import TopicPartition

    from linewatch.kafka.io import NotAuthorized, make_consumer, poll_records

    consumer = make_consumer(settings, group, [topic] if group else None, client_id=f"probe-{topic}")
    try:
        if not group:
            consumer.assign([TopicPartition(topic, 0)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                got = poll_records(consumer, 500)
            except NotAuthorized as exc:
                return False, str(exc)
            if any(recs for recs in got.values()):
                return True, "fetched"
            if topic in consumer._cluster.unauthorized_topics:  # kafka-python 3: metadata refused
                return False, f"metadata for {topic} refused (TopicAuthorizationFailed)"
        raise AssertionError(f"read of {topic} neither succeeded nor was refused within {timeout_s:g}s")
    finally:
        consumer.close()


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the cause, bounded, nothing written
def _bad_settings(broker, case: str) -> Settings:
    s = _as(broker, "producer")
    ks = s.kafka
    host, port = broker.bootstrap_servers.rsplit(":", 1)
    update = {
        "wrong password": {"sasl_password_file": None, "sasl_plain_password": SecretStr("not-the-password")},
        "unknown user": {"sasl_plain_username": "mallory"},
        "client without the CA": {"ssl_cafile": None},
        "certificate for another host": {"bootstrap_servers": f"localhost:{port}"},
    }[case]
    return s.model_copy(update={"kafka": ks.model_copy(update=update)})


BAD_CASES = {
    "wrong password": r"SASL SCRAM-SHA-512 login as 'linewatch-producer' refused .*invalid credentials",
    "unknown user": r"SASL SCRAM-SHA-512 login as 'mallory' refused .*invalid credentials",
    "client without the CA": r"TLS: the broker certificate at .* is not trusted by the system CAs .*SSL_CAFILE",
    "certificate for another host": r"TLS: the broker certificate at localhost:\d+ is not valid for 'localhost'",
    "producer credential writes results": r"not authorized: .*'linewatch-producer' write topic results",
    "producer credential reads results": r"not authorized: .*'linewatch-producer' join consumer group linewatch-sink",
    "producer credential reads results, no group": r"metadata for results refused",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_fast_with_one_line_and_writes_nothing(secured, case):
    from linewatch.errors import UserError

    broker, settings = secured
    before = {f: end_offsets(broker, getattr(settings.topics, f)) for f in TOPIC_FIELDS}
    t0 = time.monotonic()
    if case.startswith("producer credential reads"):
        group = "linewatch-sink" if "no group" not in case else None
        allowed, message = try_read(_as(broker, "producer"), settings.topics.results, group)
        assert not allowed
    elif case == "producer credential writes results":
        allowed, message = try_write(_as(broker, "producer"), settings.topics.results)
        assert not allowed
    else:
        with pytest.raises(UserError) as err:
            try_write(_bad_settings(broker, case), settings.topics.frames)
        message = str(err.value)
    elapsed = time.monotonic() - t0
    _record("bad_cases", case, {"message": message, "seconds": round(elapsed, 2)})
    assert re.search(BAD_CASES[case], message), message
    assert "\n" not in message
    assert elapsed < BOUND_S, f"{case}: {elapsed:.1f}s"
    after = {f: end_offsets(broker, getattr(settings.topics, f)) for f in TOPIC_FIELDS}
    assert after == before, f"{case} wrote something: {before} -> {after}"


def _service(broker, tmp_path, role: str, args: list[str], **kafka) -> tuple[subprocess.CompletedProcess, float]:
    """``linewatch <args>`` as ``role`` (kafka overrides on top), to its exit (bounded)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    ks = broker.kafka_settings(role, connect_timeout_s=15).model_copy(update=kafka)
    for key, value in ks.model_dump(exclude_defaults=True).items():
        env[f"LINEWATCH_KAFKA__{key.upper()}"] = str(value.get_secret_value() if isinstance(value, SecretStr) else value)
    env.update(LINEWATCH_HOME=str(tmp_path / "home"), LINEWATCH_STORAGE__DB_PATH=str(tmp_path / "lw.duckdb"),
               LINEWATCH_STORAGE__REGISTRY_DIR=str(tmp_path / "profiles"), LINEWATCH_TOPICS__FRAMES_PARTITIONS="2",
               LINEWATCH_TOPICS__RESULTS_PARTITIONS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    (tmp_path / "profiles").mkdir(exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "linewatch.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, time.monotonic() - t0


_PRODUCE = ["produce", "--source", "synthetic:cap", "--product", "cap", "--camera", "cam-x", "--max-frames", "3",
            "--size", "64", "--fps", "0"]
SERVICE_CASES = {
    "sink, wrong password": ("sink", ["sink"], {"sasl_password_file": None, "sasl_plain_password": "wrong"},
                             r"SASL SCRAM-SHA-512 login as 'linewatch-sink' refused"),
    "sink, producer credential": ("producer", ["sink"], {}, r"not authorized: .*'linewatch-producer' join consumer "
                                                            r"group linewatch-sink"),
    "worker, producer credential": ("producer", ["work", "--worker-id", "w-bad"], {},
                                    r"not authorized: .*'linewatch-producer' join consumer group linewatch-workers"),
    "worker, wrong password": ("worker", ["work", "--worker-id", "w-bad"], {"sasl_plain_username": "linewatch-worker",
                                                                           "sasl_password_file": None,
                                                                           "sasl_plain_password": "wrong"},
                               r"SASL SCRAM-SHA-512 login as 'linewatch-worker' refused"),
    "producer, worker credential": ("worker", _PRODUCE, {}, r"not authorized: .*'linewatch-worker' write topic frames"),
    "producer, sink credential": ("sink", _PRODUCE, {}, r"topic 'frames' does not exist .* ACLs hide it from user "
                                                        r"'linewatch-sink'"),
}


@pytest.mark.parametrize("case", list(SERVICE_CASES))
def test_worker_and_sink_exit_cleanly_on_a_refusal(secured, tmp_path, case):
    broker, _ = secured
    role, args, kafka, pattern = SERVICE_CASES[case]
    proc, elapsed = _service(broker, tmp_path, role, args, **kafka)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    _record("services", case, {"exit": proc.returncode, "seconds": round(elapsed, 1),
                               "last_line": lines[-1] if lines else ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    assert lines[-1].startswith("linewatch: error: ")


# ---------------------------------------------------------------------------------------------
# the ACL matrix, each cell attempted
def test_acl_matrix_role_x_topic_x_read_write(secured):
    broker, settings = secured
    cells: dict[str, dict[str, dict[str, str]]] = {}
    wrong = []
    before = {f: end_offsets(broker, getattr(settings.topics, f)) for f in TOPIC_FIELDS}
    writes: dict[str, int] = {f: 0 for f in TOPIC_FIELDS}
    for role in ROLES:
        granted = role_topics(settings, role)
        groups = ROLE_GRANTS[role].groups
        group = group_id(settings, groups[0]) if groups else None
        as_role = _as(broker, role)
        cells[role] = {}
        for field in TOPIC_FIELDS:
            topic = getattr(settings.topics, field)
            can_read, why_r = try_read(as_role, topic, group)
            can_write, why_w = try_write(as_role, topic)
            writes[field] += can_write
            cells[role][topic] = {"read": "allowed" if can_read else "denied",
                                  "write": "allowed" if can_write else "denied"}
            for kind, got, why in ((READ, can_read, why_r), (WRITE, can_write, why_w)):
                if got != (topic in granted[kind]):
                    wrong.append(f"{role} {kind} {topic}: {'allowed' if got else 'denied'} ({why})")
    _record("acl_matrix", "cells", cells)
    assert not wrong, "\n".join(wrong)
    after = {f: end_offsets(broker, getattr(settings.topics, f)) for f in TOPIC_FIELDS}
    assert {f: after[f] - before[f] for f in TOPIC_FIELDS} == writes  # a denied write left nothing


def test_acls_apply_idempotently(secured):
    from linewatch.kafka.acls import apply_acls, existing_acls
    from linewatch.kafka.io import make_admin

    broker, settings = secured
    admin = make_admin(broker.kafka_settings())
    try:
        wanted = bindings(settings, broker.secrets.users())
        assert apply_acls(admin, wanted) == []  # the fixture applied them: nothing new
        have = existing_acls(admin)
        assert {(b.principal, b.resource_type, b.name, b.operation, "*") for b in wanted} == have
    finally:
        admin.close()


def test_controller_listener_takes_only_the_broker_certificate(secured):
    """The KRaft controller listener is not advertised and requires a client certificate:
    a client with the right CA but no certificate is refused in the handshake."""
    import socket
    import ssl

    broker, _ = secured
    props = dict(line.split("=", 1) for line in broker.properties_file.read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    assert "CONTROLLER" not in props["advertised.listeners"]
    assert props["listener.security.protocol.map"].split(",")[0] == "CONTROLLER:SSL"
    ctx = ssl.create_default_context(cafile=str(broker.secrets.ca_cert))
    with socket.create_connection((broker.settings.host, broker.settings.controller_port), timeout=10) as raw:
        # TLS 1.3: the client's handshake completes, the server's "certificate required" alert
        # arrives with the first read (a listener without client auth would just wait: timeout)
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|HANDSHAKE_FAILURE|certificate"):
            with ctx.wrap_socket(raw, server_hostname=broker.settings.host) as tls:
                tls.recv(1)


# ---------------------------------------------------------------------------------------------
# secrets never in reprs or logs
def test_passwords_never_in_reprs_client_logs_or_broker_log(secured, caplog):
    from linewatch.kafka.io import make_consumer

    broker, settings = secured
    passwords = {role: broker.secrets.password(role) for role in (*ROLES, BROKER_ROLE)}
    ks = broker.kafka_settings("sink")
    inline = ks.model_copy(update={"sasl_password_file": None, "sasl_plain_password": SecretStr(passwords["sink"])})
    # the kafka logger's own level too: an in-process `linewatch` main() earlier in the session
    # (tests/test_cli_help.py) sets it to ERROR
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="kafka"):
        for k in (ks, inline):
            consumer = make_consumer(k, "linewatch-sink", [settings.topics.results])
            consumer.poll(timeout_ms=2000)
            consumer.close()
    texts = {
        "reprs": " ".join(repr(x) + str(x) for x in (ks, inline, Settings(kafka=inline), inline.model_dump(),
                                                       inline.model_dump_json())),
        "client log": caplog.text,
        "broker log": broker.log_file.read_text(errors="replace"),
    }
    assert "Authenticated as linewatch-sink" in caplog.text  # the log was really captured
    for where, text in texts.items():
        for role, pw in passwords.items():
            assert pw not in text, f"{role}'s password in the {where}"
    assert broker.secrets.keystore_password() not in texts["broker log"]


# ---------------------------------------------------------------------------------------------
# no broker needed
def test_every_role_has_a_grant_and_a_topic_settings_lack_is_skipped():
    settings = Settings()
    assert set(ROLE_GRANTS) == set(ROLES)
    assert role_topics(settings, "dashboard")[WRITE] == {"reviews"}
    assert role_topics(settings, "sink")[READ] == {"results", "frames.dlq", "reviews"}

    class WithoutReviews(TopicSettings):  # an older settings file: the grant is skipped, not an error
        reviews: str | None = None

    older = settings.model_copy(update={"topics": WithoutReviews()})
    assert role_topics(older, "dashboard")[WRITE] == set()
    got = {(b.role, b.resource_type, b.name, b.operation) for b in bindings(settings, {r: r for r in ROLES})}
    assert ("producer", "TOPIC", "frames", "WRITE") in got
    assert ("worker", "GROUP", "linewatch-workers", "READ") in got and ("sink", "GROUP", "linewatch-sink", "READ") in got
    assert ("bridge", "GROUP", "linewatch-bridge-mqtt", "READ") in got and ("bridge", "TOPIC", "results", "READ") in got
    assert not any(r == "producer" and op == "READ" for r, _, _, op in got)
    assert not any(r == "admin" and op in ("READ", "WRITE") for r, _, _, op in got)


def test_secrets_are_owner_only_and_the_certificate_names_the_host(tmp_path):
    from cryptography import x509

    from linewatch.kafka.security import BrokerSecrets, SecurityError, default_users, scram_format_arg

    s = BrokerSecrets(tmp_path / "security")
    made = s.ensure("127.0.0.1", default_users())
    assert made[0] == "CA" and len(made) == 3
    assert s.ensure("127.0.0.1", default_users()) == []  # idempotent
    assert oct(s.root.stat().st_mode & 0o777) == "0o700"
    for path in s.root.iterdir():
        if path.name != "ca.pem":
            assert oct(path.stat().st_mode & 0o777) == "0o600", path
    assert s.ensure("kafka.plant", default_users()) == ["broker certificate for kafka.plant"]  # reissued
    from cryptography.hazmat.primitives.serialization import pkcs12

    cert = pkcs12.load_pkcs12(s.keystore.read_bytes(), s.keystore_password().encode()).cert.certificate
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["kafka.plant"]
    with pytest.raises(SecurityError, match="formatted with users"):
        s.ensure("kafka.plant", {"producer": "someone-else"})
    arg = scram_format_arg("linewatch-worker", "pw")
    assert arg.startswith("SCRAM-SHA-512=[name=linewatch-worker,iterations=8192,salt=") and "pw\"" not in arg
    with pytest.raises(SecurityError):
        scram_format_arg("bad,name", "pw")


def test_a_home_formatted_plaintext_is_not_started_secured(tmp_path):
    from linewatch.kafka.broker import Broker, BrokerError
    from linewatch.settings import BrokerSettings

    data = tmp_path / "b" / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_text("formatted\n")
    with pytest.raises(BrokerError, match="formatted plaintext, settings ask for secured"):
        Broker(BrokerSettings(home=tmp_path / "b", secured=True))._format_storage()


def test_sasl_password_file_is_read_and_never_shown(tmp_path):
    from linewatch.errors import UserError
    from linewatch.settings import KafkaSettings

    f = tmp_path / "pw"
    f.write_text("file-s3cret\n")
    ks = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_plain_username="u",
                       sasl_password_file=f)
    assert ks.client_config()["sasl_plain_password"] == "file-s3cret"
    assert "file-s3cret" not in repr(ks) + str(ks) + ks.model_dump_json()
    with pytest.raises(UserError, match="cannot read it"):
        ks.model_copy(update={"sasl_password_file": tmp_path / "missing"}).client_config()
