"""The worker's HTTP endpoint: /metrics, /healthz, and /ready (503 until the published profiles
are loaded and warmed). A real HTTP server on loopback; no broker needed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from linewatch.kafka.broker import free_port
from workers.metrics import WorkerMetrics


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_ready_is_503_until_the_profiles_are_warm_then_200_with_them():
    port = free_port()
    m = WorkerMetrics("w-h", port=port)
    try:
        code, body = _get(port, "/ready")
        assert code == 503 and json.loads(body) == {"ready": False, "worker_id": "w-h", "products": {}}
        assert _get(port, "/healthz") == (200, b"ok\n")  # alive while loading
        m.set_ready({"cap": 3}, failed={"pcb": "weights.safetensors: not a safetensors file"})
        code, body = _get(port, "/ready")
        assert code == 200 and json.loads(body)["products"] == {"cap": 3}
        assert "pcb" in json.loads(body)["failed"]
        code, text = _get(port, "/metrics")
        assert code == 200 and b"linewatch_worker_ready 1.0" in text
        assert _get(port, "/nope")[0] == 404
    finally:
        m.close()
    with pytest.raises(OSError):  # closed: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
