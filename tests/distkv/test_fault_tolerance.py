"""Members of a cluster fail alone: a real SIGKILL or SIGSTOP of one instance's rank under mpirun (with
ULFM, as launch/serve.sh runs it), while requests stream.

The other instances and the front go on: a request that borrowed from the failed instance recomputes its
lost KV, and one that ran on it runs again elsewhere from its prompt and the tokens already streamed. Every
request must finish with the tokens of an undisturbed run (the request alone on one instance, greedy, fp32),
the ledger empty and every live pool whole; requests of an instance that shares no KV with the failed one
never wait for it.
"""
from __future__ import annotations

import pytest
from online_jobs import check_served, random_prompt, run_online

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = [pytest.mark.slow, pytest.mark.mpi]

POOL_BLOCKS = 8
# A short --peer-timeout, so that a stopped rank is declared failed quickly.
PEER_TIMEOUT = 3.0
LONG, LATE = 2, 3


def three_instance_job(long_on: int, neighbour_on: int) -> list[dict]:
    """Two neighbour requests that fill their instance's pool of 8 blocks from their first decode step to their last
    token (4 blocks each), so that it has nothing to lend; then a long request that needs 14 blocks (its pool holds
    8) and so borrows 6 from the instance that is neither; and a late request for the neighbours' instance, which
    arrives with the fault (once the long request has streamed its first token)."""
    neighbours = [{"prompt_ids": random_prompt(48, seed), "max_new_tokens": 16, "arrive_step": 0,
                   "instance": neighbour_on} for seed in (1, 2)]
    long = {"prompt_ids": random_prompt(200, 3), "max_new_tokens": 16, "arrive_after": [0, 1], "instance": long_on}
    late = {"prompt_ids": random_prompt(20, 4), "max_new_tokens": 8, "arrive_after": [LONG, 1],
            "instance": neighbour_on}
    return [*neighbours, long, late]


def unrelated_wait(result: dict) -> float:
    """The longest the requests of the neighbours' instance waited for a token, the late one's last included."""
    times = [result["results"][index]["times"] for index in (0, 1, LATE)]
    gaps = [later - earlier for served in times for earlier, later in zip(served, served[1:])]
    return max([*gaps, times[-1][-1] - result["fault_times"]["sent"]])


def run_with_fault(run_mpi, tmp_path, checkpoint, reference, requests: list[dict], signal: str, tp: int = 1,
                   rank: int = 2) -> dict:
    """Global rank ``rank`` gets ``signal`` once the long request has streamed its first token; every request still
    ends with the undisturbed tokens, and the rank's instance is declared failed."""
    result = run_online(run_mpi, tmp_path, checkpoint, tp, 3, POOL_BLOCKS, requests,
                        fault={"after": [LONG, 1], "rank": rank, "signal": signal}, peer_timeout=PEER_TIMEOUT)
    check_served(result["results"], requests, reference)
    assert result["report"]["failed"] == [rank // tp]
    return result


@pytest.mark.parametrize("signal", ["KILL", "STOP"])
@pytest.mark.parametrize("debtor", [0, 1])
def test_a_failed_creditor_costs_its_debtor_a_recompute_and_nothing_else(signal, debtor, megakv_checkpoint, reference,
                                                                        run_mpi, tmp_path):
    result = run_with_fault(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), reference,
                            three_instance_job(long_on=debtor, neighbour_on=1 - debtor), signal)
    times = result["fault_times"]
    detection = times["declared"] - times["sent"]
    resumed = next(t for t in result["results"][LONG]["times"] if t > times["sent"]) - times["sent"]
    waited = unrelated_wait(result)
    print(f"SIG{signal} of the creditor of instance {debtor}: declared failed after {detection:.2f} s, the "
          f"debtor's next token {resumed:.2f} s after the fault; the other instance's requests waited {waited:.2f} s "
          "at most")
    assert detection < (1.0 if signal == "KILL" else PEER_TIMEOUT + 2.0)
    # Debtor 0 included: the front shares its rank with instance 0, but not its thread.
    assert waited < PEER_TIMEOUT / 2


def test_a_killed_debtor_s_requests_run_again_elsewhere_with_the_same_tokens(megakv_checkpoint, reference, run_mpi,
                                                                            tmp_path):
    # Instance 2's long request borrows from instance 0 (instance 1's pool is full) and runs again on instance 0 or
    # 1 from its prompt and its first token.
    result = run_with_fault(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), reference,
                            three_instance_job(long_on=2, neighbour_on=1), "KILL")
    assert result["requests_recomputed"] == 1
    assert result["results"][LONG]["final"]["instance"] != 2
    times = result["fault_times"]
    waited = unrelated_wait(result)
    print(f"SIGKILL of the debtor: declared failed after {times['declared'] - times['sent']:.2f} s; the other "
          f"instance's requests waited {waited:.2f} s at most")
    assert waited < PEER_TIMEOUT / 2


def test_a_killed_tensor_parallel_rank_takes_its_whole_instance_out(megakv_checkpoint, reference, run_mpi, tmp_path):
    # TP 2: the creditor's second rank (global rank 5) dies; its leader (rank 4) ends with it, and instance 1's
    # second rank, whose link to rank 5 ended, makes both of its ranks drop the step.
    result = run_with_fault(run_mpi, tmp_path, megakv_checkpoint("gqa", 2), reference,
                            three_instance_job(long_on=1, neighbour_on=0), "KILL", tp=2, rank=5)
    times = result["fault_times"]
    print(f"SIGKILL of a TP rank of the creditor: declared failed after {times['declared'] - times['sent']:.2f} s")
    assert times["declared"] - times["sent"] < PEER_TIMEOUT


def test_a_hung_tensor_parallel_rank_takes_its_whole_instance_out(megakv_checkpoint, reference, run_mpi, tmp_path):
    # TP 2: instance 1's second rank (global rank 3) stops while instance 1 decodes the long request. Its leader's
    # heartbeats go on, and its creditor hears from it only when it asks: the leader's next tensor-parallel
    # collective gives up after twice the peer timeout and ends the leader, which MPI reports. The long request
    # runs again on another instance.
    result = run_with_fault(run_mpi, tmp_path, megakv_checkpoint("gqa", 2), reference,
                            three_instance_job(long_on=1, neighbour_on=0), "STOP", tp=2, rank=3)
    times = result["fault_times"]
    print(f"SIGSTOP of a TP rank of the debtor: declared failed after {times['declared'] - times['sent']:.2f} s")
    assert times["declared"] - times["sent"] < 2 * PEER_TIMEOUT + 2
    assert result["results"][LONG]["final"]["instance"] != 1
