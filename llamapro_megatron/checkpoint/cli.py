"""Checkpoint commands: `llamapro convert hf-to-mcore | mcore-to-hf`, `llamapro expand`, `llamapro merge`,
`llamapro expand-hf`."""
from __future__ import annotations

import argparse
import os


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is validated and "
                   "recorded for (a torch_dist checkpoint loads at any TP/PP)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size, likewise")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank, likewise")
    add_expert_args(p, "likewise")


def add_expert_args(p: argparse.ArgumentParser, what: str) -> None:
    """--ep and --etp, the expert layout of an MoE model, as every command that takes a layout spells them."""
    p.add_argument("--ep", type=int, default=1, help=f"expert-parallel size (MoE models): {what}; it must divide "
                   "the experts of a layer")
    p.add_argument("--etp", type=int, default=None, help="tensor-parallel size of each expert (MoE models; default: "
                   "--tp): it must divide the experts' FFN size; the world then holds TP x PP and ETP x EP x PP alike")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="worker processes started on this machine (ignored under torchrun, which provides the "
                   "ranks), or copying threads when bytes are copied as they are; independent of --tp/--pp. "
                   "Default: %(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_round_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-round-mb", type=int, default=512,
                   help="memory bound per worker: tensors are read and written in rounds of at most this many MB "
                   "per worker (a larger single tensor goes alone). Default: %(default)s")


def add_plan_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("expansion plan" + ("" if required else " (optional: expand while converting)"))
    g.add_argument("--groups", type=int, default=None,
                   help="the paper's plan: split the P blocks into N groups and add a copy after each group "
                   "(LLaMA-2-7B: --groups 8 gives 32 -> 40 blocks)")
    g.add_argument("--positions", default=None,
                   help="comma-separated 0-based indices of the new blocks in the expanded model; each copies the "
                   "nearest original block below it")
    g.add_argument("--placement", choices=["top", "bottom"], default=None,
                   help="all new blocks on top or at the bottom (the paper's ablations); with --num-new")
    g.add_argument("--num-new", type=int, default=None, help="number of new blocks for --placement")


def plan_fn(args, required: bool):
    """A function num_source_layers -> ExpansionPlan from the plan flags (None when optional and absent)."""
    from llamapro_megatron.expansion import plan_from_args

    if not required and args.groups is None and args.positions is None and args.placement is None:
        return None
    return lambda num_layers: plan_from_args(num_layers, args.groups, args.positions, args.placement, args.num_new)


