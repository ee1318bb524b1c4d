"""Property tests of rManager / gManager / ledger / DGFM with the in-process transport."""
from __future__ import annotations

import dataclasses
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from megakv.distkv.control import InProcessCluster
from megakv.distkv.dgfm import find_cycle
from megakv.distkv.messages import PENDING
from megakv.distkv.rmanager import RManager
from megakv.kvcache.block_pool import BlockPool

BLOCK_SIZE = 4


def check_transfers_agree(rmanagers: list[RManager]) -> None:
    """Both ends of every DGFM copy hold the same record of it (they tag the copy with its plan index)."""
    by_index: dict[int, list] = {}
    for rm in rmanagers:
        for transfer in rm.transfers:
            assert rm.instance_id in (transfer.src_instance, transfer.dst_instance)
            by_index.setdefault(transfer.plan_index, []).append(transfer)
    for records in by_index.values():
        assert len(records) == 2, records
        src_view, dst_view = sorted(records, key=lambda t: t.dst_block)
        assert dataclasses.replace(src_view, dst_block=dst_view.dst_block) == dst_view


def check_invariants(cluster: InProcessCluster) -> None:
    rmanagers = [node.rmanager for node in cluster.nodes]
    check_transfers_agree(rmanagers)
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
            for block_id in rm._returns.get(creditor.instance_id, []):
                assert block_id not in owners, "returned block still in use"
                owners[block_id] = "returning"
        for debtor, lent in creditor._lent.items():
            assert lent <= set(owners), "a lent block is owned by nobody"
        for block_id in range(creditor.pool.num_blocks):
            assert creditor.pool.is_free(block_id) == (block_id not in owners), f"block {block_id} leaked"
    for debtor in rmanagers:
        counts = debtor.remote_block_counts()
        for creditor in rmanagers:
            if creditor is debtor:
                continue
            expected = counts.get(creditor.instance_id, 0)
            assert cluster.gmanager.debts[debtor.instance_id, creditor.instance_id] == expected, "ledger drift"
            assert len(creditor.lent_to(debtor.instance_id)) == expected


