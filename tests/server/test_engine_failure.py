"""A model fault fails only the requests it touches, and the server keeps serving. Under mpirun (with ULFM, as
launch/serve.sh runs it) a cluster that loses an instance goes on without it: a stream that borrowed from it
continues with the same tokens, unless the instances left cannot hold its request, which then ends with an
error event naming the failure; /health says which instances are out. Under the deepspeed launcher, which ends
every rank when one dies, the cluster goes down with a line naming the lost rank: its streams end, /health never
answers 200 again, and every process exits non-zero instead of leaving requests hanging.

The fault is real: a checkpoint whose final norm is NaN gives NaN logits, which greedy decoding takes (argmax)
and sampling refuses (torch.multinomial raises in the sampler, which fails that request alone)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file, save_file

from megakv.bench.server_metrics import total
from megakv.processes import session_pids

from server_process import SHUTDOWN_SECONDS, ServerProcess, wait_for_failed_instances, wait_for_idle_pools

SAMPLING_FAILURE = "sampling failed: probability tensor contains either `inf`, `nan` or element < 0"

# Under deepspeed, whoever notices first names the lost rank: rank 0's KV server, whose link from rank 1 ends
# without a goodbye, or rank 0's messaging connection from rank 1.
KV_LINK_LOST = "megakv: the KV server of rank 0 (instance 0) lost the link from rank 1 (instance 1)"
RANK_LOST = "megakv: rank 0: rank 1 is gone (its connection closed without a goodbye"
# 300 prompt tokens of the chat model's vocabulary (259 ids): with 30 new ones, 21 blocks of 16 (the KV of 329).
LONG_PROMPT = [1 + index % 250 for index in range(300)]


@pytest.fixture(scope="module")
def nan_checkpoint(chat_model, tmp_path_factory) -> Path:
    """The chat model with a NaN final norm."""
    checkpoint = tmp_path_factory.mktemp("nan") / "ckpt"
    shutil.copytree(chat_model[1], checkpoint)
    shard = checkpoint / "model_tp00.safetensors"
    tensors = load_file(shard)
    tensors["decoder.final_layernorm.weight"] = torch.full_like(tensors["decoder.final_layernorm.weight"],
                                                                float("nan"))
    save_file(tensors, shard, metadata={"format": "pt"})
    return checkpoint


def wait_for_exit(server: ServerProcess) -> tuple[int, list[int]]:
    """The exit status of the server's process, and every /health status seen until it stopped answering."""
    statuses = []
    deadline = time.monotonic() + SHUTDOWN_SECONDS
    while server.proc.poll() is None:
        assert time.monotonic() < deadline, f"still running {SHUTDOWN_SECONDS} s after the failure:\n{server.output}"
        try:
            statuses.append(httpx.get(f"{server.url}/health", timeout=2).status_code)
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return server.proc.returncode, statuses


def test_a_model_fault_fails_its_request_alone_and_the_server_keeps_serving(nan_checkpoint, start_server):
    server = start_server(nan_checkpoint, "--num-blocks", "64", "--served-model-name", "tiny")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    greedy = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    with pytest.raises(openai.InternalServerError, match=SAMPLING_FAILURE):
        client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4, temperature=1.0)
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 1.0, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert SAMPLING_FAILURE in events[-2] and events[-1] == "data: [DONE]"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    again = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert again.choices[0].text == greedy.choices[0].text
    assert total(wait_for_idle_pools(server.url), "megakv:kv_blocks_free") == 64
    assert server.stop(signal.SIGTERM) == 0, server.output


@pytest.mark.mpi
@pytest.mark.slow
def test_a_model_fault_on_one_instance_fails_its_request_alone(nan_checkpoint, start_server):
    server = start_server(nan_checkpoint, "--instances", "2", "--num-blocks", "16", "--served-model-name", "tiny",
                          ranks=2)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    # A greedy request holds blocks on instance 0, so the router sends the sampled one to instance 1, where its
    # sampling fails; the greedy stream goes on to its end.
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": list(range(1, 40)), "max_tokens": 60, "ignore_eos": True, "stream": True,
            "temperature": 0}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        with pytest.raises(openai.InternalServerError, match=SAMPLING_FAILURE):
            client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4, temperature=1.0,
                                      extra_body={"return_kv_placement": True})
        events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
    assert client.completions.create(model="tiny", prompt=[4, 5], max_tokens=2, temperature=0).choices
    assert total(wait_for_idle_pools(server.url), "megakv:kv_blocks_free") == 32
    assert server.stop(signal.SIGTERM) == 0, server.output


def rank_pids(server: ServerProcess) -> list[int]:
    """The pids of the job's ranks: the processes of its session that run ``megakv serve`` or launch/serve.py,
    not the launchers (mpirun, deepspeed) that start them."""
    pids = []
    for pid in session_pids(server.proc.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"mpirun") and any(arg.endswith((b"/megakv", b"launch/serve.py")) for arg in argv[:3]):
            pids.append(pid)
    return pids


