"""Prefix-aware routing for a cluster with prefix caching, as SGLang's cache-aware router and llm-d route: the
front remembers to which instance it sent each full block of every prompt, and sends a request to the instance
that holds the longest cached prefix of it.

The rule (SGLang's, with its thresholds in requests): the instance believed to hold the longest leading run of
the request's full prompt blocks serves it when that run is at least MIN_MATCH of those blocks and the instance
has at most MAX_EXTRA_LOAD more unfinished requests than the least loaded instance; otherwise the request goes by
free room, as without the cache. A holder that is busy with the document's first question is still chosen: the
follow-up waits for its room there rather than computing the whole document elsewhere. The directory is a
belief, bounded by what the pools can hold: an instance may have given a cached block up since, and the request
then computes it again, so routing never changes a request's tokens, only where its prefill is saved.
"""
from __future__ import annotations

from collections import OrderedDict

# The share of a prompt's full blocks an instance must hold for the request to go there.
MIN_MATCH = 0.5
# How many more unfinished requests than the least loaded instance the holder may have.
MAX_EXTRA_LOAD = 4


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


def prefix_holder(directory: PrefixDirectory, block_hashes: list[bytes], load: list[int]) -> int | None:
    """The instance to serve a request with these full prompt blocks by the rule above, given each instance's
    unfinished requests; None: route by free room."""
    holder, num_blocks = directory.longest_prefix(block_hashes)
    if holder is None or num_blocks < MIN_MATCH * len(block_hashes):
        return None
    return holder if load[holder] - min(load) <= MAX_EXTRA_LOAD else None
