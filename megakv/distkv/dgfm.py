"""DGFM, debt-graph fragmented memory management (DistKV-LLM section 4.4).

Instances are nodes and debts are edges debtor -> creditor, weighted by the
number of blocks. A cycle (A holds B's blocks while B holds A's, or longer) is
cancelled by a rotation: along the cycle every instance sends the debtor's block
it holds back to that debtor, into the slot the debtor had lent it, so each debt
drops by one and no pool changes size. An instance with free room pulls its
requests' remote blocks home. Moves are bounded per step so the copies hide
behind compute.
"""
from __future__ import annotations

from megakv.distkv.messages import BlockRef, Relocation, RemoteBlock


def find_cycle(edges: set[tuple[int, int]]) -> list[int] | None:
    """Nodes [n0, ..., nk-1] of a cycle n0 -> n1 -> ... -> n0 in the directed graph, or None."""
    successors: dict[int, list[int]] = {}
    for debtor, creditor in sorted(edges):
        successors.setdefault(debtor, []).append(creditor)
    done: set[int] = set()
    for start in sorted(successors):
        path: list[int] = []
        on_path: dict[int, int] = {}
        stack = [(start, iter(successors.get(start, [])))]
        path.append(start)
        on_path[start] = 0
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                done.add(path.pop())
                on_path.pop(node)
            elif child in on_path:
                return path[on_path[child]:]
            elif child not in done:
                on_path[child] = len(path)
                path.append(child)
                stack.append((child, iter(successors.get(child, []))))
    return None


def plan_moves(debts: dict[tuple[int, int], int], candidates: dict[int, dict[int, list[RemoteBlock]]],
               free_room: dict[int, int], max_moves: int) -> list[Relocation]:
    """Relocations cancelling debt cycles first, then pulling blocks home, at most max_moves in all.

    debts: (debtor, creditor) -> blocks; candidates: debtor -> creditor -> blocks that may move;
    free_room: instance -> free blocks it may fill with its own pulled-home blocks.
    Mutates ``debts`` to the state after the moves.
    """
    pools = {d: {c: list(blocks) for c, blocks in by_creditor.items()} for d, by_creditor in candidates.items()}
    relocations: list[Relocation] = []

    def movable_edges() -> set[tuple[int, int]]:
        return {(d, c) for (d, c), n in debts.items() if n > 0 and pools.get(d, {}).get(c)}

    while (cycle := find_cycle(movable_edges())) is not None and len(cycle) <= max_moves - len(relocations):
        size = len(cycle)
        # held[j]: the block of cycle[j] that sits on cycle[j + 1]
        held = [pools[cycle[j]][cycle[(j + 1) % size]].pop() for j in range(size)]
        for j in range(size):
            owner, holder = cycle[j], cycle[(j + 1) % size]
            relocations.append(Relocation(owner, held[j].request_id, held[j].logical_index,
                                          old=BlockRef(holder, held[j].block_id),
                                          new=BlockRef(owner, held[j - 1].block_id)))
            debts[owner, holder] -= 1
    for debtor in sorted(pools):
        room = free_room.get(debtor, 0)
        for creditor in sorted(pools[debtor]):
            blocks = pools[debtor][creditor]
            while room > 0 and blocks and debts.get((debtor, creditor), 0) > 0 and len(relocations) < max_moves:
                block = blocks.pop()
                relocations.append(Relocation(debtor, block.request_id, block.logical_index,
                                              old=BlockRef(creditor, block.block_id), new=BlockRef(debtor, -1)))
                debts[debtor, creditor] -= 1
                room -= 1
    return relocations
