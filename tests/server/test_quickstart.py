"""The quickstart's demo run (launch/quickstart.py): the real demo cluster under mpirun answers through the openai
client, the pass-key chat borrows blocks from the other instances, and SIGTERM ends every rank."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from server_process import ROOT


@pytest.mark.mpi
@pytest.mark.slow
def test_quickstart_answers_borrows_and_stops_every_rank(smollm2):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "quickstart.py"), "--model",
                           str(smollm2.checkpoint(1))], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "assistant: The pass key is 40962." in proc.stdout
    assert "assistant: The capital of France is Paris." in proc.stdout
    pass_key_placement = proc.stdout.split("The pass key is 40962.")[1].splitlines()[1]
    assert "24 in its own pool, 18 borrowed; held by instances [0, 1, 2]" in pass_key_placement
    # The pass key's borrowed full blocks stay on loan, cached, and each lender's pool is free but for them.
    owed, kept, *free = map(int, re.search(r"(\d+) blocks owed in the ledger \((\d+) of them kept loans.*"
                                           r"free blocks per instance (\d+), (\d+), (\d+) of 24", proc.stdout).groups())
    assert owed == kept == 17 and free[0] == 24 and sum(24 - blocks for blocks in free) == kept
    assert "every rank exited, then mpirun with status 0" in proc.stdout
