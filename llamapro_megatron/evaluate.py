"""`llamapro evaluate`: per-domain perplexity of a Megatron checkpoint (any TP/PP) or a Hugging Face directory.

Each domain's documents are tokenized with the model's own tokenizer (BOS when the tokenizer adds one, EOD after
each document), concatenated, and cut into windows of ``seq_length + 1`` tokens that overlap by one, so every
token after the first is predicted exactly once. The perplexity is exp of the mean token loss over all of them:
no sliding-window context tricks, and windows are identical on the Megatron and the Hugging Face paths, so the two
agree to float rounding. On Megatron, padded vocabulary rows (TP padding) are excluded from the softmax.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamapro_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

DEFAULT_SEQ_LENGTH = 512


@dataclass
class DomainResult:
    domain: str
    tokens: int  # predicted tokens
    loss: float  # mean token cross-entropy (nats)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


# ------------------------------------------------------------------ data
def parse_data_args(items: list[str], flag: str = "--data") -> dict[str, str]:
    """NAME=PATH pairs, in order; names unique."""
    data: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag} {item!r}: expected NAME=PATH, e.g. code=heldout/code.jsonl")
        if name in data:
            raise UserError(f"{flag} {item!r}: domain {name!r} given twice")
        data[name] = path
    return data


def _is_indexed_prefix(path: Path) -> bool:
    return Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file()


def read_documents(path: str | Path, json_key: str = "text") -> list[str]:
    """Documents of a text file (the whole file is one) or a .jsonl/.jsonl.gz file (one per line, `json_key`)."""
    from llamapro_megatron.data.readers import JSONL_SUFFIXES, _open_text

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path}: no such file (nor an indexed dataset prefix with .bin/.idx)")
    with _open_text(path) as f:
        if not path.name.lower().endswith(JSONL_SUFFIXES):
            return [f.read()]
        docs = []
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[json_key]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"--data {path}:{line_no}: not a JSON object with a {json_key!r} string "
                                "(set --json-key)") from None
            docs.append(str(value))
        return docs


def domain_tokens(path: str | Path, tokenizer, json_key: str = "text", max_tokens: int | None = None) -> list[int]:
    """The token stream of one domain: documents (or a preprocessed indexed dataset's documents, as stored)."""
    path = Path(path)
    limit = None if max_tokens is None else max_tokens + 1  # +1: the first token is context only
    stream: list[int] = []
    if _is_indexed_prefix(path):
        from llamapro_megatron.runtime import prepare

        prepare()
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(str(path))
        for i in range(len(dataset)):
            stream.extend(int(t) for t in dataset[i])
            if limit is not None and len(stream) >= limit:
                break
    else:
        bos = [tokenizer.bos] if tokenizer.add_bos_token and tokenizer.bos >= 0 else []
        eod = [tokenizer.eod] if tokenizer.eod >= 0 else []
        for doc in read_documents(path, json_key):
            stream.extend(bos + tokenizer.tokenize(doc) + eod)
            if limit is not None and len(stream) >= limit:
                break
    stream = stream[:limit] if limit is not None else stream
    if len(stream) < 2:
        raise UserError(f"--data {path}: fewer than 2 tokens, nothing to predict")
    return stream


def windows(tokens: list[int], seq_length: int) -> list[list[int]]:
    """Windows of seq_length + 1 tokens overlapping by one (the last may be shorter): each token after the
    first is a label exactly once."""
    if seq_length < 1:
        raise UserError(f"--seq-length {seq_length}: must be at least 1")
    return [tokens[i : i + seq_length + 1] for i in range(0, len(tokens) - 1, seq_length)]


def _batches(wins: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive windows grouped into batches of one length each (full batches of full windows first)."""
    by_len: dict[int, list[list[int]]] = {}
    for w in wins:
        by_len.setdefault(len(w), []).append(w)
    out = []
    for group in by_len.values():
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out


# ----------------------------------------------------------- Megatron path
def megatron_domain_losses(load: str | Path, domains: dict[str, list[int]], *, seq_length: int, tp: int = 1,
                           pp: int = 1, micro_batch_size: int = 4, dtype: str = "float32", spec: str = "auto",
                           ckpt_step: int | None = None, loads: list[str | Path] | None = None,
                           progress: bool = True, ep: int = 1, etp: int | None = None) -> list[dict[str, DomainResult]]:
    """Per-domain loss of one checkpoint (or of each of `loads`, in one launch) at TP x PP (x EP, ETP: MoE); data
    parallel over whatever ranks remain (under a launcher)."""
    from llamapro_megatron.verify import run_on_models

    wins = {name: windows(tokens, seq_length) for name, tokens in domains.items()}
    return run_on_models(loads or [load], _losses_worker, (wins, micro_batch_size, progress), tp=tp, pp=pp,
                         dtype=dtype, spec=spec, ckpt_step=ckpt_step, ep=ep, etp=etp)


def _losses_worker(model, meta, info, wins: dict[str, list[list[int]]], micro_batch_size: int,
                   progress: bool) -> dict[str, DomainResult]:
    import torch
    from megatron.core import parallel_state as ps

    from llamapro_megatron.runtime.model import mask_padded_vocabulary

    mask_padded_vocabulary(model, meta.arch.vocab_size, meta.padded_vocab_size)
    # Windows split over the data-parallel replicas; an MoE layer's expert-parallel ranks exchange their tokens
    # (equal shapes), so they run the same windows and the first of them counts the losses. Dense: EP 1, the same.
    share, shares = ps.get_expert_data_parallel_rank(), ps.get_expert_data_parallel_world_size()
    counts = ps.get_expert_model_parallel_rank() == 0
    results = {}
    for name, domain_wins in wins.items():
        t0 = time.time()
        mine = domain_wins[share::shares]
        local = torch.zeros(2, dtype=torch.float64)
        batches = _batches(mine, micro_batch_size)
        shapes: dict[tuple[int, int], list] = {}  # the pipeline schedule needs one micro-batch shape per call
        for b in batches:
            shapes.setdefault((len(b), len(b[0])), []).append(torch.tensor(b))
        for group in shapes.values():
            local += _schedule_losses(model, group, info) * counts
        local = local.to(info.device)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(local)
        total, count = local.tolist()
        results[name] = DomainResult(name, int(count), total / count)
        if progress and info.rank == 0:
            print(f"  {name}: {int(count):,} tokens, loss {total / count:.4f} ({time.time() - t0:.1f} s)", flush=True)
    return results


def _schedule_losses(model, batches: list[torch.Tensor], info) -> torch.Tensor:
    """[sum of token losses, token count] of equal-shape micro batches of windows through the pipeline schedule;
    nonzero on the first TP rank of the last stage only. The model computes the losses (labels given), with its
    padded vocabulary rows masked (``mask_padded_vocabulary``, installed by the caller), as the trainer does."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = batches[0].shape[0], batches[0].shape[1] - 1
    positions = torch.arange(seq, device=info.device).unsqueeze(0).expand(batch, -1)
    sums = torch.zeros(2, dtype=torch.float64)

    def forward_step(data_iterator, module):
        window = next(data_iterator).to(info.device)
        output = module(window[:, :-1], positions, attention_mask=None, labels=window[:, 1:])

        def loss_func(losses):
            sums[0] += losses.double().sum().cpu()
            sums[1] += losses.numel()
            return losses.new_zeros(()), {}

        return output, loss_func

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                                    num_microbatches=len(batches), seq_length=seq, micro_batch_size=batch,
                                    forward_only=True)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        return sums
    return torch.zeros(2, dtype=torch.float64)


# ------------------------------------------------------- Hugging Face path
def hf_domain_losses(hf_dir: str | Path, domains: dict[str, list[int]], *, seq_length: int, batch_size: int = 4,
                     dtype: str = "float32", progress: bool = True) -> dict[str, DomainResult]:
    """The same per-domain losses computed by transformers (the reference)."""
    import torch

    from llamapro_megatron.arch import torch_dtype
    from llamapro_megatron.checkpoint.hf import transformers_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers_model(hf_dir, torch_dtype(dtype)).to(device)
    return model_domain_losses(model, domains, seq_length=seq_length, batch_size=batch_size, progress=progress)


def model_domain_losses(model, domains: dict[str, list[int]], *, seq_length: int, batch_size: int = 4,
                        progress: bool = True) -> dict[str, DomainResult]:
    """Per-domain losses of a transformers model object (or a peft model wrapping one), on its device."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    results = {}
    for name, tokens in domains.items():
        t0 = time.time()
        total, count = 0.0, 0
        for batch in _batches(windows(tokens, seq_length), batch_size):
            window = torch.tensor(batch, device=device)
            with torch.no_grad():
                logits = model(input_ids=window[:, :-1]).logits[..., :vocab].float()
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), window[:, 1:].reshape(-1),
                                                       reduction="none")
            total += losses.double().sum().item()
            count += losses.numel()
        results[name] = DomainResult(name, count, total / count)
        if progress:
            print(f"  {name}: {count:,} tokens, loss {total / count:.4f} ({time.time() - t0:.1f} s)", flush=True)
    return results


# ---------------------------------------------------------------- the API
def require_one_model(load: str | Path | None, hf_dir: str | Path | None) -> None:
    if (load is None) == (hf_dir is None):
        raise UserError("give exactly one of --load (Megatron checkpoint) and --hf-dir (Hugging Face directory)")


def model_tokenizer(load: str | Path | None = None, hf_dir: str | Path | None = None, ckpt_step: int | None = None,
                    tokenizer: str | Path | None = None):
    """The tokenizer stored with the model: a checkpoint's tokenizer/ directory, or the HF directory's files."""
    from llamapro_megatron.checkpoint.mcore import TOKENIZER_DIR, resolve_checkpoint
    from llamapro_megatron.data.tokenizer import load_tokenizer

    require_one_model(load, hf_dir)
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if hf_dir is not None:
        return load_tokenizer(hf_dir)
    path = resolve_checkpoint(load, ckpt_step) / TOKENIZER_DIR
    if not path.is_dir():
        raise UserError(f"--load {load}: the checkpoint stores no tokenizer ({path}); pass --tokenizer")
    return load_tokenizer(path)


def evaluate(data: dict[str, str | Path], *, load: str | Path | None = None, hf_dir: str | Path | None = None,
             seq_length: int = DEFAULT_SEQ_LENGTH, max_tokens: int | None = None, tp: int = 1, pp: int = 1,
             micro_batch_size: int = 4, ckpt_step: int | None = None, tokenizer: str | Path | None = None,
             json_key: str = "text", dtype: str = "float32", progress: bool = True, ep: int = 1,
             etp: int | None = None) -> list[DomainResult]:
    """Per-domain perplexity of a Megatron checkpoint (`load`, at TP x PP, EP and ETP for MoE) or a Hugging Face
    directory (`hf_dir`).

    `data` maps a domain name to a text file, a .jsonl(.gz) file (`json_key`) or an indexed-dataset prefix.
    """
    require_one_model(load, hf_dir)
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: must be at least 1")
    tok = model_tokenizer(load, hf_dir, ckpt_step, tokenizer)
    domains = {name: domain_tokens(path, tok, json_key, max_tokens) for name, path in data.items()}
    if load is not None:
        (results,) = megatron_domain_losses(load, domains, seq_length=seq_length, tp=tp, pp=pp,
                                            micro_batch_size=micro_batch_size, dtype=dtype, ckpt_step=ckpt_step,
                                            progress=progress, ep=ep, etp=etp)
    else:
        results = hf_domain_losses(hf_dir, domains, seq_length=seq_length, batch_size=micro_batch_size,
                                   dtype=dtype, progress=progress)
    return [results[name] for name in data]


def format_table(results: list[DomainResult]) -> str:
    lines = [f"{'domain':<12} {'tokens':>10} {'loss':>9} {'perplexity':>11}"]
    for r in results:
        lines.append(f"{r.domain:<12} {r.tokens:>10,} {r.loss:>9.4f} {r.perplexity:>11.3f}")
    return "\n".join(lines)


# -------------------------------------------------------------------- CLI
def register(sub) -> None:
    p = sub.add_parser("evaluate", help="per-domain perplexity of a Megatron checkpoint or a Hugging Face model",
                       description="Exact token-level perplexity per held-out domain: documents tokenized with the "
                       "model's own tokenizer, concatenated and cut into --seq-length windows (the same windows for "
                       "--load and --hf-dir, so both give the same figures; padded vocabulary rows are excluded). "
                       "Prints a table (domain, tokens, loss, perplexity).")
    add_model_args(p)
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="NAME=PATH",
                   help="held-out sets: a text file, a .jsonl(.gz) file with a text key, or a preprocessed "
                   "indexed-dataset prefix (PATH.bin/PATH.idx); several after one --data, or --data repeated")
    p.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH,
                   help="tokens of context per window (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens per domain")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--json-key", default="text", help="key of the text in .jsonl files (default: text)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results as JSON")
    p.set_defaults(func=run)


def add_model_args(p) -> None:
    """The model to run, as `evaluate` and `generate` take it: a Megatron checkpoint at --tp/--pp (--ep/--etp), or a
    HF model."""
    from llamapro_megatron.checkpoint.cli import add_expert_args

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="Megatron checkpoint or training save directory (latest iteration)")
    src.add_argument("--hf-dir", help="Hugging Face model directory (run by transformers)")
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration of a training save (default: latest)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to run --load at")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to run --load at")
    add_expert_args(p, "run --load with the experts of each layer split over EP ranks")
    p.add_argument("--tokenizer", default=None, help="tokenizer to use instead of the model's own")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype (default fp32)")


def run(args) -> int:
    from llamapro_megatron.arch import canonical_dtype

    results = evaluate(parse_data_args(args.data), load=args.load, hf_dir=args.hf_dir, seq_length=args.seq_length,
                       max_tokens=args.max_tokens, tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch_size,
                       ckpt_step=args.ckpt_step, tokenizer=args.tokenizer, json_key=args.json_key,
                       dtype=canonical_dtype(args.dtype), ep=args.ep, etp=args.etp)
    print(format_table(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": args.load or args.hf_dir, "seq_length": args.seq_length,
                                                   "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    return 0
