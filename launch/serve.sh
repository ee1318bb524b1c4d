#!/usr/bin/env bash
# megakv serve on a CPU cluster under mpirun, with as many ranks as the config's instances x tp:
#   bash launch/serve.sh configs/demo.yaml --model demo/ckpt [--port 8000 ...]
# Every option after the config goes to megakv serve (flags win over the file). SIGTERM to rank 0 (the pid it
# prints) shuts the cluster down cleanly; Ctrl-C here makes mpirun kill every rank at once.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: bash launch/serve.sh CONFIG.yaml --model CKPT_DIR [megakv serve options]}
shift
ranks=$(.venv/bin/python -c 'import sys, yaml
config = yaml.safe_load(open(sys.argv[1])) or {}
print(int(config.get("instances", 1)) * int(config.get("tp", 1)))' "$config")
exec .venv/bin/mpirun --allow-run-as-root --oversubscribe --bind-to none -n "$ranks" \
  .venv/bin/megakv serve --config "$config" "$@"
