"""The model this rank trains: its pipeline stage's GPTModel chunk(s), the freeze policy, the DDP wrap.

Freezing is decided by *global* layer number: megatron names decoder layers by their local index inside a
stage (``decoder.layers.0`` on every stage), while ``TransformerLayer.layer_number`` is the 1-based global
number for both the local and the TE spec. It is applied before the DDP wrap and the optimizer build: both
only take parameters that require grad.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llamapro_megatron.checkpoint.mcore import CheckpointMeta, build_gpt_model, mask_padded_vocabulary
from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import FreezeSection, TrainConfig

EMBEDDING, OUTPUT, FINAL_NORM = "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm."


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
                              flags=TRAIN_LAYOUT_FLAGS)
    if meta.padded_vocab_size % p.tensor_model_parallel_size:
        raise UserError(f"--tensor-model-parallel-size {p.tensor_model_parallel_size} does not divide the "
                        f"checkpoint's padded vocabulary {meta.padded_vocab_size}; reconvert with that --tp")
    kind = resolve_spec_kind(config.model.spec)
    overrides = transformer_overrides(config, meta.arch, kind)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype=train_dtype(config),
                                tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, vpp=vpp,
                                spec=kind, vp_stage=vp_stage if vpp else None,
                                rope_fusion=not config.model.no_rope_fusion,
                                # SFT: the loss is a mean over the global batch's assistant tokens, not a mean of
                                # micro-batch means (megatron-core's per-token loss; DDP then sums gradients)
                                calculate_per_token_loss=config.data.sft, **overrides)
        mask_padded_vocabulary(model, meta.arch.vocab_size, meta.padded_vocab_size)
        chunks.append(model.to(device))
    return chunks


def global_layer_index(layer: torch.nn.Module) -> int:
    return int(layer.layer_number) - 1


def decoder_layers(chunk: torch.nn.Module) -> Iterator[torch.nn.Module]:
    yield from chunk.decoder.layers


def trainable_layers(meta: CheckpointMeta, freeze: FreezeSection) -> set[int] | None:
    """Global 0-based layers that train; None means every layer (``--freeze none``)."""
    n = meta.arch.num_layers
    if freeze.freeze == "none":
        return None
    if freeze.freeze == "layers":
        bad = [i for i in freeze.trainable_layers if not 0 <= i < n]
        if bad:
            raise UserError(f"--trainable-layers {bad}: the model has layers 0..{n - 1}")
        return set(freeze.trainable_layers)
    if not meta.expansion or not meta.expansion.get("new_layer_indices"):
        raise UserError("--freeze llamapro trains the expanded blocks, but this checkpoint has no expansion "
                        "metadata; expand it first (`llamapro expand --groups N`) or choose --freeze none or "
                        "--freeze layers --trainable-layers ...")
    return set(meta.expansion["new_layer_indices"])


def _is_norm(name: str) -> bool:
    return "layernorm" in name or "layer_norm_weight" in name


def apply_freeze(chunks: list[torch.nn.Module], meta: CheckpointMeta, freeze: FreezeSection) -> None:
    """Set ``requires_grad`` on every parameter of the (unwrapped) chunks according to the policy."""
    layers = trainable_layers(meta, freeze)
    # Tied embeddings: the last stage's output layer is a copy of the first stage's embedding kept in sync by
    # megatron-core; both copies must agree.
    tied = meta.arch.tie_word_embeddings
    train_embedding = freeze.train_embeddings or (tied and freeze.train_output_layer)
    train_output = freeze.train_output_layer or (tied and freeze.train_embeddings)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if layers is None:
                param.requires_grad = True
            elif name == EMBEDDING:
                param.requires_grad = train_embedding
            elif name == OUTPUT:
                param.requires_grad = train_output
            elif name.startswith(FINAL_NORM):
                param.requires_grad = freeze.train_norms
            elif not name.startswith("decoder.layers."):
                raise RuntimeError(f"freeze policy: unexpected parameter {name}")  # a new megatron module
        if layers is None:
            continue
        for layer in decoder_layers(chunk):
            in_plan = global_layer_index(layer) in layers
            for name, param in layer.named_parameters():
                param.requires_grad = in_plan or (freeze.train_norms and _is_norm(name))


@dataclass
class StageCounts:
    pp_rank: int
    trainable: int
    frozen: int
    trainable_layers: list[int]
    layers: list[int]  # every decoder layer of the stage, chunk by chunk


def stage_counts(chunks: list[torch.nn.Module], pp_rank: int, tp_rank: int = 0) -> StageCounts:
    """This rank's share of the model's parameters, so that summing over the TP ranks and pipeline stages (of one
    data-parallel replica) counts every parameter once: tensor-parallel shards count on their rank, replicated
    parameters (norms) on TP rank 0 only, and the tied embedding's copy on the last pipeline stage not at all
    (megatron-core marks that copy ``shared``; `LanguageModule.setup_embeddings_and_output_layer`)."""
    trainable = frozen = 0
    layers, every_layer = [], []
    for chunk in chunks:
        for param in chunk.parameters():
            if getattr(param, "shared", False) and getattr(param, "shared_embedding", False):
                continue
            if tp_rank != 0 and not getattr(param, "tensor_model_parallel", False):
                continue
            if param.requires_grad:
                trainable += param.numel()
            else:
                frozen += param.numel()
        layers += [global_layer_index(layer) for layer in decoder_layers(chunk)
                   if any(p.requires_grad for p in layer.parameters())]
        every_layer += [global_layer_index(layer) for layer in decoder_layers(chunk)]
    return StageCounts(pp_rank, trainable, frozen, sorted(layers), every_layer)


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
