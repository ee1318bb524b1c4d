"""gManager (DistKV-LLM section 4.3): the cluster's debt ledger, creditor choice, and DGFM planning.

Coordination only: no KV passes through it. Each step it reads every rManager's
heartbeat, settles returned blocks in the ledger, answers borrowing needs with
the creditors that have the most lendable room, and plans bounded DGFM moves.
"""
from __future__ import annotations

from collections import defaultdict

from megakv.distkv.dgfm import plan_moves
from megakv.distkv.messages import ClusterView, Grant, Heartbeat, MovePlan


class GManager:
    """Global ledger: ``debts[(debtor, creditor)]`` blocks of debtor's requests held by creditor."""

    def __init__(self, num_instances: int, max_moves_per_step: int = 8) -> None:
        self.num_instances = num_instances
        self.max_moves_per_step = max_moves_per_step
        self.debts: dict[tuple[int, int], int] = defaultdict(int)
        self.num_borrow_events = 0
        self.num_blocks_borrowed = 0
        self.num_blocks_moved = 0

    def outstanding(self) -> dict[str, int]:
        """Non-zero debts, as "debtor->creditor": blocks."""
        return {f"{d}->{c}": n for (d, c), n in sorted(self.debts.items()) if n}

    def on_heartbeats(self, heartbeats: list[Heartbeat]) -> dict[int, list]:
        """Process one step's heartbeats; returns the messages to send, by instance."""
        outbox: dict[int, list] = defaultdict(list)
        beats = sorted(heartbeats, key=lambda beat: beat.instance_id)
        lendable = {beat.instance_id: beat.num_lendable_blocks for beat in beats}
        free = {beat.instance_id: beat.num_free_blocks for beat in beats}
        for beat in beats:
            for creditor, num_blocks in beat.returned.items():
                self.debts[beat.instance_id, creditor] -= num_blocks
                assert self.debts[beat.instance_id, creditor] >= 0, "ledger went negative"
        for beat in beats:
            for request_id, need in sorted(beat.needs.items()):
                creditors = sorted((c for c in lendable if c != beat.instance_id), key=lambda c: (-lendable[c], c))
                for creditor in creditors:
                    take = min(need, lendable[creditor])
                    if take == 0:
                        break
                    outbox[beat.instance_id].append(Grant(request_id, creditor, take))
                    lendable[creditor] -= take
                    free[creditor] -= take
                    self.debts[beat.instance_id, creditor] += take
                    self.num_borrow_events += 1
                    self.num_blocks_borrowed += take
                    need -= take
        room = {beat.instance_id: max(0, free[beat.instance_id] - beat.num_reserved_blocks) for beat in beats}
        candidates = {beat.instance_id: beat.remote_blocks for beat in beats}
        relocations = plan_moves(self.debts, candidates, room, self.max_moves_per_step)
        if relocations:
            self.num_blocks_moved += len(relocations)
            involved = {r.owner for r in relocations} | {r.old.instance_id for r in relocations}
            for instance_id in involved:
                outbox[instance_id].append(MovePlan(relocations))
            for relocation in relocations:
                if relocation.new.block_id < 0:
                    free[relocation.owner] -= 1
                    lendable[relocation.owner] = min(lendable[relocation.owner], free[relocation.owner])
        for beat in beats:
            borrowable = sum(n for c, n in lendable.items() if c != beat.instance_id)
            outbox[beat.instance_id].append(ClusterView(borrowable))
        return outbox
