"""What the per-file checksums cost a torch_dist save, against the save itself and the floor of reading the bytes.

    python benchmarks/checksums.py [--ranks 2] [--gib 1.0] [--repeats 5] [--workdir DIR]

A world of `--ranks` gloo processes saves `--gib` GiB of bf16 tensors (sharded over the ranks, like a training
save's model and optimizer state) with the project's save (`runtime/dist_ckpt.save`), then hashes it as every
writer does (`integrity.gathered_digests`: each rank its share of the data files, then `integrity.record` on rank 0
for the rest). Per repeat (a fresh directory each): save seconds, checksum seconds, and the floor: every rank
reading its share of the same files into a buffer (no hash). Prints medians and the checksum / save ratio.
The conversion's cost is measured by `benchmarks/convert.py --trees BEFORE,AFTER` (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _read_share(d: Path, rank: int, world: int) -> None:
    """The floor: read (no hash) the same files `integrity.gathered_digests` has this rank hash."""
    from llamapro_megatron.checkpoint.integrity import _BLOCK, rank_share

    buf = bytearray(_BLOCK)
    for p in rank_share(d, rank, world):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _world(workdir: str, gib: float, repeats: int) -> list[dict]:
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from llamapro_megatron.checkpoint import integrity
    from llamapro_megatron.runtime.dist_ckpt import save
    from llamapro_megatron.runtime.distributed import destroy_distributed, init_distributed

    info = init_distributed()
    rank, world = info.rank, info.world_size
    n_tensors, total = 16, int(gib * 2**30)
    rows = total // (n_tensors * 2 * 4096)  # bf16 rows of 4096 over all ranks
    g = torch.Generator().manual_seed(rank)
    state = {f"t{i}": ShardedTensor.from_rank_offsets(
        f"t{i}", torch.randn(rows // world, 4096, generator=g).bfloat16(), (0, rank, world)) for i in range(n_tensors)}
    out = []
    for r in range(repeats):
        d = Path(workdir) / f"save{r}"
        if rank == 0:
            d.mkdir()
        dist.barrier()
        t0 = time.perf_counter()
        save(state, str(d))
        dist.barrier()
        t1 = time.perf_counter()
        digests = integrity.gathered_digests(d)
        if rank == 0:
            integrity.record(d, digests)
        dist.barrier()
        t2 = time.perf_counter()
        _read_share(d, rank, world)
        dist.barrier()
        t3 = time.perf_counter()
        size = sum(p.stat().st_size for p in d.iterdir())
        out.append({"save": t1 - t0, "checksums": t2 - t1, "read_floor": t3 - t2, "bytes": size})
        dist.barrier()
        if rank == 0:
            shutil.rmtree(d)
    destroy_distributed()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from llamapro_megatron.runtime.launch import run_workers

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="llamapro-bench-ckpt-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        runs = run_workers(_world, args.ranks, args=(str(workdir), args.gib, args.repeats), timeout_s=3600)[0]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.ranks} ranks, "
          f"{runs[0]['bytes'] / 2**30:.2f} GiB per save, {args.repeats} repeats")
    for name in ("save", "checksums", "read_floor"):
        print(f"{name:>10}: median {statistics.median(r[name] for r in runs):.3f} s   per repeat: "
              + " ".join(f"{r[name]:.3f}" for r in runs))
    ratio = [r["checksums"] / r["save"] for r in runs]
    print(f"checksums / save: median {statistics.median(ratio):.3f} (per repeat: "
          + " ".join(f"{x:.3f}" for x in ratio) + ")")
    print(f"checksums / read floor: median {statistics.median(r['checksums'] / r['read_floor'] for r in runs):.2f}")


if __name__ == "__main__":
    main()
