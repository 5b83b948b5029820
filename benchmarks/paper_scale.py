"""LLaMA Pro at the paper's scale on one GPU: LLaMA-2-7B's shape grown 32 -> 40 blocks (8.36B parameters, 1.62B of
them training), bf16 and FP8 step figures, Hugging Face transformers on the same shape, and the dry-run planner's
memory beside the device's peak (issue 22; BENCHMARKS.md, "Paper scale on one H200").

    # the GPU machine: benchmarks/paper_scale_device.sh installs megatron-core and Transformer Engine, then runs
    python3 benchmarks/paper_scale.py --out DIR --workdir /tmp/ps --budget-s 500
    # what the planner predicts for the same runs, beside what a run measured (no GPU needed)
    python benchmarks/paper_scale.py --predict --results DIR/results.jsonl
    # the script itself on CPU with tiny shapes (fp32; its FP8 runs are refused, as they must be without a GPU)
    PYTHONPATH=. python benchmarks/paper_scale.py --tiny --out /tmp/ps-out

Models: random weights of LLaMA-2-7B's exact config (32 layers, hidden 4096, FFN 11008, 32 heads, vocab 32000) drawn
on the GPU and written as a Hugging Face directory, converted by `hf_to_mcore` (parallel workers) and expanded by the
project's sharded expansion, `expand_mcore` with `--groups 8` (new blocks at 4, 9, ..., 39); the HF weights are then
deleted (the disk holds 64 GiB). The HF side builds the expanded architecture from its config.json, randomly
initialised on the GPU: the same shapes and frozen blocks as llamapro's model, other random values (the step's
work does not depend on them). The ~1B shape of train_vs_hf.py (16 -> 20 blocks) is the planner's second size.

Runs, in order of importance, each in a fresh spawned process (`train_vs_hf.run_side`: its own CUDA peak, no
shared allocator); one that the time left cannot hold is recorded as skipped, so what runs first is what matters:
  8.3B llamapro bf16 (TE spec), FP8 hybrid/delayed, HF transformers + AdamW (fp32 weights, bf16 autocast), bf16 with
  full recomputation; then the --pytest GPU tests (FP8 checkpoints, the planner, then issue 20's MoE checkpoint
  on TE's grouped experts; at most 150 s), the planner's other
  configurations (the 1B shape, FP8 with recomputation), FP8 with current (tensorwise) scaling, and second repeats
  of the bf16 and FP8 runs. MFU is against the bf16 dense peak (989 TFLOP/s on an H100/H200) for the FP8 runs
  too (FP8's dense peak is twice that), so FP8 / bf16 MFU is their speed ratio. Every run writes one line to
  OUT/results.jsonl as it ends; OUT/summary.md holds
  the tables. Tokens are seeded random (`--mock-data`), the same batches for every llamapro run, so the FP8 run's
  losses are compared step by step with the bf16 run's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import make_random_llama, random_llama_config  # noqa: E402  (benchmarks/: no package)

# (layers, hidden, ffn, heads, kv heads, vocab, groups): LLaMA-2-7B, train_vs_hf.py's ~1B, and CPU stand-ins
SHAPES = {
    "8.3b": (32, 4096, 11008, 32, 32, 32000, 8),
    "1b": (16, 2048, 5632, 32, 4, 32000, 4),
    "tiny": (4, 128, 352, 4, 2, 512, 2),
    "tiny1b": (2, 64, 160, 4, 2, 512, 1),
}
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
FP8 = ["--fp8-format", "hybrid"]  # delayed scaling (the default recipe), amax history 1 (Megatron-LM's defaults)
FP8_TENSORWISE = ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]
GIB = 2**30


@dataclass
class RunSpec:
    name: str
    shape: str  # a SHAPES key (the GPU names; --tiny maps them to the tiny ones)
    side: str  # llamapro | hf
    micro_batch: int
    warmup: int
    steps: int
    flags: list[str] = field(default_factory=list)  # llamapro flags beyond train_vs_hf's
    estimate_s: float = 60.0  # wall time it is expected to need, for the budget

    @property
    def precision(self) -> str:
        if self.side == "hf":
            return "bf16 autocast (fp32 weights)"
        if "--fp8-format" in self.flags:
            recipe = self.flags[self.flags.index("--fp8-recipe") + 1] if "--fp8-recipe" in self.flags else "delayed"
            return f"FP8 {self.flags[self.flags.index('--fp8-format') + 1]}, {recipe}"
        return "bf16"

    @property
    def recompute(self) -> str:
        return "full, uniform 1" if "--recompute-granularity" in self.flags else "none"

    def record(self, seq_length: int) -> dict:
        """What results.jsonl says of the run before its figures."""
        return {"name": self.name, "shape": self.shape, "side": self.side, "precision": self.precision,
                "recompute": self.recompute, "micro_batch": self.micro_batch, "seq_length": seq_length,
                "warmup": self.warmup, "steps": self.steps, "flags": self.flags}


RUNS = [
    RunSpec("8.3b-bf16", "8.3b", "llamapro", 2, 2, 6, [], 75),
    RunSpec("8.3b-fp8", "8.3b", "llamapro", 2, 2, 6, FP8, 80),
    RunSpec("8.3b-hf", "8.3b", "hf", 2, 2, 4, [], 45),
    RunSpec("8.3b-bf16-recompute", "8.3b", "llamapro", 2, 1, 2, RECOMPUTE, 65),
    RunSpec("pytest", "", "pytest", 0, 0, 0, [], 100),  # the --pytest GPU tests (FP8, planner, MoE), at most 150 s
    RunSpec("1b-bf16", "1b", "llamapro", 4, 1, 2, [], 30),
    RunSpec("1b-bf16-recompute", "1b", "llamapro", 4, 1, 2, RECOMPUTE, 30),
    RunSpec("1b-fp8", "1b", "llamapro", 4, 1, 2, FP8, 30),
    RunSpec("1b-fp8-recompute", "1b", "llamapro", 4, 1, 2, FP8 + RECOMPUTE, 30),
    RunSpec("8.3b-fp8-recompute", "8.3b", "llamapro", 2, 1, 2, FP8 + RECOMPUTE, 65),
    RunSpec("8.3b-fp8-tensorwise", "8.3b", "llamapro", 2, 2, 4, FP8_TENSORWISE, 70),
    RunSpec("8.3b-bf16-repeat2", "8.3b", "llamapro", 2, 2, 6, [], 75),
    RunSpec("8.3b-fp8-repeat2", "8.3b", "llamapro", 2, 2, 6, FP8, 80),
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results.jsonl, summary.md and the logs go here")
    ap.add_argument("--workdir", default=None, help="the prepared checkpoints (kept and reused when present)")
    ap.add_argument("--budget-s", type=float, default=500.0, help="wall seconds for everything from the start")
    ap.add_argument("--seq-length", type=int, default=None, help="default 4096 (--tiny: 64)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these (RunSpec names)")
    ap.add_argument("--prepare-workers", type=int, default=6, help="conversion and expansion worker processes")
    ap.add_argument("--wait-for", default=None, metavar="FILE",
                    help="before the first llamapro run, wait until FILE exists (Transformer Engine's build in the "
                         "background writes its exit status there; the HF run, which needs no TE, may go first)")
    ap.add_argument("--te-site", default=None, metavar="DIR",
                    help="with --wait-for: the folder Transformer Engine is installed in, put on the runs' path once "
                         "the build succeeded and a small FP8 layer ran there (this process never imports TE)")
    ap.add_argument("--tiny", action="store_true", help="CPU check of this script: tiny shapes, fp32")
    ap.add_argument("--predict", action="store_true",
                    help="print the planner's memory for every llamapro run (dry run, no GPU) and, with --results, "
                         "the measured peak beside it")
    ap.add_argument("--results", default=None, help="with --predict: a results.jsonl of a device run")
    ap.add_argument("--pytest", nargs="*", default=["tests/gpu/test_fp8.py", "tests/gpu/test_planner_memory.py",
                                                   "tests/gpu/test_moe_te.py"],
                    help="GPU tests run after the 8.3B runs, in this order, for at most 150 s of the budget (what a "
                         "timeout cuts off is the last; empty: none)")
    args = ap.parse_args(argv)
    if args.seq_length is None:
        args.seq_length = 64 if args.tiny else 4096
    if not args.predict and args.out is None:
        ap.error("--out is required (except with --predict)")
    return args


# ---------------------------------------------------------------------------------------------- preparation
def prepare(shape_key: str, args, work: Path, log) -> dict:
    """(expanded checkpoint, HF config dir of the expanded model, new layer indices) of a shape, made once."""
    import torch

    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave

    layers, hidden, ffn, heads, kv, vocab, groups = SHAPES[shape_key]
    base_dir = work / shape_key
    pro, pro_hf = base_dir / "pro", base_dir / "pro_hf"
    new = interleave(layers, groups).new_indices
    done = base_dir / "prepared.json"
    if done.exists():
        log(f"{shape_key}: reusing {base_dir}")
        return {"pro": str(pro), "pro_hf": str(pro_hf), "new": list(new), **json.loads(done.read_text())}
    shutil.rmtree(base_dir, ignore_errors=True)
    times = {}
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    hf_bytes = make_random_llama(base_dir / "hf", layers, hidden, ffn, heads, kv, vocab, dtype, device=device)
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs' processes get the GPU; this one keeps only its context
    times["random_hf_s"] = time.time() - t0
    log(f"{shape_key}: random HF model, {hf_bytes / 1e9:.1f} GB in {times['random_hf_s']:.0f} s")
    t0 = time.time()
    hf_to_mcore(base_dir / "hf", base_dir / "base", progress=False, workers=args.prepare_workers)
    times["convert_s"] = time.time() - t0
    log(f"{shape_key}: hf_to_mcore in {times['convert_s']:.0f} s")
    shutil.rmtree(base_dir / "hf")  # disk: the 7B source would take 13.5 GB more
    t0 = time.time()
    expand_mcore(base_dir / "base", pro, lambda n: interleave(n, groups), progress=False,
                 workers=args.prepare_workers)
    times["expand_s"] = time.time() - t0
    log(f"{shape_key}: expand_mcore {layers} -> {layers + len(new)} blocks in {times['expand_s']:.0f} s")
    shutil.rmtree(base_dir / "base")
    pro_hf.mkdir()
    config = random_llama_config(layers + len(new), hidden, ffn, heads, kv, vocab, dtype)
    (pro_hf / "config.json").write_text(json.dumps(config, indent=2))
    done.write_text(json.dumps(times))
    return {"pro": str(pro), "pro_hf": str(pro_hf), "new": list(new), **times}


# ---------------------------------------------------------------------------------------------- one run
def side_args(spec: RunSpec, args, device: str) -> SimpleNamespace:
    """The namespace train_vs_hf's run_llamapro / run_hf read."""
    bf16 = device == "cuda"
    # on CPU (--tiny) the FP8 runs ask for bf16 too, so that what refuses them is the missing TE spec
    extra = list(spec.flags) + (["--bf16"] if "--fp8-format" in spec.flags and not bf16 else [])
    return SimpleNamespace(device=device, spec="auto", bf16=bf16, hf_precision="autocast",
                           micro_batch_size=spec.micro_batch, seq_length=args.seq_length, warmup=spec.warmup,
                           steps=spec.steps, no_bias_swiglu_fusion=False, no_rope_fusion=False,
                           cross_entropy_loss_fusion=None, profile=False, extra_argv=extra)


