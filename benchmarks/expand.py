"""Block-expansion speed and memory against the copy floor and mergekit, in one run.

    python benchmarks/expand.py --mergekit /work/bench/mk-venv/bin/mergekit-yaml
                                [--layers 24 --hidden 2048 --ffn 5632 --heads 32 --kv-heads 4 --vocab 32000]
                                [--groups 6] [--workers 2] [--repeats 3] [--workdir DIR] [--mergekit-args "..."]
                                [--trees OLD,NEW]

Makes a random HF LLaMA of the given shape (default ~1.2B parameters, bf16; `make_random_llama` from
benchmarks/convert.py) and converts it once to Megatron (neither is timed). Then, `--repeats` times each, every
step a fresh process like a user runs it, times and samples the peak RSS of every process of its tree:

  copy floor (HF)   copying the output directory of this repeat's `expand-hf` run (a fresh Python process,
                    shutil.copytree: sendfile): exactly the bytes an expansion has to write
  expand-hf         `llamapro expand-hf --groups G` (HF -> HF)
  mergekit          `mergekit-yaml` passthrough merge of the same layer slices, the copies as 1-layer slices with
                    `scale` 0.0 on o_proj and down_proj (the LLaMA Pro recipe in mergekit; for `--experts`, Mixtral's
                    experts' w2 too), on CPU
  copy floor (mcore) copying the output directory of this repeat's `llamapro expand` run
  expand (mcore)    `llamapro expand --groups G` (Megatron torch_dist -> Megatron torch_dist)

Every step's wall time includes an fsync of each file it wrote, after the process exits, so a step that leaves
its writes in the page cache is not favoured over one that does not (per file, not `os.sync()`, which would also
wait for other jobs' writes on a shared machine). Before every step (untimed) the script reads the step's source
into the page cache, syncs, waits for the kernel's dirty pages to drain and then `--settle` seconds more, so
that every step starts hot and no step pays for the writeback of the one before it.

Checks that expand-hf's output equals mergekit's tensor by tensor (same names, dtypes and values; -0.0 == 0.0,
which is what `x * 0.0` gives for negative x; mergekit writes a Mixtral's experts fused, as transformers 5 holds
them, which the check splits into the hub's per-expert names). `--trees A,B`: project trees compared in one run (as in
benchmarks/convert.py): expand-hf and expand run once per tree in every repeat, the copy floors once (of the first
tree's output). Prints medians (wall; CPU seconds of the process tree, which a
loaded machine disturbs less), ratios, and the targets: expand-hf >= 3x faster than mergekit, <= 1/4 of its peak
RSS per process, <= 2x the copy floor.

mergekit is not a dependency of this project; install it into a separate virtualenv (never into the project's,
whose torch must not change):

    python3 -m venv /work/bench/mk-venv
    /work/bench/mk-venv/bin/pip install torch==2.13.0          # the CPU wheel (constraints-cpu.txt)
    /work/bench/mk-venv/bin/pip install -c constraints-cpu.txt mergekit
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import (  # noqa: E402  (benchmarks/: no package)
    add_model_shape_args,
    make_random_llama,
    run_measured,
    tree_env,
    tree_labels,
)

# A fresh process that copies a directory tree, as `cp -r` would (shutil uses copy_file_range/sendfile).
COPY_TREE = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"
HF_LAYER = "model.layers."


def expansion_sources(num_layers: int, groups: int) -> list[tuple[int, bool]]:
    """(source layer, is a new copy) for every expanded layer: the paper's plan, as `--groups` computes it."""
    from llamapro_megatron.expansion import plan_from_args

    plan = plan_from_args(num_layers, groups, None, None, None)
    return [(plan.sources[i], plan.is_new(i)) for i in range(plan.num_layers)]


