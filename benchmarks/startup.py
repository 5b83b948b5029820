"""A worker's fixed cost: start an interpreter, import torch + megatron-core, exit; GC running vs paused + frozen.

    python benchmarks/startup.py [--repeats 7]

Every rank `run_workers` starts (conversion, expansion, verify, training) pays this before touching a tensor.
Each case is a fresh `python -c` process, timed from outside (wall) and by its own CPU seconds; the cases
alternate within each repeat so machine load hits them alike. Cases:
  bare        the interpreter alone (the floor)
  gc-on       `import torch` then megatron-core, the way `runtime.prepare()` imports it, with the cyclic GC running
  collect     GC paused during the imports, then one collection, then frozen (what workers did before)
  frozen      the same through `runtime.compat.import_frameworks()` (GC paused during the imports, everything
              then frozen, no collection): what workers do
Prints medians, the object count the imports leave, and the ratio frozen / gc-on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_TAIL = """
import gc, json
print(json.dumps({"objects": len(gc.get_objects()) + gc.get_freeze_count()}))
"""
CASES = {
    "bare": "pass",
    "gc-on": "import torch\nfrom llamapro_megatron.runtime.compat import load_megatron_core\nload_megatron_core()"
             + _TAIL,
    "collect": "import gc\ngc.disable()\nimport torch\nfrom llamapro_megatron.runtime.compat import load_megatron_core"
               "\nload_megatron_core()\ngc.collect()\ngc.freeze()\ngc.enable()" + _TAIL,
    "frozen": "from llamapro_megatron.runtime.compat import import_frameworks\nimport_frameworks()" + _TAIL,
}


def run_case(code: str) -> tuple[float, float, dict]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    before = os.times()
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return wall, cpu, json.loads(lines[-1]) if lines else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    run_case(CASES["gc-on"])  # warm the page cache: the first import reads the libraries from disk
    results = {name: {"wall": [], "cpu": [], "objects": 0} for name in CASES}
    for r in range(args.repeats):
        line = []
        for name, code in CASES.items():
            wall, cpu, info = run_case(code)
            results[name]["wall"].append(wall)
            results[name]["cpu"].append(cpu)
            results[name]["objects"] = info.get("objects", 0)
            line.append(f"{name} {wall:.2f}s")
        print(f"run {r + 1}: " + "  ".join(line) + f"  (load average {os.getloadavg()[0]:.1f})", flush=True)

    import torch

    print(f"\nmachine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}; medians of {args.repeats}")
    print(f"{'case':8s} {'wall s':>7s} {'CPU s':>7s} {'objects':>9s}")
    med = {}
    for name, res in results.items():
        med[name] = statistics.median(res["wall"]), statistics.median(res["cpu"])
        print(f"{name:8s} {med[name][0]:7.2f} {med[name][1]:7.2f} {res['objects']:9d}")
    for base in ("gc-on", "collect"):
        wall, cpu = (med["frozen"][i] / med[base][i] for i in (0, 1))
        print(f"frozen / {base}: wall {wall:.2f}x, CPU {cpu:.2f}x")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