def run_one(spec: RunSpec, prepared: dict, args, device: str) -> dict:
    from train_vs_hf import run_side

    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.training import metrics

    path = Path(prepared["pro"] if spec.side == "llamapro" else prepared["pro_hf"])
    t0 = time.time()
    side = run_side(spec.side, path, tuple(prepared["new"]), side_args(spec, args, device))
    arch = LlamaArch.from_hf_dir(prepared["pro_hf"])
    recompute = "--recompute-granularity" in spec.flags
    # as the trainer counts: full recomputation back-propagates from the bottom of the model (training/model.py)
    flops = metrics.flops_per_token(arch, arch.vocab_size, args.seq_length, set(prepared["new"]),
                                    train_embeddings=recompute, train_output=False,
                                    first_chunk_layers=arch.num_layers)
    median = statistics.median(side.seconds)
    tokens = spec.micro_batch * args.seq_length / median
    peak = metrics.peak_tflops(None) if device == "cuda" else None
    counted, six_n = flops.per_token * tokens / 1e12, flops.six_n_per_token * tokens / 1e12
    return dict(
        status="ok", wall_s=time.time() - t0, seconds=side.seconds, median_s=median, tokens_per_s=tokens,
        tflops_counted=counted, tflops_6n=six_n, mfu_counted=counted / peak if peak else None,
        mfu_6n=six_n / peak if peak else None, gflop_per_token_counted=flops.per_token / 1e9,
        parameters=flops.num_parameters, losses=side.losses,
        peak_allocated_gib=side.peak_bytes / GIB if side.peak_bytes is not None else None,
        peak_reserved_gib=side.peak_reserved / GIB if side.peak_reserved is not None else None,
        peak_rss_gib=side.peak_rss / GIB)


