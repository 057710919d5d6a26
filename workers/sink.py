"""The sink: `results` (and `frames.dlq`, `reviews`) -> DuckDB, the only writer of the database.

Loop: poll a batch (up to ``sink.max_batch`` records or ``sink.max_wait_ms``), write it in one
DuckDB transaction (open, write, COMMIT, CHECKPOINT, close -- so the dashboard can open the
file read-only between batches), evaluate alerts on the frames that were actually new,
publish those alerts, and only then commit the Kafka offsets. A crash anywhere replays the
batch; inserts are idempotent by frame id (and DLQ events by their source coordinates), so
the database still holds every frame exactly once.

Library first: ``run_sink(settings)`` is what `linewatch sink`, the demo and the tests call.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError

from linewatch import store
from linewatch.messages import Alert, DlqRecord, InspectionResult, Review, now_ms
from linewatch.settings import Settings
from workers.alerts import AlertEvaluator
from workers.drift import DriftEvaluator

log = logging.getLogger(__name__)


@dataclass
class SinkStats:
    """What one run of the sink did (returned by run_sink; also logged at the end)."""

    records: int = 0  # Kafka records consumed (results + dlq)
    results: int = 0  # valid InspectionResult records
    inserted: int = 0  # new inspection rows
    duplicates: int = 0  # results already in the database (replays)
    dlq: int = 0  # new dlq_events rows
    rejected: int = 0  # records on `results` that were not a valid InspectionResult
    alerts_raised: int = 0
    alerts_cleared: int = 0
    alerts_published: int = 0
    reviews: int = 0  # new review rows
    reviews_rejected: int = 0  # unreadable, or of a frame the database does not hold (to dlq_events)
    evidence_kept: int = 0  # new evidence rows (original frames kept)
    evidence_bytes: int = 0
    evidence_deleted: int = 0  # removed by retention
    batches: int = 0
    commit_failures: int = 0
    write_seconds: float = 0.0  # time inside DuckDB transactions (incl. waiting for the lock)
    started_ts_ms: int = field(default_factory=now_ms)
    finished_ts_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _header(headers: list[tuple[str, bytes]] | None, key: str, last: bool = False) -> str | None:
    """A header as text (None when absent or not UTF-8). ``last``: the worker appends its
    ``dlq`` header after the frame's own headers, so a forged ``dlq`` header sent by a
    camera comes first and is ignored."""
    found = None
    for k, v in headers or []:
        if k == key:
            try:
                found = v.decode("utf-8")
            except (UnicodeDecodeError, AttributeError):
                found = None
            if not last:
                return found
    return found


def _short(text: str | None, n: int = 128) -> str | None:
    return None if text is None else text[:n]


def _dlq_event(rec: Any) -> store.DlqEvent:
    """A `frames.dlq` record -> DlqEvent; a record without a readable ``dlq`` header is still
    counted (keyed by its own DLQ coordinates) so nothing disappears silently."""
    raw = _header(rec.headers, "dlq", last=True)
    try:
        if raw is None:
            raise ValueError("no 'dlq' header")
        info = DlqRecord.model_validate_json(raw)
    except (ValidationError, ValueError) as exc:
        info = DlqRecord(
            frame_id=_short(_header(rec.headers, "frame_id")),
            reason=f"unreadable DLQ record: {' '.join(str(exc).split())[:200]}",
            stage="other",
            worker_id="unknown",
            source_topic=rec.topic,
            source_partition=rec.partition,
            source_offset=rec.offset,
        )
    return store.DlqEvent(record=info, product=_short(_header(rec.headers, "product")),
                          camera=_short(_header(rec.headers, "camera")))


def _review_rejected(review: Review, partition: int, offset: int, why: str, topic: str) -> store.DlqEvent:
    return store.DlqEvent(
        record=DlqRecord(frame_id=review.frame_id, reason=f"sink: {why}", stage="other", worker_id="sink",
                         source_topic=topic, source_partition=partition, source_offset=offset),
        product=review.product)


def _rejected_event(rec: Any, exc: Exception, what: str = "result") -> store.DlqEvent:
    reason = f"sink: invalid {what}: {' '.join(str(exc).split())[:300]}"
    return store.DlqEvent(
        record=DlqRecord(
            frame_id=_short(_header(rec.headers, "frame_id")),
            reason=reason,
            stage="other",
            worker_id="sink",
            source_topic=rec.topic,
            source_partition=rec.partition,
            source_offset=rec.offset,
        ),
        product=_short(_header(rec.headers, "product")),
        camera=_short(_header(rec.headers, "camera")),
    )


class Sink:
    """State of one sink process; ``run_sink`` drives it. Split out so tests can feed
    batches without Kafka (``handle_batch``)."""

    def __init__(self, settings: Settings, producer: Any | None = None) -> None:
        self.settings = settings
        self.db_path = settings.storage.db_path
        self.producer = producer
        self.stats = SinkStats()
        self.alerts = AlertEvaluator(settings.alerts)
        self.drift = DriftEvaluator(settings.alerts, self._drift_reference)
        self._pending_alerts: list[Alert] = []  # stored, not yet acknowledged on the topic
        self._published: list[str] = []  # acknowledged, flag not yet written
        self._profiles_seen: set[tuple[str, int]] = set()
        self.evidence_root = store.evidence_root(self.db_path, settings.evidence.dir)
        self._evidence_total = 0  # bytes indexed, kept current between retention passes
        self._last_sweep = float("-inf")

    def start(self) -> int:
        """Create/migrate the schema (UserError if the file is not DuckDB), seed the alert
        state from the database and pick up alerts a crash left unpublished."""
        version = store.init_db(self.db_path)
        try:
            store.sync_profiles_from_registry(self.db_path, self.settings.storage.registry_dir)
        except Exception as exc:  # the registry is a nicety here; never stop the sink for it
            log.warning("could not read the profile registry %s: %s", self.settings.storage.registry_dir, exc)
        with store.reading(self.db_path) as con:
            verdicts = store.recent_verdicts(con, self.settings.alerts.window_frames)
            active = store.active_alerts(con)
            normal_scores = store.recent_normal_scores(con, self.settings.alerts.drift_window)
            self._pending_alerts = store.unpublished_alerts(con)
            self._profiles_seen = {
                (p, v) for p, v in con.execute("SELECT product, version FROM profiles").fetchall()
            }
            self._evidence_total = int(con.execute("SELECT coalesce(sum(bytes), 0) FROM evidence").fetchone()[0])
        orphans = store.sweep_orphans(self.db_path, self.evidence_root)
        if orphans:
            log.info("evidence: removed %d orphan file(s) under %s", orphans, self.evidence_root)
        for product in set(verdicts) | {a.product for a in active}:
            self.alerts.seed(product, verdicts.get(product, []),
                             [a for a in active if a.product == product and a.kind != "drift"])
        drifting = {a.product for a in active if a.kind == "drift"}
        for product, (version, scores) in normal_scores.items():
            self.drift.seed(product, version, scores, product in drifting)
        return version

    def handle_batch(self, records: list[Any]) -> store.WriteResult:
        """Write one polled batch (kafka ConsumerRecords) in one transaction."""
        topics = self.settings.topics
        results: list[InspectionResult] = []
        dlq: list[store.DlqEvent] = []
        reviews: list[tuple[Review, int, int]] = []
        for rec in records:
            self.stats.records += 1
            if rec.topic == topics.dlq:
                dlq.append(_dlq_event(rec))
                continue
            if rec.topic == topics.reviews:
                try:
                    reviews.append((Review.model_validate_json(rec.value), rec.partition, rec.offset))
                except (ValidationError, ValueError, TypeError) as exc:
                    self.stats.reviews_rejected += 1
                    log.warning("rejecting review %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)
                    dlq.append(_rejected_event(rec, exc, "review"))
                continue
            try:
                results.append(InspectionResult.from_bytes(rec.value))
            except (ValidationError, ValueError, TypeError) as exc:
                self.stats.rejected += 1
                log.warning("rejecting record %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)
                dlq.append(_rejected_event(rec, exc))
        self.stats.results += len(results)
        evidence = self._write_evidence(results)  # files first: a committed row never names a missing file
        new_alerts: list[Alert] = []
        t0 = time.perf_counter()
        with store.writing(self.db_path) as con:
            wr = store.write_batch(con, results, dlq=dlq, published_alert_ids=self._published, evidence=evidence,
                                   reviews=reviews)
            if wr.reviews_rejected:  # kept as DLQ events with the reason: nothing disappears silently
                store.write_batch(con, [], dlq=[_review_rejected(r, p, o, why, topics.reviews)
                                                for r, p, o, why in wr.reviews_rejected])
            by_id = {r.frame_id: r for r in results}
            fresh = sorted((by_id[f] for f in wr.inserted_ids), key=lambda r: (r.capture_ts_ms, r.seq, r.frame_id))
            for r in fresh:
                new_alerts.extend(self.alerts.observe(r.product, r.verdict, r.capture_ts_ms))
                new_alerts.extend(self.drift.observe(r.product, r.profile_version, r.verdict, r.image_score,
                                                     r.capture_ts_ms, r.image_threshold))
            if new_alerts:
                store.write_batch(con, [], alerts=new_alerts)
        self.stats.write_seconds += time.perf_counter() - t0
        self._published = []
        self.stats.batches += 1
        self.stats.inserted += len(wr.inserted_ids)
        self.stats.duplicates += wr.duplicates
        self.stats.dlq += wr.dlq_inserted
        self.stats.reviews += wr.reviews_inserted
        self.stats.reviews_rejected += len(wr.reviews_rejected)
        for _, _, _, why in wr.reviews_rejected:
            log.warning("review not stored: %s", why)
        self.stats.evidence_kept += wr.evidence_inserted
        self.stats.evidence_bytes += wr.evidence_bytes
        self._evidence_total += wr.evidence_bytes
        self.retain()
        for a in new_alerts:
            if a.state == "raised":
                self.stats.alerts_raised += 1
                log.warning("ALERT raised: %s", a.message)
            else:
                self.stats.alerts_cleared += 1
                log.warning("alert cleared: %s", a.message)
        self._pending_alerts.extend(new_alerts)
        new_profiles = {(r.product, r.profile_version) for r in fresh} - self._profiles_seen
        if new_profiles:
            self._profiles_seen |= new_profiles
            try:
                store.sync_profiles_from_registry(self.db_path, self.settings.storage.registry_dir)
            except Exception as exc:
                log.warning("could not read the profile registry: %s", exc)
        return wr

    def _drift_reference(self, product: str, version: int) -> dict | None:
        """The normal validation scores a profile version was calibrated on (its registry folder)."""
        from linewatch.profiles import Registry

        prof = Registry(self.settings.storage.registry_dir).read_profile(product, version)
        return (prof.calibration_metrics or {}).get("normal_scores")

    def _write_evidence(self, results: list[InspectionResult]) -> list[store.EvidenceRow]:
        """Write the attached original frames as files; a frame that cannot be written (disk
        full, bad base64) is logged and stored without evidence, never dropped."""
        rows = []
        stored = now_ms()
        for r in results:
            if not r.frame_b64 or r.evidence is None:
                continue
            try:
                data = base64.b64decode(r.frame_b64, validate=True)
                rel, sha = store.write_file(self.evidence_root, r.frame_id, data, r.frame_encoding or "jpeg")
            except (OSError, ValueError) as exc:
                log.warning("evidence of %s not kept: %s", r.frame_id, exc)
                continue
            rows.append(store.EvidenceRow(frame_id=r.frame_id, product=r.product, camera=r.camera,
                                          capture_ts_ms=r.capture_ts_ms, stored_ts_ms=stored, reason=r.evidence,
                                          encoding=r.frame_encoding or "jpeg", bytes=len(data), sha256=sha,
                                          file=rel))
        return rows

    def retain(self, force: bool = False) -> store.RetentionResult | None:
        """Run the retention policy when the kept bytes exceed the cap, and at least every
        ``evidence.sweep_interval_s`` for the age limit."""
        ev = self.settings.evidence
        due = time.monotonic() - self._last_sweep >= ev.sweep_interval_s
        if not (force or due or self._evidence_total > ev.max_bytes):
            return None
        res = store.enforce_retention(self.db_path, self.evidence_root, max_age_ms=int(ev.max_age_days * 86_400_000),
                                      max_bytes=ev.max_bytes, now_ms=now_ms())
        self._last_sweep = time.monotonic()
        self._evidence_total = res.total_bytes
        self.stats.evidence_deleted += res.deleted
        if res.over_cap:
            log.warning("evidence: %d bytes kept, over the cap of %d: %d bytes are frames whose review is pending",
                        res.total_bytes, ev.max_bytes, res.pending_bytes)
        return res

    def publish_alerts(self) -> None:
        """Send stored alerts to the `alerts` topic; the published flag is written with the
        next batch (at-least-once: a consumer dedupes by alert_id)."""
        if not self._pending_alerts or self.producer is None:
            return
        from linewatch.kafka.io import DeliveryError, send_nowait

        pending = []
        for a in self._pending_alerts:
            pending.append((a, send_nowait(self.producer, self.settings.topics.alerts, a.model_dump_json().encode(),
                                           key=a.product, what=f"alert {a.alert_id}")))
        self.producer.flush(timeout=30)
        left: list[Alert] = []
        for a, p in pending:
            try:
                p.result(timeout=30)
                self._published.append(a.alert_id)
                self.stats.alerts_published += 1
            except DeliveryError as exc:
                log.warning("alert %s not published yet (%s); will retry", a.alert_id, exc)
                left.append(a)
        self._pending_alerts = left


def _poll_batch(consumer: Any, max_batch: int, max_wait_ms: int, stop: threading.Event,
                quiet_ms: int | None = None) -> list[Any]:
    """Up to ``max_batch`` records: wait up to 1 s for the first, then fill the batch until
    ``max_wait_ms`` have passed or, with ``quiet_ms``, until a poll has waited that long for
    nothing. Why the quiet gap: at 10 frames/s a fixed wait holds every row ~``max_wait_ms``
    before DuckDB sees it, while a busy topic always has the next records fetched, so batches
    still fill and the write rate holds (docs/results/latency.md)."""
    from linewatch.kafka.io import poll_records

    out: list[Any] = []
    first_deadline = time.monotonic() + 1.0
    deadline: float | None = None
    while len(out) < max_batch and not stop.is_set():
        now = time.monotonic()
        end = deadline if deadline is not None else first_deadline
        if now >= end:
            break
        wait_ms = max(1, int((end - now) * 1000))
        if out and quiet_ms is not None:
            wait_ms = min(wait_ms, max(1, quiet_ms))
        polled = poll_records(consumer, wait_ms, max_batch - len(out))
        got = sum(len(recs) for recs in polled.values())
        for recs in polled.values():
            out.extend(recs)
        if out and deadline is None:
            deadline = time.monotonic() + max_wait_ms / 1000
        elif out and not got and quiet_ms is not None:
            break  # the topic is drained: write now
    return out


def run_sink(
    settings: Settings,
    stop_event: threading.Event | None = None,
    max_records: int | None = None,
    *,
    idle_timeout_s: float | None = None,
    consumer: Any | None = None,
    producer: Any | None = None,
) -> SinkStats:
    """Consume `results` and `frames.dlq` into DuckDB until ``stop_event`` is set, ``max_records``
    records were consumed, or (if given) nothing arrived for ``idle_timeout_s`` seconds.

    Raises UserError (NotADatabase) at start when the database path is not a DuckDB file,
    BrokerUnavailable when Kafka cannot be reached.
    """
    from linewatch.kafka.io import IdleClock, ensure_topics, make_consumer, make_producer

    stop = stop_event or threading.Event()
    own_consumer = consumer is None
    own_producer = producer is None
    sink = Sink(settings)
    sink.start()  # before touching Kafka: a bad database file is reported first
    ensure_topics(settings)
    if producer is None:
        producer = make_producer(settings, client_id=f"{settings.kafka.client_id}-sink")
    sink.producer = producer
    if consumer is None:
        consumer = make_consumer(
            settings,
            settings.sink.group_id,
            [settings.topics.results, settings.topics.dlq, settings.topics.reviews],
            client_id=f"{settings.kafka.client_id}-sink",
            max_poll_records=settings.sink.max_batch,
            # a SIGKILLed sink holds its partitions until its session expires: keep that short
            # (the client default is 45 s) so a restarted sink resumes within ~10 s
            session_timeout_ms=10_000,
            heartbeat_interval_ms=3_000,
        )
    log.info("sink: %s + %s -> %s", settings.topics.results, settings.topics.dlq, settings.storage.db_path)
    idle = IdleClock(consumer, idle_timeout_s)
    last_log = time.monotonic()
    try:
        sink.publish_alerts()  # whatever a previous run stored but could not announce
        while not stop.is_set():
            limit = settings.sink.max_batch
            if max_records is not None:
                limit = min(limit, max_records - sink.stats.records)
                if limit <= 0:
                    break
            records = _poll_batch(consumer, limit, settings.sink.max_wait_ms, stop, settings.sink.quiet_ms)
            if not records:
                if idle.expired():
                    break
                continue
            idle.records()
            sink.handle_batch(records)
            if time.monotonic() - last_log >= 30:
                last_log = time.monotonic()
                st = sink.stats
                log.info("sink: %d records, %d rows written, %d duplicates skipped, %d DLQ, %d alerts raised",
                         st.records, st.inserted, st.duplicates, st.dlq, st.alerts_raised)
            sink.publish_alerts()
            try:
                consumer.commit()  # only now: DuckDB has the batch, the alerts are out
            except Exception as exc:  # rebalance: the batch will be replayed, idempotently
                sink.stats.commit_failures += 1
                log.warning("offset commit failed (%s); the batch will be replayed and deduplicated", exc)
        if sink._published:  # write the last published flags
            with store.writing(sink.db_path) as con:
                store.write_batch(con, [], published_alert_ids=sink._published)
            sink._published = []
    finally:
        if own_consumer:
            try:
                consumer.close(autocommit=False)
            except Exception as exc:  # pragma: no cover - best effort on shutdown
                log.debug("consumer close: %s", exc)
        if own_producer:
            try:
                producer.flush(timeout=10)
                producer.close(timeout=10)
            except Exception as exc:  # pragma: no cover
                log.debug("producer close: %s", exc)
    sink.stats.finished_ts_ms = now_ms()
    log.info("sink stopped: %s", sink.stats.as_dict())
    return sink.stats
