"""megakv serve refuses a KV pool larger than the memory before allocating it: one line, exit 2."""
from __future__ import annotations

import subprocess

from server_process import free_port, serve_argv


def test_serve_kv_pool_beyond_memory_is_one_line(chat_model):
    proc = subprocess.run(serve_argv(chat_model[1], free_port(), "--num-blocks", "100000000000"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("megakv: error:")]
    assert "--num-blocks 100000000000: the KV pool of 100000000000 blocks" in line
