#!/usr/bin/env bash
# The test suite, from nothing: sets up .venv (launch/setup_env.sh), then runs pytest.
#   bash launch/run_tests.sh           full suite (unit, kernel, mpirun/gloo, end to end)
#   bash launch/run_tests.sh --quick   skips tests marked slow
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
marker=()
if [ "${1:-}" = "--quick" ]; then
  marker=(-m "not slow")
  shift
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "${marker[@]}" "$@"
