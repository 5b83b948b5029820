"""`llamapro convert hf-to-mcore | mcore-to-hf`."""
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


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="worker processes started on this machine (ignored under torchrun, which provides the "
                   "ranks); independent of --tp/--pp. Default: %(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def register(sub) -> None:
    convert = sub.add_parser("convert", help="convert between Hugging Face and Megatron checkpoints",
                             description="Convert between Hugging Face LLaMA-family checkpoints and megatron-core "
                             "torch_dist checkpoints (Megatron-LM directory layout). Streaming: each worker reads "
                             "only the tensors it writes.")
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
    add_worker_args(p)
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
    p.set_defaults(func=run_mcore_to_hf)


def run_hf_to_mcore(args) -> int:
    from llamapro_megatron.checkpoint.convert import hf_to_mcore

    hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, dtype=args.dtype,
                workers=args.workers, overwrite=args.overwrite,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, progress=args.progress)
    return 0


def run_mcore_to_hf(args) -> int:
    from llamapro_megatron.checkpoint.convert import mcore_to_hf

    mcore_to_hf(args.load, args.out, dtype=args.dtype, workers=args.workers, ckpt_step=args.ckpt_step,
                overwrite=args.overwrite, progress=args.progress)
    return 0
