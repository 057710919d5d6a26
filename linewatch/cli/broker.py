"""``linewatch broker install|start|stop|status|topics|acls``: a thin shell over
linewatch.kafka.broker, linewatch.kafka.io and linewatch.kafka.acls (nothing heavy is imported
until a handler runs)."""

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
With --secured (or LINEWATCH_BROKER__SECURED=true): SASL_SSL only, one SCRAM user per role,
deny-by-default ACLs; security/ holds the CA, the keystore and one <role>.env per role
(docs/security.md).
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
                "secured": True if getattr(args, "secured", False) else None,
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
    mode = " SASL_SSL (SCRAM-SHA-512, ACLs)" if broker.secured else ""
    print(f"Kafka broker {verb}: {status.bootstrap_servers}{mode} (pid {status.pid})")
    print(f"  log:  {status.log_file}")
    print(f"  data: {broker.data_dir}")
    if broker.secured:
        if broker.secrets_made:
            print(f"  made: {', '.join(broker.secrets_made)}")
        print(f"  CA:   {broker.secrets.ca_cert}")
        print(f"  env:  {broker.secrets.root}/<role>.env per role (set -a; . {broker.secrets.env_file('worker')}; set +a)")
    if not args.no_topics:
        topic_settings = settings.model_copy(update={"kafka": broker.kafka_settings("admin")}) if broker.secured \
            else settings
        if broker.secured:
            _apply_acls(broker, settings, quiet=True)  # the admin role may create topics only once granted
        created = ensure_topics(topic_settings)
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


def _apply_acls(broker, settings, users: dict[str, str] | None = None, quiet: bool = False) -> list:
    """Apply the role ACLs (linewatch.kafka.acls) on the broker at settings kafka.* -- on a local
    secured broker as its own super user -- print them unless quiet, return those created now."""
    from linewatch.kafka.acls import apply_acls, bindings
    from linewatch.kafka.io import make_admin
    from linewatch.kafka.security import default_users

    local = broker.secrets.exists()  # the home holds a secured broker's users: run as its super user
    if local and not broker.secured:
        broker = _broker(settings.model_copy(update={"broker": settings.broker.model_copy(update={"secured": True})}))
    ks = broker.kafka_settings() if local else settings.kafka
    users = {**(broker.secrets.users() if local else default_users()), **(users or {})}
    wanted = bindings(settings.model_copy(update={"kafka": ks}), users)
    admin = make_admin(ks)
    try:
        created = apply_acls(admin, wanted)
    finally:
        admin.close()
    if not quiet:
        for b in wanted:
            print(b.line() + ("   (created now)" if b in created else ""))
        print(f"{len(wanted)} ACLs for {len({b.role for b in wanted})} roles; {len(created)} created now, "
              "everything else denied")
    return created


def cmd_acls(args: argparse.Namespace) -> int:
    from linewatch.kafka.io import quiet_kafka_logs

    quiet_kafka_logs(args.verbose)
    settings = _settings(args)
    users = {}
    for item in args.user or []:
        role, sep, name = item.partition("=")
        if not sep or not name:
            from linewatch.errors import UserError

            raise UserError(f"--user {item!r}: expected ROLE=KAFKA_USER, e.g. --user worker=plant7-worker")
        users[role] = name
    _apply_acls(_broker(settings), settings, users)
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
    q.add_argument("--no-topics", action="store_true", help="do not create the linewatch topics (nor apply the ACLs)")
    q.add_argument("--secured", action="store_true",
                   help="SASL_SSL + SCRAM-SHA-512 users + deny-by-default ACLs, a certificate from a local CA "
                        "(default: settings broker.secured, off); a home formatted one way cannot start the other")
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

    q = sub.add_parser(
        "acls",
        help="apply each role's least-privilege ACLs (idempotent) and print them",
        description="Create the ALLOW ACLs of linewatch.kafka.acls.ROLE_GRANTS that the cluster lacks "
        "(producer writes frames; worker reads frames in its group, writes results and frames.dlq; sink "
        "reads results and frames.dlq in its group, writes alerts; admin creates the topics) and print "
        "all of them. Nothing is deleted. On the local secured broker (--home, settings broker.*) it runs "
        "as the broker's own super user; otherwise as settings kafka.* (a plant cluster: a user allowed "
        "to alter ACLs).",
    )
    common(q)
    q.add_argument("--secured", action="store_true",
                   help="the local broker is a secured one (default: settings broker.secured, off; a home "
                        "holding a secured broker's users is recognised without it)")
    q.add_argument("--user", action="append", metavar="ROLE=USER",
                   help="Kafka user of a role, repeatable (default: linewatch-<role>, the local broker's users)")
    q.set_defaults(func=cmd_acls)