def failure(e: BaseException) -> dict:
    text = "".join(traceback.format_exception_only(type(e), e)).strip()
    oom = "OutOfMemoryError" in text or "out of memory" in text
    return {"status": "out of memory" if oom else "failed", "error": text[-2000:]}


# ---------------------------------------------------------------------------------------------- the session
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.predict:
        return predict(args)
    import torch

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or out / "work")
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    log_file = (out / "log.txt").open("a")

    def log(text: str) -> None:
        line = f"[{time.time() - started:6.0f} s] {text}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    def left() -> float:
        return args.budget_s - (time.time() - started)

    from llamapro_megatron.runtime import prepare as prepare_runtime

    prepare_runtime()
    results_path = out / "results.jsonl"
    prepared: dict[str, dict] = {}
    runs = [r for r in RUNS if args.only is None or r.name in args.only]
    if args.tiny:
        runs = [RunSpec(r.name, r.shape, r.side, r.micro_batch, 1, 2, r.flags, 5) for r in runs if r.side != "pytest"]
    te_waited = args.wait_for is None
    pending = list(runs)

    def shape_key(spec: RunSpec) -> str:
        return {"8.3b": "tiny", "1b": "tiny1b"}[spec.shape] if args.tiny else spec.shape

    while pending:
        spec = pending[0]
        if spec.side == "pytest":
            pending.pop(0)
            run_pytest(args, out, left, log)
            continue
        shape, record = shape_key(spec), spec.record(args.seq_length)
        try:
            if shape not in prepared:  # first: TE builds meanwhile (neither needs the other)
                t0 = time.time()
                prepared[shape] = prepare(shape, args, work, log)
                log(f"{shape}: prepared in {time.time() - t0:.0f} s")
            if not te_waited and spec.side == "llamapro" and not Path(args.wait_for).exists():
                hf = next((r for r in pending if r.side == "hf" and shape_key(r) in prepared), None)
                if hf is not None:  # the GPU is free while TE builds: the HF run needs no TE
                    spec, shape, record = hf, shape_key(hf), hf.record(args.seq_length)
            if not te_waited and spec.side == "llamapro":
                if not Path(args.wait_for).exists():
                    log(f"waiting for {args.wait_for} (Transformer Engine's build)")
                while not Path(args.wait_for).exists() and left() > 0:
                    time.sleep(2)
                te_waited = True
                use_transformer_engine(args, log)
            pending.remove(spec)
            if spec.estimate_s > left():
                record.update(status="skipped", error=f"{left():.0f} s of the budget left, the run needs "
                                                       f"~{spec.estimate_s:.0f} s")
            else:
                log(f"{spec.name}: {spec.side}, {spec.precision}, recompute {spec.recompute}, micro batch "
                    f"{spec.micro_batch} x {args.seq_length}")
                record.update(run_one(spec, prepared[shape], args, device))
        except Exception as e:  # a run's failure (OOM, a refusal) is a result; the session goes on
            if spec in pending:
                pending.remove(spec)
            record.update(failure(e))
            if spec.side == "hf" and record["status"] == "out of memory" and spec.micro_batch > 1:
                log(f"{spec.name}: out of memory at micro batch {spec.micro_batch}; again at 1")
                pending.insert(0, RunSpec(spec.name + "-mb1", spec.shape, "hf", 1, spec.warmup, spec.steps,
                                          [], spec.estimate_s))
        record["elapsed_s"] = time.time() - started
        with results_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"{spec.name}: {describe(record)}")
    env = environment(device)
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    log(f"environment: {json.dumps(env)}")
    summary = summarize([json.loads(line) for line in results_path.read_text().splitlines()])
    (out / "summary.md").write_text(summary)
    print(summary)
    log(f"done in {time.time() - started:.0f} s")
    return 0


