"""The bridge loop shared by MQTT and OPC UA: `results` -> verdicts -> the target, offsets
committed only once the target acknowledged every verdict of the batch.

Delivery rules, and why:

* A record that is not a valid InspectionResult (the published schema,
  docs/contracts/results.value.schema.json) is logged with its coordinates, counted and
  skipped: one bad record must not stop the reject signal for the whole line.
* A frame id already presented is skipped (a worker rebalance replays results).
* The target down or refusing: the batch is held, the consumer's partitions are paused (the
  group keeps the bridge as a member), the publisher reconnects with a growing delay up to
  ``bridge.retry_backoff_max_s``, and the verdicts go out in their original order once it is
  back. Each verdict is stamped when it is handed over, so one that waited past the reject
  window says ``late``. After ``bridge.outage_limit_s`` the bridge exits non-zero with one line,
  committing nothing it did not deliver, so a restart resumes from the first undelivered one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from linewatch.errors import UserError
from linewatch.messages import InspectionResult, Verdict, now_ms
from linewatch.settings import Settings

from bridges.metrics import BridgeMetrics
from bridges.verdicts import CameraOrder, make_verdict

log = logging.getLogger(__name__)


class PublishError(Exception):
    """The target did not acknowledge; the first ``delivered`` verdicts of the call were."""

    def __init__(self, message: str, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


class BridgeOutage(UserError):
    """The target stayed unreachable longer than ``bridge.outage_limit_s``."""


class Publisher(Protocol):
    target: str  # "mqtt" | "opcua": the metrics label and the CLI name
    where: str  # for log lines: "MQTT broker 127.0.0.1:1883"

    def connect(self) -> None:
        """Connect (raise PublishError when the target refuses or does not answer)."""

    def publish(self, verdicts: Sequence[Verdict]) -> None:
        """Hand every verdict over in order and wait for each acknowledgement; raise
        PublishError(delivered=k) when only the first k were acknowledged."""

    def close(self) -> None:
        """Drop the connection; nothing queued in the client survives (a retry republishes)."""


@dataclass
class BridgeStats:
    """What one run of a bridge did (returned by run_bridge; its stop line)."""

    target: str
    records: int = 0
    published: int = 0
    late: int = 0
    invalid: int = 0
    duplicates: int = 0
    publish_failures: int = 0
    outages: int = 0
    commit_failures: int = 0
    elapsed_s: float = 0.0
    # capture -> acknowledged, the most recent verdicts (bounded: a bridge runs for months)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100_000), repr=False)

    def percentile(self, q: float) -> float | None:
        return round(float(np.percentile(np.fromiter(self.latencies_ms, float), q)), 1) if self.latencies_ms else None

    def summary(self) -> dict[str, Any]:
        return {"target": self.target, "records": self.records, "published": self.published, "late": self.late,
                "invalid": self.invalid, "duplicates": self.duplicates, "publish_failures": self.publish_failures,
                "outages": self.outages, "commit_failures": self.commit_failures,
                "elapsed_s": round(self.elapsed_s, 3),
                "capture_to_published_p50_ms": self.percentile(50),
                "capture_to_published_p99_ms": self.percentile(99)}

    def stop_line(self) -> str:
        return (f"bridge {self.target}: {self.published} verdicts published ({self.late} late), "
                f"{self.invalid} invalid and {self.duplicates} duplicate records skipped, {self.outages} outages; "
                f"capture -> published p50 {self.percentile(50)} ms, p99 {self.percentile(99)} ms")


class _Stopped(Exception):
    """stop was requested while the target was down: leave without committing."""


class _Delivery:
    """Connecting and publishing with the outage rules above; one per run."""

    def __init__(self, settings: Settings, publisher: Publisher, consumer: Any, stop: threading.Event,
                 metrics: BridgeMetrics | None, stats: BridgeStats, clock_ms: Callable[[], int]) -> None:
        self.bs = settings.bridge
        self.publisher, self.consumer, self.stop = publisher, consumer, stop
        self.metrics, self.stats, self.clock_ms = metrics, stats, clock_ms
        self.order = CameraOrder()
        self.connected = False

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        if self.metrics is not None:
            self.metrics.set_connected(up)

    def _wait_out(self, started: float, delay: float, err: Exception, waiting: int) -> float:
        """One failed attempt: log (once per outage), give up past the limit, keep the group
        membership, sleep. Returns the next delay."""
        self.stats.publish_failures += 1
        if self.metrics is not None:
            self.metrics.failures.labels(self.publisher.target).inc()
        down = time.monotonic() - started
        limit = self.bs.outage_limit_s
        if limit and down > limit:
            held = (f"{waiting} verdicts not delivered and not committed: a restart resumes from them" if waiting
                    else "nothing consumed yet")
            raise BridgeOutage(f"{self.publisher.where} unreachable for {down:.0f} s ({err}); {held}")
        self._keep_membership()
        if self.stop.wait(delay):
            raise _Stopped()
        return min(delay * 2, self.bs.retry_backoff_max_s)

    def _keep_membership(self) -> None:
        """Poll with every partition paused: no records, but the group keeps this member."""
        try:
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.pause(*assigned)
            self.consumer.poll(timeout_ms=0)
        except Exception as exc:  # noqa: BLE001 - a broker hiccup here only delays the retry
            log.debug("poll while waiting for %s: %s", self.publisher.where, exc)

    def _outage_starts(self, err: Exception, waiting: int) -> float:
        self._set_connected(False)
        self.stats.outages += 1
        held = f"{waiting} verdicts wait, nothing committed past them" if waiting else "nothing consumed yet"
        log.warning("%s: %s; %s; retrying (every <= %g s, giving up after %s)", self.publisher.where, err, held,
                    self.bs.retry_backoff_max_s,
                    f"{self.bs.outage_limit_s:g} s" if self.bs.outage_limit_s else "never")
        return time.monotonic()

    def _outage_ends(self, started: float) -> None:
        log.warning("%s is back after %.1f s; delivering the waiting verdicts in order", self.publisher.where,
                    time.monotonic() - started)
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)

    def connect(self) -> None:
        self.deliver([])

    def deliver(self, todo: list[InspectionResult]) -> None:
        """Connect if needed and publish ``todo`` in order; returns once every verdict is
        acknowledged (raises BridgeOutage past the limit, _Stopped on stop)."""
        window = self.bs.reject_window_ms
        i = 0
        started: float | None = None
        delay = 0.2
        while True:
            err: PublishError | None = None
            delivered = 0
            verdicts: list[Verdict] = []
            try:
                if not self.connected:
                    self.publisher.connect()
                    self._set_connected(True)
                if i < len(todo):
                    stamp = self.clock_ms()
                    verdicts = [make_verdict(r, stamp, window, self.order.is_stale(r)) for r in todo[i:]]
                    self.publisher.publish(verdicts)
                    delivered = len(verdicts)
            except PublishError as exc:
                err, delivered = exc, exc.delivered
            if delivered:
                self._account(todo[i:i + delivered], verdicts[:delivered])
                i += delivered
            if err is None:
                break
            self.publisher.close()
            if started is None:
                started = self._outage_starts(err, len(todo) - i)
            self.connected = False
            delay = self._wait_out(started, delay, err, len(todo) - i)
        if started is not None:
            self._outage_ends(started)

    def _account(self, results: list[InspectionResult], verdicts: list[Verdict]) -> None:
        acked = self.clock_ms()
        latencies = [float(max(0, acked - v.capture_ts_ms)) for v in verdicts]
        late = sum(v.late for v in verdicts)
        for r in results:
            self.order.mark(r)
        self.stats.published += len(verdicts)
        self.stats.late += late
        self.stats.latencies_ms.extend(latencies)
        if self.metrics is not None:
            self.metrics.published(latencies, late)


def _valid(rec: Any, stats: BridgeStats, metrics: BridgeMetrics | None, target: str) -> InspectionResult | None:
    try:
        return InspectionResult.from_bytes(rec.value)
    except (ValidationError, ValueError, TypeError) as exc:
        why = " ".join(str(exc).split())[:300]
        if isinstance(exc, ValidationError) and exc.errors():
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "record"
            why = f"{where}: {first.get('msg')} ({exc.error_count()} errors)"
        stats.invalid += 1
        if metrics is not None:
            metrics.skipped.labels(target, "invalid").inc()
        log.warning("skipping %s[%d]@%d: not a valid result (docs/contracts/results.value.schema.json): %s",
                    rec.topic, rec.partition, rec.offset, why)
        return None


def run_bridge(settings: Settings, publisher: Publisher, group_id: str, *,
               stop_event: threading.Event | None = None, max_records: int | None = None,
               idle_timeout_s: float | None = None, consumer: Any | None = None,
               metrics: BridgeMetrics | None = None, clock_ms: Callable[[], int] = now_ms) -> BridgeStats:
    """Consume `results` in ``group_id`` and present every verdict through ``publisher`` until
    ``stop_event``, ``max_records`` consumed records, or ``idle_timeout_s`` without records.

    Raises BrokerUnavailable when Kafka cannot be reached, BridgeOutage when the target stays
    down past ``bridge.outage_limit_s``."""
    from linewatch.kafka.io import IdleClock, make_consumer, poll_records

    stop = stop_event or threading.Event()
    stats = BridgeStats(publisher.target)
    t0 = time.monotonic()
    own_consumer = consumer is None
    if consumer is None:
        consumer = make_consumer(settings, group_id, [settings.topics.results],
                                 client_id=f"{settings.kafka.client_id}-bridge-{publisher.target}",
                                 max_poll_records=settings.bridge.max_batch,
                                 session_timeout_ms=10_000, heartbeat_interval_ms=3_000)
    delivery = _Delivery(settings, publisher, consumer, stop, metrics, stats, clock_ms)
    log.info("bridge %s: %s -> %s (group %s, reject window %d ms)", publisher.target, settings.topics.results,
             publisher.where, group_id, settings.bridge.reject_window_ms)
    idle = IdleClock(consumer, idle_timeout_s)
    try:
        delivery.connect()
        while not stop.is_set():
            limit = settings.bridge.max_batch
            if max_records is not None:
                limit = min(limit, max_records - stats.records)
                if limit <= 0:
                    break
            polled = poll_records(consumer, 200, limit)
            records = [r for recs in polled.values() for r in recs]
            if not records:
                if idle.expired():
                    break
                continue
            idle.records()
            todo: list[InspectionResult] = []
            batch_ids: set[str] = set()
            for rec in records:
                stats.records += 1
                res = _valid(rec, stats, metrics, publisher.target)
                if res is None:
                    continue
                if delivery.order.seen(res) or res.frame_id in batch_ids:
                    stats.duplicates += 1
                    if metrics is not None:
                        metrics.skipped.labels(publisher.target, "duplicate").inc()
                    continue
                batch_ids.add(res.frame_id)
                todo.append(res)
            delivery.deliver(todo)
            try:
                consumer.commit()  # only now: the target acknowledged every verdict of the batch
            except Exception as exc:  # noqa: BLE001 - a rebalance: the batch is replayed and deduplicated
                stats.commit_failures += 1
                log.warning("offset commit failed (%s); the batch will be replayed (duplicates are skipped)", exc)
    except _Stopped:
        log.warning("bridge %s: stopped while %s was down; undelivered verdicts stay uncommitted",
                    publisher.target, publisher.where)
    finally:
        publisher.close()
        if own_consumer:
            try:
                consumer.close(autocommit=False)
            except Exception as exc:  # noqa: BLE001 - best effort on shutdown
                log.debug("consumer close: %s", exc)
        stats.elapsed_s = time.monotonic() - t0
    log.info("%s", stats.stop_line())
    return stats
