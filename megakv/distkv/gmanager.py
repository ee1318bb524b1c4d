"""gManager (DistKV-LLM section 4.3): the cluster's debt ledger and its borrowers' queue.

Coordination only: no KV passes through it, and it hears from an instance only when that instance
borrows, lends, returns or reports room it was asked for. Borrowers are served first come, first
served, one Lend in flight at a time, each from the instance with the most lendable blocks that hold
no cached prefix, and only when no instance has such blocks from the one with the most lendable
blocks: a loan pushes a prefix out only when nothing else is left (a prefix whose first blocks are
gone is lost whole, its later blocks on other instances with it). When no instance can lend to the
first borrower, every later borrower still waiting for blocks is asked to yield: they hold blocks
while making no progress, and two such requests on two instances would otherwise wait for each other
forever. They run again in arrival order, each when its turn comes. Meanwhile the instances report
their room as it frees up, and give back the loans they keep for a cached prefix. An instance
declared failed leaves the ledger and the queue, and the others hear of it.

The gManager is a plain state machine: ``handle`` takes one message and returns what to send,
so the in-process tests and the MPI cluster drive the same code.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

from megakv.distkv.messages import (Borrow, InstanceFailed, KeptLoans, Lend, Lent, Room, Settled, Turn, Unresponsive,
                                    WantRoom, Yield, Yielded, sender_of)


@dataclass
class _Borrower:
    debtor: int
    request_id: str
    arrival: int
    num_blocks: int
    # Asked to yield; it waits for its Turn, then tells how many blocks it needs.
    yielded: bool = False
    turn_sent: bool = False
    # Changes whenever the debtor tells a new need: a Lend asked for an earlier need is not taken off this one.
    version: int = 0


class GManager:
    """Global ledger: ``debts[(debtor, creditor)]`` blocks of debtor's requests held by creditor."""

    def __init__(self, lendable_blocks: list[int]) -> None:
        self.num_instances = len(lendable_blocks)
        self.debts: dict[tuple[int, int], int] = defaultdict(int)
        # Of the debts, the blocks each debtor keeps for their cached content with no request holding them, as it
        # last said (KeptLoans): owed, but by nobody's request.
        self.kept: dict[tuple[int, int], int] = {}
        self.num_borrow_events = 0
        self.num_blocks_borrowed = 0
        self.num_blocks_moved = 0
        self.num_blocks_swapped = 0
        # What each instance may lend, and of that the blocks without a cached prefix, as it last said (every pool
        # starts empty).
        self._lendable = list(lendable_blocks)
        self._fresh = list(lendable_blocks)
        # Borrowers in arrival order, by request id.
        self._queue: dict[str, _Borrower] = {}
        # The request whose Lend awaits its creditor's answer, the version of its need that the Lend served, and
        # the creditor.
        self._asking: tuple[str, int, int] | None = None
        # Instances out of the cluster, in the order they failed: nothing they send is read.
        self.failed: list[int] = []
        self._versions = itertools.count(1)
        self._room_wanted = False

    def outstanding(self) -> dict[str, int]:
        """Non-zero debts, as "debtor->creditor": blocks."""
        return {f"{d}->{c}": n for (d, c), n in sorted(self.debts.items()) if n}

    def kept_loans(self) -> dict[str, int]:
        """Debts that are kept loans (see ``kept``), as "debtor->creditor": blocks."""
        return {f"{d}->{c}": min(n, self.debts.get((d, c), 0)) for (d, c), n in sorted(self.kept.items())
                if min(n, self.debts.get((d, c), 0))}

    def describe(self) -> str:
        """The borrowers' queue and the Lend in flight, for a report on a stalled cluster."""
        waiting = ", ".join(f"{b.request_id} of instance {b.debtor} " +
                            (("has its turn" if b.turn_sent else "yielded") if b.yielded else f"needs {b.num_blocks}")
                            for b in self._queue.values())
        asking = f"; a Lend for {self._asking[0]} in flight" if self._asking is not None else ""
        failed = f"; failed instances: {self.failed}" if self.failed else ""
        return f"borrowers: {waiting or 'none'}{asking}; lendable blocks per instance: {self._lendable}{failed}"

    @property
    def is_busy(self) -> bool:
        """True while a block is owed for a request (kept loans are not), a borrower waits, or a Lend is in
        flight."""
        return (any(n > self.kept.get(pair, 0) for pair, n in self.debts.items())
                or bool(self._queue) or self._asking is not None)

    @property
    def live_instances(self) -> list[int]:
        """The instances not declared failed."""
        return [instance for instance in range(self.num_instances) if instance not in self.failed]

    def fail_instance(self, failed: int) -> list[tuple[int, object]]:
        """Take ``failed`` out of the cluster: its debts either way leave the ledger (its creditors take their
        blocks back, its debtors drop the blocks it held and recompute), its borrowers leave the queue, and every
        other instance hears of it, and so does ``failed``, in case it still runs. Returns the messages to send."""
        if failed in self.failed:
            return []
        self.failed.append(failed)
        for pair in [pair for pair in self.debts if failed in pair]:
            del self.debts[pair]
        self.kept = {pair: n for pair, n in self.kept.items() if failed not in pair}
        self._lendable[failed] = self._fresh[failed] = 0
        self._queue = {request_id: borrower for request_id, borrower in self._queue.items()
                       if borrower.debtor != failed}
        if self._asking is not None and self._asking[2] == failed:
            self._asking = None  # its Lent will never come
        return [(instance, InstanceFailed(failed)) for instance in range(self.num_instances)] + self._advance()

    def handle(self, message: object) -> list[tuple[int, object]]:
        """Take one message from an rManager; returns (instance, message) pairs to send. A failed instance's
        messages are dropped."""
        if sender_of(message) in self.failed:
            return []
        if isinstance(message, Unresponsive):
            return self.fail_instance(message.instance_id)
        if isinstance(message, Borrow):
            self._on_borrow(message)
        elif isinstance(message, Lent):
            assert self._asking is not None, "a Lent answers the one Lend in flight"
            _, asked_version, _ = self._asking
            self._asking = None
            self._set_room(message.creditor, message.num_lendable_blocks, message.num_fresh_blocks)
            if message.debtor in self.failed:
                return self._advance()  # the creditor took the loan back when it heard of the failure
            self.debts[message.debtor, message.creditor] += message.num_blocks
            if message.num_blocks:
                self.num_borrow_events += 1
                self.num_blocks_borrowed += message.num_blocks
            borrower = self._queue.get(message.request_id)
            # A need told after the Lend went out (the request ended, was preempted, or came back) is the
            # debtor's own count: the loan may have reached it too late to fill it, and then goes back.
            if borrower is not None and not borrower.yielded and borrower.version == asked_version:
                borrower.num_blocks -= message.num_blocks
                if borrower.num_blocks <= 0:
                    del self._queue[message.request_id]
        elif isinstance(message, Settled) and message.debtor in self.failed:
            self._set_room(message.creditor, message.num_lendable_blocks, message.num_fresh_blocks)
        elif isinstance(message, Settled):
            self.debts[message.debtor, message.creditor] -= message.num_blocks
            assert self.debts[message.debtor, message.creditor] >= 0, "ledger went negative"
            self.num_blocks_moved += message.num_moved
            self.num_blocks_swapped += message.num_swapped
            self._set_room(message.creditor, message.num_lendable_blocks, message.num_fresh_blocks)
        elif isinstance(message, Room):
            self._set_room(message.instance_id, message.num_lendable_blocks, message.num_fresh_blocks)
        elif isinstance(message, KeptLoans):
            self.kept = {pair: n for pair, n in self.kept.items() if pair[0] != message.debtor}
            self.kept.update({(message.debtor, creditor): n for creditor, n in message.counts.items()
                              if creditor not in self.failed})
            return []
        elif isinstance(message, Yielded):
            borrower = self._queue.get(message.request_id)
            if borrower is None:
                self._enqueue(_Borrower(message.debtor, message.request_id, message.arrival, 0))
                borrower = self._queue[message.request_id]
            borrower.yielded, borrower.turn_sent = True, False
        else:
            raise TypeError(f"the gManager got an unexpected message: {message!r}")
        return self._advance()

    def _set_room(self, instance: int, num_lendable_blocks: int, num_fresh_blocks: int) -> None:
        self._lendable[instance], self._fresh[instance] = num_lendable_blocks, num_fresh_blocks

    def _on_borrow(self, message: Borrow) -> None:
        borrower = self._queue.get(message.request_id)
        if message.num_blocks == 0:
            self._queue.pop(message.request_id, None)
        elif borrower is not None:
            borrower.num_blocks, borrower.yielded = message.num_blocks, False
            borrower.version = next(self._versions)
        else:
            self._enqueue(_Borrower(message.debtor, message.request_id, message.arrival, message.num_blocks,
                                    version=next(self._versions)))

    def _enqueue(self, borrower: _Borrower) -> None:
        self._queue[borrower.request_id] = borrower
        self._queue = dict(sorted(self._queue.items(), key=lambda item: item[1].arrival))

    def _advance(self) -> list[tuple[int, object]]:
        """Serve the first borrower, or make room for it."""
        sends: list[tuple[int, object]] = []
        if self._asking is not None:
            return sends
        if not self._queue:
            if self._room_wanted:
                self._room_wanted = False
                sends += [(instance, WantRoom(False)) for instance in self.live_instances]
            return sends
        first, *later = self._queue.values()
        creditors = [c for c in self.live_instances if c != first.debtor and self._lendable[c] > 0]
        if not first.yielded and creditors:
            creditor = max(creditors, key=lambda c: (self._fresh[c], self._lendable[c], -c))
            self._asking = (first.request_id, first.version, creditor)
            # Its fresh blocks as it last said: if it has none by now, its Lent says so, and the next Lend goes to
            # another instance.
            fresh = self._fresh[creditor] > 0
            offer = self._fresh[creditor] if fresh else self._lendable[creditor]
            return [(creditor, Lend(first.debtor, first.request_id, min(first.num_blocks, offer), fresh))]
        if first.yielded and not first.turn_sent:
            first.turn_sent = True
            sends.append((first.debtor, Turn(first.request_id)))
        # The first borrower waits (for room, or to be admitted again): the later ones hold blocks it may need
        # while they cannot be served before it.
        for borrower in later:
            if not borrower.yielded:
                borrower.yielded, borrower.turn_sent = True, False
                sends.append((borrower.debtor, Yield(borrower.request_id)))
        if not first.yielded and not self._room_wanted:
            self._room_wanted = True
            sends += [(instance, WantRoom(True)) for instance in self.live_instances]
        return sends