def register(sub) -> None:
    convert = sub.add_parser("convert", help="convert between Hugging Face and Megatron checkpoints",
                             description="Convert between Hugging Face LLaMA-family checkpoints and megatron-core "
                             "torch_dist checkpoints (Megatron-LM directory layout). Streaming: each worker reads "
                             "only the tensors it writes. When no dtype changes, tensor bytes are copied file to file "
                             "by --workers threads (hf-to-mcore: while one process checks the layout with "
                             "megatron-core and writes the checkpoint's metadata); LLAMAPRO_DIRECT_CONVERT=0 makes "
                             "worker processes build every tensor instead, as they do for a dtype change, under "
                             "torchrun, and for checkpoints whose tensors are split by columns (TP saves of "
                             "row-parallel weights).")
    csub = convert.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    p = csub.add_parser("hf-to-mcore", help="Hugging Face directory -> Megatron torch_dist checkpoint",
                        description="Write a megatron-core torch_dist checkpoint (OUT/release + "
                        "latest_checkpointed_iteration.txt) from a Hugging Face LLaMA-family directory.")
    p.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json, *.safetensors)")
    p.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    add_layout_args(p)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the stored weights (default: the source's)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP, as Megatron-LM does (default 128)")
    add_plan_args(p, required=False)
    add_worker_args(p)
    add_round_arg(p)
    p.set_defaults(func=run_hf_to_mcore)

    p = csub.add_parser("mcore-to-hf", help="Megatron checkpoint -> Hugging Face directory",
                        description="Write a Hugging Face directory (config.json, generation_config.json, sharded "
                        "safetensors + index, tokenizer files) that transformers loads offline.")
    p.add_argument("--load", required=True, help="Megatron checkpoint or training save directory")
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration to export (default: the latest)")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the written weights (default: the checkpoint's)")
    add_worker_args(p)
    add_round_arg(p)
    p.set_defaults(func=run_mcore_to_hf)

    p = sub.add_parser("expand", help="insert identity copies of blocks into a Megatron checkpoint (LLaMA Pro)",
                       description="Expand a Megatron checkpoint with identity copies of blocks (attention output "
                       "and MLP down projections zeroed), reading each source layer once, never the whole model. "
                       "The result's outputs equal the original's; its metadata records which layers are new.")
    p.add_argument("--load", required=True, help="source Megatron checkpoint or save directory")
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration of --load to expand (default: latest)")
    p.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    add_plan_args(p, required=True)
    add_layout_args(p)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the stored weights (default: the source's)")
    add_worker_args(p)
    add_round_arg(p)
    p.set_defaults(func=run_expand)

    p = sub.add_parser("merge", help="trainable-only training save + its base -> a full Megatron checkpoint",
                       description="Write the full checkpoint (a `release` of the weights) of a save made with "
                       "`train --save-trainable-only`: trained tensors from the save, frozen ones from the base "
                       "checkpoint it records (checked by fingerprint). Streaming: workers read and write a few "
                       "layers at a time. To resume training with its optimizer, pass the save itself to "
                       "`train --load` instead (export, expand and verify take it directly too).")
    p.add_argument("--trainable", required=True, help="training save directory written with --save-trainable-only")
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration of --trainable (default: the latest)")
    p.add_argument("--base", default=None, help="the base checkpoint, if it moved (default: the path the save "
                   "records); refused unless its fingerprint matches")
    p.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    p.add_argument("--tp", type=int, default=None, help="layout to validate and record (default: the save's)")
    p.add_argument("--pp", type=int, default=None, help="likewise")
    p.add_argument("--vpp", type=int, default=None, help="likewise")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (MoE models), likewise; it must divide "
                   "the experts of a layer")
    p.add_argument("--etp", type=int, default=None, help="tensor-parallel size of each expert (MoE models), likewise; "
                   "it must divide the experts' FFN size")
    add_worker_args(p)
    add_round_arg(p)
    p.set_defaults(func=run_merge)

    p = sub.add_parser("expand-hf", help="the same expansion, Hugging Face directory to Hugging Face directory",
                       description="Expand a Hugging Face LLaMA-family directory with identity blocks (config, "
                       "safetensors index, generation config and tokenizer carried over), streaming by layer.")
    p.add_argument("--hf-dir", required=True, help="source Hugging Face model directory")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    add_plan_args(p, required=True)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the written weights (default: the source's)")
    add_worker_args(p)
    p.set_defaults(func=run_expand_hf)


def run_hf_to_mcore(args) -> int:
    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.expansion import describe

    make_plan = plan_fn(args, required=False)
    plan = None
    if make_plan is not None:
        plan = make_plan(LlamaArch.from_hf_dir(args.hf_dir).num_layers)
        if args.progress:
            print(describe(plan, args.pp, args.vpp), flush=True)
    hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp,
                dtype=args.dtype, workers=args.workers, overwrite=args.overwrite, plan=plan,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, progress=args.progress,
                round_bytes=args.max_round_mb << 20)
    return 0


def run_mcore_to_hf(args) -> int:
    from llamapro_megatron.checkpoint.convert import mcore_to_hf

    mcore_to_hf(args.load, args.out, dtype=args.dtype, workers=args.workers, ckpt_step=args.ckpt_step,
                overwrite=args.overwrite, progress=args.progress, round_bytes=args.max_round_mb << 20)
    return 0


def run_expand(args) -> int:
    from llamapro_megatron.checkpoint.expand import expand_mcore

    expand_mcore(args.load, args.out, plan_fn(args, required=True), tp=args.tp, pp=args.pp, vpp=args.vpp,
                 ep=args.ep, etp=args.etp, dtype=args.dtype, workers=args.workers, ckpt_step=args.ckpt_step,
                 overwrite=args.overwrite, progress=args.progress, round_bytes=args.max_round_mb << 20)
    return 0


def run_merge(args) -> int:
    from llamapro_megatron.checkpoint.merge import merge_trainable

    merge_trainable(args.base, args.trainable, args.out, ckpt_step=args.ckpt_step, tp=args.tp, pp=args.pp,
                    vpp=args.vpp, ep=args.ep, etp=args.etp, workers=args.workers, overwrite=args.overwrite,
                    progress=args.progress, round_bytes=args.max_round_mb << 20)
    return 0


def run_expand_hf(args) -> int:
    from llamapro_megatron.checkpoint.expand_hf import expand_hf

    expand_hf(args.hf_dir, args.out, plan_fn(args, required=True), dtype=args.dtype, workers=args.workers,
              overwrite=args.overwrite, progress=args.progress)
    return 0
