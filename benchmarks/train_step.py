"""One training step of an expanded model: LLaMA Pro freezing (--freeze llamapro) against full fine-tuning
(--freeze none) of the same checkpoint, in the same run. Prints the time ratio and the optimizer-state bytes ratio.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/train_step.py [--hf-dir DIR] [--groups 6] [--steps 4]

Default model: SmolLM2-135M (llamapro_megatron.artifacts) expanded 30 -> 36 blocks; one rank (TP1 PP1), fp32,
mock data, micro batch 2 x seq 256. The first step (warm-up) is excluded; the median of the others is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", default=None)
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    args = parser.parse_args(argv)

    from llamapro_megatron.artifacts import smollm2_hf_dir
    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    hf = args.hf_dir or str(smollm2_hf_dir())
    with tempfile.TemporaryDirectory() as tmp:
        hf_to_mcore(hf, Path(tmp, "base"), progress=False, workers=1)
        expand_mcore(Path(tmp, "base"), Path(tmp, "pro"), lambda n: interleave(n, args.groups), progress=False,
                     workers=1)
        common = ["--load", str(Path(tmp, "pro")), "--mock-data", "--micro-batch-size", "2", "--seq-length",
                  str(args.seq_length), "--train-iters", str(args.steps + 1), "--lr", "1e-4", "--log-interval",
                  "1000", "--eval-iters", "0"]
        runs = {}
        for policy in ("llamapro", "none"):
            result = train(config_from_argv([*common, "--freeze", policy]))
            runs[policy] = (statistics.median(result.seconds_per_step[1:]), result.optimizer_state_bytes)
    (t_pro, b_pro), (t_full, b_full) = runs["llamapro"], runs["none"]
    print(f"\ncommand: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load "
          f"average {os.getloadavg()[0]:.1f}")
    print("| run | s/step (median) | optimizer state |")
    print("|---|---:|---:|")
    print(f"| --freeze llamapro | {t_pro:.2f} | {b_pro / 2**20:,.1f} MiB |")
    print(f"| --freeze none | {t_full:.2f} | {b_full / 2**20:,.1f} MiB |")
    print(f"| ratio llamapro / none | {t_pro / t_full:.2f} | {b_pro / b_full:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
