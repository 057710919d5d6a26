"""The ``linewatch`` command: a thin argparse shell over library functions, and the composition
root: the only place in the core that imports the services (docs/architecture.md).

Each service's subcommands live next to the code they drive and expose ``register(subparsers)``
(benchmarks: ``register_bench``); registration must not import heavy libraries (torch,
streamlit, scikit-learn), so ``--help`` stays fast and a producer or sink never loads a model
library (tests/test_imports.py checks it). A handler is ``func(args) -> int``. User errors
(UserError, ModelError, ProfileError, pydantic ValidationError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys

import bridges.cli
import calibration.cli
import dashboard.cli
import producers.bench
import producers.cli
import workers.bench
import workers.bench_engines
import workers.bench_latency
import workers.cli
from linewatch import __version__
from linewatch.cli import broker, contracts, demo, synth

# modules whose register() adds top-level subcommands, in --help order
COMMANDS = [broker, producers.cli, synth, calibration.cli, workers.cli, bridges.cli, dashboard.cli, demo, contracts]
# modules whose register_bench() adds one `linewatch bench` subcommand each
BENCHES = [producers.bench, workers.bench_engines, workers.bench, workers.bench_latency]


def _register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (producer throughput, models, the worker end to end) against real components",
        description="Measure linewatch against real components. Each benchmark prints its "
        "figures and can write them as JSON (--json).",
    )
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for module in BENCHES:
        module.register_bench(bench_sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linewatch",
        description="Visual inspection for production lines: cameras -> Kafka -> anomaly maps -> "
        "defect masks -> DuckDB -> dashboard.",
    )
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    _register_bench(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    try:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ())) or exc.title
            return f"invalid setting {loc}: {err.get('msg')}"
    except ImportError:  # pragma: no cover
        pass
    return " ".join(str(exc).split()) or type(exc).__name__


def user_error_types() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from linewatch.errors import ModelError, UserError
    from linewatch.profiles import ProfileError

    return (UserError, ModelError, ProfileError, ValidationError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every reconnect attempt; our services report outages themselves.
    logging.getLogger("kafka").setLevel(logging.DEBUG if args.verbose >= 2 else logging.ERROR)
    # `kill -USR1 <pid>` writes every thread's stack to stderr: how to see where a service that
    # stopped making progress (a consumer that never finishes its group join) is waiting.
    # (to the process's own stderr: an in-process caller, pytest's capsys, may have swapped
    # sys.stderr for an object without a file descriptor)
    if sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except user_error_types() as exc:
        print(f"linewatch: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
