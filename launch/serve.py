"""Entry point for launchers that start a Python script, such as ``deepspeed``.

    deepspeed --num_gpus 1 launch/serve.py --model CKPT_DIR --port 8000

Takes the same options as ``megakv serve``; the ``--local_rank`` argument the
deepspeed launcher appends is dropped (LOCAL_RANK is read from the environment).
Several ranks hand requests over MPI: launch those with mpirun (launch/serve.sh).
"""
import sys

from megakv.cli import main

if __name__ == "__main__":
    argv = [arg for arg in sys.argv[1:] if not arg.startswith(("--local_rank", "--local-rank"))]
    main(["serve", *argv])
