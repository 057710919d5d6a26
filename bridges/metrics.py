"""Prometheus metrics of one bridge (``linewatch_bridge_*``, label ``target`` = mqtt|opcua),
served by the core's MetricsServer when ``bridge.metrics_port`` is not 0. Capture ->
published p50/p99 are gauges over the recent verdicts, because the line engineer asks "what
is the 99th percentile now", which a histogram answers only approximately."""

from __future__ import annotations

from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from linewatch.metrics_http import MetricsServer

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BridgeMetrics:
    def __init__(self, target: str, host: str = "127.0.0.1", port: int = 0, window: int = 1000) -> None:
        self.target = target
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.verdicts = Counter("linewatch_bridge_verdicts", "Verdicts published, by timing (on_time, late)",
                                ["target", "timing"], registry=r)
        self.skipped = Counter("linewatch_bridge_skipped", "Records not published, by reason (invalid, duplicate)",
                               ["target", "reason"], registry=r)
        self.failures = Counter("linewatch_bridge_publish_failures", "Publish attempts that failed", ["target"],
                                registry=r)
        self.latency = Histogram("linewatch_bridge_capture_to_published_seconds", "Capture -> verdict acknowledged",
                                 ["target"], buckets=_BUCKETS, registry=r)
        self.p50 = Gauge("linewatch_bridge_capture_to_published_p50_ms", "Median capture -> published, recent verdicts",
                         ["target"], registry=r)
        self.p99 = Gauge("linewatch_bridge_capture_to_published_p99_ms", "p99 capture -> published, recent verdicts",
                         ["target"], registry=r)
        self.connected = Gauge("linewatch_bridge_connected", "1 while the bridge's target acknowledges", ["target"],
                               registry=r)
        self._recent: deque[float] = deque(maxlen=window)
        self._up = False
        self.server = MetricsServer(r, host, port, self.readiness) if port else None

    def readiness(self) -> dict:
        return {"ready": self._up, "target": self.target}

    def set_connected(self, up: bool) -> None:
        self._up = up
        self.connected.labels(self.target).set(1 if up else 0)

    def published(self, latencies_ms: list[float], late: int) -> None:
        for ms in latencies_ms:
            self.latency.labels(self.target).observe(ms / 1000)
        self._recent.extend(latencies_ms)
        if late:
            self.verdicts.labels(self.target, "late").inc(late)
        if len(latencies_ms) > late:
            self.verdicts.labels(self.target, "on_time").inc(len(latencies_ms) - late)
        if self._recent:
            p50, p99 = np.percentile(np.fromiter(self._recent, float), [50, 99])
            self.p50.labels(self.target).set(float(p50))
            self.p99.labels(self.target).set(float(p99))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
