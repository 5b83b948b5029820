"""`llamapro study`: post-pretraining strategies compared on one model, the same data and the same budget.

Every strategy starts from the same converted checkpoint and trains through the real trainer (`llamapro train`)
on the same tokens in the same order (per seed), sequence length, batch, schedule and learning rate; every result is
evaluated on the same held-out text per domain. Strategies: LLaMA Pro with the interleaved plan (--groups) and the
paper's placement ablations (all new blocks on top, at the bottom, or at --positions); full fine-tuning of the
original model; fine-tuning only its top K layers, with K the number of new blocks (the same trainable count).

The data: training text is drawn across each corpus (documents in the order of a stable hash, not file order,
each cut to --train-chars / 64 characters) up to --train-chars per domain; held-out text is drawn the same way
from documents that are never trained on (the default corpora split by document; given files are refused if they
share a document). In-domain sets are the domains trained on, retained sets the others.

Stages are cached in --workdir like the quickstart's: a second run prints the table at once, and a changed
setting reruns only what depends on it (another --steps retrains and re-evaluates, but does not convert or expand
again; --seeds 3 after --seeds 2 runs the third seed only). The Megatron stages run in one launch of 2 ranks
(pipeline-parallel) on CPU, GPU ranks when there are GPUs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from llamapro_megatron.errors import UserError
from llamapro_megatron.stagecache import Graph, StageCache, mute_library_chatter, run_in_world, write_jsonl

# name -> what the row is (the table's legend and --help)
STRATEGIES = {
    "llamapro": "LLaMA Pro: one new block after each of --groups groups (the paper's plan); only new blocks train",
    "llamapro-top": "LLaMA Pro with the --groups new blocks all on top (copies of the last block)",
    "llamapro-bottom": "LLaMA Pro with the --groups new blocks all at the bottom (copies of the first block)",
    "llamapro-at": "LLaMA Pro with new blocks at --positions (indices in the expanded model)",
    "full": "full fine-tuning of the original model (no expansion; every parameter trains)",
    "top-k": "fine-tuning only the top K original layers, K = --groups (LLaMA Pro's trainable count)",
    "lora": "LoRA with Hugging Face peft on transformers (outside megatron-core): adapters on every attention and "
            "MLP projection, rank matched to LLaMA Pro's trainable count",
}
DEFAULT_STRATEGIES = ("llamapro", "llamapro-top", "llamapro-bottom", "full", "top-k", "lora")
DEFAULT_TRAIN = ("code", "math")
DEFAULT_HELDOUT = ("code", "math", "general")
HELDOUT_DOC_CHARS = 1500  # many short excerpts rather than a few long files: held-out text that covers the domain
# A training document gives at most its first train_chars / 64 characters (2000 at least), so the budget spans at
# least 64 documents: one long source file must not be a domain's whole training text.
TRAIN_DOCS_AT_LEAST, TRAIN_DOC_MIN_CHARS = 64, 2000


@dataclass
class Settings:
    workdir: str
    hf_dir: str | None = None  # None: SmolLM2-135M-Instruct, fetched with the real corpora
    train: dict[str, str] = field(default_factory=dict)  # domain -> .jsonl; empty: the real code and math corpora
    heldout: dict[str, str] = field(default_factory=dict)  # domain -> .jsonl; empty: real code, math, general
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    groups: int = 6
    positions: tuple[int, ...] = ()
    steps: int = 12
    seeds: int = 2
    seq_length: int = 256
    global_batch_size: int = 8
    micro_batch_size: int = 1
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup: int = 2
    heldout_tokens: int = 2000  # per domain
    train_chars: int = 400_000  # per training domain
    nproc: int = 2
    progress: bool = True

    @property
    def tokens_trained(self) -> int:
        return self.steps * self.global_batch_size * self.seq_length

    def train_key(self) -> dict:
        return {k: getattr(self, k) for k in ("steps", "seq_length", "global_batch_size", "micro_batch_size", "lr",
                                               "min_lr", "warmup")}


def expands(strategy: str) -> bool:
    return strategy.startswith("llamapro")


def runs(settings: Settings) -> list[tuple[str, int]]:
    return [(s, seed) for s in settings.strategies for seed in range(1, settings.seeds + 1)]


def build_graph(settings: Settings) -> Graph:
    """Every stage of this study: (its key, the stages it reads), in run order."""
    data_key = {"train": settings.train, "heldout": settings.heldout, "train_chars": settings.train_chars}
    g: Graph = {
        "fetch": ({"hf_dir": settings.hf_dir}, ()),
        "data": (data_key, ("fetch",)),
        "convert": ({"nproc": settings.nproc}, ("fetch",)),
        "eval:base": ({"heldout_tokens": settings.heldout_tokens, "seq_length": settings.seq_length},
                      ("convert", "data")),
    }
    for s in settings.strategies:
        if expands(s):
            g[f"expand:{s}"] = ({"plan": plan_key(settings, s)}, ("convert",))
    for s, seed in runs(settings):
        source = f"expand:{s}" if expands(s) else "fetch" if s == "lora" else "convert"
        g[f"train:{s}:{seed}"] = ({**settings.train_key(), "seed": seed, "strategy": plan_key(settings, s)},
                                  (source, "data"))
        g[f"eval:{s}:{seed}"] = (g["eval:base"][0], (f"train:{s}:{seed}", "data"))
    return g


def plan_key(settings: Settings, strategy: str) -> dict:
    """What defines a strategy's model: the expansion plan, or which original layers train."""
    if strategy == "llamapro-at":
        return {"positions": list(settings.positions)}
    if strategy in ("llamapro", "llamapro-top", "llamapro-bottom", "top-k", "lora"):
        return {"strategy": strategy, "groups": settings.groups}
    return {"strategy": strategy}


