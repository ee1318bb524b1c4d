"""tools/bench_prefix_cache.py on a tiny cluster: both modes, the first questions' and follow-ups' TTFT, the
cache's hits in the cached mode only, and the ratios."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_prefix_cache.py"


@pytest.mark.mpi
def test_bench_prefix_cache_tiny_run_reports_both_modes(random_demo_checkpoint, tmp_path):
    model = random_demo_checkpoint
    output = tmp_path / "report.json"
    # Documents of 60-80 tokens in pools of 8 blocks (128 tokens): each stays on its instance, whose cache keeps it
    # (a document that borrowed would take the other document's cached blocks, see docs/benchmarks.md).
    proc = subprocess.run([sys.executable, str(TOOL), "--model", str(model), "--instances", "2", "--num-blocks", "8",
                           "--documents", "2", "--questions", "3", "--document-len-dist", "uniform:60:80",
                           "--question-len", "4", "--output-len", "2", "--request-rate", "50",
                           "--request-timeout", "120", "--output", str(output)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report == json.loads(proc.stdout)
    for mode in ("cached", "uncached"):
        figures = report["modes"][mode]
        assert figures["completed"] == 6 and figures["failed"] == 0
        assert figures["first_question_ttft_ms"]["median"] > 0 and figures["follow_up_ttft_ms"]["p99"] > 0
    assert report["modes"]["cached"]["server"]["prefix_cache_hits"] > 0
    assert report["modes"]["uncached"]["server"]["prefix_cache_hits"] == 0
    assert set(report["follow_up_ttft_uncached_over_cached"]) == {"median", "p99"}
    assert report["workload"]["documents"] == 2 and report["pool_tokens_per_instance"] == 128
