"""Independent instances, shown without timing: one instance's step loop is stalled (a test hook), and the
others go on. With no blocks shared they never wait for it; a debtor of the stalled instance proceeds because
the creditor's KV server answers its micro-attentions, while an unrelated instance keeps stepping."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from settled import assert_settled

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams

WORKER = Path(__file__).with_name("independence_worker.py")


def prompt(length: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(301), k=length)


def alone(checkpoint: Path, requests: list[dict]) -> list[list[int]]:
    """Each request served alone on one instance with a large pool."""
    engine = LLMEngine(read_checkpoint_info(checkpoint), EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64),
                                                                      scheduler=SchedulerConfig(max_num_batched_tokens=64)))
    return [engine.generate([r["prompt_ids"]], [SamplingParams(max_new_tokens=r["max_new_tokens"])])[0].token_ids
            for r in requests]


def run(run_mpi, tmp_path: Path, checkpoint: Path, instances: int, requests: list[dict], stall_instance: int,
        stall_when: str, max_num_batched_tokens: int = 64) -> dict:
    job = dict(checkpoint=str(checkpoint), instances=instances, pool_blocks=16, requests=requests,
               stall_instance=stall_instance, stall_when=stall_when, max_num_batched_tokens=max_num_batched_tokens)
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_mpi(instances, [sys.executable, str(WORKER), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
            timeout=180)
    result = json.loads((tmp_path / "out.json").read_text())
    assert_settled(result["report"])
    return result


@pytest.mark.mpi
def test_an_instance_sharing_nothing_completes_while_the_other_is_stalled(megakv_checkpoint, run_mpi, tmp_path):
    checkpoint = megakv_checkpoint("gqa", 1)
    requests = [{"prompt_ids": prompt(100, 1), "max_new_tokens": 12, "instance": 0},
                {"prompt_ids": prompt(80, 2), "max_new_tokens": 12, "instance": 1}]
    result = run(run_mpi, tmp_path, checkpoint, 2, requests, stall_instance=1, stall_when="busy")
    assert result["order"] == [0, 1]
    assert result["finals"]["0"]["stalled_when_finished"]
    assert [result["finals"][str(i)]["token_ids"] for i in range(2)] == alone(checkpoint, requests)


@pytest.mark.mpi
def test_a_debtor_proceeds_on_its_stalled_creditors_answers_while_an_unrelated_instance_steps(
        megakv_checkpoint, run_mpi, tmp_path):
    checkpoint = megakv_checkpoint("gqa", 1)
    # 290 prompt tokens (and 10 new ones), prefilled in one step, need 19 of the 16-block pool's blocks at once: instance 1 (the
    # most lendable, then the lowest id) lends the 3 missing ones, then stalls; instance 2 serves its own
    # request meanwhile.
    requests = [{"prompt_ids": prompt(290, 3), "max_new_tokens": 10, "instance": 0},
                {"prompt_ids": prompt(60, 4), "max_new_tokens": 10, "instance": 2}]
    result = run(run_mpi, tmp_path, checkpoint, 3, requests, stall_instance=1, stall_when="lent",
                 max_num_batched_tokens=512)
    debtor, unrelated = result["finals"]["0"], result["finals"]["1"]
    assert debtor["block_instances"] == [0, 1]
    assert debtor["stalled_when_finished"] and unrelated["stalled_when_finished"]
    assert [debtor["token_ids"], unrelated["token_ids"]] == alone(checkpoint, requests)
