#!/usr/bin/env bash
# Installs everything the tests need (venv, Kafka jars, Debian chromium) and runs the whole
# suite: unit, integration (real Kafka broker, real DuckDB), browser (real headless Chromium),
# fault injection. Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$(bash "$HERE/scripts/bootstrap.sh" --with-browser | tail -n 1)"
cd "$HERE"
set +e
"$BIN/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit $rc