def expansion_plan(settings: Settings, strategy: str, num_layers: int):
    from llamapro_megatron.expansion import at_positions, interleave, placement

    if strategy == "llamapro":
        return interleave(num_layers, settings.groups)
    if strategy == "llamapro-at":
        return at_positions(num_layers, list(settings.positions))
    return placement(num_layers, strategy.removeprefix("llamapro-"), settings.groups)


def run_args(settings: Settings, cache: StageCache, data: dict, seed: int) -> list[str]:
    """The trainer flags every run shares: data (and its order, by seed), batch and schedule."""
    blend = [x for d in data["train_domains"] for x in ("1", data["prefixes"][d])]
    return ["--data-path", *blend, "--split", "100,0,0", "--data-cache-path", str(cache.path("data") / "cache"),
            "--seq-length", str(settings.seq_length), "--micro-batch-size", str(settings.micro_batch_size),
            "--global-batch-size", str(settings.global_batch_size), "--train-iters", str(settings.steps),
            "--lr", str(settings.lr), "--min-lr", str(settings.min_lr),
            "--lr-warmup-iters", str(min(settings.warmup, settings.steps // 4)),
            "--lr-decay-style", "cosine", "--weight-decay", "0.0", "--clip-grad", "1.0", "--eval-iters", "0",
            "--log-interval", "1", "--seed", str(seed)]


def freeze_args(settings: Settings, strategy: str, num_layers: int) -> list[str]:
    if expands(strategy):
        return ["--freeze", "llamapro"]
    if strategy == "full":
        return ["--freeze", "none"]
    return ["--freeze", "layers", "--trainable-layers", *map(str, range(num_layers - settings.groups, num_layers))]


# ------------------------------------------------------------------ data
def _log(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def _header(graph: Graph, stage: str, what: str) -> None:
    _log(f"\n=== [{list(graph).index(stage) + 1}/{len(graph)}] {stage}: {what}")


def spread_order(texts: list[str]) -> list[str]:
    """Documents in the order of a stable hash of their text: a prefix of it is drawn across the whole corpus."""
    return sorted(texts, key=lambda t: hashlib.sha256(t.encode()).digest())


def read_texts(path: str | Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}, line {n}: expected a JSON object with a \"text\" field") from e
            if text.strip():
                texts.append(text)
    if not texts:
        raise UserError(f"{path}: no documents")
    return texts


def _fetch(settings: Settings, cache: StageCache, graph: Graph) -> dict:
    from llamapro_megatron import artifacts

    need_corpora = not settings.train or not settings.heldout
    _header(graph, "fetch", ("the model" if settings.hf_dir is None else "") +
            (" and the real corpora (code: Python stdlib, math: CHAMP, general: botchan)" if need_corpora else ""))
    hf = Path(settings.hf_dir) if settings.hf_dir else artifacts.smollm2_hf_dir()
    if need_corpora:
        from llamapro_megatron.data.corpora import build

        corpora = cache.path("corpora")
        shutil.rmtree(corpora, ignore_errors=True)
        build(corpora, artifacts.champ(), artifacts.botchan(), None)
    return {"hf_dir": str(hf.resolve())}


def data_files(settings: Settings, cache: StageCache) -> tuple[dict[str, Path], dict[str, Path]]:
    corpora = cache.path("corpora")
    train = {d: Path(p) for d, p in settings.train.items()} or {d: corpora / d / "train.jsonl" for d in DEFAULT_TRAIN}
    heldout = ({d: Path(p) for d, p in settings.heldout.items()}
               or {d: corpora / d / "heldout.jsonl" for d in DEFAULT_HELDOUT})
    return train, heldout


def _data(settings: Settings, cache: StageCache, graph: Graph, hf_dir: str) -> dict:
    from llamapro_megatron.data.preprocess import preprocess

    _header(graph, "data", "held-out sets and tokenized training data, drawn across each corpus")
    train, heldout = data_files(settings, cache)
    data = cache.path("data")
    data.mkdir(parents=True, exist_ok=True)
    heldout_docs = {d: read_texts(p) for d, p in heldout.items()}
    seen = {hashlib.sha256(t.encode()).digest(): d for d, texts in heldout_docs.items() for t in texts}
    for domain, texts in heldout_docs.items():
        write_jsonl(data / f"heldout_{domain}.jsonl", [t[:HELDOUT_DOC_CHARS] for t in spread_order(texts)])
    prefixes, counts = {}, {}
    for domain, path in train.items():
        texts = read_texts(path)
        shared = [seen[h] for h in (hashlib.sha256(t.encode()).digest() for t in texts) if h in seen]
        if shared:
            raise UserError(f"--train {domain}={path}: {len(shared)} of its documents are also in the held-out "
                            f"set of {sorted(set(shared))}; held-out text must not be trained on")
        chosen, size = [], 0
        cap = max(TRAIN_DOC_MIN_CHARS, settings.train_chars // TRAIN_DOCS_AT_LEAST)
        for text in spread_order(texts):
            chosen.append(text[:cap])
            size += len(chosen[-1])
            if size >= settings.train_chars:
                break
        write_jsonl(data / f"train_{domain}.jsonl", chosen)
        stats = preprocess([data / f"train_{domain}.jsonl"], hf_dir, data / f"train_{domain}", append_eod=True,
                           progress=settings.progress, log=_log)
        prefixes[domain] = stats.outputs["text"]
        counts[domain] = {"documents": len(chosen), "of": len(texts), "characters": size}
        _log(f"  {domain}: {len(chosen)} of {len(texts)} documents, {size:,} characters")
    return {"prefixes": prefixes, "train_domains": list(train), "heldout_domains": list(heldout),
            "counts": counts}


# ------------------------------------------------------------- the launch
def _world(settings: Settings, todo: list[str], hf_dir: str, data: dict, num_layers: int) -> dict:
    """Every Megatron stage, on each rank of one launch; rank 0 writes the markers."""
    import torch.distributed as dist

    cache = StageCache(settings.workdir)
    graph = build_graph(settings)

    def run(stage: str) -> dict:
        pp = dist.get_world_size()
        kind, _, rest = stage.partition(":")
        if kind == "convert":
            return _convert(settings, cache, graph, hf_dir, pp)
        if kind == "expand":
            return _expand(settings, cache, graph, rest, num_layers, pp)
        if kind == "train":
            strategy, seed = rest.rsplit(":", 1)
            return _train(settings, cache, graph, strategy, int(seed), data, num_layers, pp)
        return _evaluate(settings, cache, graph, stage, data, pp)

    run_in_world(cache, graph, todo, run)
    return {}


def checkpoint_dir(cache: StageCache, stage: str) -> Path:
    """Where a stage's checkpoint goes: base, expanded-STRATEGY, trained-STRATEGY-seedN."""
    kind, _, rest = stage.partition(":")
    if kind == "convert" or stage == "eval:base":
        return cache.path("checkpoints") / "base"
    if kind == "expand":
        return cache.path("checkpoints") / f"expanded-{rest}"
    strategy, seed = rest.rsplit(":", 1)
    return cache.path("checkpoints") / f"trained-{strategy}-seed{seed}"


def _convert(settings: Settings, cache: StageCache, graph: Graph, hf_dir: str, pp: int) -> dict:
    from llamapro_megatron.checkpoint.convert import hf_to_mcore

    _header(graph, "convert", f"Hugging Face -> Megatron torch_dist at PP={pp}")
    hf_to_mcore(hf_dir, checkpoint_dir(cache, "convert"), pp=pp, overwrite=True, progress=settings.progress)
    return {}


def _expand(settings: Settings, cache: StageCache, graph: Graph, strategy: str, num_layers: int, pp: int) -> dict:
    from llamapro_megatron.checkpoint.expand import expand_mcore

    plan = expansion_plan(settings, strategy, num_layers)
    new = [i for i in range(plan.num_layers) if plan.is_new(i)]
    _header(graph, f"expand:{strategy}", f"{num_layers} -> {plan.num_layers} blocks, new at {new}")
    expand_mcore(checkpoint_dir(cache, "convert"), checkpoint_dir(cache, f"expand:{strategy}"),
                 lambda n: expansion_plan(settings, strategy, n), pp=pp, overwrite=True, progress=settings.progress)
    return {"new_layers": new}


def _train(settings: Settings, cache: StageCache, graph: Graph, strategy: str, seed: int, data: dict,
           num_layers: int, pp: int) -> dict:
    import torch.distributed as dist

    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    stage = f"train:{strategy}:{seed}"
    _header(graph, stage, f"{STRATEGIES[strategy]}; seed {seed}, {settings.steps} steps x "
            f"{settings.global_batch_size} x {settings.seq_length} = {settings.tokens_trained:,} tokens")
    save = checkpoint_dir(cache, stage)
    if dist.get_rank() == 0:
        shutil.rmtree(save, ignore_errors=True)  # no marker: whatever is there is unfinished
    dist.barrier()
    load = checkpoint_dir(cache, f"expand:{strategy}" if expands(strategy) else "convert")
    result = train(config_from_argv([
        "--load", str(load), "--save", str(save), "--pipeline-model-parallel-size", str(pp),
        *run_args(settings, cache, data, seed), *freeze_args(settings, strategy, num_layers)]))
    counts = result.parameter_counts
    return {"losses": {str(k): v for k, v in result.losses.items()}, "trainable": counts["trainable"],
            "total": counts["trainable"] + counts["frozen"]}


def _evaluate(settings: Settings, cache: StageCache, graph: Graph, stage: str, data: dict, pp: int) -> dict:
    from llamapro_megatron.evaluate import evaluate

    _header(graph, stage, "held-out perplexity per domain")
    files = {d: str(cache.path("data") / f"heldout_{d}.jsonl") for d in data["heldout_domains"]}
    source = checkpoint_dir(cache, stage)
    results = evaluate(files, load=source, pp=pp, seq_length=settings.seq_length, max_tokens=settings.heldout_tokens,
                       micro_batch_size=2, progress=settings.progress)
    return {r.domain: {"tokens": r.tokens, "loss": r.loss} for r in results}


def is_lora(stage: str) -> bool:
    return stage.split(":")[1:2] == ["lora"]


def _lora_world(settings: Settings, todo: list[str], hf_dir: str) -> dict:
    """The LoRA stages in one process; a world of 1 (gloo) because megatron-core's dataset builder asks for a rank."""
    cache = StageCache(settings.workdir)
    graph = build_graph(settings)
    if not settings.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    run_in_world(cache, graph, todo, lambda stage: _lora_stage(settings, cache, graph, stage, hf_dir), backend="gloo")
    return {}


def _lora_stage(settings: Settings, cache: StageCache, graph: Graph, stage: str, hf_dir: str) -> dict:
    from llamapro_megatron import study_lora

    kind, _, seed = stage.split(":")
    out = checkpoint_dir(cache, stage)
    data = cache.read("data")["result"]
    if kind == "train":
        target = settings.groups * study_lora.block_parameters(hf_dir)
        _header(graph, stage, f"{STRATEGIES['lora']}; seed {seed}, {settings.steps} steps x "
                f"{settings.global_batch_size} x {settings.seq_length} = {settings.tokens_trained:,} tokens")
        argv = ["--load", str(checkpoint_dir(cache, "convert")), *run_args(settings, cache, data, int(seed))]
        return study_lora.train_lora(settings, argv, hf_dir, out, int(seed), target)
    _header(graph, stage, "held-out perplexity per domain (the base model with the adapters, in peft)")
    files = {d: str(cache.path("data") / f"heldout_{d}.jsonl") for d in data["heldout_domains"]}
    return study_lora.evaluate_lora(hf_dir, out, files, settings)


# ------------------------------------------------------------------- API
def num_layers_of(hf_dir: str | Path) -> int:
    from llamapro_megatron.arch import LlamaArch

    return LlamaArch.from_hf_dir(hf_dir).num_layers


def validate(settings: Settings) -> None:
    if not settings.strategies:
        raise UserError("--strategies: give at least one strategy")
    unknown = [s for s in settings.strategies if s not in STRATEGIES]
    if unknown:
        raise UserError(f"--strategies {','.join(unknown)}: unknown; choose from {', '.join(STRATEGIES)}")
    if len(set(settings.strategies)) != len(settings.strategies):
        raise UserError(f"--strategies {','.join(settings.strategies)}: a strategy is named twice")
    if ("llamapro-at" in settings.strategies) != bool(settings.positions):
        raise UserError("--positions goes with the llamapro-at strategy (give both or neither)")
    for name, value in (("--steps", settings.steps), ("--seeds", settings.seeds), ("--groups", settings.groups),
                        ("--heldout-tokens", settings.heldout_tokens), ("--train-chars", settings.train_chars)):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    for flag, files in (("--train", settings.train), ("--heldout", settings.heldout)):
        for domain, path in files.items():
            if not Path(path).is_file():
                raise UserError(f"{flag} {domain}={path}: no such file")
    if bool(settings.train) != bool(settings.heldout):
        raise UserError("give --train and --heldout together (or neither, for the real code/math/general corpora)")


def require_extra(strategies) -> None:
    """The picture needs matplotlib and the LoRA row peft: the [study] extra, refused before any work starts."""
    import importlib.util

    missing = [m for m in ("matplotlib", *(("peft",) if "lora" in strategies else ()))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"llamapro study needs {' and '.join(missing)}: pip install 'llamapro-megatron[study]' "
                        "(or pip install " + " ".join(missing) + ")")


def study(settings: Settings) -> dict:
    """Run (or resume) the study; returns the summary (also in WORKDIR/summary.json)."""
    import torch

    from llamapro_megatron.runtime.launch import WorkerError, run_workers

    t_start = time.time()
    mute_library_chatter()
    validate(settings)
    require_extra(settings.strategies)
    if settings.hf_dir is not None and not (Path(settings.hf_dir) / "config.json").is_file():
        raise UserError(f"--hf-dir {settings.hf_dir}: no config.json there (a Hugging Face model directory)")
    if torch.cuda.is_available():
        settings.nproc = min(2, torch.cuda.device_count())
    cache = StageCache(settings.workdir)
    cache.root.mkdir(parents=True, exist_ok=True)
    graph = build_graph(settings)
    todo = cache.todo(graph)
    skipped = [s for s in graph if s not in todo]
    if skipped:
        _log(f"cached in {cache.root}: {len(skipped)} of {len(graph)} stages (skipped)")
    if "fetch" in todo:
        t0 = time.time()
        cache.record(graph, "fetch", time.time() - t0, _fetch(settings, cache, graph))
    hf_dir = cache.read("fetch")["result"]["hf_dir"]
    num_layers = num_layers_of(hf_dir)
    for s in settings.strategies:  # refuse a plan the model cannot take before any rank starts
        if expands(s):
            expansion_plan(settings, s, num_layers)
    if "top-k" in settings.strategies and settings.groups > num_layers:
        raise UserError(f"--groups {settings.groups}: top-k would train more layers than the model's {num_layers}")
    if "data" in todo:
        t0 = time.time()
        cache.record(graph, "data", time.time() - t0, _data(settings, cache, graph, hf_dir))
    world_todo = [s for s in todo if s not in ("fetch", "data") and not is_lora(s)]
    if world_todo:
        _log(f"\nstarting {settings.nproc} ranks for {len(world_todo)} stages")
        try:
            run_workers(_world, settings.nproc, args=(settings, world_todo, hf_dir, cache.read("data")["result"],
                                                      num_layers))
        except WorkerError as e:
            lines = (e.remote_traceback or str(e)).strip().splitlines()
            raise UserError(f"study failed on rank {e.rank}: {lines[-1] if lines else e} (finished stages stay "
                            f"cached in {cache.root}; rerun to continue)") from e
    lora_todo = [s for s in todo if is_lora(s)]
    if lora_todo:
        _log("\nstarting 1 process for the LoRA stages (transformers + peft)")
        try:
            run_workers(_lora_world, 1, args=(settings, lora_todo, hf_dir))
        except WorkerError as e:
            lines = (e.remote_traceback or str(e)).strip().splitlines()
            raise UserError(f"study failed in the LoRA run: {lines[-1] if lines else e} (finished stages stay "
                            f"cached in {cache.root}; rerun to continue)") from e
    summary = summarize(settings, cache, graph, skipped, hf_dir, num_layers, time.time() - t_start)
    (cache.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(settings: Settings, cache: StageCache, graph: Graph, skipped: list[str], hf_dir: str, num_layers: int,
              seconds: float) -> dict:
    """Everything the table and the picture show, from the stage markers."""
    data = cache.read("data")["result"]
    rows: dict[str, list[dict]] = {}
    for strategy, seed in runs(settings):
        train, ev = cache.read(f"train:{strategy}:{seed}"), cache.read(f"eval:{strategy}:{seed}")
        rows.setdefault(strategy, []).append({
            "seed": seed, "trainable": train["result"]["trainable"], "total": train["result"]["total"],
            "train_seconds": train["seconds"], "losses": train["result"]["losses"], "eval": ev["result"],
            **{k: train["result"][k] for k in ("rank", "of_llamapro") if k in train["result"]}})
    return {
        "model": hf_dir, "num_layers": num_layers, "groups": settings.groups, "seeds": settings.seeds,
        "steps": settings.steps, "global_batch_size": settings.global_batch_size, "seq_length": settings.seq_length,
        "tokens_trained": settings.tokens_trained, "lr": settings.lr,
        "in_domain": data["train_domains"], "retained": [d for d in data["heldout_domains"]
                                                         if d not in data["train_domains"]],
        "heldout_domains": data["heldout_domains"], "train_data": data["counts"],
        "base": cache.read("eval:base")["result"], "strategies": rows,
        "stages": {s: {"seconds": cache.read(s)["seconds"], "cached": s in skipped} for s in graph},
        "seconds_this_run": seconds,
    }


def register(sub) -> None:
    p = sub.add_parser("study", help="compare LLaMA Pro with full fine-tuning, top-K tuning and placements on your "
                       "model and data: one table and one picture",
                       description=" ".join(__doc__.split("\n\n")[1:4]).replace("\n", " "))
    p.add_argument("--workdir", default="llamapro-study",
                   help="where data, checkpoints, stage markers, summary.json and study.png go (default "
                   "%(default)s); a rerun skips the stages finished there")
    p.add_argument("--hf-dir", default=None, help="the base model, a Hugging Face LLaMA-family directory (default: "
                   "SmolLM2-135M-Instruct, fetched)")
    p.add_argument("--train", action="append", metavar="DOMAIN=FILE.jsonl",
                   help="a training corpus (repeat per domain; {\"text\": ...} per line); default: the real code "
                   "and math corpora")
    p.add_argument("--heldout", action="append", metavar="DOMAIN=FILE.jsonl",
                   help="a held-out set (repeat per domain): domains also in --train are in-domain, the others "
                   "retained; default: real code, math and general text")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help="comma-separated, from: " + "; ".join(f"{k}: {v}" for k, v in STRATEGIES.items())
                   + " (default %(default)s)")
    p.add_argument("--groups", type=int, default=Settings.groups,
                   help="new blocks: one after each of N groups (llamapro), N on top or at the bottom, and K = N "
                   "for top-k (default %(default)s)")
    p.add_argument("--positions", default=None, help="llamapro-at: new blocks' indices in the expanded model, "
                   "comma-separated")
    p.add_argument("--steps", type=int, default=Settings.steps, help="training steps per strategy and seed "
                   "(default %(default)s)")
    p.add_argument("--seeds", type=int, default=Settings.seeds,
                   help="runs per strategy (seeds 1..N: the data order changes); with 2 or more the table shows "
                   "each figure's spread and marks differences within it as not significant (default %(default)s)")
    p.add_argument("--seq-length", type=int, default=Settings.seq_length, help="default %(default)s")
    p.add_argument("--global-batch-size", type=int, default=Settings.global_batch_size, help="default %(default)s")
    p.add_argument("--lr", type=float, default=Settings.lr, help="peak learning rate, every strategy "
                   "(default %(default)s; cosine to lr/10)")
    p.add_argument("--heldout-tokens", type=int, default=Settings.heldout_tokens,
                   help="tokens per held-out domain (default %(default)s)")
    p.add_argument("--train-chars", type=int, default=Settings.train_chars,
                   help="characters of training text per domain (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from llamapro_megatron.evaluate import parse_data_args
    from llamapro_megatron.study_report import format_table, plot

    positions: tuple[int, ...] = ()
    if args.positions:
        try:
            positions = tuple(int(p) for p in args.positions.replace(",", " ").split())
        except ValueError as e:
            raise UserError(f"--positions {args.positions!r}: expected comma-separated integers") from e
    settings = Settings(workdir=args.workdir, hf_dir=args.hf_dir, train=parse_data_args(args.train or [], "--train"),
                        heldout=parse_data_args(args.heldout or [], "--heldout"),
                        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
                        groups=args.groups, positions=positions, steps=args.steps, seeds=args.seeds,
                        seq_length=args.seq_length, global_batch_size=args.global_batch_size, lr=args.lr,
                        min_lr=args.lr / 10, heldout_tokens=args.heldout_tokens, train_chars=args.train_chars,
                        progress=args.progress)
    summary = study(settings)
    picture = plot(summary, Path(settings.workdir) / "study.png")
    print("\n" + format_table(summary) + f"\npicture: {picture}")
    return 0

