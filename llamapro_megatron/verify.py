"""`llamapro verify`: the Megatron model at a TP/PP layout against transformers on the same tokens.

Prints max/mean absolute logit difference and top-1 agreement over the real vocabulary (padded rows excluded)
and fails above the tolerance. The Megatron forward runs on TP x PP ranks (spawned here, or torchrun's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamapro_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

DEFAULT_TEXT = (
    "The LLaMA Pro method expands a pretrained model with copies of its own blocks, then trains only the new "
    "blocks on code and mathematics so that the model keeps its general knowledge.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "The integral of x squared from 0 to 3 equals 9."
)


@dataclass
class LogitComparison:
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    num_tokens: int

    def line(self) -> str:
        return (f"max |dlogit| {self.max_abs_diff:.3e}  mean |dlogit| {self.mean_abs_diff:.3e}  "
                f"top-1 agreement {100 * self.top1_agreement:.2f}% over {self.num_tokens} tokens")


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, vocab_size: int) -> LogitComparison:

    a = reference[..., :vocab_size].double()
    b = candidate[..., :vocab_size].double()
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs()
    agree = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return LogitComparison(diff.max().item(), diff.mean().item(), agree, a.shape[0] * a.shape[1])


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    import torch

    from llamapro_megatron.checkpoint.hf import transformers_model

    model = transformers_model(hf_dir, torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def megatron_logits(load: str | Path, tokens: torch.Tensor, *, tp: int = 1, pp: int = 1, dtype: str = "float32",
                    spec: str = "auto", ckpt_step: int | None = None, ep: int = 1,
                    etp: int | None = None) -> torch.Tensor:
    """Logits [batch, seq, padded vocab] of a Megatron checkpoint run at TP x PP (x EP, ETP) ranks."""
    return megatron_logits_many([load], tokens, tp=tp, pp=pp, dtype=dtype, spec=spec, ckpt_step=ckpt_step, ep=ep,
                                etp=etp)[0]


def megatron_logits_many(loads: list[str | Path], tokens: torch.Tensor, *, tp: int = 1, pp: int = 1,
                         dtype: str = "float32", spec: str = "auto", ckpt_step: int | None = None,
                         ep: int = 1, etp: int | None = None) -> list:
    """Logits of several checkpoints, one after the other in the same TP x PP (x EP, ETP) launch."""
    return run_on_models(loads, _gathered_logits, (tokens,), tp=tp, pp=pp, dtype=dtype, spec=spec,
                         ckpt_step=ckpt_step, ep=ep, etp=etp)


def run_on_models(loads: list[str | Path], fn, fn_args: tuple = (), *, tp: int = 1, pp: int = 1,
                  dtype: str = "float32", spec: str = "auto", ckpt_step: int | None = None, ep: int = 1,
                  etp: int | None = None) -> list:
    """``fn(model, meta, info, *fn_args)`` for each checkpoint, built at TP x PP on spawned ranks (or these ranks
    under a launcher); returns rank 0's results, one per checkpoint. With ``ep`` > 1 (MoE) there are TP x PP x EP
    ranks, the EP ones data-parallel ranks that each hold a share of the experts and run the same tokens; ``etp``
    (MoE): each expert's tensor-parallel size, None for TP (the ranks: ``layout_world_size``). ``fn``
    must be a picklable top-level function, called collectively on every rank. In fp32, TF32 GEMMs are off there
    (``NVIDIA_TF32_OVERRIDE=0`` unless set): verify, evaluate and generate compare against transformers' fp32."""
    from llamapro_megatron.arch import layout_world_size
    from llamapro_megatron.checkpoint.mcore import read_meta, resolve_checkpoint
    from llamapro_megatron.runtime.launch import inside_launcher, run_workers

    ckpt_dirs = [resolve_checkpoint(load, ckpt_step) for load in loads]
    for ckpt_dir in ckpt_dirs:
        meta = read_meta(ckpt_dir)
        meta.arch.validate_layout(tp, pp, ep=ep, etp=etp)
        if meta.padded_vocab_size % tp:
            raise UserError(f"--tp {tp} does not divide the padded vocabulary {meta.padded_vocab_size} of {ckpt_dir}")
    args = ([str(d) for d in ckpt_dirs], tp, pp, dtype, spec, fn, tuple(fn_args), ep, etp)
    if inside_launcher():
        return _models_worker(*args)
    return run_workers(_models_worker, layout_world_size(tp, pp, ep, etp), args=args)[0]