def stream_completion(server: ServerProcess, body: dict, on_first_event) -> list[str]:
    """The data lines of a streamed completion; ``on_first_event()`` runs once the first one has come."""
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                      json={"model": "tiny", "stream": True, **body}) as stream:
        assert stream.status_code == 200, stream.read()
        lines = (line for line in stream.iter_lines() if line.startswith("data: "))
        events = [next(lines)]
        on_first_event()
        events += list(lines)
    return events


def streamed_text(events: list[str]) -> str:
    return "".join(json.loads(event[len("data: "):])["choices"][0]["text"] for event in events[:-1])


@pytest.mark.mpi
@pytest.mark.slow
def test_a_killed_creditor_leaves_the_cluster_server_serving_the_same_tokens(chat_model, start_server):
    server = start_server(chat_model[1], "--instances", "3", "--num-blocks", "16", "--served-model-name", "tiny",
                          ranks=3)
    killed = sorted(pid for pid in rank_pids(server) if pid != server.front_pid())[0]
    # 330 tokens need 21 blocks: the request borrows 5 beyond its instance's 16.
    body = {"prompt": LONG_PROMPT, "max_tokens": 30, "ignore_eos": True, "temperature": 0}
    events = stream_completion(server, body, lambda: os.kill(killed, signal.SIGKILL))
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-2].replace(" ", ""), events[-2:]
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    (failed,) = health.json()["failed_instances"]
    undisturbed = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0).completions.create(
        model="tiny", prompt=LONG_PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    assert streamed_text(events) == undisturbed.choices[0].text
    metrics = wait_for_idle_pools(server.url)
    assert total(metrics, "megakv:instance_failures_total") == 1
    # The failed instance's pool is gone from /metrics; the others are free but for the kept loans.
    assert total(metrics, "megakv:kv_blocks_free") + total(metrics, "megakv:ledger_kept_blocks") == 2 * 16
    assert f"the gManager declares instance {failed} failed" in server.output
    assert server.stop(signal.SIGTERM) == 0, server.output


@pytest.mark.mpi
@pytest.mark.slow
def test_a_request_the_instances_left_cannot_hold_ends_with_an_error_naming_the_failure(chat_model, start_server):
    server = start_server(chat_model[1], "--instances", "2", "--num-blocks", "16", "--served-model-name", "tiny",
                          ranks=2)
    (other_rank,) = [pid for pid in rank_pids(server) if pid != server.front_pid()]
    events = stream_completion(server, {"prompt": LONG_PROMPT, "max_tokens": 30, "ignore_eos": True},
                               lambda: os.kill(other_rank, signal.SIGKILL))
    assert events[-1] == "data: [DONE]"
    assert "instance 1 failed, and the 1 instance(s) left can hold 256 tokens of a request, fewer than its 329" \
        in events[-2], events[-2:]
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.json()["failed_instances"] == [1]
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    assert client.completions.create(model="tiny", prompt=[4, 5], max_tokens=2, temperature=0).choices
    assert total(wait_for_idle_pools(server.url), "megakv:kv_blocks_free") == 16
    assert server.stop(signal.SIGTERM) == 0, server.output


@pytest.mark.mpi
@pytest.mark.slow
def test_an_idle_cluster_server_hears_of_a_killed_instance_and_holds_less(chat_model, start_server):
    # Nothing runs when the rank dies: the front, which steps only while there is work, must still hear of it.
    server = start_server(chat_model[1], "--instances", "2", "--num-blocks", "16", "--served-model-name", "tiny",
                          ranks=2)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
    assert client.models.list().data[0].max_model_len == 2 * 16 * 16
    (other_rank,) = [pid for pid in rank_pids(server) if pid != server.front_pid()]
    os.kill(other_rank, signal.SIGKILL)
    wait_for_failed_instances(server, [1], 10)
    assert client.models.list().data[0].max_model_len == 16 * 16
    with pytest.raises(openai.BadRequestError, match=r"a request may hold at most 256 \(the KV memory it may use: 16 "
                                                     r"blocks of 16 tokens, its instance's pool \(instances \[1\] "
                                                     r"failed\)\)"):
        client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=30, temperature=0)
    assert client.completions.create(model="tiny", prompt=[4, 5], max_tokens=2, temperature=0).choices
    assert server.stop(signal.SIGTERM) == 0, server.output


@pytest.mark.mpi
@pytest.mark.slow
def test_a_killed_rank_under_deepspeed_ends_the_cluster_server_and_its_streams(chat_model, start_server):
    server = start_server(chat_model[1], "--instances", "2", "--num-blocks", "16", "--served-model-name", "tiny",
                          ranks=2, launcher="deepspeed")
    (other_rank,) = [pid for pid in rank_pids(server) if pid != server.front_pid()]
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": list(range(1, 40)), "max_tokens": 200, "ignore_eos": True,
            "stream": True}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        os.kill(other_rank, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    status, health = wait_for_exit(server)
    assert status != 0 and 200 not in health, server.output
    output = " ".join(server.output.split())
    assert RANK_LOST in output or KV_LINK_LOST in output, server.output
