#!/usr/bin/env bash
# The test suite, from nothing: sets up the environments (launch/setup_env.sh, launch/setup_clients.sh), then
# runs pytest.
#   bash launch/run_tests.sh            full suite (unit, kernel, mpirun/gloo, end to end), pinned packages (.venv)
#   bash launch/run_tests.sh --quick    skips tests marked slow
#   bash launch/run_tests.sh --newest   against the newest releases of every package but torch (.venv-newest)
# The flags combine; extra arguments go to pytest. The tests run in MEGAKV_TEST_WORKERS processes (default 2, the
# cores of the smallest host megakv is tested on; 0 runs them in pytest's own process).
set -euo pipefail
cd "$(dirname "$0")/.."
marker=()
export MEGAKV_DEPS=pinned
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) marker=(-m "not slow"); shift ;;
    --newest) MEGAKV_DEPS=newest; shift ;;
    *) break ;;
  esac
done
venv=.venv
if [ "$MEGAKV_DEPS" = newest ]; then
  venv=.venv-newest
fi
# The launch scripts that tests start run megakv from the same environment.
export MEGAKV_VENV=$venv
bash launch/setup_env.sh
# The load generators some server tests run (GuideLLM, AIPerf), in their own pinned environment.
bash launch/setup_clients.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Most tests wait on processes of their own (mpirun jobs, servers, compilers) or run on one thread, so a second
# worker fills the core the first leaves idle. Each test file runs whole in one worker (loadfile): the servers
# and clusters a module shares start once.
workers=(-n "${MEGAKV_TEST_WORKERS:-2}" --dist loadfile)
exec "$venv/bin/python" -m pytest "${workers[@]}" "${marker[@]}" "$@"
