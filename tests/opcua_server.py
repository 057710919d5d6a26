"""A real OPC UA server (asyncua's own) for the bridge tests, in a background thread with its
own event loop: the namespace a line's server would define, one user with a password who may
add nodes (the bridge creates its per-camera nodes), anonymous refused. Every Write request's
verdict is recorded in arrival order (``verdicts``), as a PLC's monitored item would see it."""

from __future__ import annotations

import asyncio
import json
import threading

from asyncua import Server
from asyncua.common.callback import CallbackType
from asyncua.crypto.permission_rules import User, UserRole

NAMESPACE = "urn:linewatch:verdicts"


class _Users:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, iserver, username=None, password=None, certificate=None):  # noqa: ARG002 - asyncua's API
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.Admin, name=username)
        return None


class OpcuaTestServer:
    def __init__(self, port: int, users: dict[str, str] | None = None) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/"
        self.users = users if users is not None else {"linewatch": "s3cret-pw"}
        self.verdicts: list[dict] = []  # across restarts
        self.requests = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    async def _on_write(self, event, _dispatcher) -> None:
        self.requests += 1
        for wv in event.request_params.NodesToWrite:
            value = wv.Value.Value.Value
            if isinstance(value, str) and value.startswith("{"):
                self.verdicts.append(json.loads(value))

    def start(self) -> None:
        ready = threading.Event()
        box: dict = {}
        self._stop = threading.Event()
        stop = self._stop

        async def main() -> None:
            server = Server(user_manager=_Users(self.users))
            await server.init()
            server.set_endpoint(self.endpoint)
            await server.register_namespace(NAMESPACE)
            server.subscribe_server_callback(CallbackType.PostWrite, self._on_write)
            async with server:
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.02)

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # surfaced by start()
                box["error"] = exc
                ready.set()

        self._thread = threading.Thread(target=run, name=f"opcua-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(30) or "error" in box:
            raise RuntimeError(f"OPC UA test server did not start: {box.get('error')}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
