#!/usr/bin/env bash
# megakv's demo, from nothing: sets up .venv, builds the tiny demo model
# (tools/make_demo_model.py: random weights, byte-level tokenizer), and serves
# configs/demo_prompts.jsonl on a CPU cluster of 2 instances x 2 TP ranks launched
# with mpirun. The long prompt needs more KV than its instance's pool holds: the
# output shows where its blocks lived and the cluster's ledger afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
.venv/bin/python tools/make_demo_model.py --output demo/ckpt --hf-output demo/hf --tp 2
exec .venv/bin/mpirun --allow-run-as-root --oversubscribe --bind-to none -n 4 \
  .venv/bin/megakv generate --config configs/demo.yaml --model demo/ckpt \
  --prompts-file configs/demo_prompts.jsonl "$@"
