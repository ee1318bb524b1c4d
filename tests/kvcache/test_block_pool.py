"""Block pool and one instance's block tables: allocation invariants, exhaustion, no leak, table versions."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megakv.engine.model_runner import ModelRunner, StepInputs
from megakv.engine.request import Request
from megakv.engine.sampling import SamplingParams
from megakv.engine.scheduler import ScheduledChunk, SchedulerOutput
from megakv.kvcache.block_pool import BlockPool, KVCacheExhaustedError, num_blocks_for
from megakv.kvcache.rmanager import BlockRef, RManager


def test_block_pool_allocate_free_invariants():
    pool = BlockPool(10)
    first = pool.allocate(4)
    second = pool.allocate(6)
    assert sorted(first + second) == list(range(10))
    assert pool.num_free_blocks == 0 and pool.num_used_blocks == 10
    pool.free(first)
    assert pool.num_free_blocks == 4
    assert sorted(pool.allocate(4)) == sorted(first)


def test_block_pool_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(KVCacheExhaustedError, match="2 blocks requested, 1 of 3 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_block_pool_double_free_is_caught():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(AssertionError):
        pool.free(ids)


def test_rmanager_local_tables_grow_on_demand():
    manager = RManager(0, BlockPool(8), block_size=4)
    assert len(manager.grow("a", 5)) == 2
    assert len(manager.grow("a", 8)) == 2
    table = manager.grow("a", 9)
    assert len(table) == 3 and all(isinstance(ref, BlockRef) and ref.instance_id == 0 for ref in table)
    assert manager.num_free_blocks == 5
    assert num_blocks_for(9, 4) == 3 and num_blocks_for(0, 4) == 0


def test_rmanager_table_version_changes_only_with_the_table():
    manager = RManager(0, BlockPool(8), block_size=4)
    manager.grow("a", 5)
    version = manager.table_version("a")
    manager.grow("a", 8)  # the two blocks still hold 8 tokens
    assert manager.table_version("a") == version
    manager.grow("a", 9)
    grown = manager.table_version("a")
    assert grown != version
    manager.free("a")
    manager.grow("a", 9)  # the same request id with new blocks: a version never seen before
    assert manager.table_version("a") not in (version, grown)


def test_model_runner_reuses_table_tensors_until_the_table_changes():
    manager = RManager(0, BlockPool(8), block_size=4)
    # prepare() reads only the model's sliding window: no weights are needed.
    model = SimpleNamespace(config=SimpleNamespace(sliding_window=None, eos_token_ids=()))
    runner = ModelRunner(model=model, kv_cache=None, rmanager=manager, device=torch.device("cpu"))
    request = Request("a", list(range(12)), SamplingParams(max_new_tokens=1))

    def prepare(start: int, num_tokens: int) -> StepInputs:
        manager.grow("a", start + num_tokens)
        return runner.prepare(SchedulerOutput([ScheduledChunk(request, start, num_tokens)]))

    prepare(0, 5)
    view = runner._views["a"]
    prepare(5, 2)
    assert runner._views["a"] is view
    inputs = prepare(7, 3)
    assert runner._views["a"] is not view
    table = [ref.block_id for ref in manager.block_table("a")]
    assert inputs.metadata.block_tables[0].tolist() == table
    assert inputs.metadata.slot_mapping.tolist() == [table[pos // 4] * 4 + pos % 4 for pos in range(7, 10)]


def test_rmanager_single_instance_exhaustion_keeps_table():
    manager = RManager(0, BlockPool(2), block_size=4)
    manager.grow("a", 4)
    manager.grow("b", 4)
    assert not manager.can_grow("a", 5)
    with pytest.raises(KVCacheExhaustedError, match="no room for request a"):
        manager.grow("a", 5)
    assert len(manager.block_table("a")) == 1


def test_rmanager_no_leak_after_batch():
    pool = BlockPool(64)
    manager = RManager(0, pool, block_size=16)
    lengths = [1, 15, 16, 17, 100, 300, 33]
    for index, length in enumerate(lengths):
        manager.grow(str(index), length)
    assert pool.num_free_blocks == 64 - sum(num_blocks_for(n, 16) for n in lengths)
    for request_id in manager.request_ids:
        manager.free(request_id)
    assert pool.num_free_blocks == 64 and manager.request_ids == []
