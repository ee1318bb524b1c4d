#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment in .venv and installs
# megakv with everything its demo and tests need. Safe to run repeatedly.
#
# torch is pinned first: it is a local CPU wheel here, and installing any
# package that depends on torch before it would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGAKV_VENV:-.venv}
TORCH_VERSION=${MEGAKV_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.megakv-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ]; then
  exit 0
fi
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
export DS_BUILD_OPS=0
"$PY" -m pip install --quiet -c "$VENV/constraints.txt" -e ".[test]"
touch "$stamp"
