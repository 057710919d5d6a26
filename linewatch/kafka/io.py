"""Kafka client helpers shared by every service (producers, workers, sink, calibration).

Why one place: the 10 MB message limit has to be raised on the producer, the consumer and
the topic together, deliveries must be checked (an oversized record otherwise fails
quietly), and an unreachable broker must end in a clear error after a bounded wait instead
of a hang. Each service gets that by calling these functions instead of building clients.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from linewatch.errors import UserError
from linewatch.kafka.access import AccessDenied, check_access
from linewatch.settings import KafkaSettings, Settings

if TYPE_CHECKING:  # kafka-python is imported lazily so `linewatch --help` stays fast
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.producer.future import FutureRecordMetadata, RecordMetadata

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


class KafkaIOError(UserError):
    """A Kafka operation failed in a way the user must act on (one-line message)."""


class BrokerUnavailable(KafkaIOError):
    """No broker answered at the configured bootstrap servers within the bound."""

    reason: BaseException | None = None


class DeliveryError(KafkaIOError):
    """A record was not acknowledged by the broker."""


class NotAuthorized(DeliveryError):
    """The broker's ACLs do not let this principal use the topic (or group): never retried."""


_REFUSED = re.compile(r"\b(Topic|Group|Cluster|TransactionalId)AuthorizationFailedError\b")


def _refusal_kind(exc: BaseException) -> str | None:
    """``TopicAuthorizationFailedError`` and the like, also when kafka-python wraps it in a
    plain KafkaError (an idempotent producer's InitProducerId refused); None: not an ACL refusal."""
    from kafka import errors

    if isinstance(exc, errors.AuthorizationError) or _REFUSED.fullmatch(type(exc).__name__):
        return type(exc).__name__
    m = _REFUSED.search(str(exc)) if isinstance(exc, errors.KafkaError) else None
    return m.group(0) if m else None


def _not_authorized(exc: BaseException) -> bool:
    return _refusal_kind(exc) is not None


def refusal(exc: BaseException, client: Any, what: str = "") -> NotAuthorized:
    """One line naming who (the client's SASL user) was refused what (``what``, else the topic
    or group the error names)."""
    user = (getattr(client, "config", None) or {}).get("sasl_plain_username")
    who = f"user {user!r}" if user else "this client"
    names = exc.args[0] if exc.args else ""
    if not isinstance(names, (str, bytes)):
        names = ", ".join(sorted(map(str, names)))
    names = str(names).split(": ")[-1].strip()
    kind = _refusal_kind(exc) or type(exc).__name__
    if kind.startswith("Cluster"):
        what = f"{what + ': ' if what else ''}an idempotent producer needs WRITE on some topic"
    if not what:
        what = (f"join consumer group {names or '(unnamed)'}" if kind.startswith("Group") else
                f"use topic {names or '(unnamed)'}" if kind.startswith("Topic") else
                "do this")
    return NotAuthorized(f"not authorized: the broker's ACLs do not let {who} {what} ({kind}); each role's "
                         "ACLs: docs/security.md (linewatch broker acls)")


def _check_access(ks: KafkaSettings, timeout_s: float) -> None:
    """Before a client of a secured cluster is built: refuse at once, naming the cause, when
    TLS or SASL would fail (linewatch.kafka.access); PLAINTEXT costs nothing."""
    if ks.security_protocol != "PLAINTEXT":
        check_access(ks, timeout_s=min(timeout_s, 10.0))


class RecordTooLarge(DeliveryError):
    """A record is over the message size limit; the caller may skip it and go on."""


def _kafka_settings(settings: Settings | KafkaSettings) -> KafkaSettings:
    return settings.kafka if isinstance(settings, Settings) else settings


