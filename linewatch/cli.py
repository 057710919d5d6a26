"""The ``linewatch`` command: a thin argparse shell over library functions.

Each subcommand lives next to the code it drives and exposes ``register(subparsers)``;
registration must not import heavy libraries (torch, streamlit), so ``--help`` stays fast.
A handler is ``func(args) -> int``. User errors (UserError, ProfileError, ModelError,
pydantic ValidationError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from linewatch import __version__

# (module, …) whose register() adds one top-level subcommand each, in --help order.
COMMAND_MODULES = [
    "linewatch.broker_cli",
    "producers.cli",
    "linewatch.synth_cli",
    "calibration.cli",
    "workers.cli",
    "workers.sink_cli",
    "dashboard.cli",
    "linewatch.demo_cli",
    "linewatch.bench_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linewatch",
        description="Visual inspection for production lines: cameras -> Kafka -> anomaly maps -> "
        "defect masks -> DuckDB -> dashboard.",
    )
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet: keep the rest of the CLI usable
                continue
            raise
        module.register(sub)
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

    from linewatch.errors import UserError

    types: list[type[BaseException]] = [UserError, ValidationError, FileNotFoundError]
    for mod, cls in (("linewatch.profiles", "ProfileError"), ("linewatch.models.base", "ModelError")):
        # only modules already imported: one that was not cannot have raised its error, and
        # importing it here (linewatch.models.base imports torch) costs seconds on every error
        module = sys.modules.get(mod)
        if module is not None and hasattr(module, cls):
            types.append(getattr(module, cls))
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every reconnect attempt; our services report outages themselves.
    logging.getLogger("kafka").setLevel(logging.DEBUG if args.verbose >= 2 else logging.ERROR)
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
