"""The inspection worker: a Kafka consumer group on ``frames`` that publishes to ``results``.

Delivery is at-least-once: a micro-batch's offsets are committed only after every result and
DLQ record of that batch has been acknowledged by Kafka. When a delivery fails, the worker
seeks back to the batch's first offsets and processes it again (the sink is idempotent by
frame id, so a replay never makes a second row). Records of partitions revoked while a batch
is being collected are still processed (a partition may come straight back to this consumer
with its fetch position kept), and only partitions still assigned are committed: one that
moved is replayed by its new owner from the last commit (duplicates, never a loss).

Library-first: ``run_worker`` is what ``linewatch work``, the demo, the bench and the tests
call, in the main thread (SIGTERM/SIGINT finish the batch, commit and leave the group), in a
thread (``stop_event``) or in a subprocess.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from linewatch.profiles import Registry
from linewatch.settings import Settings, WorkerSettings
from workers.metrics import WorkerMetrics
from workers.engines import select_engine
from workers.pipeline import BatchProcessor, Outgoing, PreparedBatch
from workers.profile_cache import EngineFactory, ProfileCache, ReloadEvent

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # poll granularity while idle: bounds the reaction time to a stop request


@dataclass
class WorkerStats:
    """What a worker did; returned by run_worker."""

    worker_id: str
    frames: int = 0  # records handled (results + DLQ)
    results: int = 0
    defects: int = 0
    dlq: int = 0
    batches: int = 0
    commits: int = 0
    commit_failures: int = 0
    rejoins: int = 0  # consumers replaced because their group join stalled (WorkerSettings.join_timeout_s)
    replays: int = 0  # batches processed again after a failed delivery
    revoked_in_batch: int = 0  # records whose partition was revoked while their batch formed
    profile_loads: int = 0
    reloads: list[tuple[str, int | None, int | None, bool]] = field(default_factory=list)
    engines: dict[str, str] = field(default_factory=dict)  # product -> engine name
    stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("poll", "profile", "decode", "inference", "post", "publish", "commit"), 0.0))
    started_at: float = field(default_factory=time.time)
    elapsed_s: float = 0.0  # first record received -> last commit
    dlq_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_revoked(self) -> int:
        """Old name of ``revoked_in_batch`` (such records are no longer dropped)."""
        return self.revoked_in_batch

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def default_engine_factory(ws: WorkerSettings) -> EngineFactory:
    """``workers.engines.select_engine`` (the fallback chain) with the worker's settings."""
    threads = ws.threads or os.cpu_count() or 1

    def build(model: Any, onnx_path: Any, profile: Any) -> Any:
        return select_engine(model, onnx_path, ws.engine, threads, ws.max_batch)

    return build


class _Revocations:
    """Rebalance listener: remembers partitions revoked while a batch forms (for the stats)."""

    def __init__(self) -> None:
        from kafka import ConsumerRebalanceListener

        outer = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):  # noqa: N805 - kafka-python's signature
                outer.revoked.update(revoked)
                if revoked:
                    log.info("partitions revoked: %s", sorted(tp.partition for tp in revoked))

            def on_partitions_assigned(self, assigned):  # noqa: N805
                outer.joined = True  # called after every completed join, with an empty assignment too
                if assigned:
                    log.info("partitions assigned: %s", sorted(tp.partition for tp in assigned))

        self.revoked: set[Any] = set()
        self.joined = False
        self.listener = Listener()


