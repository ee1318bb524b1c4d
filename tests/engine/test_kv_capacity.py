"""KVCapacity: what a request may hold, and how a too-long request is told where the blocks come from."""
from __future__ import annotations

from megakv.engine.core import KVCapacity


def test_kv_capacity_one_instance_names_its_pool():
    capacity = KVCapacity(40)
    assert capacity.num_blocks == 40
    assert capacity.describe() == "its instance holds 40"


def test_kv_capacity_cluster_names_lenders_and_cap():
    capacity = KVCapacity(40, num_other_instances=1, num_lendable_blocks_per_instance=16, lending_cap=0.4)
    assert capacity.num_blocks == 56
    assert capacity.describe() == "its instance holds 40 and the other 1 instance may lend 16 (--lending-cap 0.4)"
    nothing_lent = KVCapacity(40, num_other_instances=2, num_lendable_blocks_per_instance=0, lending_cap=0.0)
    assert nothing_lent.describe() == "its instance holds 40 and the other 2 instances may lend 0 (--lending-cap 0.0)"
