"""The benchmark scripts run end to end on tiny sizes and print the JSON their readers expect."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def run_tool(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.slow
@pytest.mark.mpi
def test_bench_distkv_tiny_run_reaches_the_physical_limit():
    result = run_tool(str(TOOLS / "bench_distkv.py"), "--contexts", "512", "--pool-blocks", "4",
                      "--instances-list", "1,2", "--decode-tokens", "4", "--repeats", "1",
                      "--traffic-instances", "1,2", "--borrow-samples", "3")
    for row in result["max_context"]:
        assert row["ratio_to_physical_limit"] >= 0.95 and row["one_block_more_rejected"]
    [overhead] = result["remote_overhead"]
    [run] = overhead["runs"]
    assert run["spread_num_remote_blocks"] > 0 and overhead["slowdown"] == run["slowdown"] > 0
    assert overhead["remote_layer_budget_at_1.15x_us"] > 0 and "remote_layer_overhead_us" in overhead
    assert result["transport_round_trip"]["round_trip_us"] > 0
    assert result["independence"]["ratio"] > 0
    alone, pair = result["control_traffic"]
    # One instance alone has no control plane; of two, the one that is not the front reports its outputs once a
    # step, and nothing else per step.
    assert alone["messages_per_step_per_instance"] == 0
    assert 0 < pair["messages_per_step_per_instance"] and pair["max_messages_per_step"] <= 1.5
    idle, busy = result["borrow_latency"]
    assert (idle["front_batch"], busy["front_batch"]) == (0, 16) and idle["samples"] == busy["samples"] == 3
    # Busy, instance 0 told the gManager in the warm-up that it has less to lend: the idle instance 2 lends.
    assert busy["creditors"] == [2] and 0 < busy["median_ms"] <= busy["p99_ms"] <= busy["max_ms"]


@pytest.mark.slow
def test_bench_attention_tiny_run_prints_every_key():
    result = run_tool(str(TOOLS / "bench_attention.py"), "--contexts", "256", "--batches", "1",
                      "--prefill-queries", "16", "--prefill-context", "256", "--repeats", "1")
    text = json.dumps(result)
    for key in ("context", "batch", "paged_gbps", "sdpa_contiguous_gbps", "read_bandwidth_gbps"):
        assert f'"{key}"' in text
    (resident,) = [row for row in result["results"] if row["case"] == "decode_cache_resident"]
    assert resident["kv_bytes"] == 16 << 20 and resident["paged_gbps"] > 0
