"""A failed instance, in the bookkeeping: random failures at random points of what a cluster does.

Three or four instances, each a real Scheduler over its rManager, and the control plane in one process
with messages crossing in any order a network allows (what the dead instance sent may still arrive, what
was sent to it is lost). When the gManager declares an instance failed, the others take back the blocks it
held, recompute the requests that held blocks of its pool, and the front runs its requests again on
another instance. Invariants: no block of a live instance is owned twice or leaked, the ledger equals the
live instances' tables, no table or prefix cache points to the failed instance, and at the end every live pool
is whole. With prefix caching, the requests share prefixes, so blocks kept on loan die with their creditor too.
"""
from __future__ import annotations

import random

import pytest
from control_plane import ScheduledCluster, end_every_request, run_random_operations

BLOCK_SIZE = 4
OPERATIONS = ["add"] * 3 + ["step"] * 8 + ["deliver"] * 2 + ["preempt", "recall", "abort", "stop", "fail"]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("seed", range(60))
def test_instance_failure_leaves_the_survivors_bookkeeping_whole(seed, prefix_caching):
    rng = random.Random(seed)
    cluster = ScheduledCluster([rng.randint(3, 8) for _ in range(rng.choice([3, 4]))], BLOCK_SIZE, prefix_caching)
    run_random_operations(cluster, rng, OPERATIONS, 300)
    assert cluster.gmanager.failed, "no instance failed: the test checks nothing new"
    end_every_request(cluster, rng)
