"""A borrower served while the front's instance is held in a long step: the gManager must not wait for it.

argv: checkpoint out.json hold_seconds. Three instances of one rank each, pools of 8 blocks of 16 tokens.
Request P (220 tokens, instance 1) borrows first from instance 0, so the gManager then knows instance 0
has less to lend than instance 2. Once that loan is in the ledger, the front adds request H (20 tokens) to its
own instance, whose step for it is held for ``hold_seconds``; once the hold has begun, the front adds request B
(150 tokens, instance 1: more than its pool, so it borrows too): B's first loan must come from instance 2
during the hold, for neither the gManager nor the front waits for instance 0's step. Rank 0 writes the hold's start
and end and the outputs; rank 1 writes when each loan reached it, to ``out.json.rank1`` (every rank is on
one host: one clock).
"""
from __future__ import annotations

import json
import sys
import time

import torch

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, DistKVConfig, EngineConfig, ParallelConfig, SchedulerConfig
from megakv.distkv.cluster_engine import ClusterEngine
from megakv.distkv.messages import Loan
from megakv.engine.sampling import SamplingParams
from megakv.parallel import state

NUM_INSTANCES = 3


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 301, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def record_loans(engine: ClusterEngine, path: str) -> None:
    loans = []
    handle = engine.control.handle

    def timed(message: object) -> None:
        if isinstance(message, Loan):
            loans.append({"request_id": message.request_id, "creditor": message.creditor, "time": time.time()})
        handle(message)

    engine.control.handle = timed
    engine.serve_forever()
    engine.cluster_report()
    json.dump(loans, open(path, "w"))


def main() -> None:
    checkpoint, out, hold_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    state.init_distributed()
    state.initialize_model_parallel(1, NUM_INSTANCES)
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=8),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64),
                          parallel=ParallelConfig(1, NUM_INSTANCES), distkv=DistKVConfig(lending_cap=1.0))
    engine = ClusterEngine(read_checkpoint_info(checkpoint), config)
    if not engine.is_front:
        record_loans(engine, f"{out}.rank{engine.instance_id}")
        state.destroy_model_parallel()
        return
    hold: dict[str, float] = {}
    added: set[str] = set()

    def hold_once() -> None:  # on instance 0's thread
        if "H" in added and not hold:
            hold["start"] = time.time()
            time.sleep(hold_seconds)
            hold["end"] = time.time()

    engine.before_step = hold_once
    requests = {"P": (prompt(220, 1), 4), "H": (prompt(20, 3), 2), "B": (prompt(150, 2), 8)}

    def add(request_id: str, instance: int) -> None:
        prompt_ids, max_new_tokens = requests[request_id]
        added.add(request_id)
        engine.add_request(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens), request_id, instance=instance)

    add("P", 1)
    outputs = {}
    deadline = time.monotonic() + 120
    while (len(outputs) < len(requests) or engine.has_unfinished()) and time.monotonic() < deadline:
        if "H" not in added and "1->0" in engine.stats().ledger_outstanding:
            add("H", 0)
        if "B" not in added and "start" in hold:
            add("B", 1)
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output.token_ids
    engine.shutdown()
    json.dump({"hold": hold, "outputs": outputs, "prompts": requests, "report": engine.cluster_report()},
              open(out, "w"))
    state.destroy_model_parallel()


if __name__ == "__main__":
    main()
