"""Fixtures of the tools' tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def random_demo_checkpoint(tmp_path_factory) -> Path:
    """A megakv checkpoint (TP 1) of the random demo model, which the benchmark tools' tests run on."""
    root = tmp_path_factory.mktemp("random-demo")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_model.py"), "--random", "--tp", "1",
                    "--output", str(root / "ckpt"), "--hf-output", str(root / "hf")], check=True,
                   capture_output=True, timeout=300)
    return root / "ckpt"
