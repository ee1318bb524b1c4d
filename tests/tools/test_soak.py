"""tools/soak.py on a tiny cluster with a killed instance: every request answered, the pools whole at the end, and
each rank's memory and descriptors reported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = [pytest.mark.slow, pytest.mark.mpi]

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "soak.py"


def test_soak_tiny_run_with_a_killed_instance(random_demo_checkpoint, tmp_path):
    output = tmp_path / "report.json"
    # Pools of 8 blocks (128 tokens): a long prompt of 144-248 tokens borrows, and still fits the 2 instances left.
    proc = subprocess.run([sys.executable, str(TOOL), "--model", str(random_demo_checkpoint), "--instances", "3",
                           "--num-blocks", "8", "--duration", "60", "--max-requests", "100", "--concurrency", "4",
                           "--long-fraction", "0.2", "--max-tokens", "8", "--kill-rank", "2", "--kill-at", "1",
                           "--peer-timeout", "3", "--sample-every", "0.5", "--output", str(output)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report == json.loads(proc.stdout)
    requests = report["requests"]
    assert requests["sent"] == 100 and requests["completed"] + requests["aborted"] == 100, report["errors"]
    assert requests["failed"] == requests["ended_by_instance_failure"] == 0
    assert report["killed"]["rank"] == 2
    assert report["cluster"]["pools_whole"] and report["cluster"]["failed_instances"] == [2]
    assert report["cluster"]["instance_failures_total"] == 1
    assert sorted(report["ranks"]) == ["0", "1"]
    for figures in report["ranks"].values():
        assert figures["end"]["rss_mib"] > 0 and figures["end"]["fds"] > 0
