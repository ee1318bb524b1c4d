"""The deepspeed launcher runs megakv at TP=2 with the same tokens as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.mpi
def test_deepspeed_launcher_tp2_equals_single_process(megakv_checkpoint):
    args = ["--prompt-ids", "5,17,42,7,99", "--max-new-tokens", "12", "--json"]
    single = subprocess.run([str(BIN_DIR / "megakv"), "generate", "--model", str(megakv_checkpoint("gqa", 1)),
                             *args], capture_output=True, text=True, check=True, timeout=120)
    # --quiet and a named accelerator keep the launcher's own log lines off stdout, as the README says.
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    launched = subprocess.run([str(BIN_DIR / "deepspeed"), "--quiet", "--num_gpus", "2", "--master_port", "29517",
                               str(REPO_ROOT / "launch" / "generate.py"), "--model",
                               str(megakv_checkpoint("gqa", 2)), "--tp", "2", *args],
                              capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert launched.returncode == 0, launched.stderr[-3000:]
    # --json: stdout holds nothing but the JSON records.
    records = [json.loads(line) for line in launched.stdout.splitlines()]
    assert records == [json.loads(single.stdout)]