def mergekit_config(hf: Path, layers: list[tuple[int, bool]], dtype: str) -> str:
    """A passthrough merge: runs of source layers as slices, each copy a 1-layer slice with its output
    projections scaled by 0 (first matching filter wins; the last entry, without a filter, is the default)."""
    slices, run = [], None
    for src, new in layers:
        if new:
            if run:
                slices.append(run)
                run = None
            slices.append((src, src + 1, True))
        elif run and run[1] == src:
            run = (run[0], src + 1, False)
        else:
            if run:
                slices.append(run)
            run = (src, src + 1, False)
    if run:
        slices.append(run)
    lines = ["merge_method: passthrough", f"dtype: {dtype}", "slices:"]
    for a, b, new in slices:
        lines += ["  - sources:", f"      - model: {hf}", f"        layer_range: [{a}, {b}]"]
        if new:
            lines += ["        parameters:", "          scale:",
                      "            - filter: o_proj", "              value: 0.0",
                      "            - filter: down_proj", "              value: 0.0",
                      # Mixtral's experts' down projections (block_sparse_moe.experts.E.w2)
                      "            - filter: w2", "              value: 0.0",
                      "            - value: 1.0"]
    return "\n".join(lines) + "\n"


# transformers 5 keeps a Mixtral layer's experts fused, and mergekit (which loads through it) writes them so:
# mlp.experts.gate_up_proj [E, 2F, H] (gate rows, then up), mlp.experts.down_proj [E, H, F], the router mlp.gate.
# The hub, and expand-hf, name them per expert: block_sparse_moe.experts.E.w1 (gate) / w3 (up) / w2 (down).
FUSED_MIXTRAL = re.compile(r"^(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


def tensors_of(model_dir: Path) -> dict[str, tuple[Path, str, Callable]]:
    """Every tensor of a HF directory under its hub name: (file, stored name, its safetensors slice -> the tensor)."""
    names = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                m = FUSED_MIXTRAL.match(k)
                if m is None:
                    names[k] = (f, k, lambda sl: sl[:])
                    continue
                layer, what = m.groups()
                if what == "gate.weight":
                    names[f"{layer}.block_sparse_moe.gate.weight"] = (f, k, lambda sl: sl[:])
                    continue
                for e in range(h.get_slice(k).get_shape()[0]):
                    base = f"{layer}.block_sparse_moe.experts.{e}"
                    if what == "experts.down_proj":
                        names[f"{base}.w2.weight"] = (f, k, lambda sl, e=e: sl[e])
                    else:
                        names[f"{base}.w1.weight"] = (f, k, lambda sl, e=e: sl[e].chunk(2)[0])
                        names[f"{base}.w3.weight"] = (f, k, lambda sl, e=e: sl[e].chunk(2)[1])
    return names


def compare_hf(a: Path, b: Path) -> list[str]:
    """Differences between two HF directories' tensors (hub names, dtypes, values); empty when equal."""
    ta, tb = tensors_of(a), tensors_of(b)
    problems = [f"only in {a.name}: {n}" for n in sorted(ta.keys() - tb.keys())]
    problems += [f"only in {b.name}: {n}" for n in sorted(tb.keys() - ta.keys())]
    for name in sorted(ta.keys() & tb.keys()):
        (fa, ka, pick_a), (fb, kb, pick_b) = ta[name], tb[name]
        with safe_open(str(fa), framework="pt") as ha, safe_open(str(fb), framework="pt") as hb:
            x, y = pick_a(ha.get_slice(ka)), pick_b(hb.get_slice(kb))
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):  # equal: -0.0 == 0.0
            problems.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}, "
                            f"max |diff| {(x.float() - y.float()).abs().max().item() if x.shape == y.shape else '-'}")
    return problems


def fsync_tree(root: Path) -> None:
    from llamapro_megatron.checkpoint.output import fsync_path

    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        fsync_path(f)


def settle(seconds: float, source: Path) -> None:
    """Read the step's source into the page cache, then let earlier writes drain (this VM's disk lags far behind
    the page cache), so that every step starts from the same state and pays for no other step's I/O."""
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass
    os.sync()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        if int(meminfo["Dirty"].split()[0]) + int(meminfo["Writeback"].split()[0]) < 64 << 10:  # KiB
            break
        time.sleep(0.5)
    time.sleep(seconds)


