"""How the model is laid out and executed: pipeline split (virtual chunks, uneven end stages), activation
recomputation, sequence parallelism, the attention window. Resolved once the checkpoint's layer count is known.

Everything here ends up as megatron-core TransformerConfig fields, so every chunk of every rank is built from
the same decisions; the freeze policy does not depend on them (it reads each layer's global ``layer_number``).
"""
from __future__ import annotations

import copy
from typing import Any

from llamapro_megatron.arch import TRAIN_LAYOUT_FLAGS, LlamaArch, pipeline_stage_layers
from llamapro_megatron.errors import UserError
from llamapro_megatron.runtime.specs import _cuda_available
from llamapro_megatron.training.config import TrainConfig

# Specs whose attention applies TransformerConfig.window_size (megatron-core 0.16: TE attention, and the local
# spec's FusedScaleMaskSoftmax torch path; runtime/sdpa.py applies it as a banded mask). A spec added without
# window support must refuse longer sequences.
WINDOWED_SPECS = ("te", "local", "sdpa")


def resolve_pipeline(config: TrainConfig, arch: LlamaArch) -> TrainConfig:
    """A copy of ``config`` whose virtual pipeline size is set (from --num-layers-per-virtual-pipeline-stage when
    that was given) and whose pipeline split has been checked against the model's layers."""
    p = config.parallelism
    stages = pipeline_stage_layers(arch.num_layers, p.pipeline_model_parallel_size,
                                   p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers,
                                   pp_flag=TRAIN_LAYOUT_FLAGS[1])
    vpp = p.virtual_pipeline_model_parallel_size
    per_chunk = p.num_layers_per_virtual_pipeline_stage
    if per_chunk is not None:
        if stages[0] % per_chunk:
            raise UserError(f"--num-layers-per-virtual-pipeline-stage {per_chunk} does not divide the {stages[0]} "
                            f"layers of a pipeline stage ({arch.num_layers} layers / PP "
                            f"{p.pipeline_model_parallel_size})")
        vpp = stages[0] // per_chunk
    if vpp is not None and vpp > 1:
        if p.pipeline_model_parallel_size == 2 and None not in (p.decoder_first_pipeline_num_layers,
                                                                p.decoder_last_pipeline_num_layers):
            # megatron-core 0.16 divides by the (zero) middle stages here; the first stage's count says it all
            raise UserError("with --pipeline-model-parallel-size 2 and virtual stages give only "
                            "--decoder-first-pipeline-num-layers (the last stage holds the rest)")
        bad = sorted({n for n in stages if n % vpp})
        if bad:
            raise UserError(f"--virtual-pipeline-model-parallel-size {vpp} does not divide the {bad[0]} layers of "
                            f"a pipeline stage (stages hold {stages} layers)")
    out = copy.deepcopy(config)
    out.parallelism.virtual_pipeline_model_parallel_size = vpp if vpp and vpp > 1 else None
    out.parallelism.num_layers_per_virtual_pipeline_stage = None  # resolved into the above
    return out


def first_chunk_layers(config: TrainConfig, arch: LlamaArch) -> int:
    """Layers of pipeline chunk 0 (rank 0, virtual stage 0): all of them without pipeline parallelism."""
    p = config.parallelism
    if p.pipeline_model_parallel_size < 2:
        return arch.num_layers
    stages = pipeline_stage_layers(arch.num_layers, p.pipeline_model_parallel_size,
                                   p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers,
                                   pp_flag=TRAIN_LAYOUT_FLAGS[1])
    return stages[0] // (p.virtual_pipeline_model_parallel_size or 1)


def check_microbatches(config: TrainConfig, num_microbatches: int) -> None:
    """The interleaved schedule runs micro batches in groups of PP per chunk (megatron-core's default group)."""
    p = config.parallelism
    if p.virtual_pipeline_model_parallel_size and num_microbatches % p.pipeline_model_parallel_size:
        raise UserError(f"the interleaved pipeline schedule (virtual stages) needs the micro batches per step "
                        f"({num_microbatches} = global batch / (micro batch x data-parallel size)) to be a multiple "
                        f"of --pipeline-model-parallel-size {p.pipeline_model_parallel_size}; change "
                        "--global-batch-size or --micro-batch-size")


