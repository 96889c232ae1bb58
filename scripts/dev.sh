#!/usr/bin/env bash
# One entry point for a fresh machine; every step is idempotent.
#   scripts/dev.sh lab    set up (venv, dependencies, default model), then open JupyterLab on notebooks/
#   scripts/dev.sh test   set up, then run the whole test suite
#   scripts/dev.sh setup  set up only
# WORKBENCH_VENV picks the virtual environment folder (default .venv); extra arguments go to pytest/lab.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${WORKBENCH_VENV:-.venv}"
PY="$VENV/bin/python"

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    # Reinstall only when the dependency list or this script changed.
    local stamp="$VENV/.workbench-setup" want
    want="$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$PY" -m pip install -q --upgrade pip
        # No GPU: the CPU build of torch first, so the range in pyproject is met without CUDA packages.
        has_gpu || "$PY" -m pip install -q "${WORKBENCH_TORCH:-torch==2.13.0}"
        "$PY" -m pip install -q -e ".[all]"
        echo "$want" >"$stamp"
    fi
    "$VENV/bin/workbench" provision --quiet >/dev/null
    browser
}

# The browser tests drive JupyterLab in the system Chromium (Debian's package; never `playwright install`).
# apt waits up to 10 minutes for another apt to release its lock; a failure shows apt's own words. Under
# CI=true the suite then fails in one line rather than skipping the browser tests (tests/conftest.py).
browser() {
    command -v chromium >/dev/null 2>&1 && return
    local sudo="" log
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "no apt-get: install Chromium yourself to run the browser tests" >&2
        return
    fi
    echo "installing chromium for the browser tests (apt-get)" >&2
    log="$(mktemp)"
    local apt=($sudo apt-get -o DPkg::Lock::Timeout=600 -y -qq)
    if ! "${apt[@]}" install chromium >"$log" 2>&1; then
        "${apt[@]}" update >>"$log" 2>&1 || true
        if ! "${apt[@]}" install chromium >>"$log" 2>&1; then
            echo "could not install chromium; apt said:" >&2
            tail -n 5 "$log" >&2
        fi
    fi
    rm -f "$log"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    lab) setup; exec "$VENV/bin/workbench" lab "$@" ;;
    test) setup; exec "$PY" -m pytest "$@" ;;
    *) echo "usage: scripts/dev.sh lab|test|setup [args]" >&2; exit 2 ;;
esac
