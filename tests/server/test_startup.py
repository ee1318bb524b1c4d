"""megakv serve stops before serving, with one line and status 2, on what it cannot run with: a KV pool larger
than the memory, a bad server setting in its config, a port that is taken."""
from __future__ import annotations

import socket
import subprocess

from server_process import MEGAKV, free_port, serve_argv


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
