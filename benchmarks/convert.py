"""Conversion speed and memory against the floor of copying the same bytes, in one run.

    python benchmarks/convert.py [--layers 24 --hidden 2048 --ffn 5632 --heads 32 --kv-heads 4 --vocab 32000]
                                 [--experts 8 --topk 2]
                                 [--workers 2] [--repeats 3] [--workdir DIR] [--trees OLD,NEW]

Makes a random HF LLaMA of the given shape (default ~1.2B parameters, bf16), then times, `--repeats` times each:
copying its safetensors files (the floor), `llamapro convert hf-to-mcore` and `llamapro convert mcore-to-hf`,
each as a fresh process like a user runs it, on each of `--paths`: `direct` (the default path: tensor bytes copied
file to file, `checkpoint/direct_import.py`, `direct_export.py`) and `regular` (workers build tensors, megatron-core
writes and reads them; what `LLAMAPRO_DIRECT_CONVERT=0` forces), interleaved within each repeat. Peak RSS is
sampled (psutil, every 50 ms) for every process of the command's tree. Prints medians, ratios to the floor, and the
per-worker RSS target (1.5 GB + largest tensor).

`--trees A,B`: source trees of the project (e.g. a `git worktree` of the commit before a change, and this one), each
step run once per tree in every repeat (PYTHONPATH=tree), to compare code before and after in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file


def make_random_llama(out: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                      dtype: torch.dtype, layers_per_shard: int = 6, experts: int = 0, topk: int = 2,
                      device: str = "cpu") -> int:
    """Write a random LLaMA HF directory shard by shard (never the whole model in memory); returns bytes.

    ``experts`` > 0: a Mixtral (every layer an MoE layer of that many experts of FFN ``ffn``, top ``topk``), with the
    hub's names (`block_sparse_moe.gate`, `block_sparse_moe.experts.E.w1/w2/w3`). ``device``: where the random
    numbers are drawn (``cuda``: ~100x faster than one CPU generator at 7B; other values than the CPU's)."""
    out.mkdir(parents=True)
    d = hidden // heads
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(dtype).cpu()

    groups = [list(range(i, min(i + layers_per_shard, layers))) for i in range(0, layers, layers_per_shard)]
    total_files = len(groups) + 1
    weight_map, total = {}, 0
    for f, group in enumerate([None, *groups]):
        if group is None:
            tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                       "model.norm.weight": torch.ones(hidden, dtype=dtype)}
        else:
            tensors = {}
            for i in group:
                p = f"model.layers.{i}."
                tensors.update({
                    p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                    p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
                    p + "self_attn.q_proj.weight": rand(heads * d, hidden),
                    p + "self_attn.k_proj.weight": rand(kv_heads * d, hidden),
                    p + "self_attn.v_proj.weight": rand(kv_heads * d, hidden),
                    p + "self_attn.o_proj.weight": rand(hidden, heads * d),
                })
                if not experts:
                    tensors.update({p + "mlp.gate_proj.weight": rand(ffn, hidden),
                                    p + "mlp.up_proj.weight": rand(ffn, hidden),
                                    p + "mlp.down_proj.weight": rand(hidden, ffn)})
                    continue
                tensors[p + "block_sparse_moe.gate.weight"] = rand(experts, hidden)
                for e in range(experts):
                    q = f"{p}block_sparse_moe.experts.{e}."
                    tensors.update({q + "w1.weight": rand(ffn, hidden), q + "w3.weight": rand(ffn, hidden),
                                    q + "w2.weight": rand(hidden, ffn)})
        name = f"model-{f + 1:05d}-of-{total_files:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config = random_llama_config(layers, hidden, ffn, heads, kv_heads, vocab, dtype, experts, topk)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total


