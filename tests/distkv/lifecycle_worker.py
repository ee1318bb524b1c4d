"""A DistKV cluster under mpirun whose front waits on files, so a test can watch its ranks from outside.

argv: checkpoint folder, control folder. Every rank writes ``pid-<rank>``. The front serves one short
request, writes ``idle`` and then serves nothing (as an idle server) until ``done`` appears; with
``busy`` in the folder it instead keeps serving requests until the job is killed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from megakv.checkpoint.format import read_checkpoint_info
from megakv.config import CacheConfig, EngineConfig, ParallelConfig
from megakv.distkv.cluster_engine import ClusterEngine
from megakv.engine.sampling import SamplingParams
from megakv.parallel import state


def main() -> None:
    checkpoint, folder = sys.argv[1], Path(sys.argv[2])
    env = state.init_distributed()
    state.initialize_model_parallel(1, 2)
    (folder / f"pid-{env.rank}").write_text(str(os.getpid()))
    config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=8), parallel=ParallelConfig(1, 2))
    engine = ClusterEngine(read_checkpoint_info(checkpoint), config, device=env.device)
    if not engine.is_front:
        engine.serve_forever()
        state.destroy_model_parallel()
        return
    params = SamplingParams(max_new_tokens=8)
    # 200 tokens need 13 blocks of the 8 per instance: the request borrows, so both instances work.
    engine.add_request(list(range(1, 201)), params, instance=0)
    while engine.has_unfinished() or (folder / "busy").exists():
        if not engine.has_unfinished():
            engine.add_request(list(range(1, 201)), params)
        engine.step()
    (folder / "idle").write_text(str(time.time()))
    while not (folder / "done").exists():
        time.sleep(0.1)
    engine.shutdown()
    state.destroy_model_parallel()


if __name__ == "__main__":
    main()