def _models_worker(ckpt_dirs: list[str], tp: int, pp: int, dtype: str, spec: str, fn, fn_args: tuple,
                   ep: int = 1, etp: int | None = None) -> list:
    import os

    from llamapro_megatron.arch import canonical_dtype
    from llamapro_megatron.checkpoint.load import load_model_weights
    from llamapro_megatron.checkpoint.mcore import read_meta
    from llamapro_megatron.runtime.distributed import destroy_distributed, init_distributed
    from llamapro_megatron.runtime.model import build_gpt_model

    if canonical_dtype(dtype) == "float32":
        # fp32 checks mean fp32 arithmetic: Transformer Engine runs fp32 GEMMs on TF32 tensor cores (~1e-3 relative
        # off transformers' fp32 logits), torch's matmul does not by default. NVIDIA libraries read this before their
        # first GEMM, which comes after this point; a value the user set is kept.
        os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    info = init_distributed(tp=tp, pp=pp, ep=ep, etp=etp)
    results = []
    try:
        for ckpt_dir in ckpt_dirs:
            meta = read_meta(ckpt_dir)
            model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype=dtype, tp=tp, pp=pp, ep=ep, etp=etp,
                                    spec=spec)
            load_model_weights(model, ckpt_dir)
            model.to(info.device)
            results.append(fn(model, meta, info, *fn_args))
            del model
    finally:
        destroy_distributed()
    return results


def _gathered_logits(model, meta, info, tokens: torch.Tensor) -> torch.Tensor:
    import torch

    logits = forward_logits(model, tokens.to(info.device), hidden_size=meta.arch.hidden_size)
    gathered = [None] * info.world_size  # every rank returns the logits (under torchrun too)
    torch.distributed.all_gather_object(gathered, logits)
    return next(t for t in gathered if t is not None)


def forward_logits(model, tokens: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits of one batch through megatron-core's pipeline schedule.

    Returned (on CPU, float32) by the first TP rank of the last pipeline stage; None elsewhere.
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)
    captured = {}

    def forward_step(data_iterator, module):
        toks = next(data_iterator)
        output = module(toks, positions, attention_mask=None)

        def loss_func(output_tensor):
            captured["logits"] = gather_from_tensor_model_parallel_region(output_tensor).float().cpu()
            return output_tensor.new_zeros(()), {}

        return output, loss_func

    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
                                    num_microbatches=1, seq_length=seq, micro_batch_size=batch,
                                    forward_only=True)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        return captured["logits"]
    return None


def tokens_for(text: str | None, token_ids: str | None, tokenizer_dirs: list[Path], vocab_size: int) -> torch.Tensor:
    """[1, seq] token ids: given ids, or the text through the first tokenizer found, or seeded random ids."""
    import torch

    if token_ids:
        ids = [int(x) for x in token_ids.replace(",", " ").split()]
        if any(i < 0 or i >= vocab_size for i in ids):
            raise UserError(f"--token-ids must lie in [0, {vocab_size})")
        return torch.tensor([ids])
    for d in tokenizer_dirs:
        if d.is_dir() and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
            return torch.tensor([tok(text or DEFAULT_TEXT)["input_ids"]])
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, 48), generator=g)


def check_integrity(ckpt_dirs: list[Path], progress: bool = True) -> bool:
    """`integrity.check` of each checkpoint (and of a trainable-only save's base); prints one line per checkpoint
    and one per damaged file; returns whether all are intact."""
    from llamapro_megatron.checkpoint import integrity, trainable
    from llamapro_megatron.checkpoint.mcore import read_meta
    from llamapro_megatron.progress import SharedProgress

    todo = []
    for d in ckpt_dirs:
        todo.append(d)
        meta = read_meta(d)
        if trainable.is_trainable_only(meta):
            todo.append(trainable.resolve_base(d, meta))
    ok = True
    for d in dict.fromkeys(todo):
        bar = SharedProgress(None, 0, 1, integrity.total_bytes(d), "integrity", progress)
        try:
            report = integrity.check(d, bar.update)
        finally:
            bar.close()
        verdict = "OK" if report.ok else f"FAIL, {len(report.problems)} damaged"
        print(f"integrity of {d}: {report.files} files, {report.bytes / 2**20:.1f} MiB as recorded at save time "
              f"({integrity.ALGORITHM}) -> {verdict}", flush=True)
        for problem in report.problems:
            print(f"  {d / problem}", flush=True)
        ok = ok and report.ok
    return ok


