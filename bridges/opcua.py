"""``linewatch bridge opcua``: verdicts written as variables on an OPC UA server the bridge
connects to as a client (asyncua).

Layout (namespace ``bridge.opcua.namespace_uri``): ``Objects/<root>/<camera>/`` holds one
variable per Verdict field plus ``defect`` (Boolean, for a PLC rung) and ``verdict_json``. Each
verdict is one Write request carrying all its variables, so a PLC that reads after a change of
``seq`` sees one frame's values, never a mix of two; one request per verdict, so a monitored
item sees every verdict, not only the last of a batch. A server without the nodes gets them
created (AddNodes); a server that refuses that needs them created there (docs/contracts.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from linewatch.messages import OPCUA_VARIABLES, Verdict
from linewatch.settings import OpcuaSettings

from bridges.loop import PublishError

def _value(verdict: Verdict, name: str) -> Any:
    if name == "defect":
        return verdict.verdict == "defect"
    if name == "verdict_json":
        return verdict.model_dump_json()
    return getattr(verdict, name)


class OpcuaPublisher:
    target = "opcua"

    def __init__(self, cfg: OpcuaSettings, timeout_s: float) -> None:
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.where = f"OPC UA server {cfg.endpoint}"
        self._loop = asyncio.new_event_loop()
        self._client: Any = None
        self._ns = 0
        self._root: Any = None
        self._nodes: dict[str, list[Any]] = {}

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout_s))

    def connect(self) -> None:
        try:
            self._run(self._connect())
        except PublishError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, ua.UaError: all "cannot connect"
            raise PublishError(f"cannot connect: {type(exc).__name__}: {exc}") from None

    async def _connect(self) -> None:
        from asyncua import Client

        cfg = self.cfg
        client = Client(url=cfg.endpoint, timeout=self.timeout_s)
        if cfg.username is not None:
            client.set_user(cfg.username)
        if cfg.password is not None:
            client.set_password(cfg.password.get_secret_value())
        if cfg.security_string:
            await client.set_security_string(cfg.security_string)
        await client.connect()
        self._client = client
        self._ns = await self._namespace(client)
        self._root = await self._child_object(client.nodes.objects, cfg.root)
        self._nodes = {}

    async def _namespace(self, client: Any) -> int:
        from asyncua import ua

        uris = await client.get_namespace_array()
        if self.cfg.namespace_uri in uris:
            return uris.index(self.cfg.namespace_uri)
        try:  # servers that let a client register one (most PLCs do not)
            return await client.register_namespace(self.cfg.namespace_uri)
        except ua.UaStatusCodeError as exc:
            raise PublishError(f"the server has no namespace {self.cfg.namespace_uri!r} and refuses to add it "
                               f"({exc.code_as_name() if hasattr(exc, 'code_as_name') else exc}); register it on "
                               "the server or set bridge.opcua.namespace_uri to one it has") from None

    async def _child_object(self, parent: Any, name: str) -> Any:
        from asyncua import ua

        try:
            return await parent.get_child(f"{self._ns}:{name}")
        except ua.UaStatusCodeError:
            try:
                return await parent.add_object(self._ns, name)
            except ua.UaStatusCodeError as exc:
                raise PublishError(f"node {name!r} is missing and the server refuses to create it ({exc}); "
                                   "create it there (docs/contracts.md)") from None

    async def _camera_nodes(self, camera: str) -> list[Any]:
        from asyncua import ua

        nodes = self._nodes.get(camera)
        if nodes is not None:
            return nodes
        obj = await self._child_object(self._root, camera)
        nodes = []
        for name, kind in OPCUA_VARIABLES.items():
            try:
                node = await obj.get_child(f"{self._ns}:{name}")
            except ua.UaStatusCodeError:
                vtype = getattr(ua.VariantType, kind)
                initial = {"String": "", "Int64": 0, "Double": 0.0, "Boolean": False}[kind]
                node = await obj.add_variable(self._ns, name, ua.Variant(initial, vtype))
                await node.set_writable()
            nodes.append(node)
        self._nodes[camera] = nodes
        return nodes

    async def _write(self, verdict: Verdict) -> None:
        from asyncua import ua

        nodes = await self._camera_nodes(verdict.camera)
        values = [ua.Variant(_value(verdict, name), getattr(ua.VariantType, kind))
                  for name, kind in OPCUA_VARIABLES.items()]
        await self._client.write_values(nodes, values)

    def publish(self, verdicts: Sequence[Verdict]) -> None:
        if self._client is None:
            raise PublishError("not connected")
        for k, v in enumerate(verdicts):
            try:
                self._run(self._write(v))
            except PublishError as exc:
                raise PublishError(str(exc), k) from None
            except Exception as exc:  # noqa: BLE001 - connection lost, timeout, Bad* status
                raise PublishError(f"write of {v.frame_id} failed: {type(exc).__name__}: {exc}", k) from None

    def close(self) -> None:
        client, self._client = self._client, None
        self._nodes = {}
        if client is not None:
            try:
                self._loop.run_until_complete(asyncio.wait_for(client.disconnect(), 2.0))
            except Exception:  # noqa: BLE001 - the server is gone already; drop the socket
                try:
                    client.disconnect_socket()
                except Exception:  # noqa: BLE001
                    pass
