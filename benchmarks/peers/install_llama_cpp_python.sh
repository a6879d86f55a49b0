#!/usr/bin/env bash
# Install the `llama-cpp-python[server]` OpenAI server into its own venv
# (benchmarks/peers/build/venv, git-ignored); it compiles llama.cpp, niced and -j1 by default.
# Benchmark-only peer: never a dependency of sarathi-vattn.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/build/venv"
JOBS="${JOBS:-1}"
mkdir -p "$HERE/build"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" nice -n 10 "$VENV/bin/pip" install 'llama-cpp-python[server]'
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
