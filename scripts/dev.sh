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
browser() {
    command -v chromium >/dev/null 2>&1 && return
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium for the browser tests (apt-get)" >&2
        $sudo apt-get install -y -qq chromium >/dev/null 2>&1 \
            || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq chromium >/dev/null 2>&1; } \
            || echo "could not install chromium: the browser tests will be skipped" >&2
    else
        echo "no apt-get: install Chromium yourself to run the browser tests (they are skipped without it)" >&2
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    lab) setup; exec "$VENV/bin/workbench" lab "$@" ;;
    test) setup; exec "$PY" -m pytest "$@" ;;
    *) echo "usage: scripts/dev.sh lab|test|setup [args]" >&2; exit 2 ;;
esac
