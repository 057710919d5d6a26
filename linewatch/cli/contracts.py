"""``linewatch contracts``: write (or check) the published wire contract, the JSON Schemas of
every Kafka record (linewatch/contracts.py; explained in docs/contracts.md)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "contracts",
        help="write the JSON Schemas of the Kafka records (frames, results, frames.dlq, alerts)",
        description="Generate the wire contract from the pydantic models: one JSON Schema per record "
        "part and an index.json. The repository's copy lives in docs/contracts/ "
        "(regenerate with `linewatch contracts --out docs/contracts` after changing linewatch/messages.py).",
    )
    p.add_argument("--out", required=True, help="directory to write the schemas into (created if missing)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 and list the files that differ from the models (default: write)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from linewatch.contracts import REGENERATE, stale, write_contracts

    out = Path(args.out)
    if args.check:
        diff = stale(out)
        if diff:
            print(f"{out}: out of date with linewatch/messages.py: {', '.join(diff)}; run `{REGENERATE}`")
            return 1
        print(f"{out}: up to date")
        return 0
    written = write_contracts(out)
    print(f"wrote {len(written)} files to {out} ({', '.join(p.name for p in written)})")
    return 0
