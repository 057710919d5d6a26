#!/usr/bin/env bash
# Installs everything (venv, Kafka jars) and runs the synthetic production line end to end:
# broker, producers, workers, sink and dashboard. Ctrl-C stops it all cleanly.
# Extra arguments go to `linewatch demo` (see `linewatch demo --help`).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(bash "$HERE/scripts/bootstrap.sh" | tail -n 1)"
cd "$HERE"
exec "$BIN/linewatch" demo "$@"
