"""The study's LoRA row: Hugging Face `peft` on the base model in transformers, run outside megatron-core.

LoRA is what users would pick instead of LLaMA Pro, so it runs with the library made for it, under the same
conditions as the Megatron rows: the same tokens in the same order (the trainer's own data module builds the
batches from the same flags and seed), the same loss (token mean per micro batch, averaged over the global batch),
Adam with the same betas, epsilon, zero weight decay and clipping, and megatron-core's own lr scheduler. Adapters go
on every attention and MLP projection; the rank is the one whose trainable count is nearest LLaMA Pro's
(`--groups` blocks), and the table says how near. One process (no pipeline), fp32.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from llamapro_megatron.errors import UserError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER, MERGED = "adapter", "merged"


def _shapes(hf_dir: str | Path) -> dict[str, list[int]]:
    from llamapro_megatron.checkpoint.hf import read_header

    shapes = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        _, header = read_header(f)
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def block_parameters(hf_dir: str | Path) -> int:
    """Parameters of one decoder block (layer 0): what each new LLaMA Pro block trains."""
    return sum(math.prod(s) for k, s in _shapes(hf_dir).items() if k.startswith("model.layers.0."))


def lora_rank(hf_dir: str | Path, target: int) -> tuple[int, int]:
    """(rank, trainable parameters) of the LoRA on every TARGETS projection nearest `target` parameters."""
    per_rank = sum(s[0] + s[1] for k, s in _shapes(hf_dir).items()
                   if k.startswith("model.layers.") and k.endswith(tuple(f".{t}.weight" for t in TARGETS)))
    if not per_rank:
        raise UserError(f"{hf_dir}: no {'/'.join(TARGETS)} projections to put LoRA adapters on")
    rank = max(1, round(target / per_rank))
    return rank, rank * per_rank


def _log(message: str) -> None:
    print(message, flush=True)


def train_lora(settings, run_argv: list[str], hf_dir: str, out: Path, seed: int, target: int) -> dict:
    """Train the adapters; write OUT/adapter (peft) and OUT/merged (the merged HF model)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llamapro_megatron.checkpoint.hf import transformers_model
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.data import BatchShape, TrainingData
    from llamapro_megatron.training.optimizer import build_scheduler, resolve_steps

    config = config_from_argv(run_argv)
    o = config.optimizer
    steps = resolve_steps(config, settings.global_batch_size)
    shape = BatchShape(settings.micro_batch_size, settings.global_batch_size, 1)
    model = transformers_model(hf_dir, torch.float32)
    data = TrainingData(config, model.config.vocab_size, shape, 0, steps.train_iters, 0, hf_dir)
    rank, expected = lora_rank(hf_dir, target)
    torch.manual_seed(seed)  # the adapters' A matrices start random (B at zero: the model starts as the base)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=list(TARGETS), bias="none"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in peft_model.parameters())
    assert trainable == expected, (trainable, expected)  # every TARGETS projection of every layer got one
    _log(f"LoRA (peft, outside megatron-core): rank {rank}, alpha {2 * rank}, on {', '.join(TARGETS)}: "
         f"{trainable:,} trainable of {total:,} ({100 * trainable / target:.1f}% of LLaMA Pro's {target:,})")
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=0.0)
    scheduler = build_scheduler(optimizer, config, steps)
    vocab = model.config.vocab_size
    losses = {}
    peft_model.train()
    for it in range(steps.train_iters):
        ts = time.time()
        micro = data.train_batches(it * settings.global_batch_size)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for batch in micro:
            logits = peft_model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits.float()
            token_losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab), batch["labels"].reshape(-1), reduction="none").view_as(batch["labels"])
            mask = batch["loss_mask"].float()
            loss = (token_losses * mask).sum() / mask.sum().clamp(min=1)
            (loss / len(micro)).backward()
            step_loss += loss.item() / len(micro)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o.clip_grad).item()
        optimizer.step()
        scheduler.step(increment=1)
        lr = optimizer.param_groups[0]["lr"]  # the next step's, as the trainer logs it
        losses[str(it + 1)] = step_loss
        _log(f"step {it + 1}/{steps.train_iters} | loss {step_loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
             f"{time.time() - ts:.2f} s/step")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    peft_model.save_pretrained(str(out / ADAPTER))
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out / MERGED), safe_serialization=True)
    _copy_tokenizer(hf_dir, out / MERGED)
    return {"losses": losses, "trainable": trainable, "total": total, "rank": rank,
            "of_llamapro": trainable / target}


def _copy_tokenizer(hf_dir: str | Path, dest: Path) -> None:
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        if (Path(hf_dir) / name).is_file() and not (dest / name).exists():
            shutil.copy2(Path(hf_dir) / name, dest / name)


def evaluate_lora(hf_dir: str, out: Path, files: dict[str, str], settings) -> dict:
    """Held-out losses of the base model with the trained adapters applied by peft (not merged)."""
    import torch
    from peft import PeftModel

    from llamapro_megatron.checkpoint.hf import transformers_model
    from llamapro_megatron.evaluate import domain_tokens, model_domain_losses, model_tokenizer

    tok = model_tokenizer(hf_dir=hf_dir)
    domains = {d: domain_tokens(p, tok, max_tokens=settings.heldout_tokens) for d, p in files.items()}
    model = PeftModel.from_pretrained(transformers_model(hf_dir, torch.float32), str(out / ADAPTER))
    results = model_domain_losses(model, domains, seq_length=settings.seq_length, batch_size=2,
                                  progress=settings.progress)
    return {name: {"tokens": r.tokens, "loss": r.loss} for name, r in results.items()}
