"""Fixtures of the DistKV cluster tests."""
from __future__ import annotations

import pytest

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def reference(megakv_checkpoint):
    """(prompt, max_new_tokens) -> greedy tokens of the request alone on one instance with a large pool."""
    engine = LLMEngine(read_checkpoint_info(megakv_checkpoint("gqa", 1)),
                       EngineConfig(cache=CacheConfig(block_size=16, num_blocks=128),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=64)))

    def tokens(prompt: list[int], max_new_tokens: int) -> list[int]:
        return engine.generate([prompt], [SamplingParams(max_new_tokens=max_new_tokens)])[0].token_ids

    return tokens
