"""``linewatch bench <what>``: benchmarks against real components.

Each benchmark lives next to the code it measures and exposes ``register_bench(subparsers)``
(adding one sub-subcommand; heavy imports only inside its handler). To add one, append a
``(name, module)`` line to BENCHES; a module not written yet is skipped.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES: list[tuple[str, str]] = [
    ("producer", "producers.bench"),
    ("models", "linewatch.bench_models"),
    ("worker", "linewatch.bench_worker"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmarks (producer throughput, ...) against real components",
        description="Measure linewatch against real components. Each benchmark prints its "
        "figures and can write them as JSON (--json).",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for _name, module_name in BENCHES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register_bench(sub)
