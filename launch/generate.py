"""Entry point for launchers that start a Python script, such as ``deepspeed``.

    deepspeed --quiet --num_gpus 2 launch/generate.py --model CKPT_DIR --tp 2 --prompt-ids 1,2,3 --json

Takes the same options as ``megakv generate``; the ``--local_rank`` argument the
deepspeed launcher appends is dropped (LOCAL_RANK is read from the environment).
"""
import sys

from megakv.cli import main

if __name__ == "__main__":
    argv = [arg for arg in sys.argv[1:] if not arg.startswith(("--local_rank", "--local-rank"))]
    main(["generate", *argv])
