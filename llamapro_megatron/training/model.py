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

from llamapro_megatron.checkpoint.mcore import CheckpointMeta, build_gpt_model
from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import FreezeSection, TrainConfig

EMBEDDING, OUTPUT, FINAL_NORM = "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm."


def train_dtype(config: TrainConfig) -> str:
    return "bfloat16" if config.model.bf16 else "float32"


def build_model_chunks(meta: CheckpointMeta, config: TrainConfig) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one, or one per virtual stage), unwrapped, on this rank's device."""
    p = config.parallelism
    vpp = p.virtual_pipeline_model_parallel_size if (p.virtual_pipeline_model_parallel_size or 1) > 1 else None
    meta.arch.validate_layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, vpp)
    if meta.padded_vocab_size % p.tensor_model_parallel_size:
        raise UserError(f"--tensor-model-parallel-size {p.tensor_model_parallel_size} does not divide the "
                        f"checkpoint's padded vocabulary {meta.padded_vocab_size}; reconvert with that --tp")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype=train_dtype(config),
                                tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, vpp=vpp,
                                spec=config.model.spec, vp_stage=vp_stage if vpp else None)
        contiguous_output_layer_grad(model)
        chunks.append(model.to(device))
    return chunks


def contiguous_output_layer_grad(chunk: torch.nn.Module) -> None:
    """Make the gradient that reaches the output layer contiguous (last stage; a no-op elsewhere).

    GPTModel returns its [s, b, vocab] logits transposed to [b, s, vocab], so the gradient flowing back into the
    output layer is a transposed view; ``torch.matmul(grad, weight)`` in the layer's backward cannot fold that
    into one GEMM and runs a bmm of s products of [b, vocab] x [vocab, h], re-reading the whole weight s times
    (CPU, SmolLM2's 49152 x 576 layer, micro batch 2 x seq 256: 3.8 s against 0.18 s). One copy of the gradient
    makes it a single GEMM, on any device.
    """
    layer = getattr(chunk, "output_layer", None)
    if layer is None:
        return

    def hook(module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        if logits.requires_grad:
            logits.register_hook(torch.Tensor.contiguous)

    layer.register_forward_hook(hook)


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


def stage_counts(chunks: list[torch.nn.Module], pp_rank: int) -> StageCounts:
    """Parameters of this rank's shard (TP-local); a tied output layer on the last stage counts as frozen copy."""
    trainable = frozen = 0
    layers = []
    for chunk in chunks:
        for param in chunk.parameters():
            if param.requires_grad:
                trainable += param.numel()
            else:
                frozen += param.numel()
        layers += [global_layer_index(layer) for layer in decoder_layers(chunk)
                   if any(p.requires_grad for p in layer.parameters())]
    return StageCounts(pp_rank, trainable, frozen, sorted(layers))


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


def wrap_for_training(chunks: list[torch.nn.Module], config: TrainConfig) -> list[torch.nn.Module]:
    """Float16Module (bf16) and megatron-core DDP around each chunk; call after :func:`apply_freeze`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,  # reduce once per step in finalize_model_grads (simple, exact on CPU)
        use_distributed_optimizer=config.parallelism.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the trainer checks the loss and the grad norm itself
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        ensure_stage_output_requires_grad(chunk)
        module = Float16Module(chunk.config, chunk) if config.model.bf16 else chunk
        # Megatron-LM: only the first chunk's buffers may be bucketed lazily; each chunk gets its own DDP.
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=module,
                                               disable_bucketing=i > 0))
    return wrapped


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
