"""Adam (megatron-core's optimizer: fp32 main params under bf16, optionally distributed) and its lr schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import TrainConfig


@dataclass(frozen=True)
class Steps:
    """Iteration counts of the run, derived from the schedule section and the global batch."""

    train_iters: int
    warmup_iters: int
    decay_iters: int


def resolve_steps(config: TrainConfig, global_batch_size: int) -> Steps:
    s = config.schedule
    iters = s.train_iters if s.train_iters is not None else math.ceil(s.train_samples / global_batch_size)
    if iters < 1:
        raise UserError(f"the run has {iters} training iterations; raise --train-iters/--train-samples")
    decay = s.lr_decay_iters or iters
    warmup = round(s.lr_warmup_fraction * decay) if s.lr_warmup_fraction is not None else s.lr_warmup_iters
    if warmup >= decay:
        raise UserError(f"warmup ({warmup} iterations) must be shorter than the lr decay ({decay}); lower "
                        "--lr-warmup-iters/--lr-warmup-fraction or raise --lr-decay-iters")
    return Steps(iters, warmup, decay)


def build_optimizer(model_chunks: list, config: TrainConfig):
    """megatron-core's optimizer over the chunks' trainable parameters.

    Param groups are megatron-core's default: no weight decay on biases and 1-D tensors (norms); groups are
    aligned across ranks, so a stage with nothing to train holds empty groups.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = config.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=config.model.bf16, fp16=False,
        params_dtype=_torch_dtype(config), use_distributed_optimizer=config.parallelism.use_distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, model_chunks)


def build_scheduler(optimizer, config: TrainConfig, steps: Steps):
    """Warmup to --lr, then --lr-decay-style down to --min-lr over the decay iterations (megatron-core)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = config.optimizer
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=steps.warmup_iters,
        lr_decay_steps=steps.decay_iters, lr_decay_style=config.schedule.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=steps.train_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )


def _torch_dtype(config: TrainConfig):
    import torch

    return torch.bfloat16 if config.model.bf16 else torch.float32


def current_lr(optimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return 0.0


def check_checkpointable(optimizer, config: TrainConfig) -> None:
    """Refuse, before any step, a distributed optimizer that megatron-core could not checkpoint.

    Without TE/Apex the distributed optimizer falls back to torch Adam, whose ``state_dict`` needs the Adam step
    from this rank's own parameters (``distrib_optimizer.py:642`` asserts exactly one); a rank that owns no
    trainable parameter (a frozen pipeline stage) fails at the first save. The plain optimizer handles it.
    """
    import torch
    import torch.distributed as dist

    if not config.parallelism.use_distributed_optimizer:
        return
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    from llamapro_megatron.runtime.distributed import collective_device

    owns = sum(len(g["params"]) for g in optimizer.param_groups)
    empty = torch.tensor([0.0 if owns else 1.0], device=collective_device())
    dist.all_reduce(empty)
    if empty.item() > 0:
        raise UserError(f"--use-distributed-optimizer: {int(empty.item())} rank(s) own no trainable parameter (a "
                        "pipeline stage with nothing to train); megatron-core's torch-Adam fallback (no Transformer "
                        "Engine or Apex here) cannot checkpoint that. Drop --use-distributed-optimizer, or choose "
                        "a layout where every stage holds a trainable layer")