def _unavailable(ks: KafkaSettings, timeout_s: float, exc: BaseException | None = None) -> BrokerUnavailable:
    while isinstance(exc, BrokerUnavailable):
        exc = exc.reason
    why = ""
    if exc is not None:
        text = " ".join(str(exc).split())
        why = f" ({text if text.startswith(type(exc).__name__) else f'{type(exc).__name__}: {text}'})"
    err = BrokerUnavailable(
        f"Kafka broker not reachable at {ks.bootstrap_servers} within {timeout_s:g}s{why}; "
        "start one with `linewatch broker start` or set LINEWATCH_KAFKA__BOOTSTRAP_SERVERS"
    )
    err.reason = exc
    return err


def _is_unreachable(exc: BaseException) -> bool:
    from kafka import errors

    kinds = tuple(
        getattr(errors, name)
        for name in ("KafkaTimeoutError", "NoBrokersAvailable", "KafkaConnectionError")
        if hasattr(errors, name)
    )
    return isinstance(exc, kinds)


def _is_transient(exc: BaseException) -> bool:
    """A Kafka error that a running service should ride out (broker restarting, leader moving)."""
    from kafka import errors

    return _is_unreachable(exc) or (isinstance(exc, errors.KafkaError) and bool(getattr(exc, "retriable", False)))


_last_poll_warning = [0.0]


def poll_records(consumer: "KafkaConsumer", timeout_ms: int, max_records: int | None = None,
                 backoff_s: float = 0.5) -> dict:
    """``consumer.poll`` that survives a broker going away: kafka-python 3 raises connection
    errors out of ``poll`` while it cannot reach the coordinator (seen when the broker is
    restarted under a running sink), where a service must keep waiting, not die. Transient
    errors are logged (at most every 10 s), slept off for ``backoff_s`` and give an empty poll;
    an ACL refusal raises NotAuthorized (one line); anything else propagates."""
    try:
        return consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    except Exception as exc:  # noqa: BLE001 - filtered right below
        if _not_authorized(exc):
            raise refusal(exc, consumer) from None  # retrying will not change the ACLs
        if not _is_transient(exc):
            raise
        now = time.monotonic()
        if now - _last_poll_warning[0] > 10:
            _last_poll_warning[0] = now
            log.warning("kafka poll: %s: %s; retrying", type(exc).__name__, exc)
        time.sleep(min(backoff_s, max(timeout_ms, 1) / 1000))
        return {}


class IdleClock:
    """``idle_timeout_s`` without records, counted from when the group first gave the consumer
    partitions (joining can take seconds; that is not idleness). None: never idle. Shared by
    the sink and the bridges, whose ``--idle-timeout`` means the same."""

    def __init__(self, consumer: "KafkaConsumer", idle_timeout_s: float | None) -> None:
        self.consumer, self.timeout_s = consumer, idle_timeout_s
        self._assigned = False
        self._last = time.monotonic()

    def records(self) -> None:
        """A poll returned records."""
        self._last = time.monotonic()

    def expired(self) -> bool:
        """After an empty poll: has the consumer been idle too long?"""
        if self.timeout_s is None:
            return False
        if not self._assigned:
            self._assigned = bool(self.consumer.assignment())
            self._last = time.monotonic()
            return False
        return time.monotonic() - self._last > self.timeout_s


def quiet_kafka_logs(verbose: int = 0) -> None:
    """kafka-python logs every refused connection at ERROR; our own errors say it once.
    CLIs call this so a down broker prints one line, not a screenful (-vv shows them)."""
    logging.getLogger("kafka").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


def make_producer(settings: Settings | KafkaSettings, **overrides: Any) -> "KafkaProducer":
    """An idempotent acks=all producer with the 10 MB request limit.

    Raises BrokerUnavailable when no broker answers within ``connect_timeout_s``.
    ``overrides`` go straight to KafkaProducer (e.g. ``linger_ms``, ``client_id``).
    """
    from kafka import KafkaProducer

    ks = _kafka_settings(settings)
    _check_access(ks, ks.connect_timeout_s)
    cfg: dict[str, Any] = ks.client_config()
    cfg.update(
        acks="all",
        enable_idempotence=True,
        max_request_size=ks.max_message_bytes,
        retries=10,  # bounded; delivery_timeout_ms bounds the total time as well
        max_in_flight_requests_per_connection=5,
        linger_ms=5,
        batch_size=1_048_576,  # several ~150 kB frames per request: ~2x frames/s vs the 16 kB default
        delivery_timeout_ms=max(ks.request_timeout_ms + 5_000, 60_000),
        max_block_ms=int(ks.connect_timeout_s * 1000),
        bootstrap_timeout_ms=int(ks.connect_timeout_s * 1000),
    )
    cfg.update(overrides)
    try:
        return KafkaProducer(**cfg)
    except Exception as exc:
        if _is_unreachable(exc):
            raise _unavailable(ks, cfg["bootstrap_timeout_ms"] / 1000, exc) from None
        raise


