"""Filling a fresh large tensor with and without PyTorch's transparent-huge-page allocation.

    python benchmarks/thp_alloc.py [--gib 1] [--repeats 5]

`run_workers` starts conversion (and every other) workers with THP_MEM_ALLOC_ENABLE=1: PyTorch's CPU allocator
then madvises huge pages for allocations of 2 MB and more. Conversion allocates every tensor it reads or writes
afresh, so what matters is the cost of first touching new memory. Each setting runs in its own process (the
allocator reads the variable once): `--repeats` times, allocate an empty tensor of `--gib` GiB and copy a
same-sized source into it; prints the first fill's seconds (what a short-lived conversion worker pays first: with
THP it can include the kernel compacting memory into huge pages), the median, and the minor page faults.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

_CHILD = """
import json, resource, statistics, sys, time
import torch
gib, repeats = float(sys.argv[1]), int(sys.argv[2])
src = torch.ones(int(gib * (1 << 30)) // 2, dtype=torch.bfloat16)
faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = []
for _ in range(repeats):
    t = time.perf_counter()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times.append(time.perf_counter() - t)
    del dst
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
print(json.dumps({"first_s": times[0], "median_s": statistics.median(times), "faults_per_fill": faults / repeats}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="size of the tensor filled (default 1 GiB)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    thp_mode = "unknown"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp_mode = f.read().strip()
    except OSError:
        pass
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"kernel THP setting: {thp_mode}")
    rows = {}
    for value in ("0", "1"):
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE=value, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        out = subprocess.run([sys.executable, "-c", _CHILD, str(args.gib), str(args.repeats)], env=env,
                             capture_output=True, text=True, check=True).stdout
        rows[value] = json.loads(out.strip().splitlines()[-1])
    print(f"{'THP_MEM_ALLOC_ENABLE':<22}{'first fill s':>14}{'s per fill (median)':>21}{'page faults per fill':>22}")
    for value, r in rows.items():
        print(f"{value:<22}{r['first_s']:>14.3f}{r['median_s']:>21.3f}{r['faults_per_fill']:>22,.0f}")
    print(f"ratio 1 / 0: time {rows['1']['median_s'] / rows['0']['median_s']:.2f}, faults "
          f"{rows['1']['faults_per_fill'] / max(rows['0']['faults_per_fill'], 1):.3f}")
    print("command: python benchmarks/thp_alloc.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
