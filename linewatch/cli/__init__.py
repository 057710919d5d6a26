"""The ``linewatch`` command line (the composition root; ``main`` is the console script)."""

from linewatch.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
