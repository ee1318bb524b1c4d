"""The mpirun launch scripts: launch/num_ranks.py sizes the job from the config and flags, and
launch/serve_hostfile.sh starts the cluster on the machines of a hostfile (here one: localhost)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from openai import OpenAI

from megakv.processes import free_port

from server_process import ROOT, ServerProcess


def num_ranks(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "num_ranks.py"), *argv], capture_output=True,
                          text=True, timeout=60)


def test_num_ranks_is_instances_times_tp_with_flags_over_the_file(tmp_path):
    demo = str(ROOT / "configs" / "demo.yaml")
    assert num_ranks(demo).stdout == "3\n"
    assert num_ranks(str(ROOT / "configs" / "llama2-70b-4x8.yaml")).stdout == "32\n"
    assert num_ranks(demo, "--instances", "2", "--tp", "3", "--port", "9000").stdout == "6\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("instances: 0\n")
    proc = num_ranks(str(bad))
    assert proc.returncode == 2 and proc.stderr == \
        "megakv: error: parallel config: num_instances must be a positive integer, got 0\n"


@pytest.mark.mpi
@pytest.mark.slow
def test_serve_hostfile_serves_a_cluster_on_the_hostfile_machines_and_stops(chat_model, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    config = tmp_path / "cluster.yaml"
    config.write_text(f"model: {chat_model[1]}\ninstances: 2\ntp: 1\nkv_blocks_per_instance: 8\n"
                      f"served_model_name: tiny\nlog_level: warning\n")
    port = free_port()
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "serve_hostfile.sh"), str(hostfile), str(config),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    server = ServerProcess(proc, port)
    try:
        server.wait_ready()
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
        assert client.models.list().data[0].max_model_len == 2 * 8 * 16
        response = client.completions.create(model="tiny", prompt=list(range(1, 200)), max_tokens=4, temperature=0,
                                             extra_body={"return_kv_placement": True})
        assert response.choices[0].kv_placement["block_instances"] == [0, 1]
        assert server.stop(signal.SIGTERM) == 0, server.output
    finally:
        server.kill()
