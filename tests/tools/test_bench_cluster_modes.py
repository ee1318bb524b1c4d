"""tools/bench_cluster_modes.py on a tiny configuration: every mode, metric, ratio, context row and figure."""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from megakv.bench import cluster_server
from megakv.processes import free_port

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_cluster_modes.py"
# Two instances of 8 blocks (128 tokens each); one request in three of the long-tail workload needs 150-200.
TINY_CONFIG = """
model: random
instances: 2
block_size: 16
kv_blocks_per_instance: 8
max_num_seqs: 8
max_num_batched_tokens: 128
recall_after: 0.1
seed: 0
goodput: [ttft:60000, tpot:60000]
request_timeout: 60
workloads:
  - {name: longtail, input_len_dist: "longtail:16:48:150:200:0.34", output_len_dist: "fixed:4", num_prompts: 3,
     request_rates: [20, 40]}
  - {name: short, input_len_dist: "uniform:16:48", output_len_dist: "fixed:4", num_prompts: 3, request_rates: [20]}
max_context_instances: [1, 2]
"""
SUMMARY_KEYS = {"completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput",
                *(f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
                  for stat in ("mean", "median", "p99"))}


def run_tool(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.mpi
def test_bench_cluster_modes_tiny_run_reports_every_field_and_figure(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    proc = run_tool("--config", str(config), "--output", str(tmp_path / "out.json"), "--figures-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result == json.loads((tmp_path / "out.json").read_text())
    assert {"cpu", "cores", "commit"} <= set(result["machine"])
    assert [(row["workload"], row["request_rate"]) for row in result["workloads"]] == [
        ("longtail", 20), ("longtail", 40), ("short", 20)]
    for row in result["workloads"]:
        for mode in ("distkv", "independent", "single"):
            figures = row["modes"][mode]
            assert SUMMARY_KEYS <= set(figures) and figures["completed"] + figures["failed"] == 3
            assert figures["server_error"] is None
            assert set(figures["server"]) == {"borrow_events", "blocks_borrowed", "remote_micro_attentions",
                                              "preemptions", "recalled"}
        for pair in ("distkv/independent", "distkv/single"):
            assert set(row["ratios"][pair]) == SUMMARY_KEYS
        assert row["ratios"]["distkv/independent"]["output_throughput"] > 0
        # Only requests that every mode served: the long one is out, in DistKV's figures too.
        served = row["served_by_all"]
        assert {served[mode]["requests"] for mode in served} == {2 if row["workload"] == "longtail" else 3}
        assert all(served[mode][key] > 0 for mode in served for key in ("median_ttft_ms", "p99_ttft_ms",
                                                                        "median_e2el_ms", "p99_e2el_ms"))
        assert all(len(row["modes"][mode]["ttfts_ms"]) == 3 for mode in served)
    for row in result["workloads"][:2]:
        # The long request fits only by borrowing: DistKV serves it, the others reject it.
        assert row["modes"]["distkv"]["failed"] == 0 and row["modes"]["distkv"]["server"]["blocks_borrowed"] > 0
        assert row["modes"]["independent"]["failed"] == row["modes"]["single"]["failed"] == 1
        assert row["modes"]["independent"]["errors"] == ["HTTP 400"]
        assert row["modes"]["independent"]["failed_input_lens"][0] >= 150
    one, two = result["max_context"]
    assert (one["distkv"]["max_context_tokens"], one["independent"]["max_context_tokens"]) == (128, 128)
    assert (two["distkv"]["max_context_tokens"], two["independent"]["max_context_tokens"]) == (256, 128)
    assert two["distkv"]["ratio_to_instances_x_pool"] == 1.0 and two["independent"]["ratio_to_pool"] == 1.0
    assert all(row[mode]["one_block_more_rejected"] for row in result["max_context"]
               for mode in ("distkv", "independent"))
    assert sorted(Path(path).name for path in result["figures"]) == [
        "bench_cluster_modes_goodput.png", "bench_cluster_modes_max_context.png", "bench_cluster_modes_p99_ttft.png",
        "bench_cluster_modes_throughput.png"]
    for path in result["figures"]:
        assert Path(path).parent == tmp_path and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cluster_modes_bad_config_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY_CONFIG.replace('"uniform:16:48"', '"uniform:48:16"'))
    proc = run_tool("--config", str(config), timeout=120)
    assert proc.returncode == 2
    assert "workloads[1].input_len_dist 'uniform:48:16': the range 48..16 is empty" in proc.stderr
    config.write_text(TINY_CONFIG.replace("seed: 0", "seeds: 0"))
    proc = run_tool("--config", str(config), timeout=120)
    assert proc.returncode == 2 and "missing key(s) seed; unknown key(s) seeds" in proc.stderr


def test_a_server_whose_port_was_taken_starts_again_on_another(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_cluster_modes", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model = tool.build_random_model(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port, free = taken.getsockname()[1], free_port()
        ports = iter([taken_port, free])
        monkeypatch.setattr(cluster_server, "free_port", lambda: next(ports))
        flags = tool.server_flags(yaml.safe_load(TINY_CONFIG), 0.0)
        with cluster_server.Server.start(model, flags, 1, "bench", tmp_path / "server.log") as server:
            assert server.url == f"http://127.0.0.1:{free}"
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert f"port {taken_port} was taken before the server bound it" in capsys.readouterr().err
