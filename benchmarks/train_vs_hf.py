"""LLaMA Pro training throughput: llamapro's trainer (megatron-core) against Hugging Face transformers + torch AdamW,
the same expanded model with the same frozen blocks, in the same run.

    # CPU (this machine): SmolLM2-135M expanded 30 -> 36 blocks, fp32, micro batch 2 x seq 256
    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/train_vs_hf.py
    # CUDA: a random ~1B LLaMA (16 -> 20 blocks, hidden 2048, FFN 5632, 32 heads / 4 KV groups, vocab 32000),
    # bf16, micro batch 4 x seq 4096, TE spec if Transformer Engine imports, else the sdpa spec (printed)
    PYTHONPATH=. python benchmarks/train_vs_hf.py --device cuda --bf16

Both sides start from the same weights: the HF model is converted to Megatron, expanded (`--groups` identity
copies), and the expanded checkpoint exported back to HF, so (a) and (b) train one and the same model. Only the
new blocks train (LLaMA Pro): embeddings, output layer, final norm and every original block are frozen.

  (a) llamapro  `llamapro_megatron.training.trainer.train` with --freeze llamapro, mock data, global batch =
                micro batch (no accumulation), one rank; megatron-core's optimizer (torch AdamW without TE/Apex).
  (b) HF        `AutoModelForCausalLM` (attn_implementation="sdpa"), requires_grad False on everything but the
                new blocks, `torch.optim.AdamW` over those (weight decay on matrices only, as megatron), clip 1.0;
                with --bf16 bf16 autocast over fp32 weights (the HF Trainer's --bf16; `--hf-precision bf16` for
                bf16 weights instead). Random tokens, the same batch shape; the loss is read each step.

Same lr, betas, eps, weight decay and clipping on both sides. Each side runs `--warmup` + `--steps` steps; the
warm-up steps are dropped and the median step time taken; the pair is repeated `--repeats` times in alternating
order (a b, b a, ...) and the median over repeats reported, with the median of the per-repeat ratios. Each side of
each repeat runs in a fresh spawned process: peak RSS is that process's ru_maxrss (torch, and for (a) megatron-core,
imports included), and neither side inherits the other's allocator or parallel state.

FLOPs per token (training/metrics.py, the same count for both sides): "counted" = what a LLaMA Pro step computes
(forward everywhere; input gradients from the lowest new block up; weight gradients of the new blocks only);
"6N" = the conventional 6 x all parameters, as if everything trained. MFU = TFLOP/s / the device's bf16 dense peak
(H100/H200 989 TFLOP/s; `--peak-tflops` to set one, e.g. for a CPU).

On the workplace's GPU machine (no megatron-core there, no network; see /work/.library/device/README.md), from
the repository root here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl megatron-core==0.16.1

then the device tool's `run` with carry [".whl"] and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 benchmarks/train_vs_hf.py --device cuda --bf16

(its other dependencies - torch, transformers, safetensors, numpy - are on that machine; Transformer Engine is
not: without it the sdpa spec runs; BENCHMARKS.md, "Seventh session", says how TE 2.20 was carried and built there).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import add_model_shape_args, make_random_llama  # noqa: E402  (benchmarks/: no package)

CUDA_DEFAULTS = dict(layers=16, groups=4, micro_batch_size=4, seq_length=4096, warmup=3, steps=10)
CPU_DEFAULTS = dict(groups=6, micro_batch_size=2, seq_length=256, warmup=1, steps=3)
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


@dataclass
class Side:
    seconds: list[float]  # per step, warm-up excluded
    cpu_seconds: list[float]  # the same steps' process CPU time (all threads): what load on a shared box inflates less
    first_loss: float
    peak_bytes: int | None = None  # CUDA only: torch.cuda.max_memory_allocated
    peak_rss: int = 0  # the side's own process (imports, model, optimizer, activations): ru_maxrss
    losses: list[float] = field(default_factory=list)  # every step's, warm-up included
    peak_reserved: int | None = None  # CUDA only: torch.cuda.max_memory_reserved (the allocator's pool)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=["smollm2", "random"], default=None,
                    help="smollm2: SmolLM2-135M (real weights; the CPU default); random: a random LLaMA of the shape "
                    "flags (the CUDA default)")
    ap.add_argument("--hf-dir", default=None, help="any LLaMA-family HF directory instead of --model")
    add_model_shape_args(ap)
    ap.set_defaults(layers=None)
    ap.add_argument("--groups", type=int, default=None, help="expansion: one identity copy after each of N groups")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--seq-length", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps dropped from each side's timing")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spec", default="auto", help="llamapro's layer spec (auto: te if usable, else sdpa)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 training (llamapro --bf16; HF per --hf-precision); CUDA only, CPU runs fp32")
    ap.add_argument("--hf-precision", choices=["autocast", "bf16"], default="autocast",
                    help="CUDA only: HF weights fp32 under bf16 autocast, or bf16 weights")
    ap.add_argument("--no-bias-swiglu-fusion", action="store_true",
                    help="llamapro: separate torch ops for SwiGLU instead of the fused kernel (CUDA default)")
    ap.add_argument("--no-rope-fusion", action="store_true",
                    help="llamapro: megatron-core's unfused RoPE instead of the compiled one (CUDA default)")
    ap.add_argument("--cross-entropy-loss-fusion", action=argparse.BooleanOptionalAction, default=None,
                    help="llamapro: megatron-core's fused (compiled) cross-entropy for the loss (CUDA default) or, "
                         "with --no-..., its separate fp32 ops")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: run only the llamapro side once under torch.profiler and print its top GPU kernels")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    ap.add_argument("--workdir", default=None, help="keep the prepared models here and reuse them when present "
                    "(default: a temporary directory, removed)")
    args = ap.parse_args(argv)
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.bf16 and args.device != "cuda":
        ap.error("--bf16 needs --device cuda (the CPU comparison is fp32)")
    if args.profile and args.device != "cuda":
        ap.error("--profile reads GPU kernels: it needs --device cuda")
    args.layers = args.layers or 24  # the shape flags' default
    if args.model is None:
        args.model = "random" if args.device == "cuda" else "smollm2"
    return args


def prepare_models(args, work: Path):
    """(expanded Megatron checkpoint, the same exported to HF, expansion plan)."""
    from llamapro_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave

    if args.hf_dir:
        hf = Path(args.hf_dir)
    elif args.model == "smollm2":
        from llamapro_megatron.artifacts import smollm2_hf_dir

        hf = Path(smollm2_hf_dir())
    else:
        hf = work / "hf"
        if not (hf / "config.json").exists():  # written last: its presence means a complete model
            shutil.rmtree(hf, ignore_errors=True)
            print(f"writing a random LLaMA ({args.layers} layers, hidden {args.hidden}) to {hf}", flush=True)
            make_random_llama(hf, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab,
                              getattr(torch, args.dtype))
    plans = {}

    def plan_fn(n: int):
        plans["plan"] = interleave(n, args.groups)
        return plans["plan"]

    if (work / "pro_hf" / "config.json").exists():
        from llamapro_megatron.checkpoint.mcore import read_meta, resolve_checkpoint

        print(f"reusing the prepared models in {work}", flush=True)
        return work / "pro", work / "pro_hf", plan_fn(read_meta(resolve_checkpoint(work / "base")).arch.num_layers)
    print("converting, expanding and exporting the model (untimed)", flush=True)
    # overwrite: a kept --workdir may hold an interrupted earlier preparation
    hf_to_mcore(hf, work / "base", progress=False, workers=1, overwrite=True)
    expand_mcore(work / "base", work / "pro", plan_fn, progress=False, workers=1, overwrite=True)
    mcore_to_hf(work / "pro", work / "pro_hf", progress=False, workers=1, overwrite=True)
    return work / "pro", work / "pro_hf", plans["plan"]


def run_llamapro(pro: Path, args) -> Side:
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    argv = ["--load", str(pro), "--mock-data", "--freeze", "llamapro", "--spec", args.spec,
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.micro_batch_size),
            "--seq-length", str(args.seq_length), "--train-iters", str(args.warmup + args.steps),
            "--lr", str(LR), "--min-lr", str(LR), "--lr-decay-style", "constant", "--adam-beta1", str(BETAS[0]),
            "--adam-beta2", str(BETAS[1]), "--adam-eps", str(EPS), "--weight-decay", str(WEIGHT_DECAY),
            "--clip-grad", str(CLIP), "--log-interval", str(args.warmup + args.steps), "--eval-iters", "0"]
    if args.bf16:
        argv.append("--bf16")
    if args.no_bias_swiglu_fusion:
        argv.append("--no-bias-swiglu-fusion")
    if args.no_rope_fusion:
        argv.append("--no-rope-fusion")
    if args.cross_entropy_loss_fusion is not None:
        argv.append(f"--{'' if args.cross_entropy_loss_fusion else 'no-'}cross-entropy-loss-fusion")
    argv += list(getattr(args, "extra_argv", ()))  # e.g. FP8 or recomputation flags (benchmarks/paper_scale.py)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu_at_step = []  # process CPU time when each step ends (on_step runs right after the step's timer)
    if args.profile:  # the timed steps' GPU kernels (the profiler slows the steps: no timing comparison then)
        from torch.profiler import ProfilerActivity, profile, schedule

        with profile(activities=[ProfilerActivity.CUDA], schedule=schedule(wait=args.warmup, warmup=0,
                                                                           active=args.steps)) as prof:
            result = train(config_from_argv(argv), on_step=lambda step, loss: prof.step())
        print(f"llamapro's GPU kernels over {args.steps} steps after {args.warmup} warm-up (self time, all steps):")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=90))
        return Side(result.seconds_per_step[args.warmup:], [0.0], result.losses[1], None)
    result = train(config_from_argv(argv), on_step=lambda step, loss: cpu_at_step.append(time.process_time()))
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    cpu = [b - a for a, b in zip(cpu_at_step, cpu_at_step[1:])][args.warmup - 1:] if args.warmup else []
    return Side(result.seconds_per_step[args.warmup:], cpu, result.losses[1], peak,
                losses=[result.losses[k] for k in sorted(result.losses)], peak_reserved=_reserved(args.device))


def run_hf(pro_hf: Path, new_layers: tuple[int, ...], args) -> Side:
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    weights = torch.bfloat16 if args.bf16 and args.hf_precision == "bf16" else torch.float32
    if any(pro_hf.glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(pro_hf, dtype=weights, attn_implementation="sdpa").to(device)
    else:  # a config only (benchmarks/paper_scale.py at 8.3B): the same architecture, initialised on the device
        from transformers import AutoConfig

        with device:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pro_hf), dtype=weights,
                                                     attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    model.requires_grad_(False)
    for i in new_layers:  # LLaMA Pro: only the identity copies train
        model.model.layers[i].requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # norms: no decay
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 and weights == torch.float32
                else contextlib.nullcontext())
    g = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    seconds, cpu_seconds, losses = [], [], []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + args.steps):
        tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_length), generator=g).to(device)
        _sync(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        optimizer.step()
        value = loss.item()  # the trainer reads its loss every step too
        _sync(args.device)
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - c0)
        losses.append(value)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    del model, optimizer, trainable, groups
    return Side(seconds[args.warmup:], cpu_seconds[args.warmup:], losses[0], peak, losses=losses,
                peak_reserved=_reserved(args.device))


def _side_in_child(side: str, path: str, new_layers: tuple[int, ...], args) -> Side:
    # One fresh process per side and repeat: its peak RSS is that side's alone, and neither side inherits the
    # other's allocator state, threads or megatron parallel state.
    import resource

    run = run_llamapro(Path(path), args) if side == "llamapro" else run_hf(Path(path), new_layers, args)
    run.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return run


def run_side(side: str, path: Path, new_layers: tuple[int, ...], args) -> Side:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_side_in_child, side, str(path), new_layers, args).result()


def _reserved(device: str) -> int | None:
    return torch.cuda.max_memory_reserved() if device == "cuda" else None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False here")
    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.runtime import prepare, resolve_spec_kind
    from llamapro_megatron.training import metrics

    prepare()
    spec = resolve_spec_kind(args.spec)
    with contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory() as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        pro, pro_hf, plan = prepare_models(args, Path(tmp))
        arch = LlamaArch.from_hf_dir(pro_hf)
        if args.profile:
            run_side("llamapro", pro, tuple(plan.new_indices), args)
            return 0
        runs: dict[str, list[Side]] = {"llamapro": [], "hf": []}
        for r in range(args.repeats):
            order = ("llamapro", "hf") if r % 2 == 0 else ("hf", "llamapro")
            for side in order:
                print(f"repeat {r + 1}/{args.repeats}: {side} (load average {os.getloadavg()[0]:.1f})", flush=True)
                run = run_side(side, pro if side == "llamapro" else pro_hf, tuple(plan.new_indices), args)
                runs[side].append(run)
                print(f"  {side}: median {run.median:.3f} s/step over {len(run.seconds)} steps "
                      f"({run.cpu_median:.3f} CPU s), first loss {run.first_loss:.3f}, peak RSS "
                      f"{run.peak_rss / 2**30:.2f} GiB", flush=True)
    flops = metrics.flops_per_token(arch, arch.vocab_size, args.seq_length, set(plan.new_indices),
                                    train_embeddings=False, train_output=False, first_chunk_layers=arch.num_layers)
    peak = metrics.peak_tflops(args.peak_tflops) if args.device == "cuda" else args.peak_tflops
    report(args, spec, arch, plan, flops, peak, runs)
    return 0


def report(args, spec: str, arch, plan, flops, peak: float | None, runs: dict) -> None:
    tokens = args.micro_batch_size * args.seq_length
    medians = {side: statistics.median(s.median for s in sides) for side, sides in runs.items()}
    cpu_medians = {side: statistics.median(s.cpu_median for s in sides) for side, sides in runs.items()}
    ratio = statistics.median(h.median / m.median for m, h in zip(runs["llamapro"], runs["hf"]))
    cpu_ratio = statistics.median(h.cpu_median / m.cpu_median for m, h in zip(runs["llamapro"], runs["hf"]))
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    print(f"\ncommand: {threads}python {' '.join(sys.argv)}")
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        machine = f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    import transformers
    from megatron.core import __version__ as mcore_version

    print(f"machine: {machine}; Python {platform.python_version()}, torch {torch.__version__}, megatron-core "
          f"{mcore_version}, transformers {transformers.__version__}; load average {os.getloadavg()[0]:.1f}")
    dtype = "bf16" if args.bf16 else "fp32"
    hf_prec = {"autocast": "fp32 weights + bf16 autocast", "bf16": "bf16 weights"}[args.hf_precision] \
        if args.bf16 else "fp32"
    kernels = ("" if args.device != "cuda" else (", unfused SwiGLU" if args.no_bias_swiglu_fusion
               else ", fused SwiGLU") + (", unfused RoPE" if args.no_rope_fusion else ", fused RoPE")
               + (", unfused cross-entropy" if args.cross_entropy_loss_fusion is False else ", fused cross-entropy"))
    if spec == "sdpa" and args.device == "cuda":  # which SDPA kernels the llamapro side was steered to
        kernels += f", LLAMAPRO_SDPA_BACKEND={os.environ.get('LLAMAPRO_SDPA_BACKEND', 'auto')}"

    print(f"model: {arch.num_layers} blocks ({plan.source_num_layers} + {len(plan.new_indices)} new at "
          f"{list(plan.new_indices)}), hidden {arch.hidden_size}, {flops.num_parameters / 1e6:,.1f}M parameters; "
          f"micro batch {args.micro_batch_size} x seq {args.seq_length}; llamapro: spec {spec}, {dtype}{kernels}; HF: "
          f"sdpa attention, {hf_prec}; medians of {args.steps} steps after {args.warmup} warm-up, "
          f"{args.repeats} repeats")
    print(f"FLOPs/token: counted {flops.per_token / 1e9:.3f} G, 6N {flops.six_n_per_token / 1e9:.3f} G")
    gpu = args.device == "cuda"
    print("per repeat, s/step (median of its steps): " + "; ".join(
        f"{side} " + ", ".join(f"{s.median:.3f} ({s.cpu_median:.3f} CPU)" for s in sides)
        for side, sides in runs.items()))
    print(f"| run | s/step | CPU s/step | tokens/s | TFLOP/s counted | TFLOP/s 6N | MFU counted | MFU 6N | peak RSS |"
          f"{' peak GPU memory |' if gpu else ''}")
    print(f"|---|---:|---:|---:|---:|---:|---:|---:|---:|{'---:|' if gpu else ''}")
    for side, label in (("llamapro", f"llamapro (megatron-core, {spec} spec)"), ("hf", "HF transformers + AdamW")):
        tps = tokens / medians[side]
        counted, six_n = flops.per_token * tps / 1e12, flops.six_n_per_token * tps / 1e12
        mfu = (f"{100 * counted / peak:.1f}% | {100 * six_n / peak:.1f}%" if peak else "n/a | n/a")
        rss = statistics.median(s.peak_rss for s in runs[side]) / 2**30
        extra = f" {max(s.peak_bytes for s in runs[side]) / 2**30:.1f} GiB |" if gpu else ""
        print(f"| {label} | {medians[side]:.3f} | {cpu_medians[side]:.3f} | {tps:,.0f} | {counted:.4g} | "
              f"{six_n:.4g} | {mfu} | {rss:.2f} GiB |{extra}")
    print(f"| ratio llamapro / HF, speed (median of per-repeat ratios) | | {cpu_ratio:.2f}x | {ratio:.2f}x | | | | "
          f"| |{' |' if gpu else ''}")

if __name__ == "__main__":
    sys.exit(main())
