"""`llamapro generate`: greedy generation from a Megatron checkpoint (any TP/PP) or a Hugging Face directory.

The Megatron path re-runs the whole sequence through megatron-core's pipeline schedule for every new token (no
KV cache: simple and exact, fine for checking a model, not for serving). The next token is the argmax of the last
position's logits over the real vocabulary (padded rows excluded), as transformers' greedy search takes it, so the
two paths produce the same tokens on the same weights; generation stops at the tokenizer's end-of-document token.
"""
from __future__ import annotations

from pathlib import Path

from llamapro_megatron.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 32


def megatron_generate(load: str | Path, prompts: list[list[int]], *, max_new_tokens: int, eos: int | None,
                      tp: int = 1, pp: int = 1, dtype: str = "float32", ckpt_step: int | None = None, ep: int = 1,
                      etp: int | None = None) -> list[list[int]]:
    """The generated token ids (prompt excluded) of each prompt, greedy, at TP x PP (x EP, ETP: MoE). Every rank
    runs every prompt."""
    from llamapro_megatron.verify import run_on_models

    (out,) = run_on_models([load], _generate_worker, (prompts, max_new_tokens, eos), tp=tp, pp=pp, dtype=dtype,
                           ckpt_step=ckpt_step, ep=ep, etp=etp)
    return out


def _generate_worker(model, meta, info, prompts: list[list[int]], max_new_tokens: int,
                     eos: int | None) -> list[list[int]]:
    import torch
    import torch.distributed as dist

    from llamapro_megatron.verify import forward_logits

    vocab = meta.arch.vocab_size
    outputs = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(max_new_tokens):
            logits = forward_logits(model, torch.tensor([tokens], device=info.device),
                                    hidden_size=meta.arch.hidden_size)
            # Only the last stage's first TP rank holds logits: it picks, every rank learns the pick.
            pick = torch.full((1,), -1, dtype=torch.long, device=info.device)
            if logits is not None:
                pick[0] = int(logits[0, -1, :vocab].argmax())
            dist.all_reduce(pick, op=dist.ReduceOp.MAX)
            tokens.append(int(pick.item()))
            if tokens[-1] == eos:
                break
        outputs.append(tokens[len(prompt) :])
    return outputs


def hf_generate(hf_dir: str | Path, prompts: list[list[int]], *, max_new_tokens: int, eos: int | None,
                dtype: str = "float32") -> list[list[int]]:
    """The same with transformers' own greedy search (the reference)."""
    import torch

    from llamapro_megatron.arch import torch_dtype
    from llamapro_megatron.checkpoint.hf import transformers_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers_model(hf_dir, torch_dtype(dtype)).to(device).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=eos,
                                 pad_token_id=eos if eos is not None else 0, num_beams=1, top_k=None, top_p=None,
                                 temperature=None)
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def generate(prompts: list[str], *, load: str | Path | None = None, hf_dir: str | Path | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, tp: int = 1, pp: int = 1, ckpt_step: int | None = None,
             tokenizer: str | Path | None = None, dtype: str = "float32",
             tok=None, ep: int = 1, etp: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, generated ids) of each prompt, from a Megatron checkpoint or a Hugging Face directory.

    `tok`: the model's tokenizer already loaded (``evaluate.model_tokenizer``); loaded here when None."""
    from llamapro_megatron.evaluate import model_tokenizer, require_one_model

    require_one_model(load, hf_dir)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if tok is None:
        tok = model_tokenizer(load, hf_dir, ckpt_step, tokenizer)
    bos = [tok.bos] if tok.add_bos_token and tok.bos >= 0 else []
    ids = [bos + tok.tokenize(p) for p in prompts]
    if any(not p for p in ids):
        raise UserError("--prompt: an empty prompt gives the model nothing to continue; give some text")
    eos = tok.eod if tok.eod >= 0 else None
    if load is not None:
        out = megatron_generate(load, ids, max_new_tokens=max_new_tokens, eos=eos, tp=tp, pp=pp, dtype=dtype,
                                ckpt_step=ckpt_step, ep=ep, etp=etp)
    else:
        out = hf_generate(hf_dir, ids, max_new_tokens=max_new_tokens, eos=eos, dtype=dtype)
    return list(zip(ids, out))


def register(sub) -> None:
    from llamapro_megatron.evaluate import add_model_args

    p = sub.add_parser("generate", help="greedy generation from a Megatron checkpoint or a Hugging Face model",
                       description="Greedy continuation of each --prompt, tokenized with the model's own tokenizer "
                       "(BOS when it adds one). --load runs the Megatron checkpoint at --tp/--pp (the whole sequence "
                       "again for every new token: a check of the model, not a server); --hf-dir runs transformers. "
                       "On the same weights both give the same tokens.")
    add_model_args(p)
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (each quoted)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="stop after this many new tokens (or at end-of-document; default %(default)s)")
    p.add_argument("--ids", action="store_true", help="also print the generated token ids")
    p.set_defaults(func=run)


def run(args) -> int:
    from llamapro_megatron.arch import canonical_dtype
    from llamapro_megatron.evaluate import model_tokenizer

    tok = model_tokenizer(args.load, args.hf_dir, args.ckpt_step, args.tokenizer)
    results = generate(args.prompt, load=args.load, hf_dir=args.hf_dir, max_new_tokens=args.max_new_tokens,
                       tp=args.tp, pp=args.pp, ckpt_step=args.ckpt_step, dtype=canonical_dtype(args.dtype), tok=tok,
                       ep=args.ep, etp=args.etp)
    for prompt, (_, new) in zip(args.prompt, results):
        text = new[:-1] if new and new[-1] == tok.eod else new  # the end-of-document token ends, it is no text
        print(f"--- prompt: {prompt!r}\n{prompt}{tok.detokenize(text)}")
        if args.ids:
            print(f"generated ids: {new}")
    return 0