def timed(cmd: list[str], out: Path, env: dict | None = None) -> tuple[float, float, int]:
    """Wall seconds (the process, then fsync of every file it wrote), CPU seconds (user + system, of the whole
    process tree: reaped children count into their parent's) and the largest peak RSS of its processes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, peaks, _ = run_measured(cmd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fsync_tree(out)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall + time.perf_counter() - t0, cpu, max(peaks.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_shape_args(ap)
    ap.add_argument("--groups", type=int, default=6, help="expansion plan: a copy after each of N groups")
    ap.add_argument("--workers", type=int, default=2, help="workers of expand-hf and expand")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml (a separate virtualenv; see above); "
                    "without it the mergekit step and the equality check are skipped")
    ap.add_argument("--mergekit-args", default="--no-copy-tokenizer --lazy-unpickle",
                    help="extra mergekit-yaml options (default: %(default)s; it runs on CPU by default)")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds to wait, after a sync and once the kernel's dirty pages have drained, before each "
                    "timed step (default: %(default)s; without it a step pays for the previous one's writeback)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--trees", default=None, help="comma-separated project trees to compare in one run (see above)")
    args = ap.parse_args()
    trees = args.trees.split(",") if args.trees else [None]
    labels = tree_labels(trees)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llamapro-bench-expand-"))
    work.mkdir(parents=True, exist_ok=True)
    hf, mcore = work / "hf", work / "mcore"
    for d in (hf, mcore):
        shutil.rmtree(d, ignore_errors=True)
    dtype = getattr(torch, args.dtype)
    nbytes = make_random_llama(hf, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab, dtype,
                               experts=args.experts, topk=args.topk)
    llamapro = [sys.executable, "-m", "llamapro_megatron.cli"]
    run_measured([*llamapro, "convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(mcore),
                  "--workers", str(args.workers), "--no-progress"])
    layers = expansion_sources(args.layers, args.groups)
    yaml = work / "mergekit.yml"
    yaml.write_text(mergekit_config(hf, layers, args.dtype))

    steps = {
        "copy floor (HF)": lambda: [sys.executable, "-c", COPY_TREE, str(work / "expand-hf"), str(work / "copy-hf")],
        "mergekit": lambda: [args.mergekit, str(yaml), str(work / "mergekit"), *shlex.split(args.mergekit_args)],
        "copy floor (mcore)": lambda: [sys.executable, "-c", COPY_TREE, str(work / "expand"), str(work / "copy-mc")],
    }
    outputs = {"copy floor (HF)": "copy-hf", "mergekit": "mergekit", "copy floor (mcore)": "copy-mc"}
    sources = {"copy floor (HF)": work / "expand-hf", "mergekit": hf, "copy floor (mcore)": work / "expand"}
    envs = {}
    for tree, label in zip(trees, labels):  # the project's own steps, once per tree
        hf_step, mc_step = f"expand-hf {label}".strip(), f"expand (mcore) {label}".strip()
        steps[hf_step] = lambda: [*llamapro, "expand-hf", "--hf-dir", str(hf), "--out", str(work / "expand-hf"),
                                  "--groups", str(args.groups), "--workers", str(args.workers), "--no-progress"]
        steps[mc_step] = lambda: [*llamapro, "expand", "--load", str(mcore), "--out", str(work / "expand"),
                                  "--groups", str(args.groups), "--workers", str(args.workers), "--no-progress"]
        outputs.update({hf_step: "expand-hf", mc_step: "expand"})
        sources.update({hf_step: hf, mc_step: mcore})
        envs.update({hf_step: tree_env(tree), mc_step: tree_env(tree)})
    hf_steps = [f"expand-hf {label}".strip() for label in labels]
    mc_steps = [f"expand (mcore) {label}".strip() for label in labels]
    # each copy floor copies the output of the expansion run just before it; copies are removed once timed
    # (the page cache of this 24 GiB machine holds the sources and the latest outputs, not every copy)
    # (with several trees their steps alternate in order between repeats; their outputs are the same bytes)
    def order_of(r: int) -> list[str]:
        turn = (lambda x: x) if r % 2 == 0 else (lambda x: x[::-1])
        return [*turn(hf_steps), "copy floor (HF)", *(["mergekit"] if args.mergekit else []), *turn(mc_steps),
                "copy floor (mcore)"]

    order = order_of(0)
    walls: dict[str, list[float]] = {s: [] for s in order}
    cpus: dict[str, list[float]] = {s: [] for s in order}
    rss: dict[str, list[int]] = {s: [] for s in order}
    for r in range(args.repeats):
        for s in order_of(r):
            shutil.rmtree(work / outputs[s], ignore_errors=True)
            settle(args.settle, sources[s])
            wall, cpu, peak = timed(steps[s](), work / outputs[s], envs.get(s))
            walls[s].append(wall)
            cpus[s].append(cpu)
            rss[s].append(peak)
            if s.startswith("copy floor") or (s == "mergekit" and r < args.repeats - 1):
                shutil.rmtree(work / outputs[s])
        print(f"run {r + 1}: " + "  ".join(f"{s} {walls[s][-1]:.1f}s" for s in order) +
              f"  (load {os.getloadavg()[0]:.1f})", flush=True)

    equal = None
    if args.mergekit:
        problems = compare_hf(work / "expand-hf", work / "mergekit")  # the first tree's output
        equal = not problems
        n = len(tensors_of(work / "expand-hf"))
        print(f"\nexpand-hf output vs mergekit output: {n} tensors, "
              + ("all equal by value (same names, dtypes; torch.equal)" if equal else
                 f"{len(problems)} DIFFER:\n  " + "\n  ".join(problems[:20])))

    med = statistics.median
    gb = 1 << 30
    load = os.getloadavg()
    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, {psutil.virtual_memory().total / gb:.0f} GiB, "
          f"{platform.machine()}, torch {torch.__version__}, python {platform.python_version()}, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
    print(f"model: {args.layers} -> {len(layers)} layers (--groups {args.groups}), hidden {args.hidden}, "
          f"ffn {args.ffn}{f' x {args.experts} experts' if args.experts else ''}, {args.heads} heads / "
          f"{args.kv_heads} KV, vocab {args.vocab}, {args.dtype}: source "
          f"{nbytes / gb:.2f} GiB; workers {args.workers}; medians of {args.repeats}; wall incl. fsync of the output")
    header = f"{'step':<20}{'wall s':>8}{'x floor':>9}{'x mergekit':>12}{'CPU s':>8}{'peak RSS/proc GiB':>19}"
    print(header)
    mk = med(walls["mergekit"]) if args.mergekit else None
    mk_rss = max(rss["mergekit"]) if args.mergekit else None
    rows = [("copy floor (HF)", "copy floor (HF)"), *[(s, "copy floor (HF)") for s in hf_steps],
            ("mergekit", "copy floor (HF)"), ("copy floor (mcore)", "copy floor (mcore)"),
            *[(s, "copy floor (mcore)") for s in mc_steps]]
    for s, floor in rows:
        if s not in walls:
            continue
        w = med(walls[s])
        vs_mk = f"{w / mk:.2f}" if mk and s != "mergekit" else ""
        print(f"{s:<20}{w:>8.1f}{w / med(walls[floor]):>9.2f}{vs_mk:>12}{med(cpus[s]):>8.1f}"
              f"{max(rss[s]) / gb:>19.2f}")

    def per_repeat(a: str, b: str) -> str:  # robust to load that changes between repeats
        return f"(per repeat: {', '.join(f'{x / y:.2f}' for x, y in zip(walls[a], walls[b]))})"

    if len(labels) == 2:  # before / after: the second tree's wall time over the first's
        for a, b in (hf_steps, mc_steps):
            print(f"{b} / {a}: {med(walls[b]) / med(walls[a]):.2f} of the wall time {per_repeat(b, a)}")
    first = hf_steps[0]
    print(f"\ntargets for {first} (ratios of the medians):")
    w, peak = med(walls[first]), max(rss[first])
    ratio = w / med(walls["copy floor (HF)"])
    print(f"  <= 2x the copy floor:          {ratio:.2f}x  {'MET' if ratio <= 2 else 'MISSED'}  "
          + per_repeat(first, "copy floor (HF)"))
    if mk:
        print(f"  >= 3x faster than mergekit:    {mk / w:.2f}x  {'MET' if mk / w >= 3 else 'MISSED'}  "
              + per_repeat("mergekit", first))
        print(f"  <= 1/4 of mergekit's peak RSS: {peak / mk_rss:.2f}  {'MET' if peak <= mk_rss / 4 else 'MISSED'}")
        print(f"  output equal to mergekit's:    {'MET' if equal else 'MISSED'}")
    print("command: PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/expand.py " + shlex.join(sys.argv[1:]))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
