"""Block pool and block tables: allocation invariants, exhaustion, no leak."""
from __future__ import annotations

import pytest

from megakv.kvcache.block_manager import BlockManager, num_blocks_for
from megakv.kvcache.block_pool import BlockPool, KVCacheExhaustedError


def test_block_pool_allocate_free_invariants():
    pool = BlockPool(10)
    first = pool.allocate(4)
    second = pool.allocate(6)
    assert sorted(first + second) == list(range(10))
    assert pool.num_free_blocks == 0 and pool.num_used_blocks == 10
    pool.free(first)
    assert pool.num_free_blocks == 4
    again = pool.allocate(4)
    assert sorted(again) == sorted(first)


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


def test_block_manager_grows_on_demand():
    manager = BlockManager(BlockPool(8), block_size=4)
    assert manager.grow("a", 5) and len(manager.block_table("a")) == 2
    assert len(manager.grow("a", 8)) == 2
    assert len(manager.grow("a", 9)) == 3
    assert manager.num_free_blocks == 5
    assert num_blocks_for(9, 4) == 3 and num_blocks_for(0, 4) == 0


def test_block_manager_exhaustion_keeps_table():
    manager = BlockManager(BlockPool(2), block_size=4)
    manager.grow("a", 4)
    manager.grow("b", 4)
    with pytest.raises(KVCacheExhaustedError):
        manager.grow("a", 5)
    assert len(manager.block_table("a")) == 1
    assert not manager.can_grow("a", 5)


def test_block_manager_no_leak_after_batch():
    pool = BlockPool(64)
    manager = BlockManager(pool, block_size=16)
    for index, length in enumerate([1, 15, 16, 17, 100, 300, 33]):
        manager.grow(str(index), length)
    assert pool.num_free_blocks == 64 - sum(num_blocks_for(n, 16) for n in [1, 15, 16, 17, 100, 300, 33])
    for request_id in manager.request_ids:
        manager.free(request_id)
    assert pool.num_free_blocks == 64 and manager.request_ids == []
