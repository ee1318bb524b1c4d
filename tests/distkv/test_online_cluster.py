"""The engine API over DistKV clusters under mpirun: online arrivals, aborts, contention for room.

Every completed request must equal the same request served alone on one instance with a large pool,
and afterwards every pool is whole and the ledger empty.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from online_jobs import WORKER, check_served, random_prompt, run_online
from settled import assert_settled

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

@pytest.mark.mpi
@pytest.mark.parametrize("tp,instances", [(1, 3), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_online_cluster_arrivals_and_aborts_equal_one_instance(tp, instances, megakv_checkpoint, reference,
                                                               run_mpi, tmp_path):
    rng = random.Random(11 + tp)
    requests = []
    for index in range(8):
        arrive = rng.randint(0, 16)
        request = {"prompt_ids": random_prompt(rng.choice([20, 90, 200, 260]), 100 + index), "max_new_tokens": 12,
                   "arrive_step": arrive, "instance": rng.choice([None, *range(instances)])}
        requests.append(request)
    # One aborted during its prefill (260 tokens take several 64-token chunks), one during its decode.
    requests[1].update(prompt_ids=random_prompt(260, 201), abort_step=requests[1]["arrive_step"] + 2)
    requests[5].update(prompt_ids=random_prompt(90, 205), abort_after_tokens=3)
    result = run_online(run_mpi, tmp_path, megakv_checkpoint("gqa", tp), tp, instances, 10, requests)
    check_served(result["results"], requests, reference)
    assert result["results"][1]["final"]["token_ids"] == []
    assert 3 <= len(result["results"][5]["final"]["token_ids"]) < 12
    named = [(r["instance"], res["final"]["instance"]) for r, res in zip(requests, result["results"])]
    assert all(asked is None or asked == served for asked, served in named)


CONTENTION = {
    # Two long prompts, one per instance, whose pools hold only one of them (livelocked before).
    "two_long_two_instances": dict(instances=2, pool_blocks=20, lengths=[500, 500], to_instance=True),
    # The same long prompt sent to both instances.
    "same_long_prompt_twice": dict(instances=2, pool_blocks=20, lengths=[480, 480], to_instance=True, same=True),
    "three_long_three_instances": dict(instances=3, pool_blocks=16, lengths=[420, 420, 420], to_instance=True),
    "mixed_small_budget": dict(instances=3, pool_blocks=16, lengths=[20, 60, 150, 300] * 6, lending_cap=0.5,
                               max_num_batched_tokens=100),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(CONTENTION))
def test_online_cluster_contention_completes_with_one_instance_tokens(case, megakv_checkpoint, reference, run_mpi,
                                                                      tmp_path):
    spec = CONTENTION[case]
    requests = []
    for index, length in enumerate(spec["lengths"]):
        prompt = random_prompt(length, 300 if spec.get("same") else 300 + index)
        requests.append({"prompt_ids": prompt, "max_new_tokens": 16, "arrive_step": 0,
                         "instance": index % spec["instances"] if spec.get("to_instance") else None})
    options = {key: spec[key] for key in ("lending_cap", "max_num_batched_tokens") if key in spec}
    result = run_online(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), 1, spec["instances"], spec["pool_blocks"],
                        requests, **options)
    check_served(result["results"], requests, reference)


@pytest.mark.mpi
def test_online_cluster_contention_tp2_completes(megakv_checkpoint, reference, run_mpi, tmp_path):
    requests = [{"prompt_ids": random_prompt(500, 400 + i), "max_new_tokens": 16, "arrive_step": 0, "instance": i}
                for i in range(2)]
    result = run_online(run_mpi, tmp_path, megakv_checkpoint("gqa", 2), 2, 2, 20, requests)
    check_served(result["results"], requests, reference)


@pytest.mark.mpi
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_online_cluster_random_long_requests_on_small_pools_complete(seed, megakv_checkpoint, reference, run_mpi,
                                                                     tmp_path):
    rng = random.Random(seed)
    requests = [{"prompt_ids": random_prompt(rng.randint(100, 380), 500 + 50 * seed + i),
                 "max_new_tokens": rng.randint(4, 16), "arrive_step": rng.randint(0, 30),
                 "instance": rng.choice([None, 0, 1, 2])} for i in range(10)]
    result = run_online(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), 1, 3, 12, requests,
                        max_num_batched_tokens=rng.choice([32, 64, 128]))
    check_served(result["results"], requests, reference)


@pytest.mark.mpi
def test_online_cluster_abort_returns_blocks_on_three_instances_and_waiting_abort_leaves_no_trace(
        megakv_checkpoint, reference, run_mpi, tmp_path):
    # 420 + 16 tokens need 28 blocks: 10 local and 18 from the two others. It is aborted once 4 of its tokens
    # have arrived: it then holds 27 blocks, more than its pool and one lender's together, whichever lent first
    # (a step count would not do: the front's steps while it waits for a loan are timing's). The second long
    # request cannot fit beside it and waits for room; it is aborted while it waits.
    requests = [{"prompt_ids": random_prompt(420, 600), "max_new_tokens": 16, "arrive_step": 0, "instance": 0,
                 "abort_after_tokens": 4},
                {"prompt_ids": random_prompt(400, 601), "max_new_tokens": 16, "arrive_step": 1, "instance": 1,
                 "abort_step": 9},
                {"prompt_ids": random_prompt(30, 602), "max_new_tokens": 8, "arrive_step": 20, "instance": 2}]
    result = run_online(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), 1, 3, 10, requests)
    check_served(result["results"], requests, reference)
    spread, waiting, late = result["results"]
    assert spread["final"]["block_instances"] == [0, 1, 2]
    assert waiting["final"]["token_ids"] == []


@pytest.mark.mpi
@pytest.mark.parametrize("tp", [1, 2])
def test_dgfm_swaps_blocks_between_instances_whose_requests_hold_each_others(tp, megakv_checkpoint, reference,
                                                                            run_mpi, tmp_path):
    # Pools of 10 blocks, and no pulls home: only a swap brings blocks home. A's long request (177 + 60
    # tokens, 12 blocks at first) is admitted beside a short one holding 4 blocks: 6 local, 3 borrowed from B
    # (first in line: B and C both look unused to the gManager, and ties go to the lower instance), then 3 from
    # C (which now looks less used than B). Once it has its first tokens, the short one is aborted, and B's long
    # request (177 + 20) comes: it outgrows what B has left, and the gManager asks A first, which has not lent
    # yet. Each long request now holds blocks of the other's instance; A and B swap them. Arrivals and aborts
    # follow streamed tokens, not steps: loans take longer on a loaded host.
    requests = [{"prompt_ids": random_prompt(60, 800), "max_new_tokens": 200, "arrive_step": 0, "instance": 0,
                 "abort_after": [1, 2]},
                {"prompt_ids": random_prompt(177, 801), "max_new_tokens": 60, "arrive_step": 0, "instance": 0},
                {"prompt_ids": random_prompt(177, 802), "max_new_tokens": 20, "arrive_after": [1, 4], "instance": 1}]
    result = run_online(run_mpi, tmp_path, megakv_checkpoint("gqa", tp), tp, 3, 10, requests, pull_home=False)
    check_served(result["results"], requests, reference)
    # Both sides count the blocks they took home.
    assert result["report"]["blocks_swapped_by_dgfm"] >= 2


@pytest.mark.mpi
@pytest.mark.parametrize("recall_after", [0.1, float("inf")])
def test_online_cluster_creditor_recalls_lent_blocks_for_its_own_request(recall_after, megakv_checkpoint, reference,
                                                                         run_mpi, tmp_path):
    # 440 + 180 tokens need 39 blocks: 20 local and 19 of instance 1's. Instance 1's own request, 250 + 8 tokens
    # (17 blocks), arrives once 8 are lent: its 64-token chunks are admitted and preempted in turn, as its
    # prompt does not fit in the 12 blocks left. With recall (the default, after 0.1 s), instance 1 asks for its
    # blocks back: the long request is preempted and recomputed, and the short one ends first. Without, the
    # short one waits for the long one to end.
    requests = [{"prompt_ids": random_prompt(440, 700), "max_new_tokens": 180, "arrive_step": 0, "instance": 0},
                {"prompt_ids": random_prompt(250, 701), "max_new_tokens": 8, "arrive_step": 10, "instance": 1}]
    result = run_online(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), 1, 2, 20, requests,
                        recall_after=recall_after)
    check_served(result["results"], requests, reference)
    long_end, short_end = (served["steps"][-1] for served in result["results"])
    recalls = recall_after != float("inf")
    assert (short_end < long_end) == recalls
    assert result["recalled"] == ([1, 0] if recalls else [0, 0])


@pytest.mark.mpi
def test_gmanager_lends_while_the_front_instance_is_held_in_a_step(megakv_checkpoint, reference, run_mpi, tmp_path):
    hold_seconds = 5.0
    out = tmp_path / "out.json"
    run_mpi(3, [sys.executable, str(WORKER.with_name("gmanager_service_worker.py")),
                str(megakv_checkpoint("gqa", 1)), str(out), str(hold_seconds)], timeout=240)
    result = json.loads(out.read_text())
    loans = json.loads(Path(f"{out}.rank1").read_text())
    hold = result["hold"]
    assert hold["end"] - hold["start"] >= hold_seconds
    # Were the gManager or the front driven by instance 0's step loop, B would borrow only after the hold.
    loans_of_b = [loan for loan in loans if loan["request_id"] == "B"]
    assert loans_of_b and loans_of_b[0]["creditor"] == 2
    assert hold["start"] < loans_of_b[0]["time"] < hold["end"] - hold_seconds / 2
    for request_id, (prompt_ids, max_new_tokens) in result["prompts"].items():
        assert result["outputs"][request_id] == reference(prompt_ids, max_new_tokens)
    report = result["report"]
    assert report["blocks_per_instance"] == 8 and len(report["free_blocks"]) == 3
    assert_settled(report)
