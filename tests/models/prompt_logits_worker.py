"""mpirun worker: prompt logits of a megakv checkpoint at its TP degree; rank 0 saves them.

    mpirun -n TP python prompt_logits_worker.py CKPT PROMPTS_JSON OUT_PT
"""
import json
import sys

import torch

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, SchedulerConfig
from megakv.engine.llm_engine import LLMEngine
from megakv.parallel import state


def main(checkpoint: str, prompts_file: str, out_file: str) -> None:
    info = read_checkpoint_info(checkpoint)
    env = state.init_distributed()
    state.initialize_model_parallel(info.tensor_parallel_size)
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=64),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64))
    engine = LLMEngine(info, config, device=env.device)
    with open(prompts_file) as f:
        logits = [engine.prompt_logits(prompt) for prompt in json.load(f)]
    if env.rank == 0:
        torch.save(logits, out_file)
    state.destroy_model_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:4])
