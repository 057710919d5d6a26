#!/usr/bin/env bash
# Sets up everything linewatch needs on a fresh machine, idempotently:
#   - a virtual environment outside the clone, keyed by a hash of the dependency spec,
#     so a second run (or a second clone) reuses it;
#   - the Apache Kafka jars from Maven Central (cached);
#   - Debian's chromium + chromium-driver for the browser tests and mosquitto for the MQTT
#     bridge's tests (with --with-browser).
# Prints the path of the venv's bin directory on its last line.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LINEWATCH_CACHE:-$HOME/.cache/linewatch}"
PY="${PYTHON:-python3}"
WITH_BROWSER=0
EXTRAS="dev"
for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;
    --extras=*) EXTRAS="${arg#--extras=}" ;;
    *) echo "bootstrap: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[bootstrap] $*" >&2; }
mkdir -p "$CACHE"
PIPLOG="$CACHE/bootstrap-pip.log"
# pip and setuptools are chatty; keep their output in a log and show it only on failure.
quiet() { if ! "$@" >>"$PIPLOG" 2>&1; then echo "[bootstrap] failed: $* (last lines of $PIPLOG):" >&2; tail -n 30 "$PIPLOG" >&2; exit 1; fi; }
: >"$PIPLOG"

# ---- system packages (Java + Maven for Kafka; Chromium for browser tests) -------------
need_apt=()
command -v java >/dev/null || need_apt+=(default-jre-headless)
command -v mvn  >/dev/null || need_apt+=(maven)
if [[ $WITH_BROWSER == 1 ]]; then
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
  # the MQTT bridge's integration tests run against a real broker (Debian's mosquitto)
  command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || need_apt+=(mosquitto)
fi
if (( ${#need_apt[@]} )); then
  log "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >&2
fi

# ---- Python virtual environment, keyed by the dependency spec ---------------------------
SPEC_HASH=$("$PY" - "$HERE/pyproject.toml" "$EXTRAS" <<'PYEOF'
import hashlib, json, sys, tomllib
proj = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = sorted(e for e in sys.argv[2].split(",") if e)
spec = {"deps": proj["dependencies"], "extras": {e: proj["optional-dependencies"].get(e, []) for e in extras},
        "py": sys.version_info[:2]}
print(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12])
PYEOF
)
VENV="$CACHE/venv-$SPEC_HASH"
if [[ ! -f "$VENV/.deps-ok" ]]; then
  log "creating $VENV (first install downloads torch and friends: ~5-10 minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  quiet "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  quiet "$VENV/bin/python" -m pip install -q -e "$HERE[$EXTRAS]"
  touch "$VENV/.deps-ok"
else
  # Re-point the editable install at this clone (seconds; no dependency resolution).
  quiet "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$HERE"
fi

# ---- Kafka jars from Maven Central -------------------------------------------------------
"$VENV/bin/linewatch" broker install >&2

echo "$VENV/bin"