def make_consumer(
    settings: Settings | KafkaSettings,
    group_id: str | None,
    topics: Sequence[str] | None = None,
    **overrides: Any,
) -> "KafkaConsumer":
    """A manual-commit consumer (commit only after the next hop has the data) that accepts
    10 MB records. ``topics`` empty/None -> not subscribed (call ``assign`` yourself)."""
    from kafka import KafkaConsumer

    ks = _kafka_settings(settings)
    _check_access(ks, ks.connect_timeout_s)
    cfg: dict[str, Any] = ks.client_config()
    cfg.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=ks.max_message_bytes,
        fetch_max_bytes=max(52_428_800, ks.max_message_bytes),
        bootstrap_timeout_ms=int(ks.connect_timeout_s * 1000),
        allow_auto_create_topics=False,
    )
    cfg.update(overrides)
    try:
        consumer = KafkaConsumer(**cfg)
    except Exception as exc:
        if _is_unreachable(exc):
            raise _unavailable(ks, cfg["bootstrap_timeout_ms"] / 1000, exc) from None
        raise
    if topics:
        consumer.subscribe(list(topics))
    return consumer


def make_admin(settings: Settings | KafkaSettings, timeout_s: float | None = None):
    """A KafkaAdminClient; BrokerUnavailable after ``timeout_s`` (default connect_timeout_s)."""
    from kafka.admin import KafkaAdminClient

    ks = _kafka_settings(settings)
    timeout_s = ks.connect_timeout_s if timeout_s is None else timeout_s
    _check_access(ks, timeout_s)
    cfg = ks.client_config()
    cfg["bootstrap_timeout_ms"] = max(1, int(timeout_s * 1000))
    try:
        return KafkaAdminClient(**cfg)
    except Exception as exc:
        if _is_unreachable(exc):
            raise _unavailable(ks, timeout_s, exc) from None
        raise


