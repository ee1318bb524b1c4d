"""Helpers for tests of the control plane over InProcessCluster: delivery in any order a network allows, and the
bookkeeping invariants at rest. A cluster here is any object with ``rmanagers``, ``gmanager``, ``control`` (the
InProcessCluster) and ``arrivals`` (request id -> arrival)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hypothesis import strategies as st

from megakv.distkv.control import GMANAGER_MESSAGES
from megakv.distkv.messages import (Borrow, Lend, Lent, Loan, Recall, Recalled, ReturnBlocks, Settled, Swap, Swapped,
                                    Turn, WantRoom, Yield, Yielded)


def check_invariants(cluster) -> None:
    """At rest (nothing in flight): every block has one owner, loans match tables, the ledger matches both."""
    rmanagers = cluster.rmanagers
    for creditor in rmanagers:
        owners: dict[int, str] = {}
        for rm in rmanagers:
            for request_id in rm.request_ids:
                table = rm.block_table(request_id)
                assert rm.block_counts(request_id) == Counter(ref.instance_id for ref in table), "stale counts"
                for ref in table:
                    if ref.instance_id == creditor.instance_id:
                        assert ref.block_id not in owners, "block owned twice"
                        owners[ref.block_id] = f"{rm.instance_id}/{request_id}"
                        if rm is not creditor:
                            assert ref.block_id in creditor.lent_to(rm.instance_id), "remote block not on loan"
            # Blocks of a request that yielded while messages were delivered go back with the next sync.
            for block_id in rm._returns.get(creditor.instance_id, []):
                assert block_id not in owners, "returned block still in use"
                owners[block_id] = "returning"
        for debtor, lent in creditor._lent.items():
            assert lent <= set(owners), "a lent block is owned by nobody"
        for block_id in range(creditor.pool.num_blocks):
            assert creditor.pool.is_free(block_id) == (block_id not in owners), f"block {block_id} leaked"
    for debtor in rmanagers:
        counts = debtor.remote_block_counts()
        # The running totals that scheduling reads agree with a rescan of the tables.
        assert debtor.num_borrowed_blocks == sum(counts.values()), "stale borrowed count"
        assert debtor.num_pending_blocks == sum(debtor.pending_needs().values()), "stale pending count"
        for creditor in rmanagers:
            if creditor is not debtor:
                expected = counts.get(creditor.instance_id, 0)
                assert cluster.gmanager.debts[debtor.instance_id, creditor.instance_id] == expected, "ledger drift"
                assert len(creditor.lent_to(debtor.instance_id)) == expected


def channel(destination: int, message: object) -> tuple:
    """(sender, receiver) of a queued control message; "g" is the gManager. Messages on one channel arrive in
    the order they were sent (MPI's and TCP's guarantee), those on different channels in any order."""
    receiver = "g" if isinstance(message, GMANAGER_MESSAGES) else destination
    if isinstance(message, (Lend, Yield, Turn, WantRoom)):
        return "g", receiver
    if isinstance(message, (Borrow, ReturnBlocks, Yielded, Recalled)):
        return message.debtor, receiver
    if isinstance(message, (Loan, Lent, Settled, Recall)):
        return message.creditor, receiver
    if isinstance(message, (Swap, Swapped)):
        return message.sender, receiver
    return message.instance_id, receiver


def deliver_at(cluster, index: int) -> None:
    """Deliver the queued message at ``index`` ahead of the others; what it causes is queued last."""
    queue = cluster.control.queue
    entry = queue[index]
    del queue[index]
    queue.appendleft(entry)
    cluster.control.deliver_one()


def drawn(data) -> Callable[[list[int]], int]:
    """A chooser for deliver_in_any_order that hypothesis draws (and shrinks)."""
    return lambda heads: data.draw(st.sampled_from(heads))


def deliver_in_any_order(cluster, choose: Callable[[list[int]], int], max_messages: int = 10_000) -> None:
    """Deliver up to ``max_messages`` queued messages (and those they cause), each time the oldest of the channel
    ``choose`` picks among the channels' oldest (their queue indices); all of them unless the bound stops it
    first."""
    queue = cluster.control.queue
    for _ in range(max_messages):
        if not queue:
            return
        heads: dict[tuple, int] = {}
        for index, (destination, message) in enumerate(queue):
            heads.setdefault(channel(destination, message), index)
        deliver_at(cluster, choose(sorted(heads.values())))
    if max_messages == 10_000:
        raise AssertionError("the control plane did not settle")


def quiesce(cluster, choose: Callable[[list[int]], int]) -> None:
    """Sync every instance and deliver, until a sync sends nothing."""
    for _ in range(100):
        for node in cluster.control.nodes:
            node.sync(cluster.arrivals)
        if not cluster.control.queue:
            return
        deliver_in_any_order(cluster, choose)
    raise AssertionError("the instances kept telling the gManager something new")
