"""Fixtures for the HTTP server tests: a tiny chat checkpoint with a byte-level tokenizer, and real servers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from megakv.processes import free_port

from server_process import CHAT_TEMPLATE, ROOT, ServerProcess, serve_argv, serve_flags, spawn_server


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory) -> tuple[Path, Path]:
    """(Hugging Face folder, megakv checkpoint for TP 1) of the random demo model, with a chat template."""
    root = tmp_path_factory.mktemp("server-model")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_model.py"), "--random", "--tp", "1",
                    "--output", str(root / "ckpt"), "--hf-output", str(root / "hf")],
                   check=True, capture_output=True, text=True, timeout=300)
    (root / "ckpt" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return root / "hf", root / "ckpt"


@pytest.fixture(scope="module")
def server(chat_model):
    """A one-process server of the chat model (64 blocks) named "tiny", shared by a module's tests; modules
    that need other settings define their own."""
    server = spawn_server(chat_model[1], "--num-blocks", "64", "--served-model-name", "tiny")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    """The openai client of the module's server."""
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture
def start_server(start_mpi, start_deepspeed):
    """start_server(checkpoint, *flags, ranks=1, launcher="mpirun") -> a ready ServerProcess (several ranks under
    mpirun or the deepspeed launcher); killed at teardown if still running."""
    servers: list[ServerProcess] = []

    def start(checkpoint: Path, *flags: str, ranks: int = 1, launcher: str = "mpirun") -> ServerProcess:
        if ranks == 1:
            servers.append(spawn_server(checkpoint, *flags))
            return servers[-1]
        port = free_port()
        if launcher == "deepspeed":
            proc = start_deepspeed(ranks, "serve.py", serve_flags(checkpoint, port, *flags))
        else:
            proc = start_mpi(ranks, serve_argv(checkpoint, port, *flags))
        server = ServerProcess(proc, port)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.kill()