operations = st.lists(st.tuples(st.sampled_from(["grow", "grow", "free", "round"]), st.integers(0, 3),
                                st.integers(0, 5), st.integers(1, 24)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(num_instances=st.integers(2, 4), pool_sizes=st.lists(st.integers(2, 12), min_size=4, max_size=4),
       lending_cap=st.sampled_from([0.5, 1.0]), max_moves=st.integers(0, 6), ops=operations)
def test_bookkeeping_random_operations_keep_invariants(num_instances, pool_sizes, lending_cap, max_moves, ops):
    rmanagers = [RManager(i, BlockPool(pool_sizes[i]), BLOCK_SIZE, lending_cap) for i in range(num_instances)]
    cluster = InProcessCluster(rmanagers, max_moves_per_step=max_moves)
    cluster.run_round()
    lengths: dict[tuple[int, str], int] = {}
    for op, instance, request, tokens in ops:
        rm = rmanagers[instance % num_instances]
        request_id = f"r{request}"
        if op == "grow":
            target = lengths.get((rm.instance_id, request_id), 0) + tokens
            if rm.can_grow(request_id, target):
                rm.grow(request_id, target)
                lengths[rm.instance_id, request_id] = target
        elif op == "free":
            rm.free(request_id)
            lengths.pop((rm.instance_id, request_id), None)
        else:
            cluster.run_round()
            for manager in rmanagers:
                for rid in manager.request_ids:
                    if manager.has_pending(rid):  # not enough room in the cluster: preempt (abort)
                        manager.free(rid)
                        lengths.pop((manager.instance_id, rid), None)
            check_invariants(cluster)
    for manager in rmanagers:
        for rid in manager.request_ids:
            manager.free(rid)
    cluster.run_round()
    check_invariants(cluster)
    assert cluster.gmanager.outstanding() == {}
    assert all(rm.pool.num_free_blocks == rm.pool.num_blocks for rm in rmanagers)


def test_rmanager_borrows_when_local_pool_is_short():
    rmanagers = [RManager(i, BlockPool(4), BLOCK_SIZE) for i in range(3)]
    cluster = InProcessCluster(rmanagers)
    cluster.run_round()
    assert rmanagers[0].borrowable_estimate == 8
    rmanagers[0].grow("long", 10 * BLOCK_SIZE)
    assert rmanagers[0].block_table("long").count(PENDING) == 6
    cluster.run_round()
    table = rmanagers[0].block_table("long")
    assert PENDING not in table
    assert {ref.instance_id for ref in table} == {0, 1, 2}
    assert cluster.gmanager.outstanding() == {"0->1": 4, "0->2": 2}  # most lendable room first
    rmanagers[0].free("long")
    cluster.run_round()
    assert cluster.gmanager.outstanding() == {}


def test_rmanager_lending_cap_limits_loans():
    rmanagers = [RManager(0, BlockPool(4), BLOCK_SIZE), RManager(1, BlockPool(10), BLOCK_SIZE, lending_cap=0.3)]
    cluster = InProcessCluster(rmanagers)
    cluster.run_round()
    assert rmanagers[0].borrowable_estimate == 3
    assert not rmanagers[0].can_grow("r", 8 * BLOCK_SIZE)
    rmanagers[0].grow("r", 7 * BLOCK_SIZE)
    cluster.run_round()
    assert len(rmanagers[1].lent_to(0)) == 3


def test_dgfm_cancels_two_cycle_by_swapping_home():
    rmanagers = [RManager(i, BlockPool(3), BLOCK_SIZE) for i in range(2)]
    cluster = InProcessCluster(rmanagers, max_moves_per_step=0)
    cluster.run_round()
    rmanagers[0].grow("x", BLOCK_SIZE)
    rmanagers[0].grow("a", 3 * BLOCK_SIZE)  # 2 local, 1 borrowed from instance 1
    cluster.run_round()
    rmanagers[0].free("x")
    cluster.run_round()  # instance 1 learns that instance 0 has room again
    rmanagers[1].grow("b", 3 * BLOCK_SIZE)  # 2 local, 1 borrowed from instance 0
    cluster.run_round()
    assert cluster.gmanager.outstanding() == {"0->1": 1, "1->0": 1}
    check_invariants(cluster)
    cluster.gmanager.max_moves_per_step = 2
    for node in cluster.nodes:
        node.max_moves_per_step = 2
    cluster.run_round()
    check_invariants(cluster)
    assert cluster.gmanager.outstanding() == {}
    assert cluster.gmanager.num_blocks_moved == 2
    assert {ref.instance_id for ref in rmanagers[0].block_table("a")} == {0}
    assert {ref.instance_id for ref in rmanagers[1].block_table("b")} == {1}
    transfers = {(t.src_instance, t.dst_instance) for t in rmanagers[0].transfers}
    assert transfers == {(0, 1), (1, 0)}


def test_dgfm_pulls_blocks_home_when_room_frees_up():
    rmanagers = [RManager(i, BlockPool(3), BLOCK_SIZE) for i in range(2)]
    cluster = InProcessCluster(rmanagers, max_moves_per_step=1)
    cluster.run_round()
    rmanagers[0].grow("x", BLOCK_SIZE)
    rmanagers[0].grow("a", 4 * BLOCK_SIZE)  # 2 local, 2 borrowed
    cluster.run_round()
    rmanagers[0].free("x")
    cluster.run_round()  # one move per step: one block comes home
    check_invariants(cluster)
    assert cluster.gmanager.outstanding() == {"0->1": 1}
    assert rmanagers[0].transfers[0].dst_block >= 0


def test_find_cycle():
    assert find_cycle({(0, 1), (1, 2)}) is None
    assert sorted(find_cycle({(0, 1), (1, 0)})) == [0, 1]
    assert sorted(find_cycle({(0, 1), (1, 2), (2, 0), (3, 0)})) == [0, 1, 2]
