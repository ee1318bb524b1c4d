"""Drives a DistKV cluster through the engine API under mpirun: arrivals at given steps, aborts, streaming.

argv: job.json out.json. The job names the checkpoint, the cluster's shape and the requests, each with
``prompt_ids``, ``max_new_tokens``, ``arrive_step`` (or ``arrive_after``: [request index, tokens], once
that request has streamed that many), optional ``instance``, and an optional abort: at ``abort_step``, once
``abort_after_tokens`` of its tokens have reached the front, or ``abort_after`` as ``arrive_after``.
``"pull_home": false`` turns DGFM's pulls off (swaps stay). A ``fault`` ({"after": [request index,
tokens], "rank": R, "signal": "KILL" or "STOP"}) has the front send that signal to rank R when the trigger
is reached (a stopped rank gets SIGCONT once every request has finished, and then ends itself: the gManager
has declared it failed); ``peer_timeout`` sets --peer-timeout.
Rank 0 writes, per request, the streamed tokens, the final output, the step and time of each output, and
the cluster report; with a fault, when it was sent and when the front learnt that its instance had failed.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import (PEER_TIMEOUT_SECONDS, RECALL_AFTER_SECONDS, CacheConfig, DistKVConfig, EngineConfig,
                           ParallelConfig, SchedulerConfig)
from megakv.distkv.cluster_engine import ClusterEngine
from megakv.engine.sampling import SamplingParams
from megakv.parallel import state


def main() -> None:
    job = json.load(open(sys.argv[1]))
    env = state.init_distributed()
    state.initialize_model_parallel(job["tp"], job["instances"])
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=job["pool_blocks"]),
                          scheduler=SchedulerConfig(max_num_batched_tokens=job.get("max_num_batched_tokens", 64)),
                          parallel=ParallelConfig(job["tp"], job["instances"]),
                          distkv=DistKVConfig(lending_cap=job.get("lending_cap", 1.0),
                                              recall_after=job.get("recall_after", RECALL_AFTER_SECONDS),
                                              peer_timeout=job.get("peer_timeout", PEER_TIMEOUT_SECONDS)))
    pids = Path(sys.argv[2]).with_name("pids")
    pids.mkdir(exist_ok=True)
    (pids / str(env.rank)).write_text(str(os.getpid()))
    engine = ClusterEngine(read_checkpoint_info(job["checkpoint"]), config, device=env.device)
    if not job.get("pull_home", True) and engine.loop is not None:
        # Only a swap may bring blocks home. A debtor that gets room pulls its blocks home into it at its next
        # step, before it could lend that room: with pulls, two requests come to hold each other's blocks only
        # when a Lend beats that step, which a test cannot arrange.
        engine.loop._plan_pulls = lambda: []
    if not engine.is_front:
        engine.serve_forever()
        engine.cluster_report()
        state.destroy_model_parallel()
        return
    requests = job["requests"]
    ids: dict[str, int] = {}
    results = [{"streamed": [], "steps": [], "times": [], "final": None} for _ in requests]
    step = 0
    fault = job.get("fault")
    fault_times: dict[str, float] = {}

    def reached(trigger: list[int] | None) -> bool:
        return trigger is not None and len(results[trigger[0]]["streamed"]) >= trigger[1]

    while step < job.get("max_steps", 5000):
        if fault is not None and "sent" not in fault_times and reached(fault["after"]):
            victim = int((pids / str(fault["rank"])).read_text())
            os.kill(victim, getattr(signal, f"SIG{fault['signal']}"))
            fault_times["sent"] = time.monotonic()
        if "sent" in fault_times and "declared" not in fault_times and engine.front.failed:
            fault_times["declared"] = time.monotonic()
        for index, request in enumerate(requests):
            due = request.get("arrive_step") == step or reached(request.get("arrive_after"))
            if due and index not in ids.values():
                request_id = engine.add_request(request["prompt_ids"],
                                                SamplingParams(max_new_tokens=request["max_new_tokens"]),
                                                instance=request.get("instance"))
                ids[request_id] = index
            result = results[index]
            due = (request.get("abort_step") == step or reached(request.get("abort_after"))
                   or len(result["streamed"]) >= request.get("abort_after_tokens", float("inf")))
            if due and result["final"] is None and index in ids.values():
                engine.abort(next(rid for rid, i in ids.items() if i == index))
        for output in engine.step():
            result = results[ids[output.request_id]]
            result["streamed"] += output.new_token_ids
            result["steps"].append(step)
            result["times"].append(time.monotonic())
            if output.finished:
                result["final"] = {"token_ids": output.token_ids, "finish_reason": output.finish_reason,
                                   "instance": output.instance,
                                   "block_instances": output.placement.instances if output.placement else []}
        step += 1
        if len(ids) == len(requests) and not engine.has_unfinished():
            break
    # Every block must be home while the cluster still runs, not only after the shutdown's last round.
    stats = engine.stats()
    ledger_before_shutdown, ledger_kept_before_shutdown = stats.ledger_outstanding, stats.ledger_kept
    recalled = [instance.num_recalled for instance in stats.instances]
    if fault is not None and fault["signal"] == "STOP":
        os.kill(int((pids / str(fault["rank"])).read_text()), signal.SIGCONT)
    engine.shutdown()
    report = engine.cluster_report()
    json.dump({"results": results, "report": report, "steps": step, "ledger_before_shutdown": ledger_before_shutdown,
               "ledger_kept_before_shutdown": ledger_kept_before_shutdown,
               "recalled": recalled, "fault_times": fault_times,
               "requests_recomputed": engine.front.num_requests_recomputed},
              open(sys.argv[2], "w"))
    state.destroy_model_parallel()


if __name__ == "__main__":
    main()