TE_SMOKE = """
import torch, transformer_engine.pytorch as te
from transformer_engine.common.recipe import DelayedScaling, Format
layer = te.Linear(256, 256, params_dtype=torch.bfloat16).cuda()
x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
with te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID)):
    y = layer(x)
y.float().sum().backward()
torch.cuda.synchronize()
ref = x.detach().float() @ layer.weight.detach().float().t()
print("TE", te.__version__ if hasattr(te, "__version__") else "", "FP8 linear relative error",
      float((y.float() - ref).norm() / ref.norm()), "fp8 available", te.is_fp8_available(return_reason=True))
"""


def use_transformer_engine(args, log) -> None:
    """Put Transformer Engine on the runs' path when its build succeeded and an FP8 layer runs (in a child: a
    broken build must not take this process down)."""
    status = Path(args.wait_for).read_text().strip() if Path(args.wait_for).exists() else "not written"
    log(f"Transformer Engine build: exit status {status}")
    if status != "0" or args.te_site is None:
        log("the runs go without Transformer Engine (sdpa spec; FP8 runs are refused)")
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.te_site, os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-c", TE_SMOKE], capture_output=True, text=True, env=env, timeout=180)
        text, ok = (proc.stdout + proc.stderr).strip(), proc.returncode == 0
    except subprocess.TimeoutExpired:
        text, ok = "timed out after 180 s", False
    log(f"Transformer Engine check: {'ok' if ok else 'FAILED'}: {text[-1500:]}")
    if ok:
        sys.path.insert(0, args.te_site)  # spawned runs start with this process's sys.path
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # subprocesses (pytest)


