"""The physical rBlock pool of one instance (DistKV-LLM section 4.1: rBlocks), with its prefix cache.

Plain Python bookkeeping: which physical block ids are free, how many requests
hold each one, and which full blocks hold KV that a later request may reuse. As
in vLLM v1's block pool, a block whose last holder lets go keeps its content and
its hash: it is free (it counts as free, and may be lent or taken) and, until it is
taken, cached. Free blocks without content go first, then cached ones, least
recently released first, so that growth and lending push a prefix out only when
the pool holds nothing else. The tensors that hold the keys and values live in
:class:`megakv.kvcache.kv_cache.KVCache`.
"""
from __future__ import annotations

from collections import OrderedDict


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class KVCacheExhaustedError(RuntimeError):
    """Raised when a pool cannot supply the blocks asked for."""


class BlockPool:
    """A fixed set of ``num_blocks`` physical block ids, handed out, shared and taken back."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # Free blocks without content, then free cached ones, each least recently released first: reuse spreads
        # writes over the pool, and a cached block is taken only when no other is free.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._ref_counts = [0] * num_blocks
        # block hash (megakv.kvcache.prefix_cache) <-> the block that holds that content
        self._cached: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones among them)."""
        return len(self._free) + len(self._free_cached)

    @property
    def num_fresh_blocks(self) -> int:
        """Free blocks without content: taken before any cached one."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content a request may reuse, held or not."""
        return len(self._cached)

    def is_free(self, block_id: int) -> bool:
        return self._ref_counts[block_id] == 0

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks, each for one holder; all or nothing. A cached block taken loses its
        content."""
        if num_blocks > self.num_free_blocks:
            raise KVCacheExhaustedError(f"KV pool exhausted: {num_blocks} blocks requested, {self.num_free_blocks} "
                                        f"of {self.num_blocks} free")
        block_ids = [(self._free or self._free_cached).popitem(last=False)[0] for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
            block_hash = self._hash_of.pop(block_id, None)
            if block_hash is not None:
                del self._cached[block_hash]
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Let go of blocks, once per holder; a block nobody holds any more is free (and stays cached). Freeing
        a block nobody holds is a bookkeeping bug."""
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"block {block_id} freed twice"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                (self._free_cached if block_id in self._hash_of else self._free)[block_id] = None

    # -- prefix cache -----------------------------------------------------------------------------------

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Record that a held, full block holds the content ``block_hash`` names. Content already cached in
        another block keeps that block."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} is cached while nobody holds it"
        if block_hash not in self._cached and block_id not in self._hash_of:
            self._cached[block_hash] = block_id
            self._hash_of[block_id] = block_hash

    def uncache(self, block_ids: set[int]) -> None:
        """These blocks lost their content (a copy into them failed): no request may reuse them."""
        for block_id in block_ids:
            block_hash = self._hash_of.pop(block_id, None)
            if block_hash is not None:
                del self._cached[block_hash]
                if block_id in self._free_cached:
                    del self._free_cached[block_id]
                    self._free[block_id] = None

    def cached_block(self, block_hash: bytes) -> int | None:
        """The block holding the content ``block_hash`` names, if it is cached."""
        return self._cached.get(block_hash)

    def cached_prefix(self, block_hashes: list[bytes]) -> list[int]:
        """The blocks holding the longest prefix of ``block_hashes`` that is cached, in order."""
        block_ids = []
        for block_hash in block_hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def share(self, block_ids: list[int]) -> None:
        """One more holder for each block (a cache hit); a free block stops being free."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free_cached[block_id]
            self._ref_counts[block_id] += 1
