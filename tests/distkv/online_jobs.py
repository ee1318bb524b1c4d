"""Jobs of tests/distkv/online_worker.py under mpirun, and what they are checked against."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from settled import assert_settled

WORKER = Path(__file__).with_name("online_worker.py")


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 301, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_online(run_mpi, tmp_path, checkpoint: Path, tp: int, instances: int, pool_blocks: int,
               requests: list[dict], **options) -> dict:
    """Run the job; afterwards, and before the shutdown, no block is owed but kept loans, and every pool of a live
    instance is whole but for them."""
    job = dict(checkpoint=str(checkpoint), tp=tp, instances=instances, pool_blocks=pool_blocks, requests=requests,
               **options)
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_mpi(tp * instances, [sys.executable, str(WORKER), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
            timeout=240)
    result = json.loads((tmp_path / "out.json").read_text())
    report = result["report"]
    assert result["ledger_before_shutdown"] == result["ledger_kept_before_shutdown"]
    assert report["blocks_per_instance"] == pool_blocks
    assert sorted(report["free_blocks"]) == [str(i) for i in range(instances) if i not in report["failed"]]
    assert_settled(report)
    return result


def check_served(results: list[dict], requests: list[dict], reference) -> None:
    """Completed requests equal the reference; aborted ones stopped on a prefix of it; streams add up."""
    for request, result in zip(requests, results):
        final = result["final"]
        assert final is not None, f"request never finished: {request}"
        assert result["streamed"] == final["token_ids"]
        expected = reference(request["prompt_ids"], request["max_new_tokens"])
        if request.keys() & {"abort_step", "abort_after_tokens", "abort_after"}:
            assert final["finish_reason"] == "abort"
            assert final["token_ids"] == expected[:len(final["token_ids"])]
        else:
            assert final["finish_reason"] == "length" and final["token_ids"] == expected
