"""Stalls one instance of a DistKV cluster under mpirun and records what the others do meanwhile.

argv: job.json out.json. The job names the checkpoint, the number of instances, the pool size, the
requests (``prompt_ids``, ``max_new_tokens``, ``instance``), the step's token budget, the instance to stall and when: ``"busy"``
(as soon as it has a request) or ``"lent"`` (as soon as it lends blocks). The stalled instance's leader
waits in its step loop until the front, having seen every request of the other instances finish,
releases it (a file). Rank 0 writes each request's final output and the order in which requests finished.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, DistKVConfig, EngineConfig, ParallelConfig, SchedulerConfig
from megakv.distkv.cluster_engine import ClusterEngine
from megakv.engine.sampling import SamplingParams
from megakv.parallel import state

STALL_LIMIT_SECONDS = 120


def main() -> None:
    job = json.load(open(sys.argv[1]))
    release, stalled_marker = Path(sys.argv[2] + ".release"), Path(sys.argv[2] + ".stalled")
    state.init_distributed()
    state.initialize_model_parallel(1, job["instances"])
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=job["pool_blocks"]),
                          scheduler=SchedulerConfig(max_num_batched_tokens=job["max_num_batched_tokens"]),
                          parallel=ParallelConfig(1, job["instances"]), distkv=DistKVConfig())
    engine = ClusterEngine(read_checkpoint_info(job["checkpoint"]), config)
    if engine.instance_id == job["stall_instance"]:
        def stall() -> None:
            due = engine.rmanager.num_lent_blocks > 0 if job["stall_when"] == "lent" else engine.scheduler.has_unfinished()
            if due and not release.exists():
                stalled_marker.touch()
                deadline = time.monotonic() + STALL_LIMIT_SECONDS
                while not release.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)

        engine.before_step = stall
    if not engine.is_front:
        engine.serve_forever()
        engine.cluster_report()
        state.destroy_model_parallel()
        return
    ids = {engine.add_request(r["prompt_ids"], SamplingParams(max_new_tokens=r["max_new_tokens"]),
                              instance=r["instance"]): index for index, r in enumerate(job["requests"])}
    others = {rid for rid, index in ids.items() if job["requests"][index]["instance"] != job["stall_instance"]}
    finals: dict[int, dict] = {}
    order = []
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                index = ids[output.request_id]
                finals[index] = {"token_ids": output.token_ids, "block_instances": output.placement.instances,
                                 "stalled_when_finished": stalled_marker.exists() and not release.exists()}
                order.append(index)
        if others <= {rid for rid in ids if ids[rid] in finals}:
            release.touch()
    engine.shutdown()
    report = engine.cluster_report()
    json.dump({"finals": finals, "order": order, "report": report}, open(sys.argv[2], "w"))
    state.destroy_model_parallel()


if __name__ == "__main__":
    main()
