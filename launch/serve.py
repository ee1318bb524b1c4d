"""Entry point for launchers that start a Python script, such as ``deepspeed``.

    deepspeed --num_gpus 1 launch/serve.py --model CKPT_DIR --port 8000

    deepspeed --num_gpus 3 launch/serve.py --config configs/demo.yaml

Takes the same options as ``megakv serve``; the ``--local_rank`` argument the
deepspeed launcher appends is dropped (LOCAL_RANK is read from the environment).
Without mpirun, the ranks' control messages go over sockets of their own
(megakv.parallel.messaging).
"""
import sys

from megakv.cli import main

if __name__ == "__main__":
    argv = [arg for arg in sys.argv[1:] if not arg.startswith(("--local_rank", "--local-rank"))]
    main(["serve", *argv])
