#!/usr/bin/env bash
# Creates (or reuses) .venv-clients: the third-party load generators the tests drive megakv's server with
# (GuideLLM and AIPerf), with everything they pull in pinned by launch/clients-constraints.txt. They get an
# environment of their own: their dependencies (pandas, dash, datasets, ...) are not megakv's, and must not move
# megakv's pins. Safe to run repeatedly; launch/setup_env.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGAKV_CLIENTS_VENV:-.venv-clients}
TORCH_VERSION=${MEGAKV_TORCH_VERSION:-2.13.0}
stamp="$VENV/.megakv-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt launch/clients-constraints.txt ] && [ "$stamp" -nt launch/setup_clients.sh ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
rm -f "$stamp"
constraints="$VENV/constraints.txt"
{ echo "torch==$TORCH_VERSION"; grep -v '^#' launch/clients-constraints.txt; } > "$constraints"
# GuideLLM depends on torch: the local CPU wheel goes first, or pip would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --quiet -c "$constraints" guidellm aiperf
touch "$stamp"