def random_llama_config(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                        dtype: torch.dtype, experts: int = 0, topk: int = 2) -> dict:
    """The config.json of :func:`make_random_llama`'s model."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": str(dtype).removeprefix("torch.")}
    if experts:
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
                      num_experts_per_tok=topk, router_aux_loss_coef=0.02)
    return config


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tree_env(tree: str | None, **extra: str) -> dict:
    """The environment that runs the project from `tree` (None: as this process finds it)."""
    env = {**os.environ, **extra}
    if tree is not None:
        env["PYTHONPATH"] = str(Path(tree).resolve())
    return env


def tree_labels(trees: list[str | None]) -> list[str]:
    """Short names of the trees (their directory names), '' for a single tree."""
    return [""] if trees == [None] else [Path(t).resolve().name for t in trees]


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, dict[int, int], float]:
    """Wall time, peak RSS (bytes) of every process in the command's tree, and the tree's CPU seconds.

    CPU seconds (user + system of every process of the tree once reaped) stay meaningful on a busy machine,
    where wall time measures the other jobs too.
    """
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")
    return wall, peaks, _children_cpu() - cpu0


def copy_floor(src: Path, dst: Path) -> tuple[float, float]:
    """Wall and CPU seconds of copying the safetensors files and syncing them to disk."""
    c0, t0 = time.process_time(), time.perf_counter()
    dst.mkdir()
    for f in src.glob("*.safetensors"):
        shutil.copyfile(f, dst / f.name)
    os.sync()
    return time.perf_counter() - t0, time.process_time() - c0


def add_model_shape_args(ap: argparse.ArgumentParser) -> None:
    """The random model's shape (default: the ~1.2B bf16 shape the conversion and expansion targets use)."""
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--experts", type=int, default=0, help="an MoE (Mixtral) model: experts per layer, each of FFN "
                    "--ffn (e.g. --layers 16 --hidden 1024 --ffn 2816 --experts 8 --heads 16 --kv-heads 4: ~1.2B)")
    ap.add_argument("--topk", type=int, default=2, help="with --experts: experts per token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_shape_args(ap)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", default="direct,regular", help="comma-separated: direct, regular")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--trees", default=None, help="comma-separated project trees to compare in one run (see above)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llamapro-bench-"))
    hf = work / "hf"
    if hf.exists():
        shutil.rmtree(hf)
    dtype = getattr(torch, args.dtype)
    nbytes = make_random_llama(hf, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab, dtype,
                               experts=args.experts, topk=args.topk)
    largest = args.vocab * args.hidden * dtype.itemsize
    llamapro = [sys.executable, "-m", "llamapro_megatron.cli"]
    trees = args.trees.split(",") if args.trees else [None]
    labels = tree_labels(trees)
    paths = args.paths.split(",")
    steps = [(f"{label} {path}".strip(), direction) for label in labels for path in paths
             for direction in ("hf-to-mcore", "mcore-to-hf")]
    floor, cpu_floor = [], []
    walls = {s: [] for s in steps}
    rss = {s: [] for s in steps}
    cpu = {s: [] for s in steps}
    for r in range(args.repeats):
        for d in ("copy", *[f"mcore_{p}" for p in paths], *[f"export_{p}" for p in paths]):
            shutil.rmtree(work / d, ignore_errors=True)
        os.sync()
        wall, cpu_s = copy_floor(hf, work / "copy")
        floor.append(wall)
        cpu_floor.append(cpu_s)
        shutil.rmtree(work / "copy")  # disk: the copy, the checkpoints and the exports would coexist
        line = [f"run {r + 1}: copy {wall:.1f}s"]
        turn = (lambda x: x) if r % 2 == 0 else (lambda x: x[::-1])  # several trees: alternate their order
        for tree, label in turn(list(zip(trees, labels))):
            for path in paths:
                step = f"{label} {path}".strip()
                env = tree_env(tree, LLAMAPRO_DIRECT_CONVERT="1" if path == "direct" else "0")
                for direction, cmd in (
                        ("hf-to-mcore", ["--hf-dir", str(hf), "--out", str(work / f"mcore_{path}")]),
                        ("mcore-to-hf", ["--load", str(work / f"mcore_{path}"), "--out",
                                         str(work / f"export_{path}")])):
                    wall, peaks, cpu_s = run_measured([*llamapro, "convert", direction, *cmd, "--workers",
                                                       str(args.workers), "--no-progress"], env)
                    walls[(step, direction)].append(wall)
                    rss[(step, direction)].append(max(peaks.values()))
                    cpu[(step, direction)].append(cpu_s)
                    line.append(f"{step} {direction} {wall:.1f}s ({cpu_s:.1f} CPU s)")
                for d in (f"mcore_{path}", f"export_{path}"):  # disk and page cache: one tree's outputs at a time
                    shutil.rmtree(work / d, ignore_errors=True)
        print("  ".join(line) + f"  (load average {os.getloadavg()[0]:.1f})", flush=True)

    med = statistics.median
    gb = 1 << 30
    target_rss = 1.5 * gb + largest
    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, {psutil.virtual_memory().total / gb:.0f} GiB, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}"
          f"{f' x {args.experts} experts (top {args.topk})' if args.experts else ''}, {args.heads} heads / "
          f"{args.kv_heads} KV, vocab {args.vocab}, {args.dtype}: {nbytes / gb:.2f} GiB; workers {args.workers}; "
          f"medians of {args.repeats}")
    width = 24 + max(len(label) for label in labels)
    print(f"{'step':<{width}}{'wall s':>8}{'x copy':>8}{'CPU s':>8}{'peak RSS/proc GiB':>19}{'target':>22}")
    print(f"{'copy (floor)':<{width}}{med(floor):>8.1f}{1.0:>8.2f}{med(cpu_floor):>8.1f}{'':>19}")
    for (path, direction), w in walls.items():
        ok = med(w) <= 2 * med(floor) and max(rss[(path, direction)]) <= target_rss
        print(f"{path + ' ' + direction:<{width}}{med(w):>8.1f}{med(w) / med(floor):>8.2f}"
              f"{med(cpu[(path, direction)]):>8.1f}{max(rss[(path, direction)]) / gb:>19.2f}"
              f"{'<=2.00x, <=' + format(target_rss / gb, '.2f') + ' GiB':>22}  {'OK' if ok else 'MISSED'}")
    for step in steps:
        ratios = ", ".join(f"{w / f:.2f}" for w, f in zip(walls[step], floor))
        print(f"per repeat, {step[0]} {step[1]} / floor: {ratios}")
    if len(labels) == 2:  # before / after: the second tree's wall time over the first's
        for path in paths:
            for direction in ("hf-to-mcore", "mcore-to-hf"):
                a, b = walls[(f"{labels[0]} {path}", direction)], walls[(f"{labels[1]} {path}", direction)]
                print(f"{labels[1]} / {labels[0]}, {path} {direction}: {med(b) / med(a):.2f} of the wall time "
                      f"(per repeat {', '.join(f'{y / x:.2f}' for x, y in zip(a, b))})")
    print("command: python benchmarks/convert.py " + " ".join(sys.argv[1:]))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
