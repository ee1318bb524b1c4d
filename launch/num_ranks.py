"""Print how many ranks ``megakv serve`` needs for a config and its flags: instances x tp.

    .venv/bin/python launch/num_ranks.py CONFIG.yaml [megakv serve options]

Used by the mpirun scripts (launch/serve.sh, launch/serve_hostfile.sh), so that ``-n`` follows the same
options, flags over the file, as the ranks it starts.
"""
import sys

from megakv.cli import build_parser
from megakv.options import engine_config, resolve_options


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(["serve", "--config", *argv])
    try:
        print(engine_config(resolve_options(args)).parallel.world_size)
    except ValueError as err:
        print(f"megakv: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
