"""tools/bench_decode.py on a tiny random model: every case reported, the limit and the linear sweep computed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_decode.py"


def test_bench_decode_tiny_run_reports_every_case(random_demo_checkpoint, tmp_path):
    model = random_demo_checkpoint
    output = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--model", str(model), "--batches", "1", "3", "--context", "20",
                           "--steps", "6", "--prefill", "40", "--output", str(output)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report == json.loads(proc.stdout)
    assert [result["dtype"] for result in report["results"]] == ["float32", "bfloat16"]
    fp32, bf16 = report["results"]
    # bf16 weights are half the bytes of fp32 ones.
    assert bf16["weight_bytes_per_step"] * 2 == fp32["weight_bytes_per_step"]
    for result in report["results"]:
        assert [case["batch"] for case in result["decode"]] == [1, 3]
        assert all(case["tokens_per_s"] > 0 and case["num_steps"] >= 3 for case in result["decode"])
        assert result["prefill"]["prompt_tokens"] == 40 and result["prefill"]["tokens_per_s"] > 0
        assert 0 < result["batch1_fraction_of_limit"]
        assert [case["rows"] for case in result["linear"]][:2] == [1, 2]
        assert result["linear_crossover_rows"] in [0] + [case["rows"] for case in result["linear"]]
