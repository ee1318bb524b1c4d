#!/usr/bin/env bash
# megakv serve on this machine under mpirun, with as many ranks as the config's instances x tp:
#   bash launch/serve.sh configs/demo.yaml [--port 8000 ...]
# Every option after the config goes to megakv serve (flags win over the file). SIGTERM to rank 0 (the pid it
# prints) shuts the cluster down cleanly; Ctrl-C here makes mpirun kill every rank at once. Across several
# machines: launch/serve_hostfile.sh. Both run megakv from .venv, or from $MEGAKV_VENV when set.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: bash launch/serve.sh CONFIG.yaml [megakv serve options]}
shift
venv=${MEGAKV_VENV:-.venv}
ranks=$("$venv/bin/python" launch/num_ranks.py "$config" "$@")
# --with-ft ulfm: a rank that dies ends only its instance; the others and the front go on (megakv declares it
# failed and runs its requests again elsewhere).
exec "$venv/bin/mpirun" --allow-run-as-root --oversubscribe --bind-to none --with-ft ulfm -n "$ranks" \
  "$venv/bin/megakv" serve --config "$config" "$@"
