"""The demo cluster on two "machines": two network namespaces of this host joined by a virtual Ethernet link,
each with a hostname of its own, the cluster launched across them by launch/serve_hostfile.sh with an ssh that
enters the namespace. Instance 0 and the front run on the first machine, instances 1 and 2 on the second; a
client reaches the front over a third link, as it would over a data center's network.

The pass-key question borrows KV across the machines and is answered as transformers answers it. Then the link
between the machines is cut: the second machine is declared failed within the peer timeout, and the first keeps
serving, requests caught by the cut included (re-run from their tokens on instance 0), while a request the one
instance left cannot hold is refused with the failure named.

Needs root and ``ip netns`` (skipped with the reason otherwise)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from megakv.bench.server_metrics import scrape, total
from megakv.processes import free_port

from server_process import ROOT, ServerProcess, wait_for_failed_instances

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

SSH = ROOT / "tests" / "server" / "netns_ssh.sh"
# The machines' network lives only inside the two namespaces; the client's link has one end on this host, so its
# subnet is picked per test run.
MACHINES_SUBNET = "10.231.0"
PEER_TIMEOUT = 5.0
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24


@dataclass(frozen=True)
class TwoMachines:
    front: str  # the first machine's host (and namespace) name: rank 0 and instance 0 run there
    other: str  # the second machine's: instances 1 and 2
    link: str  # the first machine's end of the link between them
    client_address: str  # the first machine's address on the client's link

    def cut(self) -> None:
        ip("-n", self.front, "link", "set", self.link, "down")


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30)


def build_machines(tag: str) -> TwoMachines:
    front, other = f"mkv{tag}a", f"mkv{tag}b"
    client_subnet = f"10.232.{int(tag) % 250}"
    ip("netns", "add", front)
    ip("netns", "add", other)
    for name in (front, other):
        hosts = Path("/etc/netns") / name / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{MACHINES_SUBNET}.1 {front}\n{MACHINES_SUBNET}.2 {other}\n")
        ip("-n", name, "link", "set", "lo", "up")
    ip("link", "add", f"{front}0", "type", "veth", "peer", "name", f"{other}0")
    ip("link", "add", f"{front}c", "type", "veth", "peer", "name", f"mkv{tag}h")
    for index, (name, device) in enumerate(((front, f"{front}0"), (other, f"{other}0")), start=1):
        ip("link", "set", device, "netns", name)
        ip("-n", name, "addr", "add", f"{MACHINES_SUBNET}.{index}/24", "dev", device)
        ip("-n", name, "link", "set", device, "up")
    ip("link", "set", f"{front}c", "netns", front)
    ip("-n", front, "addr", "add", f"{client_subnet}.2/24", "dev", f"{front}c")
    ip("-n", front, "link", "set", f"{front}c", "up")
    ip("addr", "add", f"{client_subnet}.1/24", "dev", f"mkv{tag}h")
    ip("link", "set", f"mkv{tag}h", "up")
    return TwoMachines(front, other, f"{front}0", f"{client_subnet}.2")


def remove_machines(tag: str) -> None:
    """Kill what runs in the namespaces and remove them (their links go with them)."""
    for name in (f"mkv{tag}a", f"mkv{tag}b"):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


@pytest.fixture
def two_machines():
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs iproute2's ip and util-linux's unshare")
    tag = str(os.getpid())
    try:
        machines = build_machines(tag)
    except subprocess.CalledProcessError as err:
        remove_machines(tag)
        pytest.skip(f"cannot build network namespaces here: {' '.join(err.cmd)}: {err.stderr.strip()}")
    try:
        yield machines
    finally:
        remove_machines(tag)


def start_cluster(machines: TwoMachines, checkpoint: Path, tmp_path: Path) -> ServerProcess:
    """The demo cluster, 1 rank on the first machine and 2 on the second, launched from the first. Without prefix
    caching, which would send every chat to the instance that holds the chat template's prefix: idle instances
    take one request each."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{machines.front} slots=1\n{machines.other} slots=2\n")
    port = free_port()
    command = ["bash", str(ROOT / "launch" / "serve_hostfile.sh"), str(hostfile), str(ROOT / "configs" / "demo.yaml"),
               "--model", str(checkpoint), "--host", machines.client_address, "--port", str(port),
               "--dtype", "float32", "--peer-timeout", str(PEER_TIMEOUT), "--served-model-name", "demo",
               "--log-level", "warning", "--no-enable-prefix-caching"]
    # Open MPI, like megakv, talks between machines over their own network, not the client's.
    mpirun_args = (f"--mca plm_ssh_agent {SSH} --mca btl_tcp_if_include {MACHINES_SUBNET}.0/24 "
                   f"--mca oob_tcp_if_include {MACHINES_SUBNET}.0/24")
    proc = subprocess.Popen([str(SSH), machines.front, shlex.join(command)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MEGAKV_MPIRUN_ARGS=mpirun_args))
    return ServerProcess(proc, port, machines.client_address).ready()


def machine_of(instance: int) -> int:
    return 0 if instance == 0 else 1


def ask(client: OpenAI, messages: list[dict[str, str]]) -> tuple[object, float]:
    started = time.monotonic()
    response = client.chat.completions.create(model="demo", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"return_token_ids": True, "return_kv_placement": True})
    return response.choices[0], time.monotonic() - started


def test_two_machines_borrow_across_the_link_and_a_cut_off_machine_fails_alone(two_machines, smollm2, tmp_path):
    server = start_cluster(two_machines, smollm2.checkpoint(1), tmp_path)
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
        pass_key = smollm2.pass_key_messages(repeats=10)
        prompt = smollm2.chat_ids(pass_key)
        answer, _ = ask(client, pass_key)
        assert answer.token_ids == smollm2.greedy(prompt, MAX_TOKENS)
        assert smollm2.pass_key in answer.message.content
        placement = answer.kv_placement
        assert placement["num_remote_blocks"] > 0
        assert any(machine_of(instance) != machine_of(placement["instance"])
                   for instance in placement["block_instances"])

        france = smollm2.greedy(smollm2.chat_ids(FRANCE), MAX_TOKENS)
        with ThreadPoolExecutor(3) as pool:
            two_machines.cut()
            cut = time.monotonic()
            caught = [pool.submit(ask, client, FRANCE) for _ in range(3)]
            health = wait_for_failed_instances(server, [1, 2], PEER_TIMEOUT + 10)
            detected = time.monotonic() - cut
            answers = [future.result() for future in caught]
        print(f"link cut: declared failed after {detected:.2f} s; requests caught by the cut took "
              f"{', '.join(f'{took:.2f} s' for _, took in answers)}")
        assert health["status"] == "degraded"
        assert detected < PEER_TIMEOUT + 2
        for choice, _ in answers:
            assert choice.token_ids == france and choice.kv_placement["instance"] == 0

        again, _ = ask(client, FRANCE)
        assert again.token_ids == france
        with pytest.raises(openai.BadRequestError, match=r"a request may hold .*\(instances \[1, 2\] failed\)"):
            ask(client, pass_key)
        metrics = scrape(server.url)
        assert total(metrics, "megakv:instance_failures_total") == 2
        # The two requests caught on the second machine ran again on instance 0.
        assert total(metrics, "megakv:requests_recomputed_total") == 2
    finally:
        server.kill()
