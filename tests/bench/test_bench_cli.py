"""``megakv bench serve`` on the command line: a bad flag or an unreachable server is one line naming it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MEGAKV = str(Path(sys.executable).with_name("megakv"))


def bench_serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([MEGAKV, "bench", "serve", *flags], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flags, message", [
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--request-rate", "0"], "--request-rate must be a positive number"),
    (["--input-len-dist", "uniform:9:3"], "--input-len-dist 'uniform:9:3': the range 9..3 is empty"),
    (["--input-len-dist", "fixed:5", "--random-input-len", "5"], "--input-len-dist or --random-input-len"),
    (["--goodput", "ttft:soon"], "--goodput 'ttft:soon'"),
    (["--dataset", "sharegpt"], "--dataset sharegpt needs --dataset-path"),
    (["--base-url", "127.0.0.1:8000"], "--base-url must start with http://"),
    (["--json", "/no/such/folder/out.json"], "--json /no/such/folder/out.json: its folder does not exist"),
])
def test_bench_serve_bad_flag_is_named_before_any_request(flags, message):
    proc = bench_serve("--base-url", "http://127.0.0.1:9", *flags) if "--base-url" not in flags else \
        bench_serve(*flags)
    assert proc.returncode == 2 and proc.stderr.startswith("megakv: error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr and "cannot reach" not in proc.stderr


def test_bench_serve_unreachable_server_is_one_clear_error():
    proc = bench_serve("--base-url", "http://127.0.0.1:9", "--num-prompts", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("megakv: error: finding the model") and "cannot reach http://127.0.0.1:9" \
        in proc.stderr
