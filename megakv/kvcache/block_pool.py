"""The physical rBlock pool of one instance (DistKV-LLM section 4.1: rBlocks).

Plain Python bookkeeping: which physical block ids are free. The tensors that
hold the keys and values live in :class:`megakv.kvcache.kv_cache.KVCache`.
"""
from __future__ import annotations

from collections import deque


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class KVCacheExhaustedError(RuntimeError):
    """Raised when a pool cannot supply the blocks asked for."""


class BlockPool:
    """A fixed set of ``num_blocks`` physical block ids, handed out and taken back."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # FIFO reuse spreads writes over the pool instead of hammering the lowest ids.
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_block_ids)

    def is_free(self, block_id: int) -> bool:
        return self._is_free[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks; all or nothing."""
        if num_blocks > len(self._free_block_ids):
            raise KVCacheExhaustedError(
                f"KV pool exhausted: {num_blocks} blocks requested, {len(self._free_block_ids)} of "
                f"{self.num_blocks} free")
        block_ids = [self._free_block_ids.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._is_free[block_id] = False
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Return blocks to the pool; freeing a block twice is a bookkeeping bug."""
        for block_id in block_ids:
            assert not self._is_free[block_id], f"block {block_id} freed twice"
            self._is_free[block_id] = True
            self._free_block_ids.append(block_id)
