"""Prefix-aware routing for a cluster with prefix caching, as llm-d's and SGLang's routers route: the front
remembers to which instance it sent each full block of every prompt, and sends a request to the instance that
holds the longest cached prefix of it.

The rule: the instance believed to hold the longest leading run of the request's full prompt blocks (one block at
least) serves it, if its free blocks as last reported cover what the rest of the request needs; otherwise the
request goes by free room, as without the cache. The directory is a belief, bounded by what the pools can hold:
an instance may have given a cached block up since, and the request then computes it again, so routing never
changes a request's tokens, only where its prefill is saved.
"""
from __future__ import annotations

from collections import OrderedDict


class PrefixDirectory:
    """Block hash -> the instance its block was last sent to, for the ``capacity`` most recently sent blocks."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"a prefix directory needs room for one block at least, got {capacity}")
        self.capacity = capacity
        self._instance_of: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._instance_of)

    def record(self, block_hashes: list[bytes], instance: int) -> None:
        """A request with these full blocks was sent to ``instance``, which will cache them."""
        for block_hash in block_hashes:
            self._instance_of[block_hash] = instance
            self._instance_of.move_to_end(block_hash)
        while len(self._instance_of) > self.capacity:
            self._instance_of.popitem(last=False)

    def longest_prefix(self, block_hashes: list[bytes]) -> tuple[int | None, int]:
        """(the instance, how many blocks) of the longest leading run of ``block_hashes`` sent to one instance;
        (None, 0) when the first block was never sent."""
        instance = self._instance_of.get(block_hashes[0]) if block_hashes else None
        if instance is None:
            return None, 0
        num_blocks = 0
        for block_hash in block_hashes:
            if self._instance_of.get(block_hash) != instance:
                break
            num_blocks += 1
        return instance, num_blocks
