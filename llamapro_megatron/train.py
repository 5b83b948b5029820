"""`python -m llamapro_megatron.train [--config RECIPE.yaml] [--flag value ...]`: the trainer under torchrun.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m llamapro_megatron.train --config examples/llama2_7b_pro.yaml

Every process is one rank; without torchrun, local ranks are started (as `llamapro train` does).
"""
from __future__ import annotations

import argparse
import sys

from llamapro_megatron.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from llamapro_megatron.training.config import add_arguments, config_from_args
    from llamapro_megatron.training.launch import launch

    parser = argparse.ArgumentParser(prog="python -m llamapro_megatron.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=None, help="local ranks without torchrun")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return launch(config_from_args(args), nproc=args.nproc)
    except UserError as e:
        print(f"llamapro train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
