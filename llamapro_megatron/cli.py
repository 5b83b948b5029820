"""`llamapro` command line: one subcommand per workflow step.

Each subcommand lives in its own module exposing `register(subparsers)`; heavy imports (torch,
megatron-core) happen inside the command, so `llamapro --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from llamapro_megatron import __version__
from llamapro_megatron.errors import UserError

# Modules that register subcommands, in the order `--help` lists them.
COMMAND_MODULES = (
    "llamapro_megatron.checkpoint.cli",  # convert hf-to-mcore | mcore-to-hf, expand, expand-hf
    "llamapro_megatron.verify",  # verify
    "llamapro_megatron.data.cli",  # preprocess
    "llamapro_megatron.training.cli",  # train
    "llamapro_megatron.evaluate",  # evaluate
    "llamapro_megatron.generate",  # generate
    "llamapro_megatron.quickstart",  # quickstart
    "llamapro_megatron.study",  # study
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamapro",
        description="LLaMA Pro on megatron-core: convert Hugging Face LLaMA-family checkpoints to Megatron and "
        "back, expand them with identity blocks, and post-pretrain only the new blocks.",
    )
    parser.add_argument("--version", action="version", version=f"llamapro-megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command whose module is not part of this build
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_same_launch(sys.argv[1:] if argv is None else argv)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"llamapro {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code


def _check_same_launch(argv: list[str]) -> None:
    """Under a multi-process launch (torchrun, srun), refuse on every rank unless all run this command alike."""
    from llamapro_megatron.runtime.launch import inside_launcher

    if inside_launcher():
        from llamapro_megatron.runtime.agreement import check_same_launch

        check_same_launch(argv)


if __name__ == "__main__":
    sys.exit(main())