def register(sub) -> None:
    p = sub.add_parser("verify", help="compare a Megatron checkpoint's logits with transformers'",
                       description="Run two models on the same tokens and compare their logits: the Hugging Face "
                       "model (transformers) against a Megatron checkpoint at a TP/PP layout (--hf-dir + --load), or "
                       "a Megatron checkpoint against its expansion at one common layout (--load + --load-expanded; "
                       "an identity expansion must match exactly). Prints max/mean |logit difference| and top-1 "
                       "agreement; exits 1 above --tolerance. --integrity checks the checkpoint's files against the "
                       "checksums recorded when it was written (alone or before the comparison); exits 1 if any "
                       "differs.")
    p.add_argument("--integrity", action="store_true",
                   help="first check every file of --load (and --load-expanded; a trainable-only save's base too) "
                   "against the size and checksum recorded when it was written: a flipped byte is named by file. "
                   "Alone, without --hf-dir/--load-expanded, only this check runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for --integrity")
    p.add_argument("--hf-dir", default=None, help="Hugging Face model directory (the reference)")
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (the reference with "
                   "--load-expanded, else the model checked against --hf-dir)")
    p.add_argument("--load-expanded", default=None, help="expanded Megatron checkpoint, checked against --load")
    p.add_argument("--ckpt-step", type=int, default=None, help="iteration of --load when it is a training save "
                   "directory (default: the latest)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to run the model(s) at (a checkpoint "
                   "loads at any layout, so this checks that one too); runs TP x PP ranks")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to run at, likewise")
    from llamapro_megatron.checkpoint.cli import add_expert_args

    add_expert_args(p, "the experts of each layer split over EP ranks, run on TP x PP x EP ranks")
    p.add_argument("--text", default=None, help="text to run (default: a built-in English/code/math paragraph)")
    p.add_argument("--token-ids", default=None, help="comma-separated token ids instead of text")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest acceptable max |logit difference| in fp32 (default: 0 for --load-expanded, an "
                   "identity expansion is exact; 1e-3 against --hf-dir)")
    from llamapro_megatron.runtime.specs import SPEC_HELP, SPEC_KINDS

    p.add_argument("--spec", default="auto", choices=SPEC_KINDS, help=SPEC_HELP)
    p.set_defaults(func=run)


def run(args) -> int:
    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.checkpoint.mcore import TOKENIZER_DIR, read_meta, resolve_checkpoint

    comparisons = (args.hf_dir is not None) + (args.load_expanded is not None)
    if comparisons > 1 or (comparisons == 0 and not args.integrity):
        raise UserError("give --hf-dir (HF reference vs --load) or --load-expanded (--load vs its expansion), or "
                        "--integrity (the files of --load)")
    ckpt_dir = resolve_checkpoint(args.load, args.ckpt_step)
    if args.integrity:
        ckpt_dirs = [ckpt_dir] + ([resolve_checkpoint(args.load_expanded)] if args.load_expanded else [])
        if not check_integrity(ckpt_dirs, progress=not args.no_progress):
            return 1
        if comparisons == 0:
            return 0
    tokenizer_dirs = [ckpt_dir / TOKENIZER_DIR] + ([Path(args.hf_dir)] if args.hf_dir else [])
    if args.hf_dir:
        arch = LlamaArch.from_hf_dir(args.hf_dir)
        tokens = tokens_for(args.text, args.token_ids, tokenizer_dirs[::-1], arch.vocab_size)
        reference = hf_logits(args.hf_dir, tokens)
        (candidate,) = megatron_logits_many([ckpt_dir], tokens, tp=args.tp, pp=args.pp, ep=args.ep,
                                             etp=args.etp, spec=args.spec)
        tolerance, what = 1e-3 if args.tolerance is None else args.tolerance, f"{args.hf_dir} vs {args.load}"
    else:
        arch = read_meta(ckpt_dir).arch
        expanded_dir = resolve_checkpoint(args.load_expanded)
        if read_meta(expanded_dir).arch.replace(num_layers=arch.num_layers) != arch:
            raise UserError(f"{args.load_expanded} is not an expansion of {args.load} (architectures differ)")
        tokens = tokens_for(args.text, args.token_ids, tokenizer_dirs, arch.vocab_size)
        reference, candidate = megatron_logits_many([ckpt_dir, expanded_dir], tokens, tp=args.tp, pp=args.pp,
                                                    ep=args.ep, etp=args.etp, spec=args.spec)
        tolerance, what = 0.0 if args.tolerance is None else args.tolerance, f"{args.load} vs {args.load_expanded}"
    result = compare_logits(reference, candidate, arch.vocab_size)
    ok = result.max_abs_diff <= tolerance
    ep = (f" EP={args.ep}" if args.ep != 1 else "") + (f" ETP={args.etp}" if args.etp is not None else "")
    print(f"verify {what} at TP={args.tp} PP={args.pp}{ep}: {result.line()}  -> {'OK' if ok else 'FAIL'} "
          f"(tolerance {tolerance:g})")
    return 0 if ok else 1
