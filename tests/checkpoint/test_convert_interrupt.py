"""A conversion stopped by SIGTERM or Ctrl-C (SIGINT) leaves no temporary folder behind."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONVERT_TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


@pytest.fixture(scope="module")
def many_layers_model(make_hf, tmp_path_factory):
    """A random LLaMA of 64 layers (about 60 MB): long enough to convert that a signal lands midway."""
    return make_hf(tmp_path_factory.mktemp("hf-deep"), "llama", "gqa64", num_hidden_layers=64)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_convert_signal_mid_conversion_removes_temporary_folder(signum, many_layers_model, tmp_path):
    output = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(CONVERT_TOOL), "--source", "hf", "--input", str(many_layers_model),
                             "--output", str(output), "--tp", "2"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(path.name.startswith("out.tmp-") for path in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before its folder appeared"
        time.sleep(0.002)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [f"convert_checkpoint: error: interrupted; {output} was not written"]
    assert list(tmp_path.iterdir()) == []