def transformer_overrides(config: TrainConfig, arch: LlamaArch, spec_kind: str) -> dict[str, Any]:
    """TransformerConfig fields for the pipeline split, recomputation, sequence parallel and the window."""
    p, m = config.parallelism, config.model
    seq = config.schedule.seq_length
    if arch.sliding_window is not None and seq > arch.sliding_window and spec_kind not in WINDOWED_SPECS:
        raise UserError(f"--seq-length {seq} is longer than the model's sliding attention window "
                        f"({arch.sliding_window}), which the {spec_kind} spec cannot apply; use --seq-length "
                        f"{arch.sliding_window} or less, or the {' / '.join(WINDOWED_SPECS)} spec")
    overrides: dict[str, Any] = {
        # megatron-core's fused SwiGLU is pure torch (torch.compile): on GPUs with or without TE/Apex. On CPU its
        # compile costs more than it saves, and the CPU tests compare the unfused ops against transformers.
        "bias_activation_fusion": not m.no_bias_swiglu_fusion and _cuda_available(),
        "num_layers_in_first_pipeline_stage": p.decoder_first_pipeline_num_layers,
        "num_layers_in_last_pipeline_stage": p.decoder_last_pipeline_num_layers,
        "sequence_parallel": p.sequence_parallel,
        # the loss the model computes for the trainer (trainer.py); fused by default on CUDA: 0.172 -> 0.167 s/step
        # on an H200 (BENCHMARKS.md); on CPU the compile costs more than it saves
        "cross_entropy_loss_fusion": (m.cross_entropy_loss_fusion if m.cross_entropy_loss_fusion is not None
                                      else _cuda_available()),
        "cross_entropy_fusion_impl": "native",
    }
    overrides.update(moe_overrides(config, arch))
    overrides.update(fp8_overrides(config, spec_kind))
    if p.virtual_pipeline_model_parallel_size:
        # Megatron-LM's interleaved defaults. They also keep the two directions apart: with batched p2p at PP 2
        # both neighbours are the same rank, and gloo pairs an activation send with a gradient receive (same
        # shape, silently wrong); the unbatched ops order sends/receives by rank parity over two groups.
        overrides.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if m.recompute_granularity is not None:
        overrides.update(recompute_granularity=m.recompute_granularity, recompute_method=m.recompute_method,
                         recompute_num_layers=m.recompute_num_layers)
    return overrides


def moe_overrides(config: TrainConfig, arch: LlamaArch) -> dict[str, Any]:
    """TransformerConfig fields of an MoE model's training: the aux-loss coefficient and the dispatcher (EP itself
    is `build_gpt_model`'s ``ep``). Refuses the MoE flags for a dense model."""
    m = config.model
    if not arch.is_moe:
        for flag, value in (("--moe-aux-loss-coeff", m.moe_aux_loss_coeff),
                            ("--moe-token-dispatcher-type", m.moe_token_dispatcher_type)):
            if value is not None:
                raise UserError(f"{flag} is for mixture-of-experts models; this is a dense {arch.architecture}")
        return {}
    p = config.parallelism
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        # megatron-core's MoELayer.forward raises in training otherwise (moe/moe_layer.py, "performance may degrade")
        raise UserError(f"--tensor-model-parallel-size {p.tensor_model_parallel_size}: an MoE model trains with "
                        "tensor parallelism only with --sequence-parallel (megatron-core's MoE layer requires it); "
                        "add it, or train at TP 1 and split the experts with --expert-model-parallel-size and "
                        "--expert-tensor-parallel-size")
    if m.moe_token_dispatcher_type == "alltoall" and not _cuda_available():
        raise UserError("--moe-token-dispatcher-type alltoall needs CUDA (megatron-core's all-to-all dispatcher "
                        "creates CUDA streams); on CPU use allgather (the default there)")
    overrides: dict[str, Any] = {"moe_aux_loss_coeff": (m.moe_aux_loss_coeff if m.moe_aux_loss_coeff is not None
                                                        else arch.aux_loss_coef)}
    if m.moe_token_dispatcher_type is not None:
        overrides["moe_token_dispatcher_type"] = m.moe_token_dispatcher_type
    return overrides


def fp8_overrides(config: TrainConfig, spec_kind: str) -> dict[str, Any]:
    """TransformerConfig's FP8 fields (megatron-core then runs each TE layer under TE's FP8 autocast,
    `transformer_block.py`); the device's support is checked where the model is built (`model.py`)."""
    m = config.model
    if m.fp8_format is None:
        return {}
    if spec_kind != "te":
        raise UserError(f"--fp8-format {m.fp8_format} runs FP8 GEMMs through Transformer Engine: it needs the te "
                        f"spec (a GPU with Transformer Engine installed), not the {spec_kind} spec")
    overrides: dict[str, Any] = {"fp8": m.fp8_format, "fp8_recipe": m.fp8_scaling}
    if m.fp8_amax_history_len is not None:
        overrides["fp8_amax_history_len"] = m.fp8_amax_history_len
    if m.fp8_amax_compute_algo is not None:
        overrides["fp8_amax_compute_algo"] = m.fp8_amax_compute_algo
    return overrides


def check_world_size(world_size: int, p, flag: str) -> None:
    """`world_size` ranks (`flag`: the option that gave it) hold the layout of parallelism section `p`: TP x PP (x DP)
    and, for the experts, ETP x EP x PP over the same ranks. `train --dry-run` and `train --nproc` check this."""
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    if world_size % (tp * pp):
        raise UserError(f"{flag} {world_size} is not a multiple of TP x PP = {tp * pp}")
    dp = world_size // (tp * pp)
    if etp is None and dp % ep:
        raise UserError(f"--expert-model-parallel-size {ep} does not divide the data-parallel size {dp} "
                        f"({flag} {world_size} / TP x PP {tp * pp}): experts are split over data-parallel ranks")
    if etp is not None and world_size % (etp * ep * pp):
        raise UserError(f"{flag} {world_size} is not a multiple of ETP x EP x PP = {etp * ep * pp}: the "
                        "experts are laid out over the same ranks")
