"""The model this rank trains: its pipeline stage's GPTModel chunk(s), built, then (after the freeze policy,
`freeze.py`) wrapped for training: Float16Module, megatron-core DDP, the overlap hooks.
"""
from __future__ import annotations

import torch

from llamapro_megatron.checkpoint.mcore import CheckpointMeta
from llamapro_megatron.errors import UserError
from llamapro_megatron.runtime.model import build_gpt_model, mask_padded_vocabulary
from llamapro_megatron.training.config import TrainConfig


def train_dtype(config: TrainConfig) -> str:
    return "bfloat16" if config.model.bf16 else "float32"


def build_model_chunks(meta: CheckpointMeta, config: TrainConfig) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one, or one per virtual stage), unwrapped, on this rank's device.

    ``config`` has its pipeline layout resolved (:func:`~llamapro_megatron.training.layout.resolve_pipeline`).
    """
    from llamapro_megatron.arch import TRAIN_LAYOUT_FLAGS
    from llamapro_megatron.runtime.specs import resolve_spec_kind
    from llamapro_megatron.training.layout import transformer_overrides

    p = config.parallelism
    vpp = p.virtual_pipeline_model_parallel_size if (p.virtual_pipeline_model_parallel_size or 1) > 1 else None
    meta.arch.validate_layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, vpp,
                              first=p.decoder_first_pipeline_num_layers, last=p.decoder_last_pipeline_num_layers,
                              flags=TRAIN_LAYOUT_FLAGS, ep=p.expert_model_parallel_size,
                              etp=p.expert_tensor_parallel_size)
    if meta.padded_vocab_size % p.tensor_model_parallel_size:
        raise UserError(f"--tensor-model-parallel-size {p.tensor_model_parallel_size} does not divide the "
                        f"checkpoint's padded vocabulary {meta.padded_vocab_size}; reconvert with that --tp")
    kind = resolve_spec_kind(config.model.spec)
    overrides = transformer_overrides(config, meta.arch, kind)
    if config.model.fp8_format is not None:
        from llamapro_megatron.runtime.specs import require_fp8_support

        require_fp8_support(overrides["fp8_recipe"])
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype=train_dtype(config),
                                tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, vpp=vpp,
                                ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size, spec=kind,
                                vp_stage=vp_stage if vpp else None,
                                rope_fusion=not config.model.no_rope_fusion,
                                # SFT: the loss is a mean over the global batch's assistant tokens, not a mean of
                                # micro-batch means (megatron-core's per-token loss; DDP then sums gradients)
                                calculate_per_token_loss=config.data.sft, **overrides)
        mask_padded_vocabulary(model, meta.arch.vocab_size, meta.padded_vocab_size)
        if meta.arch.is_moe:
            mark_experts_as_expert_parallel(model)
        chunks.append(model.to(device))
    return chunks


def mark_experts_as_expert_parallel(model: torch.nn.Module) -> None:
    """Treat the experts as expert-parallel at EP 1 too, as megatron-core does from EP 2 on.

    megatron-core marks expert weights ``allreduce = False`` only when EP > 1 (`tensor_parallel/layers.py`:
    ``not (is_expert and expert_parallel)``); DDP and ``get_megatron_optimizer`` then give them their own
    buffers and their own optimizer, so an EP > 1 save holds a chained optimizer (``chained_0.`` dense,
    ``chained_1.`` experts) and an EP 1 save one optimizer, under other keys: neither resumed at the other's EP.
    Marked at every EP, the optimizer state is laid out alike and resumes at any EP. At EP 1 the experts'
    data-parallel group is the data-parallel group, so gradients reduce over the same ranks as before.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def ensure_stage_output_requires_grad(chunk: torch.nn.Module) -> None:
    """Let a pipeline stage with nothing trainable below its output take part in the backward pass.

    megatron's schedule calls ``torch.autograd.backward`` on every stage's output; on the first stage with
    frozen embeddings and frozen layers that output does not require grad and autograd raises. Marking it
    as requiring grad makes that backward a no-op (no weight or activation gradient is computed there).
    """
    def hook(module, args, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
            return output.detach().requires_grad_()
        return output

    chunk.register_forward_hook(hook)


def ensure_recompute_input_requires_grad(chunk: torch.nn.Module) -> None:
    """Full recomputation: make the decoder input require grad so trainable layers inside a recomputed group
    get their gradients.

    megatron-core recomputes groups of layers through an autograd Function whose only tensor input is the
    group's input hidden state; the weights are not inputs. Below a frozen embedding that input does not require
    grad, so a group holding frozen and new layers (e.g. layers 0-1 of LLaMA Pro) would produce an output outside
    the autograd graph and its new layer would silently never train. Cost: input gradients of the frozen layers
    below the first trainable one on the first chunk (counted in the FLOPs).
    """
    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states")
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and not hidden.requires_grad:
            kwargs["hidden_states"] = hidden.detach().requires_grad_()
        return args, kwargs

    chunk.decoder.register_forward_pre_hook(hook, with_kwargs=True)


def wrap_for_training(chunks: list[torch.nn.Module], config: TrainConfig) -> list[torch.nn.Module]:
    """Float16Module (bf16) and megatron-core DDP around each chunk; call after :func:`apply_freeze`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    p = config.parallelism
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # Off: one reduction per step in finalize_model_grads. On: bucket by bucket as the backward fills them.
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        # Interleaved: the schedule starts each chunk's gather (param_sync_func); else the forward hooks chain.
        align_param_gather=p.overlap_param_gather and p.virtual_pipeline_model_parallel_size is not None,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the trainer checks the loss and the grad norm itself
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        ensure_stage_output_requires_grad(chunk)
        if config.model.recompute_granularity == "full":
            ensure_recompute_input_requires_grad(chunk)
        module = Float16Module(chunk.config, chunk) if config.model.bf16 else chunk
        # Megatron-LM: only the first chunk's buffers may be bucketed lazily; each chunk gets its own DDP.
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=module,
                                               disable_bucketing=i > 0))
    return wrapped


def configure_overlap(wrapped: list[torch.nn.Module], config: TrainConfig) -> None:
    """Hand the schedule the DDP hooks that overlap communication with compute (as Megatron-LM's trainer does).

    Gradient reduction: no_sync holds the reduction back until the last micro batch, then each bucket is reduced
    as soon as its gradients are complete. Parameter gathering (distributed optimizer): the forward pre-hooks
    wait for each bucket's all-gather; the interleaved schedule starts them chunk by chunk.
    """
    p = config.parallelism
    for chunk in wrapped:
        c = chunk.config
        if p.overlap_grad_reduce:
            c.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
            c.grad_sync_func = ([m.start_grad_sync for m in wrapped] if len(wrapped) > 1
                                else wrapped[0].start_grad_sync)
        if p.overlap_param_gather and len(wrapped) > 1:
            c.param_sync_func = [m.start_param_sync for m in wrapped]


def sync_params(wrapped: list[torch.nn.Module], config: TrainConfig) -> None:
    """Finish every pending parameter all-gather (--overlap-param-gather): before a checkpoint is written, each
    rank's model must hold the whole updated model, not only its own optimizer shard."""
    if config.parallelism.overlap_param_gather:
        for chunk in wrapped:
            chunk.start_param_sync(force_sync=True)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