def wait_for_broker(settings: Settings | KafkaSettings, timeout_s: float | None = None) -> dict:
    """Block until a broker answers an admin call (describe_cluster); returns its answer.

    Retries until ``timeout_s`` (default ``kafka.connect_timeout_s``), then raises
    BrokerUnavailable naming the bootstrap servers: bounded, never a hang.
    """
    ks = _kafka_settings(settings)
    timeout_s = ks.connect_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _unavailable(ks, timeout_s, last)
        try:
            admin = make_admin(ks, timeout_s=max(0.5, min(remaining, 10.0)))
            try:
                return admin.describe_cluster()
            finally:
                admin.close()
        except AccessDenied:
            raise  # the broker answered and refused: waiting will not change that
        except Exception as exc:  # keep retrying until the deadline
            last = exc
            log.debug("broker not ready yet: %s", exc)
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics linewatch uses, with their partitions and configs: ``frames`` (key: camera
    id; at least as many partitions as the most workers expected), ``results``, the dead-letter
    ``frames.dlq``, ``alerts`` and the compacted ``profiles`` announcements (names from
    ``settings.topics``). Every one takes records up to the raised message size limit."""
    t = settings.topics
    base = {
        "max.message.bytes": str(settings.kafka.max_message_bytes),
        "retention.ms": str(t.retention_ms),
    }
    return [
        TopicSpec(t.frames, t.frames_partitions, dict(base)),
        TopicSpec(t.results, t.results_partitions, dict(base)),
        TopicSpec(t.dlq, t.results_partitions, dict(base)),
        TopicSpec(t.alerts, 1, dict(base)),
        # operator reviews (dashboard -> sink); keyed by frame id. Kept like the others: the sink
        # stores each one in DuckDB, where the review history lives
        TopicSpec(t.reviews, 1, dict(base)),
        # compacted: the latest announcement per product survives
        TopicSpec(t.profiles, 1, {"max.message.bytes": base["max.message.bytes"], "cleanup.policy": "compact"}),
    ]


def ensure_topics(settings: Settings, timeout_s: float | None = None) -> list[str]:
    """Create the missing linewatch topics explicitly (never by auto-create); idempotent and
    safe when several processes race. Returns the names it created. Existing topics get
    their max.message.bytes raised to the limit if lower (else big frames would be refused);
    fewer partitions than configured are logged, not changed.

    On a cluster with ACLs a service's user may neither see nor create the topics of other
    roles (linewatch.kafka.acls): what it is not allowed to create or inspect is left to the
    admin role (logged, not an error); a topic it needs and cannot use fails where it is used."""
    from kafka.errors import TopicAlreadyExistsError, for_code

    specs = topic_specs(settings)
    wait_for_broker(settings, timeout_s)
    admin = make_admin(settings, timeout_s)
    try:
        existing = {t["name"]: t for t in admin.describe_topics() if t.get("error_code", 0) == 0}
        missing = [s for s in specs if s.name not in existing]
        for s in specs:
            if s.name in existing and len(existing[s.name].get("partitions") or []) < s.partitions:
                log.warning(
                    "topic %s has %d partitions, settings ask for %d (not changed)",
                    s.name, len(existing[s.name]["partitions"]), s.partitions,
                )
        _raise_size_limits(admin, [s for s in specs if s.name in existing])
        created: list[str] = []
        if missing:
            request = {
                s.name: {"num_partitions": s.partitions, "replication_factor": -1, "configs": s.configs}
                for s in missing
            }
            response = admin.create_topics(request, timeout_ms=30_000, raise_errors=False)
            refused: list[str] = []
            for topic in response.get("topics", []):
                code = topic.get("error_code", 0)
                if code == 0:
                    created.append(topic["name"])
                elif _not_authorized(for_code(code)()):
                    refused.append(topic["name"])
                elif for_code(code) is not TopicAlreadyExistsError:
                    msg = topic.get("error_message") or for_code(code).__name__
                    raise KafkaIOError(f"could not create topic {topic['name']}: {msg}")
            if refused:
                log.info("not allowed to see or create topics %s (the admin role creates them)", ", ".join(refused))
            admin.wait_for_topics([s.name for s in missing if s.name not in refused], timeout_ms=30_000)
        if created:
            log.info("created topics %s", ", ".join(created))
        return created
    finally:
        admin.close()


def _raise_size_limits(admin, specs: list[TopicSpec]) -> None:
    """Existing topics created elsewhere may carry a smaller max.message.bytes: raise it."""
    if not specs:
        return
    from kafka.admin import ConfigResource, ConfigResourceType

    key = "max.message.bytes"
    try:
        current = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.name, {key: None}) for s in specs], config_filter="all"
        ).get("topic", {})
    except Exception as exc:  # noqa: BLE001 - only an ACL refusal is expected here
        if not _not_authorized(exc):
            raise
        log.debug("not allowed to read the configs of %s; size limits left to the admin role",
                  ", ".join(s.name for s in specs))
        return
    # a topic whose config this user may not read comes back without a value: not ours to raise
    values = {s.name: (current.get(s.name) or {}).get(key, {}).get("value") for s in specs}
    low = [s for s in specs if values[s.name] is not None and int(values[s.name]) < int(s.configs[key])]
    if low:
        log.warning("raising %s of %s to %s", key, ", ".join(s.name for s in low), low[0].configs[key])
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, s.name, {key: s.configs[key]}) for s in low])


def describe_topics(settings: Settings | KafkaSettings, names: Iterable[str] | None = None) -> dict[str, int]:
    """``{topic: partition count}`` for the given (or all non-internal) topics."""
    admin = make_admin(settings)
    try:
        topics = admin.describe_topics(list(names) if names is not None else None)
    finally:
        admin.close()
    return {
        t["name"]: len(t.get("partitions") or [])
        for t in topics
        if t.get("error_code", 0) == 0 and not t.get("is_internal") and not t["name"].startswith("__")
    }


def _frame_name(what: str | None, headers: Headers | None, topic: str) -> str:
    if what:
        return what
    for k, v in headers or []:
        if k == "frame_id":
            return v.decode("utf-8", "replace")
    return f"record for topic {topic}"


def _limit_of(producer: "KafkaProducer") -> int:
    return int(getattr(producer, "config", {}).get("max_request_size", 0))


def _as_bytes(key: str | bytes | None) -> bytes | None:
    return key.encode("utf-8") if isinstance(key, str) else key


class PendingDelivery:
    """A record handed to the producer; ``result()`` checks it and raises a clear error."""

    def __init__(self, future: "FutureRecordMetadata", name: str, size: int, limit: int,
                 topic: str = "", producer: Any = None) -> None:
        self.future = future
        self.name = name
        self.size = size
        self.limit = limit
        self.topic, self.producer = topic, producer

    def done(self) -> bool:
        return bool(self.future.is_done)

    def result(self, timeout: float | None = 30.0) -> "RecordMetadata":
        from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, RecordListTooLargeError

        try:
            return self.future.get(timeout=timeout)
        except (MessageSizeTooLargeError, RecordListTooLargeError):
            raise _too_large(self.name, self.size, self.limit) from None
        except KafkaTimeoutError as exc:
            raise DeliveryError(f"{self.name}: not acknowledged within {timeout}s ({exc})") from None
        except KafkaError as exc:
            if _not_authorized(exc):
                raise refusal(exc, self.producer, f"write topic {self.topic}" if self.topic else "") from None
            raise DeliveryError(f"{self.name}: delivery failed: {type(exc).__name__}: {exc}") from None


def _too_large(name: str, size: int, limit: int) -> RecordTooLarge:
    lim = f" limit of {limit} bytes" if limit else " message size limit"
    return RecordTooLarge(f"{name} is {size} bytes, over the{lim}; refused (LINEWATCH_KAFKA__MAX_MESSAGE_BYTES)")


def send_nowait(
    producer: "KafkaProducer",
    topic: str,
    value: bytes,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    what: str | None = None,
) -> PendingDelivery:
    """Hand a record to the producer without waiting; check it later with ``.result()``.

    Raises RecordTooLarge right away when the producer refuses it locally, and
    BrokerUnavailable when topic metadata cannot be fetched within ``max_block_ms``."""
    from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

    name = _frame_name(what, headers, topic)
    limit = _limit_of(producer)
    try:
        future = producer.send(topic, value=value, key=_as_bytes(key), headers=list(headers or []))
    except MessageSizeTooLargeError:
        raise _too_large(name, len(value), limit) from None
    except KafkaTimeoutError as exc:
        raise DeliveryError(f"{name}: topic {topic!r} metadata not available ({exc}); is the broker up and the topic created?") from None
    except Exception as exc:
        if _not_authorized(exc):
            raise refusal(exc, producer, f"write topic {topic}") from None
        raise
    return PendingDelivery(future, name, len(value), limit, topic, producer)


def send_checked(
    producer: "KafkaProducer",
    topic: str,
    value: bytes,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    timeout: float | None = 30.0,
    what: str | None = None,
) -> "RecordMetadata":
    """Send one record and wait for its acknowledgement; RecordTooLarge / DeliveryError
    name the record (``what``, else its ``frame_id`` header)."""
    return send_nowait(producer, topic, value, key=key, headers=headers, what=what).result(timeout=timeout)
