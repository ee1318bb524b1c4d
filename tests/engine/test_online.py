"""The online engine API on one instance: requests arrive between steps, stream their tokens, and abort."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.async_engine import AsyncEngine
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams

NUM_BLOCKS = 64


def engine_for(checkpoint) -> LLMEngine:
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=NUM_BLOCKS),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))
    return LLMEngine(read_checkpoint_info(checkpoint), config)


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 301, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def engine(megakv_checkpoint):
    return engine_for(megakv_checkpoint("gqa", 1))


def alone(engine: LLMEngine, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The greedy tokens of the prompt served with nothing else in the engine."""
    (output,) = engine.generate([prompt], [SamplingParams(max_new_tokens=max_new_tokens)])
    return output.token_ids


def test_online_outputs_stream_and_concatenate_to_the_final_tokens(engine):
    short, long = random_prompt(10, 1), random_prompt(150, 2)
    short_id = engine.add_request(short, SamplingParams(max_new_tokens=6))
    long_id = engine.add_request(long, SamplingParams(max_new_tokens=6))
    streamed: dict[str, list[int]] = {short_id: [], long_id: []}
    finals = {}
    steps_with_output: dict[str, list[int]] = {short_id: [], long_id: []}
    step = 0
    while engine.has_unfinished():
        for output in engine.step():
            streamed[output.request_id] += output.new_token_ids
            steps_with_output[output.request_id].append(step)
            assert output.token_ids == streamed[output.request_id]
            if output.finished:
                finals[output.request_id] = output
        step += 1
    # The short prompt's prefill fits the first step, which samples its first token; the long prompt's
    # 150 tokens take three 64-token chunks (the first shared with the short one), so its first token comes
    # in the step that runs its last chunk.
    assert steps_with_output[short_id][0] == 0 and steps_with_output[long_id][0] == 2
    assert streamed[short_id] == finals[short_id].token_ids == alone(engine, short, 6)
    assert streamed[long_id] == finals[long_id].token_ids == alone(engine, long, 6)
    assert finals[long_id].placement is not None and finals[long_id].finish_reason == "length"
    assert engine.rmanager.num_free_blocks == NUM_BLOCKS


def test_online_requests_added_at_random_steps_equal_each_served_alone(engine):
    rng = random.Random(3)
    prompts = {index: random_prompt(rng.randint(5, 120), 10 + index) for index in range(6)}
    arrivals = sorted(rng.sample(range(12), len(prompts)))
    ids: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    step = 0
    while len(tokens) < len(prompts):
        for index, arrival in enumerate(arrivals):
            if arrival == step:
                ids[engine.add_request(prompts[index], SamplingParams(max_new_tokens=8))] = index
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.token_ids
        step += 1
    for request_id, index in ids.items():
        assert tokens[request_id] == alone(engine, prompts[index], 8)
    assert engine.rmanager.num_free_blocks == NUM_BLOCKS


@pytest.mark.parametrize("when", ["waiting", "prefill", "decode"])
def test_online_abort_frees_every_block_and_leaves_others_alone(engine, when):
    other = random_prompt(30, 5)
    victim_prompt = random_prompt(200, 6)
    other_id = engine.add_request(other, SamplingParams(max_new_tokens=10))
    victim = engine.add_request(victim_prompt, SamplingParams(max_new_tokens=10))
    steps = {"waiting": 0, "prefill": 1, "decode": 5}[when]
    outputs = []
    for _ in range(steps):
        outputs += engine.step()
    holds_blocks = len(engine.rmanager.block_table(victim)) > 0
    assert holds_blocks == (when != "waiting")
    engine.abort(victim)
    assert engine.rmanager.block_table(victim) == []
    while engine.has_unfinished():
        outputs += engine.step()
    (last,) = [o for o in outputs if o.request_id == victim and o.finished]
    assert last.finish_reason == "abort"
    assert (len(last.token_ids) > 0) == (when == "decode")
    (done,) = [o for o in outputs if o.request_id == other_id and o.finished]
    assert done.token_ids == alone(engine, other, 10)
    assert engine.rmanager.num_free_blocks == NUM_BLOCKS and not engine.rmanager.request_ids
    engine.abort(victim)  # a finished request: nothing happens
    assert not engine.has_unfinished()


def test_online_bad_requests_are_refused_with_a_reason(engine):
    engine.add_request([1, 2], SamplingParams(max_new_tokens=2), request_id="dup")
    with pytest.raises(ValueError, match="request id 'dup' is already in use"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=2), request_id="dup")
    with pytest.raises(ValueError, match="instance 3 does not exist"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=2), instance=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([10**6], SamplingParams(max_new_tokens=2))
    while engine.has_unfinished():
        engine.step()
    assert engine.rmanager.num_free_blocks == NUM_BLOCKS


def test_async_engine_streams_concurrent_requests_and_aborts_on_disconnect(engine):
    prompts = [random_prompt(20, 30), random_prompt(90, 31)]
    expected = [alone(engine, prompt, 8) for prompt in prompts]

    async def consume(async_engine: AsyncEngine, prompt: list[int]) -> list[int]:
        tokens = []
        async for output in async_engine.generate(prompt, SamplingParams(max_new_tokens=8)):
            tokens += output.new_token_ids
        return tokens

    async def disconnect_after_two(async_engine: AsyncEngine) -> list[int]:
        tokens = []
        stream = async_engine.generate(random_prompt(100, 32), SamplingParams(max_new_tokens=50))
        async for output in stream:
            tokens += output.new_token_ids
            if len(tokens) >= 2:
                break
        await stream.aclose()
        return tokens

    async def main() -> tuple:
        async_engine = AsyncEngine(engine)
        try:
            results = await asyncio.wait_for(asyncio.gather(
                consume(async_engine, prompts[0]), consume(async_engine, prompts[1]),
                disconnect_after_two(async_engine)), timeout=120)
            with pytest.raises(ValueError, match="empty prompt"):
                async for _ in async_engine.generate([], SamplingParams(max_new_tokens=2)):
                    pass
        finally:
            async_engine.shutdown()
        return results

    first, second, cut = asyncio.run(main())
    assert [first, second] == expected and len(cut) == 2
    assert engine.rmanager.num_free_blocks == NUM_BLOCKS and not engine.rmanager.request_ids
