#!/usr/bin/env bash
# One entry point: creates .venv on first use (torch pinned first), then runs `tunery ARGS`
# or, for `./run.sh test ARGS`, the test suite.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${TUNERY_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

stamp="$VENV/.tunery-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and pinned: unpinned, pip pulls several GB of CUDA packages.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" = "test" ]; then
    shift
    exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/tunery" "$@"
