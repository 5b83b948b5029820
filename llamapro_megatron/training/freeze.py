"""The freeze policy: which parameters train (LLaMA Pro: only the expanded blocks), and the counts it gives.

Freezing is decided by *global* layer number: megatron names decoder layers by their local index inside a
stage (``decoder.layers.0`` on every stage), while ``TransformerLayer.layer_number`` is the 1-based global
number for both the local and the TE spec. It is applied before the DDP wrap and the optimizer build: both
only take parameters that require grad.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llamapro_megatron.checkpoint.mcore import CheckpointMeta
from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import FreezeSection

EMBEDDING, OUTPUT, FINAL_NORM = "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm."


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
            router = getattr(layer.mlp, "router", None)
            if router is not None and not in_plan:
                # A frozen MoE block adds no load-balancing loss: its router does not move, and its loss would
                # only pull the new blocks below toward balancing it. Routing itself is unchanged (megatron-core's
                # TopKRouter routes by top-k whatever its routing_type unless "sinkhorn"; "none" switches every
                # aux loss off, router.py `is_aux_loss_enabled`).
                router.routing_type = "none"


@dataclass
class StageCounts:
    pp_rank: int
    trainable: int  # this rank's share of the dense (non-expert) parameters
    frozen: int
    trainable_layers: list[int]
    layers: list[int]  # every decoder layer of the stage, chunk by chunk
    # MoE: this rank's experts (its share of the experts over EP ranks, of each expert over ETP ranks)
    expert_trainable: int = 0
    expert_frozen: int = 0


def stage_counts(chunks: list[torch.nn.Module], pp_rank: int, tp_rank: int = 0) -> StageCounts:
    """This rank's share of the model's parameters, so that summing the dense counts over the TP ranks and pipeline
    stages of one data-parallel replica, and the expert counts over the ranks of one expert-data-parallel replica
    (its ETP x EP ranks of each stage), counts every parameter once: tensor-parallel shards count on their rank,
    replicated parameters (norms, routers) on TP rank 0 only, and the tied embedding's copy on the last pipeline stage
    not at all (megatron-core marks that copy ``shared``; `LanguageModule.setup_embeddings_and_output_layer`). Experts
    are the parameters under ``.mlp.experts.`` (`model.mark_experts_as_expert_parallel`)."""
    trainable = frozen = expert_trainable = expert_frozen = 0
    layers, every_layer = [], []
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if getattr(param, "shared", False) and getattr(param, "shared_embedding", False):
                continue
            if ".mlp.experts." in name:
                if param.requires_grad:
                    expert_trainable += param.numel()
                else:
                    expert_frozen += param.numel()
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
    return StageCounts(pp_rank, trainable, frozen, sorted(layers), every_layer, expert_trainable, expert_frozen)
