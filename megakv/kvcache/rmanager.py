"""rManager (DistKV-LLM section 4.3): one instance's rBlock pool, its block tables, lending and borrowing.

Requests grow locally first. When the pool is short, the missing blocks are
recorded as PENDING and borrowed through the gManager; the request runs again
once they arrive, or earlier if its own pool frees up. An rManager lends only
blocks of its own pool, up to ``lending_cap`` of it, so a borrowed block is never
lent onward (no borrowing chains). When a request ends, its local blocks go back
to the pool and its remote blocks back to their creditors, except those that
hold a cached prefix: the debtor keeps them on loan (the ledger counts each once,
however many requests share it), so that a follow-up about a long document
attends to the document's blocks where they are. A kept block no request holds
goes back when its creditor recalls blocks, when the gManager wants room, or is
reused by this instance's own growth. DGFM moves remote blocks home when the
pool has room, and two instances that hold each other's blocks swap them, which
needs no room at all.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import NamedTuple

from megakv.kvcache.block_pool import BlockPool, KVCacheExhaustedError, num_blocks_for


class BlockRef(NamedTuple):
    """Where one logical block of a request lives: an instance and a physical block id there.

    A named tuple rather than a dataclass: tables hold thousands of them and are scanned every step.
    """

    instance_id: int
    block_id: int


# Placeholder for a block the rManager has promised but not yet borrowed.
PENDING = BlockRef(-1, -1)


class Transfer(NamedTuple):
    """DGFM: copy the KV of block ``src_block`` of ``creditor`` into block ``dst_block`` of this pool."""

    creditor: int
    src_block: int
    dst_block: int


class BlockTable:
    """One request's blocks by logical index.

    Every change goes through ``extend`` and ``set``, which keep the per-instance block counts of
    the table and of all the rManager's tables together (``totals``: read by every scheduling
    decision, so they must not rescan thousands of refs) and stamp a version that is unique across
    the rManager's tables: whoever builds tensors from a table can reuse them while the version holds.
    """

    def __init__(self, version: int, totals: Counter[int]) -> None:
        self.refs: list[BlockRef] = []
        # instance id (PENDING's -1 for promised blocks) -> blocks there; instances with none are absent
        self.counts: dict[int, int] = {}
        self.totals = totals
        self.version = version

    def extend(self, refs: Iterable[BlockRef], version: int) -> None:
        """Append blocks at the next logical indices; the table takes ``version`` if any were added."""
        num_refs = len(self.refs)
        for ref in refs:
            self.refs.append(ref)
            self.counts[ref.instance_id] = self.counts.get(ref.instance_id, 0) + 1
            self.totals[ref.instance_id] += 1
        if len(self.refs) > num_refs:
            self.version = version

    def set(self, logical_index: int, ref: BlockRef, version: int) -> None:
        """Replace the block at ``logical_index``; the table takes ``version``."""
        old = self.refs[logical_index].instance_id
        self.counts[old] -= 1
        if not self.counts[old]:
            del self.counts[old]
        self.totals[old] -= 1
        self.refs[logical_index] = ref
        self.counts[ref.instance_id] = self.counts.get(ref.instance_id, 0) + 1
        self.totals[ref.instance_id] += 1
        self.version = version

    def drop(self) -> None:
        """The table is discarded: its blocks leave the totals."""
        self.totals.subtract(self.counts)

    @property
    def num_pending(self) -> int:
        """Blocks promised but not yet borrowed."""
        return self.counts.get(PENDING.instance_id, 0)


class RManager:
    """Block tables of the requests of one instance, over its own pool and blocks borrowed elsewhere."""

    def __init__(self, instance_id: int, pool: BlockPool, block_size: int, lending_cap: float = 1.0) -> None:
        if not 0.0 <= lending_cap <= 1.0:
            raise ValueError(f"lending_cap must be between 0 and 1, got {lending_cap}")
        self.instance_id = instance_id
        self.pool = pool
        self.block_size = block_size
        self.lending_cap = lending_cap
        self._tables: dict[str, BlockTable] = {}
        # instance id -> blocks there over all tables (see BlockTable)
        self._totals: Counter[int] = Counter()
        self._versions = itertools.count(1)
        # debtor instance -> ids of this pool's blocks it holds
        self._lent: dict[int, set[int]] = {}
        # creditor instance -> ids of its blocks this instance has released but not yet handed back
        self._returns: dict[int, list[int]] = {}
        # creditor instance -> how many of those DGFM moved home
        self._moved: dict[int, int] = {}
        # Requests of this instance that recalled lent blocks (InstanceControl.recall) -> the blocks each needs in
        # all: what they do not hold yet is kept out of lending until they end.
        self._reservations: dict[str, int] = {}
        # DGFM swap in flight (begin_swap): the peer, its blocks whose KV this instance copied out, and those of
        # them whose request has been released since (they go back, or become the peer's own, at end_swap).
        self._swap: tuple[int, list[int]] | None = None
        self._released_in_swap: set[int] = set()
        # Peer -> (its blocks held here, this pool's blocks lent to it) when it last took nothing of a swap: its
        # own requests share the blocks of this pool they hold (RManager._is_shared), or keep them for a cache.
        self._declined: dict[int, tuple[int, int]] = {}
        # Instances out of the cluster (forget_instance): blocks there are dropped, not handed back.
        self._failed: set[int] = set()
        # Borrowed blocks that hold a cached prefix: block hash <-> block, how many tables hold each, and those no
        # table holds (kept on loan for a later request), least recently released first. ``_num_extra_holds``:
        # the holds beyond the first, so that a shared block counts once among the borrowed ones.
        self._remote_cached: dict[bytes, BlockRef] = {}
        self._remote_hash_of: dict[BlockRef, bytes] = {}
        self._remote_holds: dict[BlockRef, int] = {}
        self._kept: OrderedDict[BlockRef, None] = OrderedDict()
        self._num_extra_holds = 0

    # -- what the scheduler uses ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Free blocks of this instance's own pool."""
        return self.pool.num_free_blocks

    @property
    def request_ids(self) -> list[str]:
        """Requests that hold blocks here."""
        return list(self._tables)

    def block_table(self, request_id: str) -> list[BlockRef]:
        """Where each logical block of the request lives (PENDING until borrowed); do not modify."""
        table = self._tables.get(request_id)
        return table.refs if table is not None else []

    def table_version(self, request_id: str) -> int:
        """Changes whenever the request's block table does; 0 for a request without blocks."""
        table = self._tables.get(request_id)
        return table.version if table is not None else 0

    def block_counts(self, request_id: str) -> Mapping[int, int]:
        """Instance id -> blocks of the request there (-1: promised, not yet borrowed); a read-only view."""
        table = self._tables.get(request_id)
        return MappingProxyType(table.counts if table is not None else {})

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's table holds num_tokens tokens."""
        return max(0, num_blocks_for(num_tokens, self.block_size) - len(self.block_table(request_id)))

    @property
    def num_pending_blocks(self) -> int:
        """Blocks promised to requests but not yet borrowed."""
        return self._totals[PENDING.instance_id]

    def has_pending(self, request_id: str) -> bool:
        """Whether the request still waits for borrowed blocks."""
        return PENDING.instance_id in self.block_counts(request_id)

    def num_borrowable_blocks(self, num_lendable_elsewhere: int) -> int:
        """Blocks this instance could still borrow when the other instances may lend ``num_lendable_elsewhere``
        in all (their lending caps): those its requests neither hold nor await already. Requests grow into it,
        and the gManager settles what they really get."""
        return max(0, num_lendable_elsewhere - self.num_pending_blocks - self.num_borrowed_blocks)

    def can_grow(self, request_id: str, num_tokens: int, num_borrowable: int = 0) -> bool:
        """True when the local pool's free blocks, the kept loans no request holds, and ``num_borrowable`` from
        other instances cover the growth."""
        return (self.num_new_blocks(request_id, num_tokens)
                <= self.pool.num_free_blocks + len(self._kept) + num_borrowable)

    def grow(self, request_id: str, num_tokens: int, num_borrowable: int = 0) -> list[BlockRef]:
        """Extend the table to hold num_tokens: local blocks first, then kept loans (their cached content is given
        up: the instance holds them already), then up to ``num_borrowable`` PENDING until borrowed."""
        if not self.can_grow(request_id, num_tokens, num_borrowable):
            raise KVCacheExhaustedError(f"instance {self.instance_id}: no room for request {request_id} to grow "
                                        f"to {num_tokens} tokens")
        num_new = self.num_new_blocks(request_id, num_tokens)
        num_local = min(num_new, self.pool.num_free_blocks)
        if request_id not in self._tables:
            self._tables[request_id] = BlockTable(next(self._versions), self._totals)
        table = self._tables[request_id]
        if num_new:
            new_refs = [BlockRef(self.instance_id, block_id) for block_id in self.pool.allocate(num_local)]
            new_refs += self._take_kept(num_new - num_local)
            table.extend(new_refs + [PENDING] * (num_new - len(new_refs)), next(self._versions))
        return table.refs

    def free(self, request_id: str) -> None:
        """Release every block of the request: local ones at once, remote ones at the next heartbeat. The last
        blocks go first, so that a cached prefix is the last of them to be taken (as vLLM frees)."""
        table = self._tables.pop(request_id, None)
        if table is not None:
            table.drop()
        for ref in reversed(table.refs) if table is not None else []:
            if ref == PENDING:
                continue
            if ref.instance_id == self.instance_id:
                self.pool.free([ref.block_id])
            elif ref.instance_id in self._failed:
                continue
            elif self._swap is not None and ref.instance_id == self._swap[0] and ref.block_id in self._swap[1]:
                self._uncache_remote(ref)
                self._released_in_swap.add(ref.block_id)
            elif ref in self._remote_holds:
                self._release_remote(ref)
            else:
                self._returns.setdefault(ref.instance_id, []).append(ref.block_id)

    # -- prefix cache -------------------------------------------------------------------------------------

    def cached_prefix(self, block_hashes: list[bytes]) -> list[BlockRef]:
        """The blocks, of this pool or borrowed, holding the longest cached prefix of ``block_hashes``."""
        refs = []
        for block_hash in block_hashes:
            block_id = self.pool.cached_block(block_hash)
            ref = BlockRef(self.instance_id, block_id) if block_id is not None else self._remote_cached.get(block_hash)
            if ref is None:
                break
            refs.append(ref)
        return refs

    def share_cached(self, request_id: str, refs: list[BlockRef]) -> None:
        """Start the table of a request that holds no blocks with cached blocks (a cache hit)."""
        assert request_id not in self._tables, f"request {request_id} already holds blocks"
        for ref in refs:
            if ref.instance_id == self.instance_id:
                self.pool.share([ref.block_id])
            else:
                self._hold_remote(ref)
        table = BlockTable(next(self._versions), self._totals)
        table.extend(refs, next(self._versions))
        self._tables[request_id] = table

    def cache_blocks(self, request_id: str, block_hashes: list[bytes], first: int) -> None:
        """Record what the request's full blocks ``first:len(block_hashes)`` hold: block i holds the content
        ``block_hashes[i]`` names. Content already cached keeps its block."""
        refs = self.block_table(request_id)
        for ref, block_hash in zip(refs[first:len(block_hashes)], block_hashes[first:]):
            if ref.instance_id == self.instance_id:
                self.pool.cache(ref.block_id, block_hash)
            elif (ref != PENDING and block_hash not in self._remote_cached and ref not in self._remote_hash_of
                  and self.pool.cached_block(block_hash) is None):
                self._remote_cached[block_hash] = ref
                self._remote_hash_of[ref] = block_hash
                self._remote_holds[ref] = 1

    def _hold_remote(self, ref: BlockRef) -> None:
        """One more table holds a cached borrowed block."""
        holds = self._remote_holds[ref]
        if holds:
            self._num_extra_holds += 1
        else:
            del self._kept[ref]
        self._remote_holds[ref] = holds + 1

    def _release_remote(self, ref: BlockRef) -> None:
        """A table lets go of a cached borrowed block; the last one keeps it on loan, cached."""
        holds = self._remote_holds[ref] - 1
        self._remote_holds[ref] = holds
        if holds:
            self._num_extra_holds -= 1
        else:
            self._kept[ref] = None

    def _uncache_remote(self, ref: BlockRef) -> bytes | None:
        """A borrowed block stops being cached (it goes back, moves home, or takes other content); its hash."""
        block_hash = self._remote_hash_of.pop(ref, None)
        if block_hash is not None:
            del self._remote_cached[block_hash]
            self._num_extra_holds -= max(0, self._remote_holds.pop(ref) - 1)
            self._kept.pop(ref, None)
        return block_hash

    def _take_kept(self, max_blocks: int) -> list[BlockRef]:
        """Up to ``max_blocks`` kept loans, least recently released first, for new content."""
        taken = list(itertools.islice(self._kept, max_blocks))
        for ref in taken:
            self._uncache_remote(ref)
        return taken

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content is cached: of this pool (held or free) and borrowed (held or kept)."""
        return self.pool.num_cached_blocks + len(self._remote_hash_of)

    @property
    def num_kept_blocks(self) -> int:
        """Borrowed blocks kept on loan for their cached content, which no request holds."""
        return len(self._kept)

    def kept_counts(self) -> dict[int, int]:
        """Creditor -> kept loans of its pool (see num_kept_blocks)."""
        return dict(Counter(ref.instance_id for ref in self._kept))

    def drop_kept(self, creditor: int | None = None, max_blocks: int | None = None) -> int:
        """Hand back kept loans (of ``creditor``'s pool, or of every pool), least recently released first, up to
        ``max_blocks``; they go with the next returns. Returns how many."""
        kept = [ref for ref in self._kept if creditor is None or ref.instance_id == creditor][:max_blocks]
        for ref in kept:
            self._uncache_remote(ref)
            self._returns.setdefault(ref.instance_id, []).append(ref.block_id)
        return len(kept)

    # -- lending side -----------------------------------------------------------------------------------

    @property
    def num_lent_blocks(self) -> int:
        """Blocks of this pool held by other instances."""
        return sum(len(ids) for ids in self._lent.values())

    @property
    def num_lendable_blocks(self) -> int:
        """Blocks this instance may still lend: free ones not reserved, within the lending cap."""
        cap = math.floor(self.lending_cap * self.pool.num_blocks)
        return max(0, min(self.pool.num_free_blocks - self.reserved_blocks, cap - self.num_lent_blocks))

    @property
    def num_fresh_lendable_blocks(self) -> int:
        """Of the lendable blocks, those that hold no cached prefix (a loan takes them first)."""
        return min(self.num_lendable_blocks, self.pool.num_fresh_blocks)

    @property
    def reserved_blocks(self) -> int:
        """Blocks kept out of lending: what the requests holding a reservation still need."""
        return sum(max(0, num_blocks - len(self.block_table(request_id)))
                   for request_id, num_blocks in self._reservations.items())

    def reserve(self, request_id: str, num_blocks: int) -> None:
        """Keep free blocks out of lending, as many as ``request_id`` lacks of ``num_blocks`` (again after a
        preemption), until ``end_reservation``."""
        self._reservations[request_id] = num_blocks

    def end_reservation(self, request_id: str) -> None:
        self._reservations.pop(request_id, None)

    def lent_to(self, debtor: int) -> set[int]:
        """Ids of this pool's blocks that ``debtor`` holds."""
        return self._lent.get(debtor, set())

    def largest_debtor(self) -> int | None:
        """The instance that holds the most blocks of this pool; None when none is lent."""
        debtors = [debtor for debtor, block_ids in self._lent.items() if block_ids]
        return max(debtors, key=lambda debtor: (len(self._lent[debtor]), -debtor)) if debtors else None

    def lend(self, debtor: int, num_blocks: int) -> list[int]:
        """Hand ``num_blocks`` of this pool to ``debtor``."""
        if debtor == self.instance_id:
            raise ValueError("an instance cannot lend to itself")
        if num_blocks > self.num_lendable_blocks:
            raise KVCacheExhaustedError(f"instance {self.instance_id} cannot lend {num_blocks} blocks "
                                        f"({self.num_lendable_blocks} lendable)")
        block_ids = self.pool.allocate(num_blocks)
        self._lent.setdefault(debtor, set()).update(block_ids)
        return block_ids

    def take_back(self, debtor: int, block_ids: list[int]) -> None:
        """Blocks a debtor returned go back to the free pool."""
        lent = self._lent.get(debtor, set())
        for block_id in block_ids:
            assert block_id in lent, f"instance {debtor} returned block {block_id} it never borrowed"
            lent.remove(block_id)
        self.pool.free(block_ids)

    def holders(self, block_ids: set[int]) -> list[str]:
        """The requests whose tables hold any of these blocks of this pool."""
        return [request_id for request_id, table in self._tables.items()
                if any(ref.instance_id == self.instance_id and ref.block_id in block_ids for ref in table.refs)]

    def forget_instance(self, failed: int) -> list[str]:
        """Instance ``failed`` is out of the cluster: the blocks of this pool it held come home, nothing is handed
        back to it, and a swap with it ends. Returns the requests here that hold blocks of its pool: their KV is
        lost, and the caller preempts them (freeing drops those blocks)."""
        self._failed.add(failed)
        self.pool.free(sorted(self._lent.pop(failed, set())))
        for ref in [ref for ref in self._remote_hash_of if ref.instance_id == failed]:
            self._uncache_remote(ref)
        self._returns.pop(failed, None)
        self._moved.pop(failed, None)
        self._declined.pop(failed, None)
        if self._swap is not None and self._swap[0] == failed:
            self._swap, self._released_in_swap = None, set()
        return [request_id for request_id, table in self._tables.items() if table.counts.get(failed)]

    # -- borrowing side ---------------------------------------------------------------------------------

    def pending_needs(self) -> dict[str, int]:
        """Request id -> blocks it still has to borrow."""
        return {rid: table.num_pending for rid, table in self._tables.items() if table.num_pending}

    def fill_pending(self, request_id: str, creditor: int, block_ids: list[int]) -> list[int]:
        """Put borrowed blocks into the request's PENDING slots, in logical order; returns those it had no
        slot for (the request ended, or its own pool filled the slots meanwhile), to hand back."""
        table = self._tables.get(request_id)
        slots = [i for i, ref in enumerate(table.refs) if ref == PENDING] if table is not None else []
        for slot, block_id in zip(slots, block_ids):
            table.set(slot, BlockRef(creditor, block_id), next(self._versions))
        return block_ids[len(slots):]

    def fill_pending_locally(self, request_id: str, max_blocks: int) -> int:
        """Put up to ``max_blocks`` free blocks of this pool, then kept loans, into the request's PENDING slots;
        returns how many blocks of this pool it took."""
        table = self._tables.get(request_id)
        if table is None or not table.num_pending:
            return 0
        slots = [i for i, ref in enumerate(table.refs) if ref == PENDING]
        num_local = max(0, min(max_blocks, self.pool.num_free_blocks, len(slots)))
        refs = [BlockRef(self.instance_id, block_id) for block_id in self.pool.allocate(num_local)]
        refs += self._take_kept(len(slots) - num_local)
        for slot, ref in zip(slots, refs):
            table.set(slot, ref, next(self._versions))
        return num_local

    @property
    def num_borrowed_blocks(self) -> int:
        """Blocks of other pools that this instance holds: for its requests (a shared one once), kept for their
        cached content, and released ones until handed back."""
        held = sum(count for instance_id, count in self._totals.items()
                   if instance_id not in (PENDING.instance_id, self.instance_id))
        return (held - self._num_extra_holds + len(self._kept)
                + sum(len(block_ids) for block_ids in self._returns.values()))

    def remote_block_counts(self) -> dict[int, int]:
        """Creditor -> its blocks this instance holds (what the ledger should say): by its requests, each once,
        kept for their cached content, or released and not yet handed back."""
        counts: Counter[int] = Counter(ref.instance_id for ref in self._kept)
        for table in self._tables.values():
            for instance_id, count in table.counts.items():
                if instance_id not in (PENDING.instance_id, self.instance_id):
                    counts[instance_id] += count
        for ref, holds in self._remote_holds.items():
            counts[ref.instance_id] -= max(0, holds - 1)
        for creditor, block_ids in self._returns.items():
            counts[creditor] += len(block_ids)
        return {creditor: count for creditor, count in counts.items() if count}

    def num_returning(self, creditor: int) -> int:
        """Blocks of ``creditor``'s pool released here and not yet handed back."""
        return len(self._returns.get(creditor, []))

    @property
    def has_returns(self) -> bool:
        """Whether released remote blocks wait to be handed back."""
        return bool(self._returns)

    def take_returns(self) -> dict[int, tuple[list[int], int]]:
        """Creditor -> (released block ids, how many of them moved home), emptied: they go back now."""
        returns = {creditor: (block_ids, self._moved.get(creditor, 0)) for creditor, block_ids in self._returns.items()}
        self._returns, self._moved = {}, {}
        return returns

    # -- DGFM ---------------------------------------------------------------------------------------------

    def pull_home(self, max_blocks: int) -> list[Transfer]:
        """Move up to ``max_blocks`` remote blocks of this instance's requests into free blocks of its pool.

        The tables point home at once; the caller copies each block's KV from its creditor before the
        next step reads it, and the creditor's block is handed back (as moved) with the next returns.
        """
        transfers: list[Transfer] = []
        budget = min(max_blocks, self.pool.num_free_blocks)
        for table in self._tables.values():
            if table.counts.keys() <= {self.instance_id, PENDING.instance_id}:
                continue
            for logical_index, ref in enumerate(table.refs):
                if len(transfers) >= budget:
                    return transfers
                if ref.instance_id in (self.instance_id, PENDING.instance_id) or self._is_shared(ref):
                    continue
                home = self.pool.allocate(1)[0]
                self._carry_hash(ref, home)
                table.set(logical_index, BlockRef(self.instance_id, home), next(self._versions))
                transfers.append(Transfer(ref.instance_id, ref.block_id, home))
                self._returns.setdefault(ref.instance_id, []).append(ref.block_id)
                self._moved[ref.instance_id] = self._moved.get(ref.instance_id, 0) + 1
        return transfers

    def _is_shared(self, ref: BlockRef) -> bool:
        """Whether several tables hold this borrowed block: DGFM leaves it where it is until they are fewer (its
        transfers and swaps move one table's block)."""
        return self._remote_holds.get(ref, 0) > 1

    def _carry_hash(self, ref: BlockRef, home: int) -> None:
        """The held block of this pool ``home`` takes the KV of borrowed block ``ref``, and its cached content."""
        block_hash = self._uncache_remote(ref)
        if block_hash is not None:
            self.pool.cache(home, block_hash)

    def swap_partner(self, kept_by: Mapping[int, int]) -> int | None:
        """A peer to swap blocks with (see begin_swap): one that holds blocks of this instance's requests while
        its own requests hold blocks of this pool (beyond the ``kept_by`` it keeps for a cached prefix, which a
        swap does not move). Only the lower instance of the two starts a swap, so that the two never offer to each
        other at once; and not again with a peer that took nothing while neither side's loans changed."""
        if self._swap is not None:
            return None
        peers = [peer for peer, lent in self._lent.items()
                 if peer > self.instance_id and len(lent) > kept_by.get(peer, 0) and self._totals[peer]
                 and self._declined.get(peer) != (self._totals[peer], len(lent)) and self._swappable(peer)]
        return min(peers) if peers else None

    def _swappable(self, peer: int) -> bool:
        """Whether this instance's requests hold a block of ``peer``'s pool that no other request shares."""
        return any(ref.instance_id == peer and not self._is_shared(ref)
                   for table in self._tables.values() if peer in table.counts for ref in table.refs)

    def begin_swap(self, peer: int, max_blocks: int) -> list[int]:
        """Start a DGFM swap with ``peer``: up to ``max_blocks`` of its blocks that this instance's requests hold
        (no more than it holds of this pool). The caller copies their KV out before it offers them, and runs no
        step until ``end_swap``: the peer overwrites them."""
        num_blocks = min(max_blocks, len(self._lent[peer]), self._totals[peer])
        block_ids = [ref.block_id for table in self._tables.values() for ref in table.refs
                     if ref.instance_id == peer and not self._is_shared(ref)][:num_blocks]
        if block_ids:
            self._swap = (peer, block_ids)
        return block_ids

    def swap_in(self, peer: int, block_ids: list[int]) -> list[Transfer]:
        """The peer's side of a swap: blocks of this pool that ``peer`` lent back (``block_ids``) take the KV of
        as many of its blocks that this instance's requests hold. The tables point to them at once; the caller
        copies each transfer's KV at once, before any block can be freed and reused, and only then answers."""
        lent = self._lent[peer]
        transfers: list[Transfer] = []
        free_slots = iter(block_ids)
        for table in self._tables.values():
            for logical_index, ref in enumerate(table.refs):
                if ref.instance_id != peer or self._is_shared(ref):
                    continue
                home = next(free_slots, None)
                if home is None:
                    return transfers
                assert home in lent, f"instance {peer} offered block {home}, which it does not hold"
                lent.remove(home)
                self._carry_hash(ref, home)
                table.set(logical_index, BlockRef(self.instance_id, home), next(self._versions))
                transfers.append(Transfer(peer, ref.block_id, home))
        return transfers

    def end_swap(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The peer's Swapped: each pair's second block, which the peer held, is this instance's again and
        takes the KV copied out of the first. Returns (index among the blocks copied out, block) for the caller
        to write, for the requests still holding them; a released request's block goes back to the pool."""
        peer, offered = self._swap
        lent = self._lent[peer]
        swapped = dict(pairs)
        writes: list[tuple[int, int]] = []
        for table in self._tables.values():
            for logical_index, ref in enumerate(table.refs):
                if ref.instance_id == peer and ref.block_id in swapped:
                    home = swapped[ref.block_id]
                    self._carry_hash(ref, home)
                    table.set(logical_index, BlockRef(self.instance_id, home), next(self._versions))
                    writes.append((offered.index(ref.block_id), home))
        for block_id, home in pairs:
            lent.remove(home)
            if block_id in self._released_in_swap:
                self.pool.free([home])
        # Offered blocks the peer did not take stay its loans: released ones go back as usual.
        unswapped = [block_id for block_id in offered if block_id in self._released_in_swap and block_id not in swapped]
        if unswapped:
            self._returns.setdefault(peer, []).extend(unswapped)
        if not pairs:
            self._declined[peer] = (self._totals[peer], len(lent))
        self._swap, self._released_in_swap = None, set()
        return writes

    @property
    def swapping(self) -> bool:
        """Whether a swap this instance started awaits the peer's Swapped."""
        return self._swap is not None
