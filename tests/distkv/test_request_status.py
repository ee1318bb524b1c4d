"""The request status machine: the scheduler makes every transition, in any sequence of what a cluster does.

Two instances, each a real Scheduler with the cluster's admission policy over its rManager, and the
control plane in one process (tests/distkv/control_plane.py) with messages crossing in any order a network
allows: requests arrive, are scheduled (borrowing what their pool lacks), receive loans, yield and get their
turn (from the gManager), are preempted, recalled by a creditor, aborted, and finish. After every operation each request's status
is where the scheduler keeps it, and every status change was a legal one; at rest every block is accounted
for, and at the end every pool is whole. With prefix caching, requests share prompt prefixes, held in either
pool, and the debtor keeps cached loans after their requests end, until a recall or the end takes them back.
"""
from __future__ import annotations

import random

import pytest
from control_plane import ScheduledCluster, end_every_request, run_random_operations

BLOCK_SIZE = 4


OPERATIONS = ["add"] * 2 + ["step"] * 8 + ["deliver"] * 2 + ["preempt", "recall", "abort", "stop"]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("seed", range(40))
def test_request_status_changes_only_by_legal_transitions_and_matches_the_queues(seed, prefix_caching):
    rng = random.Random(seed)
    cluster = ScheduledCluster([rng.randint(3, 8), rng.randint(3, 8)], BLOCK_SIZE, prefix_caching)
    run_random_operations(cluster, rng, OPERATIONS, 300)
    end_every_request(cluster, rng)
