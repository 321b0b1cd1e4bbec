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
# The llama.cpp decode backend (optional, a ~4-minute source build): with TUNERY_LLAMACPP=1, or
# when it is the chosen backend. Built without OpenMP: its thread pool then does not share
# libgomp with torch, which throttles both when several threads use it (50 -> 29 tokens/s).
if [ "${TUNERY_LLAMACPP:-}" = 1 ] || [ "${TUNERY_DECODE_BACKEND:-}" = llama-cpp ]; then
    if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
        echo "building llama-cpp-python (a few minutes, once)"
        CMAKE_ARGS="-DGGML_OPENMP=OFF -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            "$VENV/bin/python" -m pip install -q -e ".[llamacpp]"
    fi
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" = "test" ]; then
    shift
    exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/tunery" "$@"