def run_worker(settings: Settings, stop_event: threading.Event | None = None, worker_id: str | None = None,
               max_frames: int | None = None, *, engine_factory: EngineFactory | None = None,
               create_topics: bool = True, install_signals: bool | None = None,
               on_batch: Callable[[WorkerStats], None] | None = None, overlap: bool = True) -> WorkerStats:
    """Consume ``frames`` until ``stop_event`` is set, SIGTERM/SIGINT arrives (main thread
    only) or ``max_frames`` records have been handled; always finishes and commits the
    current batch, then leaves the group. Returns the stats.

    ``overlap`` runs the engine on one batch while the next is polled and decoded and the
    previous one is published (False: strictly one batch at a time)."""
    from kafka import TopicPartition
    from kafka.errors import KafkaError

    from linewatch.kafka.io import (
        DeliveryError,
        NotAuthorized,
        RecordTooLarge,
        ensure_topics,
        make_consumer,
        make_producer,
        send_nowait,
    )

    ws = settings.worker
    worker_id = worker_id or default_worker_id()
    stop = stop_event or threading.Event()
    stats = WorkerStats(worker_id)
    if install_signals is None:
        install_signals = threading.current_thread() is threading.main_thread()
    previous: dict[int, Any] = {}
    if install_signals:
        def _on_signal(signum: int, _frame: Any) -> None:
            log.info("worker %s: signal %d, finishing the batch", worker_id, signum)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _on_signal)

    metrics = WorkerMetrics(worker_id, ws.metrics_host, ws.metrics_port)

    def on_event(ev: ReloadEvent) -> None:
        stats.reloads.append((ev.product, ev.old_version, ev.new_version, ev.ok))
        metrics.reloads.labels("ok" if ev.ok else "failed").inc()
        if ev.ok:
            stats.profile_loads += 1
            if ev.engine and ev.new_version is not None:
                stats.engines[ev.product] = ev.engine
                metrics.set_engine(ev.product, ev.engine, ev.new_version)

    cache = ProfileCache(Registry(settings.storage.registry_dir), engine_factory or default_engine_factory(ws),
                         capacity=ws.profile_cache_size, reload_interval_s=ws.reload_interval_s, on_event=on_event)
    processor = BatchProcessor(cache, worker_id=worker_id, results_topic=settings.topics.results,
                               dlq_topic=settings.topics.dlq, max_frame_pixels=ws.max_frame_pixels,
                               thumbnail_size=ws.thumbnail_size,
                               decode_threads=min(4, ws.threads or os.cpu_count() or 1),
                               evidence_rate=settings.evidence.normal_sample_rate,
                               # base64 grows 4/3; what is left of the limit carries the rest of the result
                               evidence_max_bytes=max(1024, settings.kafka.max_message_bytes * 2 // 3 - 256 * 1024),
                               camera_roi=ws.camera_roi)
    consumer = producer = None
    uncommitted: dict[Any, int] = {}  # acknowledged but not yet committed (a commit failed)
    cleanup: list[Callable[[], Any]] = []
    try:
        if ws.preload:
            t_pre = time.perf_counter()
            events = cache.preload()
            loaded = {e.product: e.new_version for e in events if e.ok and e.new_version is not None}
            failed = {e.product: e.error or "" for e in events if not e.ok}
            for product, why in failed.items():
                log.warning("worker %s: %s not preloaded (its frames go to the DLQ until it loads): %s",
                            worker_id, product, why)
            log.info("worker %s: preloaded and warmed %d profile(s) in %.2fs: %s", worker_id, len(loaded),
                     time.perf_counter() - t_pre, ", ".join(f"{p} v{v}" for p, v in loaded.items()) or "none")
            metrics.set_ready(loaded, failed)
        else:
            metrics.set_ready({})
        if create_topics:
            ensure_topics(settings)
        client_id = f"{settings.kafka.client_id}-worker-{worker_id}"

        def subscribed() -> tuple[Any, _Revocations, float]:
            """A new consumer subscribed to ``frames``, its listener, and when it subscribed."""
            rev = _Revocations()
            c = make_consumer(settings, ws.group_id, topics=None, client_id=client_id,
                              max_poll_records=ws.max_batch, max_poll_interval_ms=ws.max_poll_interval_ms,
                              session_timeout_ms=ws.session_timeout_ms,
                              heartbeat_interval_ms=max(1000, ws.session_timeout_ms // 3))
            c.subscribe([settings.topics.frames], listener=rev.listener)
            return c, rev, time.monotonic()

        consumer, revocations, subscribed_at = subscribed()
        producer = make_producer(settings, client_id=client_id, linger_ms=2)
        log.info("worker %s consuming %s as group %s (batch %d, wait %d ms)", worker_id,
                 settings.topics.frames, ws.group_id, ws.max_batch, ws.max_wait_ms)
        first_at: float | None = None
        next_offsets: dict[Any, int] = {}
        last_lag = 0.0
        engine_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine") if overlap else None
        cleanup.append(lambda: engine_pool.shutdown(wait=True) if engine_pool else None)

        def finish(prepared: PreparedBatch) -> bool:
            """Results of one inferred batch -> Kafka -> commit. False if delivery failed."""
            result = processor.finish(prepared)
            for k in ("profile", "decode", "inference", "post"):
                v = getattr(result.times, k)
                stats.stage_s[k] += v
                metrics.stage.labels(k).inc(v)
            for _product, _version, engine, n, secs in result.groups:
                if n:
                    metrics.inference.labels(engine).observe(secs)
            t1 = time.perf_counter()
            try:
                _publish(producer, result.out, send_nowait, RecordTooLarge)
            except NotAuthorized:
                raise  # the ACLs refuse this user: replaying would only repeat the refusal
            except (DeliveryError, KafkaError) as exc:
                stats.replays += 1
                log.warning("worker %s: delivery failed (%s); replaying the batch", worker_id, exc)
                return False
            acked_ms = time.time() * 1000.0
            publish_s = time.perf_counter() - t1
            stats.stage_s["publish"] += publish_s
            metrics.stage.labels("publish").inc(publish_s)

            t2 = time.perf_counter()
            offsets: dict[Any, int] = {}
            for rec in prepared.records:
                tp = TopicPartition(rec.topic, rec.partition)
                offsets[tp] = max(offsets.get(tp, -1), rec.offset + 1)
            for tp, off in offsets.items():
                uncommitted[tp] = max(uncommitted.get(tp, -1), off)
            _commit(consumer, uncommitted, stats, worker_id)
            next_offsets.update(offsets)
            commit_s = time.perf_counter() - t2
            stats.stage_s["commit"] += commit_s
            metrics.stage.labels("commit").inc(commit_s)

            ok = defect = 0
            dlq_stages: list[str] = []
            for o in result.out:
                if o.kind == "dlq":
                    dlq_stages.append(o.stage or "other")
                    key = f"{o.stage}: {(o.reason or '')[:60]}"
                    stats.dlq_reasons[key] = stats.dlq_reasons.get(key, 0) + 1
                else:
                    if o.kind == "defect":
                        defect += 1
                    else:
                        ok += 1
                    if o.capture_ts_ms is not None:
                        metrics.e2e.observe(max(0.0, acked_ms - o.capture_ts_ms) / 1000.0)
            n = len(prepared.records)
            metrics.observe_batch(n, ok, defect, dlq_stages)
            stats.frames += n
            stats.results += ok + defect
            stats.defects += defect
            stats.dlq += len(dlq_stages)
            stats.batches += 1
            if first_at is not None:
                stats.elapsed_s = time.perf_counter() - first_at
            if on_batch is not None:
                on_batch(stats)
            return True

        # Two batches in flight at most: while the engine runs batch k (its own thread; ONNX
        # Runtime and torch release the GIL), this thread polls and decodes batch k+1, then
        # post-processes, publishes and commits batch k.
        inflight: tuple[PreparedBatch, Future | None] | None = None
        slot = 0
        while True:
            pending = len(inflight[0].records) if inflight else 0
            room = ws.max_batch if max_frames is None else min(ws.max_batch, max_frames - stats.frames - pending)
            more = not stop.is_set() and room > 0
            if not more and inflight is None:
                break
            cache.refresh()
            batch: list[Any] = []
            if more:
                t0 = time.perf_counter()
                batch = _collect(consumer, revocations, room, ws.max_wait_ms, stop, stats,
                                 first_wait_ms=0 if inflight else IDLE_POLL_MS, quiet_ms=ws.quiet_ms)
                stats.stage_s["poll"] += time.perf_counter() - t0
            if (not revocations.joined and inflight is None and not batch
                    and time.monotonic() - subscribed_at > ws.join_timeout_s):
                # kafka-python 3 can stall in a group join under load (the broker drops the member,
                # the client never rejoins): a new consumer joins instead of idling forever
                log.warning("worker %s: group join not completed after %.0f s; a new consumer joins",
                            worker_id, time.monotonic() - subscribed_at)
                stats.rejoins += 1
                consumer.close(autocommit=False)
                consumer = None
                consumer, revocations, subscribed_at = subscribed()
            if time.monotonic() - last_lag > 1.0:
                metrics.set_lag(_lags(consumer, next_offsets))
                last_lag = time.monotonic()
            prepared = None
            if batch:
                if first_at is None:
                    first_at = time.perf_counter()
                prepared = processor.prepare(batch, slot)
                slot ^= 1
            if inflight is not None and inflight[1] is not None:
                inflight[1].result()  # the engine finished batch k (infer() keeps its own errors)
            nxt: tuple[PreparedBatch, Future | None] | None = None
            if prepared is not None:
                if engine_pool is not None:
                    nxt = (prepared, engine_pool.submit(processor.infer, prepared))
                else:
                    processor.infer(prepared)
                    nxt = (prepared, None)
            if inflight is not None and not finish(inflight[0]):
                # nothing of batch k (nor k+1) is committed: go back and process them again
                replay = list(inflight[0].records)
                if nxt is not None:
                    if nxt[1] is not None:
                        nxt[1].result()
                    replay += list(nxt[0].records)
                    nxt = None
                _rewind(consumer, replay)
                stop.wait(1.0)
            inflight = nxt
            if inflight is not None and engine_pool is None:
                if not finish(inflight[0]):
                    _rewind(consumer, list(inflight[0].records))
                    stop.wait(1.0)
                inflight = None
            if not batch and inflight is None and uncommitted:
                _commit(consumer, uncommitted, stats, worker_id)  # retry a failed commit while idle
    finally:
        for fn in cleanup:
            fn()
        processor.close()
        if producer is not None:
            try:
                producer.flush(timeout=10)
            finally:
                producer.close(timeout=5)
        if consumer is not None:
            if uncommitted:
                try:
                    _commit(consumer, uncommitted, stats, worker_id)
                except Exception:  # closing anyway; the records will be redelivered
                    log.exception("final commit failed")
            consumer.close(autocommit=False)  # sends LeaveGroup: partitions move at once
        metrics.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("worker %s stopped: %d frames (%d results, %d DLQ) in %d batches", worker_id,
                 stats.frames, stats.results, stats.dlq, stats.batches)
    return stats


def _commit(consumer: Any, uncommitted: dict[Any, int], stats: WorkerStats, worker_id: str) -> bool:
    """Commit the acknowledged offsets of partitions still assigned; keep them on failure so
    the next batch (or the idle loop) retries. Failing is safe: records are redelivered and
    the sink dedups by frame id."""
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    try:
        assigned = consumer.assignment()
    except Exception:
        assigned = set(uncommitted)
    for tp in [tp for tp in uncommitted if tp not in assigned]:
        del uncommitted[tp]  # its new owner starts from the last committed offset
    if not uncommitted:
        return True
    try:
        consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in uncommitted.items()})
    except KafkaError as exc:
        stats.commit_failures += 1
        log.warning("worker %s: commit failed (%s); will retry, records may be redelivered", worker_id, exc)
        return False
    stats.commits += 1
    uncommitted.clear()
    return True


def _collect(consumer: Any, revocations: _Revocations, max_batch: int, max_wait_ms: int,
             stop: threading.Event, stats: WorkerStats, first_wait_ms: int = IDLE_POLL_MS,
             quiet_ms: int | None = None) -> list[Any]:
    """Up to ``max_batch`` records, waiting at most ``first_wait_ms`` for the first one and
    ``max_wait_ms`` after it; with ``quiet_ms``, the batch also closes once a poll has waited
    that long for nothing (a frame of a slow line is not held for ``max_wait_ms``; a busy
    topic still fills the batch, its next records being fetched already)."""
    from linewatch.kafka.io import poll_records

    batch: dict[tuple[str, int, int], Any] = {}
    deadline: float | None = None
    while len(batch) < max_batch:
        if deadline is None:
            timeout_ms = first_wait_ms
        else:
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if quiet_ms is not None:
                timeout_ms = min(timeout_ms, quiet_ms)
        before = len(batch)
        polled = poll_records(consumer, timeout_ms, max_batch - len(batch))
        for recs in polled.values():
            for r in recs:
                batch[(r.topic, r.partition, r.offset)] = r  # a re-fetch after reassignment dedups
        if revocations.revoked:
            # Keep them: kafka-python keeps the fetch position of a partition that comes back to
            # this consumer, so dropping them would lose them. Processing them is always safe:
            # the commit skips partitions now owned by another worker, which replays them.
            gone = {(tp.topic, tp.partition) for tp in revocations.revoked}
            revocations.revoked.clear()
            stats.revoked_in_batch += sum(1 for k in batch if (k[0], k[1]) in gone)
        if not batch:
            return []
        if deadline is None:
            deadline = time.monotonic() + max_wait_ms / 1000.0
        elif quiet_ms is not None and len(batch) == before:
            break  # nothing more arrived within quiet_ms
        if time.monotonic() >= deadline or stop.is_set():
            break
    return list(batch.values())


def _publish(producer: Any, out: list[Outgoing], send_nowait: Callable[..., Any], too_large: type) -> None:
    """Send every record of the batch and wait until all are acknowledged (raises otherwise)."""
    pending = []
    for o in out:
        try:
            pending.append((o, send_nowait(producer, o.topic, o.value, key=o.key, headers=o.headers)))
        except too_large:
            pending.append((o, _send_oversized(producer, o, send_nowait)))
    producer.flush()
    for o, p in pending:
        try:
            p.result(timeout=60.0)
        except too_large:
            _send_oversized(producer, o, send_nowait).result(timeout=60.0)


def _send_oversized(producer: Any, o: Outgoing, send_nowait: Callable[..., Any]) -> Any:
    """A record over the size limit: a DLQ record keeps headers and reason but drops the
    original bytes; a result drops its images (and regions beyond the first 100)."""
    import json

    if o.kind != "dlq":
        body = json.loads(o.value)
        body.update(mask_png_b64=None, thumbnail_jpeg_b64=None, heatmap_png_b64=None)
        body["regions"] = body.get("regions", [])[:100]
        log.warning("result %s over the size limit: sent without images", body.get("frame_id"))
        return send_nowait(producer, o.topic, json.dumps(body).encode("utf-8"), key=o.key, headers=o.headers)
    headers = []
    for k, v in o.headers:
        if k == "dlq":
            rec = json.loads(v)
            rec["reason"] = (rec["reason"] + f" [original {len(o.value)} bytes too large to keep]")[:600]
            v = json.dumps(rec).encode("utf-8")
        headers.append((k, v))
    return send_nowait(producer, o.topic, b"", key=o.key, headers=headers)


def _rewind(consumer: Any, batch: list[Any]) -> None:
    from kafka import TopicPartition

    first: dict[Any, int] = {}
    for rec in batch:
        tp = TopicPartition(rec.topic, rec.partition)
        first[tp] = min(first.get(tp, rec.offset), rec.offset)
    assigned = consumer.assignment()
    for tp, off in first.items():
        if tp in assigned:
            consumer.seek(tp, off)


def _lags(consumer: Any, next_offsets: dict[Any, int]) -> dict[int, int]:
    """Per-partition lag from the fetcher's high-water marks (no extra broker round trip)."""
    lags: dict[int, int] = {}
    try:
        assigned = consumer.assignment()
    except Exception:
        return lags
    for tp in assigned:
        hw = consumer.highwater(tp)
        pos = next_offsets.get(tp)
        if hw is not None and pos is not None:
            lags[tp.partition] = max(0, hw - pos)
    return lags
