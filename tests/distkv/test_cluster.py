"""DistKV clusters under mpirun: requests larger than one instance's pool generate what HF generates."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from settled import assert_settled

# Every test here starts subprocesses, servers or models: the full run's, not the quick one's.
pytestmark = pytest.mark.slow

MEGAKV = str(Path(sys.executable).with_name("megakv"))
BLOCK_SIZE = 16
POOL_BLOCKS = 10
MAX_NEW_TOKENS = 32


def random_prompt(length: int, seed: int, vocab_size: int = 301) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_cluster(run_mpi, tmp_path, checkpoint: Path, tp: int, instances: int, records: list[dict],
                *extra: str, check: bool = True, pool_blocks: int = POOL_BLOCKS):
    """Run megakv generate on a cluster, in fp32 (the tests compare with Hugging Face fp32); returns (request
    records, cluster report, process)."""
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    proc = run_mpi(tp * instances, [MEGAKV, "generate", "--model", str(checkpoint), "--tp", str(tp),
                                    "--instances", str(instances), "--block-size", str(BLOCK_SIZE),
                                    "--kv-blocks-per-instance", str(pool_blocks), "--max-num-batched-tokens", "64",
                                    "--max-new-tokens", str(MAX_NEW_TOKENS), "--lending-cap", "1.0",
                                    "--prompts-file", str(prompts_file), "--json", "--dtype", "float32", *extra],
                   check=check)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [line for line in lines if "cluster" not in line], lines[-1]["cluster"], proc


def assert_cluster_clean(report: dict, instances: int, pool_blocks: int = POOL_BLOCKS) -> None:
    assert report["blocks_per_instance"] == pool_blocks and sorted(report["free_blocks"]) == \
        [str(i) for i in range(instances)]
    assert_settled(report)


@pytest.mark.mpi
# "gqa64" (head_dim 64) runs local and remote micro-attentions through the C++ CPU decode op, and the KV
# server's C++ loop; "gqa" (head_dim 16) the torch path and the KV server's Python loop.
@pytest.mark.parametrize("tp,instances,kind", [(1, 2, "gqa"), (2, 2, "gqa"), (1, 2, "gqa64"),
                                               pytest.param(2, 2, "gqa64", marks=pytest.mark.slow),
                                               pytest.param(1, 3, "gqa", marks=pytest.mark.slow),
                                               pytest.param(2, 3, "gqa", marks=pytest.mark.slow)])
def test_cluster_request_beyond_instance_pool_equals_hf(tp, instances, kind, hf_llama, megakv_checkpoint, hf_greedy,
                                                         run_mpi, tmp_path):
    # 2 instances: 20 blocks, the whole cluster; 3 instances: 29 blocks, 2.9x one pool.
    prompt = random_prompt({2: 280, 3: 420}[instances], seed=instances)
    records, report, _ = run_cluster(run_mpi, tmp_path, megakv_checkpoint(kind, tp), tp, instances,
                                     [{"prompt_ids": prompt}])
    (record,) = records
    assert record["token_ids"] == hf_greedy(hf_llama(kind), [prompt], MAX_NEW_TOKENS)[0]
    assert record["num_local_blocks"] == POOL_BLOCKS
    assert record["num_local_blocks"] + record["num_remote_blocks"] > 2 * POOL_BLOCKS - 1
    assert record["block_instances"] == list(range(instances))
    assert report["borrow_events"] > 0
    assert_cluster_clean(report, instances)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["gqa", "gqa64"])
def test_cluster_mixed_batch_borrows_both_ways_keeping_tokens(kind, hf_llama, megakv_checkpoint, hf_greedy, run_mpi,
                                                              tmp_path):
    prompts = [random_prompt(n, seed) for seed, n in enumerate([40, 230, 230, 30])]
    records = [{"prompt_ids": prompts[0], "instance": 0, "max_new_tokens": 8},
               {"prompt_ids": prompts[1], "instance": 0},
               {"prompt_ids": prompts[2], "instance": 1, "max_new_tokens": 24},
               {"prompt_ids": prompts[3], "instance": 1}]
    # A pool of 14 blocks (224 tokens) and one DGFM move per step: each long request is longer than a pool, so
    # it borrows from the other instance whatever the two instances' timing. Whether blocks then move home
    # depends on that timing (a debtor's short request must end while its loan is held): see the next test.
    results, report, _ = run_cluster(run_mpi, tmp_path, megakv_checkpoint(kind, 1), 1, 2, records,
                                     "--kv-blocks-per-instance", "14", "--max-moves-per-step", "1")
    hf_dir = hf_llama(kind)
    for record, result in zip(records, results):
        expected = hf_greedy(hf_dir, [record["prompt_ids"]], record.get("max_new_tokens", MAX_NEW_TOKENS))[0]
        assert result["token_ids"] == expected
    assert 1 in results[1]["block_instances"] and 0 in results[2]["block_instances"]
    assert_cluster_clean(report, 2, 14)


@pytest.mark.mpi
# "gqa64": the KV server's C++ loop copies the blocks; "gqa" (head_dim 16): its Python loop.
@pytest.mark.parametrize("kind", ["gqa", "gqa64"])
def test_cluster_dgfm_pulls_borrowed_blocks_home_keeping_tokens(kind, hf_llama, megakv_checkpoint, hf_greedy, run_mpi,
                                                                tmp_path):
    # Instance 0 runs a short request and a long one (15 blocks of prompt, more than its 14-block pool, so it
    # borrows during its prefill from instance 1, which has nothing to run and answers within milliseconds).
    # The short one ends 24 steps later, long before the long one (48 new tokens): its blocks make room, and
    # DGFM pulls the borrowed blocks home, one per step.
    prompts = [random_prompt(n, seed) for seed, n in enumerate([40, 230], start=20)]
    records = [{"prompt_ids": prompts[0], "instance": 0, "max_new_tokens": 24},
               {"prompt_ids": prompts[1], "instance": 0, "max_new_tokens": 48}]
    results, report, _ = run_cluster(run_mpi, tmp_path, megakv_checkpoint(kind, 1), 1, 2, records,
                                     "--kv-blocks-per-instance", "14", "--max-moves-per-step", "1")
    hf_dir = hf_llama(kind)
    for record, result in zip(records, results):
        assert result["token_ids"] == hf_greedy(hf_dir, [record["prompt_ids"]], record["max_new_tokens"])[0]
    assert results[1]["block_instances"] == [0, 1]
    assert report["blocks_moved_by_dgfm"] > 0
    assert_cluster_clean(report, 2, 14)


@pytest.mark.mpi
def test_cluster_request_larger_than_cluster_errors_others_continue(hf_llama, megakv_checkpoint, hf_greedy,
                                                                    run_mpi, tmp_path):
    short = random_prompt(50, seed=5)
    records, report, proc = run_cluster(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), 1, 2,
                                        [{"prompt_ids": random_prompt(400, seed=4)}, {"prompt_ids": short}],
                                        check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert records[0]["finish_reason"] == "error"
    assert records[0]["error"] == (f"prompt (400 tokens) + max_new_tokens ({MAX_NEW_TOKENS}) = {400 + MAX_NEW_TOKENS} "
                                   f"exceeds the 320 tokens a request may hold (the KV memory it may use: 20 blocks "
                                   f"of 16 tokens, as its instance holds 10 and the other 1 instance may lend 10 "
                                   f"(--lending-cap 1.0))")
    assert "request 0: prompt (400 tokens)" in proc.stderr
    assert records[1]["token_ids"] == hf_greedy(hf_llama("gqa"), [short], MAX_NEW_TOKENS)[0]
    assert_cluster_clean(report, 2)


@pytest.mark.mpi
def test_cluster_wrong_rank_count_errors_before_loading(megakv_checkpoint, run_mpi):
    proc = run_mpi(3, [MEGAKV, "generate", "--model", str(megakv_checkpoint("gqa", 2)), "--tp", "2",
                       "--instances", "2", "--prompt-ids", "1,2"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "world size 3 does not fit --tp 2 x --instances 2: launch 4 ranks" in proc.stderr


@pytest.mark.mpi
def test_cluster_two_requests_that_fit_only_one_at_a_time_both_complete(hf_llama, megakv_checkpoint, hf_greedy,
                                                                          run_mpi, tmp_path):
    # Each needs 16 of the cluster's 20 blocks: together they cannot fit, so they must take turns.
    prompts = [random_prompt(220, seed=6), random_prompt(220, seed=7)]
    records, report, _ = run_cluster(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), 1, 2,
                                     [{"prompt_ids": prompts[0], "instance": 0},
                                      {"prompt_ids": prompts[1], "instance": 1}])
    assert [r["token_ids"] for r in records] == hf_greedy(hf_llama("gqa"), prompts, MAX_NEW_TOKENS)
    assert_cluster_clean(report, 2)


@pytest.mark.mpi
def test_cluster_three_instances_dgfm_moves_keep_tokens(hf_llama, megakv_checkpoint, hf_greedy, run_mpi, tmp_path):
    # Instances 0 and 1 each run a short request and a long one (17 blocks of prompt, more than a 16-block
    # pool, so it borrows: 8 blocks each, all of instance 2's pool, which only lends). The long ones borrow
    # during their prefill and run long after the short ones end; then both debtors pull blocks home in the
    # same steps: copies between three instances.
    prompts = [random_prompt(n, seed) for seed, n in enumerate([40, 270, 40, 265], start=10)]
    records = [{"prompt_ids": prompts[0], "instance": 0, "max_new_tokens": 24},
               {"prompt_ids": prompts[1], "instance": 0, "max_new_tokens": 40},
               {"prompt_ids": prompts[2], "instance": 1, "max_new_tokens": 24},
               {"prompt_ids": prompts[3], "instance": 1, "max_new_tokens": 40}]
    results, report, _ = run_cluster(run_mpi, tmp_path, megakv_checkpoint("gqa", 1), 1, 3, records,
                                     "--max-moves-per-step", "4", pool_blocks=16)
    hf_dir = hf_llama("gqa")
    for record, result in zip(records, results):
        expected = hf_greedy(hf_dir, [record["prompt_ids"]], record.get("max_new_tokens", MAX_NEW_TOKENS))[0]
        assert result["token_ids"] == expected
    assert report["blocks_moved_by_dgfm"] > 0
    assert_cluster_clean(report, 3, pool_blocks=16)
