"""What the converter tests compare: the training framework's own outputs against megakv's.

Each fixture folder (see conftest.py) holds the framework's logits on :data:`PROMPT`
(``logits.pt``) and its greedy continuation (``greedy.json``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from megakv.checkpoint.format import CheckpointInfo
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams
from megakv.processes import run_session

BIN_DIR = Path(sys.executable).parent
# Every id below the fixtures' smallest vocabulary (301), long enough to span a 16-token rBlock.
PROMPT = [5, 17, 250, 3, 99, 300, 0, 42, 7, 123, 64, 1, 200, 31, 8, 77, 150, 2, 260, 11]
NUM_GREEDY_TOKENS = 6


def run_mpirun(num_ranks: int, argv: list[str], timeout: float = 300) -> None:
    """Run ``argv`` on ``num_ranks`` local MPI ranks; fail the test with the output on a non-zero exit."""
    command = [str(BIN_DIR / "mpirun"), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
               "-n", str(num_ranks), *argv]
    proc = run_session(command, timeout, dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        pytest.fail(f"mpirun exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")


def framework_outputs(fixture_dir: Path) -> tuple[torch.Tensor, list[int]]:
    """The framework's own [len, vocab] logits on PROMPT and its greedy continuation."""
    return torch.load(fixture_dir / "logits.pt"), json.loads((fixture_dir / "greedy.json").read_text())


def megakv_outputs(info: CheckpointInfo) -> tuple[torch.Tensor, list[int]]:
    """megakv's logits on PROMPT and greedy continuation, in this process (TP=1)."""
    engine = LLMEngine(info, EngineConfig(cache=CacheConfig(block_size=16, num_blocks=16),
                                          scheduler=SchedulerConfig(max_num_batched_tokens=64)))
    logits = engine.prompt_logits(PROMPT)
    params = SamplingParams(max_new_tokens=NUM_GREEDY_TOKENS, ignore_eos=True)
    return logits, engine.generate([PROMPT], [params])[0].token_ids


def check_matches_framework(info: CheckpointInfo, fixture_dir: Path) -> None:
    """megakv on the converted checkpoint gives the framework's logits (fp32, atol 1e-4) and greedy tokens."""
    expected_logits, expected_greedy = framework_outputs(fixture_dir)
    logits, greedy = megakv_outputs(info)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    assert greedy == expected_greedy
