"""``linewatch bridge mqtt``: verdicts to an MQTT broker with QoS 1, one topic per camera
(``bridge.mqtt.topic_template``), payload = one Verdict as JSON
(docs/contracts/verdict.schema.json).

A verdict counts as delivered when the broker's PUBACK arrived. The client starts with a clean
session and is discarded on any failure, so nothing paho queued survives into the retry: the
loop republishes exactly the verdicts that were not acknowledged, in order.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from linewatch.errors import UserError
from linewatch.messages import Verdict
from linewatch.settings import MqttSettings

from bridges.loop import PublishError


def topic_for(template: str, verdict: Verdict) -> str:
    return template.format(line=verdict.line, camera=verdict.camera, product=verdict.product)


def check_template(template: str) -> None:
    """A one-line UserError for a template naming an unknown field or producing wildcards."""
    try:
        sample = template.format(line="l", camera="c", product="p")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"bridge.mqtt.topic_template {template!r}: only {{line}}, {{camera}} and {{product}} "
                        f"can be filled in ({exc})") from None
    if not sample or "+" in sample or "#" in sample:
        raise UserError(f"bridge.mqtt.topic_template {template!r}: a publish topic cannot be empty or hold + or #")


class MqttPublisher:
    target = "mqtt"

    def __init__(self, cfg: MqttSettings, timeout_s: float) -> None:
        check_template(cfg.topic_template)
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.where = f"MQTT broker {cfg.host}:{cfg.port}"
        self._client: Any = None
        self._lost = threading.Event()

    def connect(self) -> None:
        import paho.mqtt.client as mqtt

        cfg = self.cfg
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id, clean_session=True,
                             protocol=mqtt.MQTTv311)
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(100)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
        if cfg.tls or cfg.tls_cafile is not None:
            client.tls_set(ca_certs=str(cfg.tls_cafile) if cfg.tls_cafile else None,
                           certfile=str(cfg.tls_certfile) if cfg.tls_certfile else None,
                           keyfile=str(cfg.tls_keyfile) if cfg.tls_keyfile else None,
                           cert_reqs=ssl.CERT_REQUIRED)
        answered = threading.Event()
        outcome: dict[str, Any] = {}
        lost = self._lost = threading.Event()

        def on_connect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
            outcome["reason"] = reason
            answered.set()

        def on_disconnect(_c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
            lost.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        except (OSError, ssl.SSLError) as exc:
            raise PublishError(f"cannot connect: {exc}") from None
        client.loop_start()
        self._client = client
        if not answered.wait(self.timeout_s):
            raise PublishError(f"no CONNACK within {self.timeout_s:g} s")
        reason = outcome["reason"]
        if getattr(reason, "is_failure", False):
            raise PublishError(f"connection refused: {reason}")

    def publish(self, verdicts: Sequence[Verdict]) -> None:
        import paho.mqtt.client as mqtt

        if self._client is None or self._lost.is_set():
            raise PublishError("not connected")
        infos = []
        for v in verdicts:
            info = self._client.publish(topic_for(self.cfg.topic_template, v), v.to_bytes(), qos=1,
                                        retain=self.cfg.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break
            infos.append(info)
        deadline = time.monotonic() + self.timeout_s
        delivered = 0
        for info in infos:
            try:
                info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                break
            if not info.is_published():
                break
            delivered += 1
        if delivered < len(verdicts):
            why = "connection lost" if self._lost.is_set() else f"no PUBACK within {self.timeout_s:g} s"
            raise PublishError(f"{len(verdicts) - delivered} of {len(verdicts)} verdicts not acknowledged ({why})",
                               delivered)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
