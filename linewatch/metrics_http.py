"""The one HTTP endpoint every long-running service exposes: ``/metrics`` (Prometheus text),
``/healthz`` (200 while the process serves) and ``/ready`` (200 or 503 with a JSON body the
service supplies). Lives in the core because the worker and the bridges both serve it and
services never import each other. Binds where it is told; the settings default is 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class MetricsServer:
    """Serves ``registry`` in a daemon thread until ``close()``. ``readiness`` returns the
    ``/ready`` body; its ``"ready"`` key picks 200 or 503 (always ready when not given)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 readiness: Callable[[], dict[str, Any]] | None = None) -> None:
        ready = readiness or (lambda: {"ready": True})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == "/healthz":
                    self._send(200, "text/plain; charset=utf-8", b"ok\n")
                elif path == "/ready":
                    body = ready()
                    self._send(200 if body.get("ready") else 503, "application/json", json.dumps(body).encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: /metrics, /healthz, /ready\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:  # scrapes are not news
                log.debug("metrics http: " + fmt, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics (health: /healthz, /ready)", host, self.port)

    @property
    def server_address(self) -> tuple:
        """(host, port) the server is bound to."""
        return self._server.server_address

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