def run_pytest(args, out: Path, left, log) -> None:
    if not args.pytest or args.tiny:
        return
    budget = min(left() - 15, 150)
    if budget < 60:
        log(f"pytest {' '.join(args.pytest)}: skipped, {left():.0f} s left")
        return
    log(f"pytest {' '.join(args.pytest)} (at most {budget:.0f} s)")
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-s",
                               *args.pytest], capture_output=True, text=True, timeout=budget)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            "timeout"
    (out / "pytest.txt").write_text(text)
    log(f"pytest: rc {rc}; {text.strip().splitlines()[-1] if text.strip() else ''}")


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count()}
    for name in ("megatron.core", "transformer_engine", "transformers"):
        try:
            module = __import__(name, fromlist=["__version__"])
            env[name] = getattr(module, "__version__", "?")
        except Exception as e:  # noqa: BLE001 (recorded, not fatal)
            env[name] = f"not importable: {type(e).__name__}"
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB)
    return env


def describe(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('error', '')[-300:]}"
    mfu = f", MFU counted {100 * r['mfu_counted']:.1f}%" if r.get("mfu_counted") else ""
    peak = f", peak {r['peak_allocated_gib']:.1f} GiB" if r.get("peak_allocated_gib") else ""
    return (f"{r['median_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s, {r['tflops_counted']:.1f} TFLOP/s "
            f"counted{mfu}{peak}; losses {[round(x, 4) for x in r['losses']]}")


