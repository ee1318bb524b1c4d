"""megakv serve at start: its log names the model, the cluster's shape, its KV capacity and the URL; it stops
before serving, with one line and status 2, on what it cannot run with: a KV pool larger than the memory, a bad
server setting in its config, a port that is taken."""
from __future__ import annotations

import re
import socket
import subprocess
import time

import httpx

from megakv.kernels.cpu_build import cpu_flags
from megakv.processes import free_port

from server_process import MEGAKV, STARTUP_SECONDS, ServerProcess, serve_argv


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``megakv: error:`` line of a run that exited 2 without a traceback."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("megakv: error:")]
    return line


def test_serve_kv_pool_beyond_memory_is_one_line(chat_model):
    proc = subprocess.run(serve_argv(chat_model[1], free_port(), "--num-blocks", "100000000000"), capture_output=True,
                          text=True, timeout=120)
    assert "--num-blocks 100000000000: the KV pool of 100000000000 blocks" in error_line(proc)


def test_serve_bad_config_setting_is_one_line(chat_model, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("host: 0.0.0.0\nport: 80000\n")
    proc = subprocess.run([MEGAKV, "serve", "--model", str(chat_model[1]), "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert "server config: port must be an integer from 0 to 65535 (0: any free port), got 80000" in error_line(proc)


def test_serve_port_in_use_is_one_line_naming_it(chat_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(serve_argv(chat_model[1], port), capture_output=True, text=True, timeout=120)
    assert f"cannot listen on 127.0.0.1 port {port} (the default host 127.0.0.1, --port {port}): " \
           f"Address already in use" in error_line(proc)


def test_serve_startup_log_names_model_shape_kv_capacity_and_url(chat_model):
    # No --dtype: auto runs this fp32 checkpoint in bf16 where the CPU has bf16 arithmetic.
    dtype = "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"
    argv = [MEGAKV, "serve", "--model", str(chat_model[1]), "--port", "0", "--num-blocks", "64", "--block-size", "8",
            "--served-model-name", "tiny", "--log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    server = ServerProcess(proc, 0)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while "megakv serve: serving on" not in server.output:
            assert proc.poll() is None and time.monotonic() < deadline, server.output
            time.sleep(0.1)
        lines = [line for line in server.output.splitlines() if line.startswith("megakv serve:")]
        assert lines[0] == f"megakv serve: model {chat_model[1]} (4 layers, hidden 64, 4 heads, {dtype}) as 'tiny': " \
                           f"1 instance x TP 1"
        assert lines[1] == "megakv serve: KV cache: 64 blocks of 8 tokens per instance (512 tokens); cluster KV " \
                           "capacity 512 tokens; lending cap 1.0; a request may hold 512 tokens (the KV memory it " \
                           "may use: 64 blocks of 8 tokens, its instance's pool)"
        # Port 0 took a free port, and the log names it.
        url = re.fullmatch(rf"megakv serve: serving on (http://127\.0\.0\.1:\d+) \(pid {proc.pid}\)", lines[2])[1]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert server.stop() == 0
    finally:
        server.kill()
