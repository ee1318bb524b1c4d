"""A DistKV cluster whose gManager never lends (a planted bug), so a request that must borrow waits forever.

argv: checkpoint instances stall_timeout. The front must declare the cluster stalled and the job end.
"""
from __future__ import annotations

import random
import sys

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, DistKVConfig, EngineConfig, ParallelConfig, SchedulerConfig
from megakv.distkv.cluster_engine import ClusterEngine
from megakv.distkv.gmanager import GManager
from megakv.engine.sampling import SamplingParams
from megakv.parallel import state


def main() -> None:
    checkpoint, instances, stall_timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    GManager._advance = lambda self: []
    state.init_distributed()
    state.initialize_model_parallel(1, instances)
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=8),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64),
                          parallel=ParallelConfig(1, instances), distkv=DistKVConfig(stall_timeout=stall_timeout))
    engine = ClusterEngine(read_checkpoint_info(checkpoint), config)
    # 12 blocks: more than the 8 of its instance's pool.
    prompt = random.Random(0).choices(range(301), k=12 * 16 - 4)
    engine.generate([prompt, prompt[:20]], [SamplingParams(max_new_tokens=4)] * 2, [0, 1])
    state.destroy_model_parallel()


if __name__ == "__main__":
    main()
