"""`llamapro train`: post-pretrain the expanded blocks (flags use Megatron-LM's names; --config is optional).

Without a launcher it starts TP x PP x DP local ranks itself (``--nproc``); under torchrun each process is a rank.
"""
from __future__ import annotations


def register(sub) -> None:
    from llamapro_megatron.training.config import add_arguments
    from llamapro_megatron.training.dry_run import add_dry_run_arguments

    p = sub.add_parser("train", help="train the expanded blocks of a LLaMA Pro checkpoint (megatron-core)",
                       description="Train a checkpoint written by `llamapro expand` (by default only its new "
                       "blocks), or resume a training save directory. Settings come from an optional YAML recipe "
                       "(--config) and Megatron-LM-named flags, which override it. The architecture and the "
                       "expansion come from the checkpoint. Under torchrun every process is a rank; otherwise "
                       "--nproc local processes are started (default: the fewest the layout runs on).")
    p.add_argument("--nproc", type=int, default=None, help="local ranks to start without a launcher "
                   "(default: the fewest the layout runs on, TP x PP, with experts PP x the least common multiple "
                   "of TP and ETP x EP; a multiple of it adds data parallelism; ignored under torchrun)")
    add_arguments(p)
    add_dry_run_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from llamapro_megatron.training.config import config_from_args
    from llamapro_megatron.training.launch import launch

    if args.dry_run:
        import warnings

        from llamapro_megatron.training.dry_run import dry_run

        # megatron-core's import-time notes (no Apex / TE on this machine, deprecations) say nothing about the plan
        warnings.filterwarnings("ignore", module=r"megatron\.core")
        plan = dry_run(config_from_args(args, plan_only=True), args.world_size, args.hf_config, args.groups)
        print(plan.format(), flush=True)
        return 0

    config = config_from_args(args)
    return launch(config, nproc=args.nproc)