def summarize(results: list[dict]) -> str:
    ok = {r["name"]: r for r in results if r["status"] == "ok"}
    lines = ["| run | precision | recompute | micro batch | s/step (per step) | tokens/s | TFLOP/s counted | "
             "TFLOP/s 6N | MFU counted | MFU 6N | peak allocated | peak reserved |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['precision']} | {r['recompute']} | {r['micro_batch']} | "
                         f"{r['status']}: {r.get('error', '')[:200]} | | | | | | | |")
            continue

        def pct(x):
            return f"{100 * x:.1f}%" if x is not None else "n/a"

        def gib(x):
            return f"{x:.1f} GiB" if x is not None else "n/a"
        per_step = ", ".join(f"{s:.3f}" for s in r["seconds"])
        lines.append(f"| {r['name']} | {r['precision']} | {r['recompute']} | {r['micro_batch']} | "
                     f"{r['median_s']:.3f} ({per_step}) | {r['tokens_per_s']:,.0f} | {r['tflops_counted']:.1f} | "
                     f"{r['tflops_6n']:.1f} | {pct(r['mfu_counted'])} | {pct(r['mfu_6n'])} | "
                     f"{gib(r['peak_allocated_gib'])} | {gib(r['peak_reserved_gib'])} |")
    ratios = []
    for a, b, label in (("8.3b-fp8", "8.3b-bf16", "FP8 / bf16 tokens/s"),
                        ("8.3b-fp8-tensorwise", "8.3b-bf16", "FP8 tensorwise / bf16 tokens/s"),
                        ("8.3b-bf16", "8.3b-hf", "llamapro bf16 / HF tokens/s"),
                        ("8.3b-bf16", "8.3b-hf-mb1", "llamapro bf16 / HF (micro batch 1) tokens/s"),
                        ("8.3b-fp8", "8.3b-hf", "llamapro FP8 / HF tokens/s")):
        if a in ok and b in ok:
            ratios.append(f"- {label}: {ok[a]['tokens_per_s'] / ok[b]['tokens_per_s']:.2f}x")
    if "8.3b-fp8" in ok and "8.3b-bf16" in ok:
        fp8, bf16 = ok["8.3b-fp8"]["losses"], ok["8.3b-bf16"]["losses"]
        diff = max(abs(a - b) for a, b in zip(fp8, bf16))
        ratios.append(f"- FP8 vs bf16 losses over the same {min(len(fp8), len(bf16))} steps (same batches): max "
                      f"|difference| {diff:.4f}; bf16 {[round(x, 4) for x in bf16]}, FP8 {[round(x, 4) for x in fp8]}")
    return "\n".join(lines + [""] + ratios) + "\n"


# ---------------------------------------------------------------------------------------------- the planner
def predict(args) -> int:
    """The dry-run planner's per-GPU memory for each llamapro run (and the measured peak, given --results)."""
    import tempfile

    from llamapro_megatron.training.config import add_arguments, config_from_args
    from llamapro_megatron.training.dry_run import dry_run
    from llamapro_megatron.training.memory import GIB as _GIB

    measured = {}
    if args.results:
        for line in Path(args.results).read_text().splitlines():
            r = json.loads(line)
            if r["status"] == "ok" and r.get("peak_allocated_gib"):
                measured[r["name"]] = r["peak_allocated_gib"]
    print("| run | weights | grads | optimizer | activations | predicted total | measured peak allocated | "
          "measured / predicted |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in RUNS:
            if spec.side != "llamapro" or "repeat" in spec.name or "tensorwise" in spec.name:
                continue
            layers, hidden, ffn, heads, kv, vocab, groups = SHAPES[spec.shape]
            config_json = Path(tmp) / f"{spec.shape}.json"
            config_json.write_text(json.dumps(random_llama_config(layers, hidden, ffn, heads, kv, vocab, "bfloat16")))
            parser = argparse.ArgumentParser()
            add_arguments(parser)
            flags = ["--bf16", "--spec", "te", "--micro-batch-size",
                     str(spec.micro_batch), "--global-batch-size", str(spec.micro_batch), "--seq-length",
                     str(args.seq_length), *spec.flags]
            plan = dry_run(config_from_args(parser.parse_args(flags), plan_only=True), 1, str(config_json), groups)
            r = max(plan.ranks, key=lambda x: x.total)
            got = measured.get(spec.name)
            print(f"| {spec.name} | {r.weights / _GIB:.2f} | {r.gradients / _GIB:.2f} | {r.optimizer / _GIB:.2f} | "
                  f"{r.activations / _GIB:.2f} | {r.total / _GIB:.2f} | "
                  + (f"{got:.2f} | {got / (r.total / _GIB):.3f} |" if got else "n/a | |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
