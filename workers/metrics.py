"""Per-worker Prometheus metrics and the health endpoints.

Each worker owns a private CollectorRegistry, so several workers in one process (tests, the
demo) never collide, and serves it on ``metrics_host:metrics_port`` (127.0.0.1 by default)
only when the port is not 0. Names start with ``linewatch_worker_``. The same server answers
``/healthz`` (200 while the process serves) and ``/ready`` (200 once every published profile
is loaded and its engine warmed, 503 before; JSON body with the products and versions), so an
orchestrator sends frames only to a worker that will not make them wait.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from linewatch.metrics_http import MetricsServer


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class WorkerMetrics:
    def __init__(self, worker_id: str, host: str = "127.0.0.1", port: int = 0):
        self.worker_id = worker_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames = Counter("linewatch_worker_frames", "Frames handled, by outcome (ok, defect, dlq)",
                              ["outcome"], registry=r)
        self.fps = Gauge("linewatch_worker_frames_per_second", "Frames handled per second over the last ~5 s",
                         registry=r)
        self.batch_size = Histogram("linewatch_worker_batch_size", "Records per micro-batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.inference = Histogram("linewatch_worker_inference_seconds", "Engine time per product group of a batch",
                                   ["engine"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("linewatch_worker_end_to_end_latency_seconds",
                             "Capture timestamp -> result acknowledged by Kafka", buckets=_LATENCY_BUCKETS, registry=r)
        self.stage = Counter("linewatch_worker_stage_seconds", "Seconds spent per pipeline stage", ["stage"],
                             registry=r)
        self.lag = Gauge("linewatch_worker_consumer_lag", "Records behind the log end, per assigned partition",
                         ["partition"], registry=r)
        self.lag_total = Gauge("linewatch_worker_consumer_lag_total", "Records behind the log end, all partitions",
                               registry=r)
        self.dlq = Counter("linewatch_worker_dlq", "Frames sent to the DLQ, by stage", ["stage"], registry=r)
        self.engine = Gauge("linewatch_worker_engine", "Engine in use per product (value = profile version)",
                            ["product", "engine"], registry=r)
        self.reloads = Counter("linewatch_worker_profile_loads", "Profile loads and hot reloads, by outcome",
                               ["outcome"], registry=r)
        self.info = Info("linewatch_worker", "Worker identity", registry=r)
        self.info.info({"worker_id": worker_id})
        self.ready_gauge = Gauge("linewatch_worker_ready", "1 once the published profiles are loaded and warmed",
                                 registry=r)
        self._server: MetricsServer | None = None
        self._window: list[tuple[float, int]] = []
        self._engines: dict[str, tuple[str, int]] = {}
        self._ready: dict[str, Any] = {"ready": False, "worker_id": worker_id, "products": {}}
        if port:
            self.serve(host, port)

    # -- readiness ---------------------------------------------------------------------------
    def set_ready(self, products: dict[str, int], failed: dict[str, str] | None = None) -> None:
        """The worker has loaded and warmed ``products`` (product -> version); ``failed`` the
        products whose profile could not be loaded (the worker serves the others)."""
        self._ready = {"ready": True, "worker_id": self.worker_id, "products": dict(products),
                       "failed": dict(failed or {})}
        self.ready_gauge.set(1)

    def readiness(self) -> dict[str, Any]:
        return dict(self._ready)

    # -- the HTTP endpoint ---------------------------------------------------------------------
    def serve(self, host: str, port: int) -> None:
        self._server = MetricsServer(self.registry, host, port, self.readiness)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def text(self) -> str:
        return generate_latest(self.registry).decode("utf-8")

    # -- updates -------------------------------------------------------------------------------
    def observe_batch(self, n: int, ok: int, defect: int, dlq_stages: list[str]) -> None:
        self.batch_size.observe(n)
        if ok:
            self.frames.labels("ok").inc(ok)
        if defect:
            self.frames.labels("defect").inc(defect)
        if dlq_stages:
            self.frames.labels("dlq").inc(len(dlq_stages))
            for s in dlq_stages:
                self.dlq.labels(s).inc()
        now = time.monotonic()
        self._window.append((now, n))
        while self._window and now - self._window[0][0] > 5.0:
            self._window.pop(0)
        span = now - self._window[0][0] if len(self._window) > 1 else 0.0
        if span > 0:
            self.fps.set(sum(k for _, k in self._window[1:]) / span)

    def set_engine(self, product: str, engine: str, version: int) -> None:
        prev = self._engines.get(product)
        if prev is not None and prev[0] != engine:
            self.engine.remove(product, prev[0])
        self._engines[product] = (engine, version)
        self.engine.labels(product, engine).set(version)

    def set_lag(self, lags: dict[int, int]) -> None:
        for p, v in lags.items():
            self.lag.labels(str(p)).set(v)
        self.lag_total.set(sum(lags.values()))
