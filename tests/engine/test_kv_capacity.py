"""KVCapacity and ContextLimit: what a request may hold, and how a too-long request is told what bounds it."""
from __future__ import annotations

import pytest

from megakv.engine.limits import ContextLimit, KVCapacity


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


def test_kv_capacity_of_a_cluster_that_lost_instances_names_them():
    two_left = KVCapacity(40, num_other_instances=1, num_lendable_blocks_per_instance=16, lending_cap=0.4,
                          failed_instances=(2, 3))
    assert two_left.num_blocks == 56
    assert two_left.describe() == ("its instance holds 40 and the other 1 instance may lend 16 (--lending-cap 0.4) "
                                   "(instances [2, 3] failed)")
    alone = ContextLimit(max_positions=1024, block_size=16, capacity=KVCapacity(8, failed_instances=(1,)))
    assert alone.reason == "the KV memory it may use: 8 blocks of 16 tokens, its instance's pool (instances [1] failed)"


def test_context_limit_one_token_either_side_of_the_kv_bound():
    limit = ContextLimit(max_positions=1024, block_size=16, capacity=KVCapacity(8))
    assert limit.max_model_len == 128
    limit.check(3, 125)
    with pytest.raises(ValueError) as refused:
        limit.check(3, 126, "max_tokens")
    assert str(refused.value) == ("prompt (3 tokens) + max_tokens (126) = 129 exceeds the 128 tokens a request may "
                                  "hold (the KV memory it may use: 8 blocks of 16 tokens, its instance's pool)")


def test_context_limit_names_the_tighter_bound():
    cluster = KVCapacity(10, num_other_instances=1, num_lendable_blocks_per_instance=10)
    by_kv = ContextLimit(max_positions=1024, block_size=16, capacity=cluster)
    assert (by_kv.max_model_len, by_kv.reason) == (
        320, "the KV memory it may use: 20 blocks of 16 tokens, as its instance holds 10 and the other 1 instance "
             "may lend 10 (--lending-cap 1.0)")
    by_positions = ContextLimit(max_positions=300, block_size=16, capacity=cluster)
    assert (by_positions.max_model_len, by_positions.reason) == (300, "the model's maximum position")
    with pytest.raises(ValueError, match=r"= 301 exceeds the 300 tokens a request may hold \(the model's maximum"):
        by_positions.check(1, 300)
