#!/usr/bin/env bash
# megakv's demo, from nothing: sets up .venv, builds the tiny demo model
# (tools/make_demo_model.py, random weights, byte-level tokenizer) and serves
# prompts on a small CPU cluster launched with mpirun.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
.venv/bin/python tools/make_demo_model.py --output demo/ckpt --hf-output demo/hf --tp 2
exec .venv/bin/mpirun --allow-run-as-root --oversubscribe --bind-to none -n 2 \
  .venv/bin/megakv generate --config configs/demo.yaml --model demo/ckpt \
  --prompt "megakv serves long contexts across many machines." "$@"
