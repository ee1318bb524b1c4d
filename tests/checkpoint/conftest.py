"""Session fixtures: checkpoints written by the real training frameworks.

Megatron-core (TP=2, gloo) and DeepSpeed (ZeRO-0 to 3 on 2 data-parallel ranks, gloo)
run under mpirun once per session; each fixture folder holds the checkpoint and the
framework's own logits and greedy tokens on ``framework_oracle.PROMPT``. Nothing is committed.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from framework_oracle import PROMPT, run_mpirun

HERE = Path(__file__).resolve().parent
# Megatron fixture variants: worker flags. "halves": rotary_interleaved=False, untied output layer.
MEGATRON_VARIANTS = {"halves_untied": [], "interleaved_tied": ["--interleaved", "--tied"]}


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompt") / "prompt.json"
    path.write_text(json.dumps(PROMPT))
    return path


@pytest.fixture(scope="session")
def megatron_fixture(tmp_path_factory, prompt_file) -> Callable[[str], Path]:
    """variant -> folder with ``legacy/``, ``torch_dist/``, ``logits.pt``, ``greedy.json`` from megatron-core."""
    cache: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            out = tmp_path_factory.mktemp(f"megatron-{variant}")
            run_mpirun(2, [sys.executable, str(HERE / "megatron_fixture_worker.py"), str(out), str(prompt_file),
                           *MEGATRON_VARIANTS[variant]])
            cache[variant] = out
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def deepspeed_fixture(tmp_path_factory, prompt_file) -> Callable[[int], Path]:
    """ZeRO stage -> folder with ``ckpt/`` (DeepSpeed's save_checkpoint), ``logits.pt``, ``greedy.json``."""
    cache: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in cache:
            out = tmp_path_factory.mktemp(f"deepspeed-zero{stage}")
            run_mpirun(2, [sys.executable, str(HERE / "deepspeed_fixture_worker.py"), str(out), str(prompt_file),
                           str(stage)])
            cache[stage] = out
        return cache[stage]

    return get
