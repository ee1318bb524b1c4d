"""mpirun worker: prompt logits and greedy tokens of several megakv checkpoints at TP=world size.

    mpirun -n 2 python logits_worker.py JOBS_JSON OUT_PT

JOBS_JSON is a list of {"checkpoint": DIR, "prompt": [...], "num_tokens": N}; rank 0 saves a
list of {"logits": Tensor[len, vocab], "greedy": [N token ids]} in the same order.
"""
import json
import sys

import torch

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.engine.sampling import SamplingParams
from megakv.parallel import state


def main(jobs_file: str, out_file: str) -> None:
    with open(jobs_file) as f:
        jobs = json.load(f)
    env = state.init_distributed()
    state.initialize_model_parallel(env.world_size)
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=16),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64))
    results = []
    for job in jobs:
        engine = LLMEngine(read_checkpoint_info(job["checkpoint"]), config, device=env.device)
        logits = engine.prompt_logits(job["prompt"])
        params = SamplingParams(max_new_tokens=job["num_tokens"], ignore_eos=True)
        greedy = engine.generate([job["prompt"]], [params])[0].token_ids
        results.append({"logits": logits, "greedy": greedy})
    if env.rank == 0:
        torch.save(results, out_file)
    state.destroy_model_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:3])
