"""``linewatch broker install|start|stop|status|topics``: a thin shell over linewatch.broker
and linewatch.kafka_io (nothing heavy is imported until a handler runs)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DESCRIPTION = """\
Run a real Apache Kafka 4.1 broker (KRaft, one node, loopback only) from the Maven Central
jars, for development and the demo. Ports, data directory and heap come from the settings
([broker] in linewatch.toml or LINEWATCH_BROKER__PORT, __CONTROLLER_PORT, __HOME, ...);
the flags below override them. Files under the broker home: server.properties,
data/ (KRaft metadata + topic logs), logs/server.log (the broker log), broker.pid.
"""


def _settings(args: argparse.Namespace):
    from linewatch.settings import load_settings

    settings = load_settings()
    broker = settings.broker.model_copy(
        update={
            k: v
            for k, v in {
                "port": getattr(args, "port", None),
                "controller_port": getattr(args, "controller_port", None),
                "home": getattr(args, "home", None),
            }.items()
            if v is not None
        }
    )
    broker = type(broker).model_validate(broker.model_dump())  # re-validate the overrides
    settings = settings.model_copy(update={"broker": broker})
    if getattr(args, "port", None) is not None or getattr(args, "home", None) is not None:
        kafka = settings.kafka.model_copy(update={"bootstrap_servers": f"{broker.host}:{broker.port}"})
        settings = settings.model_copy(update={"kafka": kafka})
    return settings


def _broker(settings):
    from linewatch.kafka.broker import Broker

    return Broker(settings.broker, max_message_bytes=settings.kafka.max_message_bytes)


def cmd_install(args: argparse.Namespace) -> int:
    broker = _broker(_settings(args))
    t0 = time.monotonic()
    cached = broker.installed() and not args.force
    if not cached:
        print(f"downloading Kafka {broker.settings.kafka_version} jars from Maven Central ...", flush=True)
    lib = broker.install(force=args.force)
    jars = len(list(lib.glob("*.jar")))
    state = "already installed" if cached else f"installed in {time.monotonic() - t0:.1f}s"
    print(f"Kafka {broker.settings.kafka_version}: {jars} jars {state} at {lib}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from linewatch.kafka.io import ensure_topics, quiet_kafka_logs

    quiet_kafka_logs(args.verbose)
    settings = _settings(args)
    broker = _broker(settings)
    was_running = broker.status().running
    t0 = time.monotonic()
    status = broker.start(timeout_s=args.timeout)
    verb = "already running" if was_running else f"started in {time.monotonic() - t0:.1f}s"
    print(f"Kafka broker {verb}: {status.bootstrap_servers} (pid {status.pid})")
    print(f"  log:  {status.log_file}")
    print(f"  data: {broker.data_dir}")
    if not args.no_topics:
        created = ensure_topics(settings)
        print(f"  topics: {', '.join(created) + ' created' if created else 'all present'}")
    print("stop it with: linewatch broker stop" + (f" --home {broker.home}" if args.home else ""))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    broker = _broker(_settings(args))
    pid = broker.status().pid
    if broker.stop(timeout_s=args.timeout):
        print(f"Kafka broker stopped (pid {pid})")
    else:
        print(f"no Kafka broker running for {broker.home}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    broker = _broker(_settings(args))
    status = broker.status()
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
    else:
        state = "running" if status.running else "stopped"
        if status.running and not status.answering:
            state = "running (not answering yet)"
        print(f"Kafka broker: {state}" + (f", pid {status.pid}" if status.pid else ""))
        print(f"  bootstrap servers: {status.bootstrap_servers}")
        print(f"  home: {status.home}")
        print(f"  log:  {status.log_file}")
        print(f"  jars: {'installed at ' + str(broker.lib_dir) if status.jars_installed else 'not installed (linewatch broker install)'}")
    return 0 if status.running else 1


def cmd_topics(args: argparse.Namespace) -> int:
    from linewatch.kafka.io import describe_topics, ensure_topics, quiet_kafka_logs, topic_specs

    quiet_kafka_logs(args.verbose)
    settings = _settings(args)
    created = [] if args.list_only else ensure_topics(settings, timeout_s=args.timeout)
    present = describe_topics(settings)
    wanted = {s.name: s for s in topic_specs(settings)}
    for name in sorted(present):
        spec = wanted.get(name)
        note = " (created now)" if name in created else ""
        extra = f"  max.message.bytes={spec.configs['max.message.bytes']}" if spec else ""
        print(f"{name:<24} partitions={present[name]}{extra}{note}")
    missing = [n for n in wanted if n not in present]
    if missing:
        print(f"missing: {', '.join(missing)} (run without --list to create them)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "broker",
        help="run a local Kafka broker (install/start/stop/status/topics)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser, ports: bool = True) -> None:
        q.add_argument("--home", type=Path, help="broker directory (default: settings broker.home, ~/.linewatch/broker)")
        if ports:
            q.add_argument("--port", type=int, help="client port on 127.0.0.1 (default: settings broker.port, 9092)")
            q.add_argument("--controller-port", type=int, help="KRaft controller port (default: 9093)")

    q = sub.add_parser(
        "install",
        help="download the Kafka jars from Maven Central (cached; needs java + mvn)",
        description="Resolve org.apache.kafka:kafka_2.13 and the log4j2 binding with Maven into "
        "~/.cache/linewatch/kafka-<version>/lib (or settings broker.jars_dir). A second run "
        "finds the cache and returns at once.",
    )
    q.add_argument("--force", action="store_true", help="download again even if cached")
    q.set_defaults(func=cmd_install)

    q = sub.add_parser(
        "start",
        help="start the broker in the background and wait until it answers; creates the topics",
        description="Start the broker (idempotent: a running one is left alone), wait until it logs "
        "'Kafka Server started' and answers an admin call, then create the linewatch topics "
        "(frames, results, frames.dlq, alerts, reviews, profiles) with the 10 MB message limit.",
    )
    common(q)
    q.add_argument("--timeout", type=float, default=None, help="seconds to wait for readiness (default: settings, 90)")
    q.add_argument("--no-topics", action="store_true", help="do not create the linewatch topics")
    q.set_defaults(func=cmd_start)

    q = sub.add_parser("stop", help="stop the broker (SIGTERM by pid, SIGKILL after --timeout)")
    common(q, ports=False)
    q.add_argument("--timeout", type=float, default=30.0, help="seconds before SIGKILL (default 30)")
    q.set_defaults(func=cmd_stop)

    q = sub.add_parser("status", help="is it running? pid, bootstrap servers, log file (exit 1 if stopped)")
    common(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_status)

    q = sub.add_parser(
        "topics",
        help="create the linewatch topics if missing and list them (any reachable broker)",
        description="Create frames/results/frames.dlq/alerts/profiles (names and partitions from "
        "settings [topics]) on the broker at settings kafka.bootstrap_servers, then list topics.",
    )
    common(q)
    q.add_argument("--list", dest="list_only", action="store_true", help="only list, create nothing")
    q.add_argument("--timeout", type=float, default=None, help="seconds to wait for the broker (default: settings)")
    q.set_defaults(func=cmd_topics)
