"""``linewatch bridge mqtt`` and ``linewatch bridge opcua``: thin shells over
``bridges.loop.run_bridge`` with the MQTT or OPC UA publisher. Every flag overrides one
setting (``bridge.*``); passwords come only from settings / env
(``LINEWATCH_BRIDGE__MQTT__PASSWORD``, ``LINEWATCH_BRIDGE__OPCUA__PASSWORD``), never from argv."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading


def register(subparsers: argparse._SubParsersAction) -> None:
    from linewatch.settings import BridgeSettings

    d = BridgeSettings()
    p = subparsers.add_parser(
        "bridge", help="publish every verdict to the line's controller (MQTT or OPC UA)",
        description="Consume `results` in the bridge's own consumer group and present each frame's verdict "
        "(frame id, verdict, category, score, capture time, latency, late flag) to the line. Offsets are "
        "committed only after the target acknowledged. Payload and node layout: docs/contracts.md.")
    sub = p.add_subparsers(dest="bridge_target", metavar="TARGET", required=True)

    m = sub.add_parser("mqtt", help="QoS 1 MQTT messages, one topic per camera",
                       description="Publish verdicts to an MQTT broker with QoS 1 (paho-mqtt). "
                       "Credentials and TLS: bridge.mqtt.* settings / LINEWATCH_BRIDGE__MQTT__* env.")
    _common(m, d.mqtt.group_id, d)
    m.add_argument("--host", help=f"MQTT broker host (bridge.mqtt.host, default {d.mqtt.host})")
    m.add_argument("--port", type=int, help=f"MQTT broker port (bridge.mqtt.port, default {d.mqtt.port})")
    m.add_argument("--topic-template", help="topic per verdict, {line} {camera} {product} filled in "
                   f"(bridge.mqtt.topic_template, default {d.mqtt.topic_template})")
    m.add_argument("--username", help="MQTT user (bridge.mqtt.username, default none; the password only "
                   "from LINEWATCH_BRIDGE__MQTT__PASSWORD)")
    m.add_argument("--tls-cafile", help="CA bundle; turns TLS on (bridge.mqtt.tls_cafile, default none: plain TCP)")
    m.set_defaults(func=_run)

    o = sub.add_parser("opcua", help="variables under one node per camera on an OPC UA server",
                       description="Write verdicts as variables under Objects/<root>/<camera>/ on an OPC UA "
                       "server (asyncua client). Credentials and security: bridge.opcua.* settings.")
    _common(o, d.opcua.group_id, d)
    o.add_argument("--endpoint", help=f"server endpoint (bridge.opcua.endpoint, default {d.opcua.endpoint})")
    o.add_argument("--root", help=f"object under Objects (bridge.opcua.root, default {d.opcua.root})")
    o.add_argument("--namespace-uri", help=f"namespace of the nodes (bridge.opcua.namespace_uri, "
                   f"default {d.opcua.namespace_uri})")
    o.add_argument("--username", help="OPC UA user (bridge.opcua.username, default anonymous; the password only "
                   "from LINEWATCH_BRIDGE__OPCUA__PASSWORD)")
    o.set_defaults(func=_run)


def _common(p: argparse.ArgumentParser, group: str, d) -> None:
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (kafka.bootstrap_servers, default 127.0.0.1:9092)")
    p.add_argument("--group-id", help=f"consumer group of this bridge (default {group})")
    p.add_argument("--reject-window-ms", type=int, help="a verdict published later than this after capture is "
                   f"marked late (bridge.reject_window_ms, default {d.reject_window_ms})")
    p.add_argument("--outage-limit-s", type=float, help="exit with an error when the target stays down this long, "
                   f"0 = never (bridge.outage_limit_s, default {d.outage_limit_s:g})")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics, /healthz, /ready on 127.0.0.1, 0 = off "
                   f"(bridge.metrics_port, default {d.metrics_port})")
    p.add_argument("--max-records", type=int, help="stop after this many `results` records (default: run until stopped)")
    p.add_argument("--idle-timeout", type=float, help="stop after this many seconds without records (default: wait forever)")
    p.add_argument("--json", action="store_true", help="print the final stats as JSON")


def settings_from_args(args: argparse.Namespace):
    """Settings (env / TOML) with the flags of ``args`` on top; the publisher's target section."""
    from linewatch.settings import load_settings

    settings = load_settings()
    target = args.bridge_target
    bridge = settings.bridge
    section = getattr(bridge, target)
    flags = {"mqtt": ("host", "port", "topic_template", "username", "tls_cafile"),
             "opcua": ("endpoint", "root", "namespace_uri", "username")}[target]
    updates = {k: getattr(args, k) for k in flags if getattr(args, k, None) is not None}
    if args.group_id:
        updates["group_id"] = args.group_id
    # validated like settings from env / TOML: a bad flag is the same one-line error
    section = type(section).model_validate({**section.model_dump(), **updates})
    top = {k: getattr(args, k) for k in ("reject_window_ms", "outage_limit_s", "metrics_port")
           if getattr(args, k) is not None}
    bridge = type(bridge).model_validate({**bridge.model_dump(), **top, target: section})
    settings = settings.model_copy(update={"bridge": bridge})
    if args.bootstrap_servers:
        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(
            update={"bootstrap_servers": args.bootstrap_servers})})
    return settings


def make_publisher(settings, target: str):
    if target == "mqtt":
        from bridges.mqtt import MqttPublisher

        return MqttPublisher(settings.bridge.mqtt, settings.bridge.publish_timeout_s)
    from bridges.opcua import OpcuaPublisher

    return OpcuaPublisher(settings.bridge.opcua, settings.bridge.publish_timeout_s)


def _run(args: argparse.Namespace) -> int:
    from bridges.loop import run_bridge
    from bridges.metrics import BridgeMetrics

    if args.verbose < 2:  # both clients log every lost connection; the bridge says it once
        for name in ("asyncua", "paho"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    settings = settings_from_args(args)
    target = args.bridge_target
    publisher = make_publisher(settings, target)
    bs = settings.bridge
    metrics = BridgeMetrics(target, bs.metrics_host, bs.metrics_port)
    stop = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"linewatch bridge {target}: {settings.topics.results} -> {publisher.where} (Ctrl-C to stop)", flush=True)
    try:
        stats = run_bridge(settings, publisher, getattr(bs, target).group_id, stop_event=stop,
                           max_records=args.max_records, idle_timeout_s=args.idle_timeout, metrics=metrics)
    finally:
        metrics.close()
    print(json.dumps(stats.summary()) if args.json else stats.stop_line(), flush=True)
    return 0
