"""Per-request block tables over one instance's rBlock pool (DistKV-LLM section 4.1).

A request's block table maps logical block i (tokens ``i*block_size`` to
``(i+1)*block_size - 1``) to a physical block id. Blocks are taken on demand as
the request grows, never reserved up front for its maximum length.
"""
from __future__ import annotations

from megakv.kvcache.block_pool import BlockPool, KVCacheExhaustedError


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Grows and frees the block tables of the requests running on one instance."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._block_tables.get(request_id, [])

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's table holds ``num_tokens`` tokens."""
        return max(0, num_blocks_for(num_tokens, self.block_size) - len(self.block_table(request_id)))

    def can_grow(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_new_blocks(request_id, num_tokens))

    def grow(self, request_id: str, num_tokens: int) -> list[int]:
        """Extend the request's table to hold ``num_tokens`` tokens; returns the table.

        Raises KVCacheExhaustedError (and changes nothing) when the pool is short.
        """
        num_new = self.num_new_blocks(request_id, num_tokens)
        if num_new:
            new_block_ids = self.pool.allocate(num_new)
            self._block_tables.setdefault(request_id, []).extend(new_block_ids)
        return self.block_table(request_id)

    def free(self, request_id: str) -> None:
        """Return every block of the request to the pool (finished, aborted or preempted)."""
        self.pool.free(self._block_tables.pop(request_id, []))

    @property
    def request_ids(self) -> list[str]:
        return list(self._block_tables)


__all__ = ["BlockManager", "BlockPool", "KVCacheExhaustedError", "num_blocks_for"]
