"""The dry-run planner's memory estimate per GPU: what `llamapro train --dry-run` prints beside the counts.

Memory per GPU, in bytes (P = this rank's parameters, T = its trainable ones, d = data-parallel size):
- weights: P x 2 (bf16) or 4 (fp32); with FP8, plus TE's FP8 copies of the decoder's GEMM weights (below).
- gradients: T x 4 (megatron-core DDP reduces into fp32 gradient buffers; frozen parameters have none).
- optimizer: T x (8 Adam moments + 4 fp32 main params under bf16), divided by d with the distributed optimizer
  (experts split over EP ranks: by d / EP, their data-parallel ranks).
- activations: per layer and micro batch, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", eq. 2 and sec. 4) redone for LLaMA blocks (RMSNorm, GQA, SwiGLU, no dropout) and for frozen
  blocks, with s = sequence, b = micro batch, h = hidden, q = heads x head dim, k = KV groups x head dim,
  f = FFN size, a = heads, t = TP, e = 2 (bf16) or 4 (fp32) bytes:
      s*b*e*(2h + (2q + 2k + 2f)/t)     what every layer that gradients pass through keeps: the norms' inputs (2h),
                                        Q and the attention output, K and V (flash attention's backward reads them),
                                        SwiGLU's gate and up
    + s*b*g*(2h + f/t)                  the GEMMs' inputs for their weight gradients, only in a layer that trains:
                                        both norm outputs (2h) and SwiGLU's output (f); g = e, or 1 with FP8 (TE keeps
                                        an FP8 GEMM's input in FP8). A frozen layer keeps none: TE saves a GEMM's
                                        input only when its weight requires grad (`linear.py`,
                                        `layernorm_linear.py`), as torch's autograd does for the local spec
    + e*a*s*s*b/t                       the attention probabilities, only with the unfused attention of the local
                                        spec (flash attention in TE / SDPA keeps none), and not with selective
                                        recomputation (it recomputes exactly that)
  With sequence parallelism the 2h terms are divided by t too. With full recomputation a layer keeps only its
  input, s*b*h*e, plus the working set of one recomputed group of layers once; every layer keeps its input then
  (the trainer makes the decoder's input require grad). A layer keeps nothing when no gradient flows through it:
  below the first trainable block of the first stage when the embedding is frozen. An MoE layer: f is top-k x the
  experts' FFN size (dropless routing); it also keeps the router's probabilities (E per token) and the router's
  input (h/sp: megatron-core's RouterGatingLinearFunction saves it whether the router trains or not, moe_utils.py
  :1185 in 0.16.1, :1319 in 0.19), and when it trains fc1's input is the permuted tokens, each once per chosen
  expert: top-k x h x ETP/t per token (the allgather dispatcher pools the tokens of the ETP x EP ranks, each EP
  rank takes its experts' share) instead of the norm output's h/sp. On the local spec's sequential experts a
  trainable MoE MLP keeps exactly s*b*(top-k x h + f) more than its frozen twin (tests/unit/test_dry_run.py).
  Micro batches in flight (1F1B): min(pp - stage, micro batches) per stage; interleaved (VPP): megatron-core's
  warm-up count + 1 of model chunks. The last stage adds the logits and loss of one micro batch:
  s*b*V/t x (e + 4 + 4) (the fused cross-entropy's softmax in e bytes and its fp32 gradient with the e-byte copy
  the output layer reads; megatron-core's unfused fp32 ops keep ~2 bytes less per logit).
- FP8 (--fp8-format): TE's row- and column-wise FP8 copies of every decoder GEMM weight on the rank, 2 bytes per
  element (its weight cache, kept across micro batches), counted with the weights. From TE 2.20's source, not yet
  checked on a device (tests/gpu/test_planner_memory.py does).
Checked on an H200 (BENCHMARKS.md): the ~1B LLaMA Pro of benchmarks/train_vs_hf.py (16 -> 20 blocks, micro batch 4
x 4096, bf16, TE spec) peaked at 20.6 GiB (fused cross-entropy) and 18.7 GiB (unfused); planned 20.3 GiB (23.9
before frozen blocks were counted apart).
Not counted: the CUDA context and NCCL buffers (~1-3 GiB), allocator fragmentation, temporary buffers.
The per-layer term is what Transformer Engine's fused layers keep (the GPU spec). The local spec (CPU) keeps more:
torch's RMSNorm and softmax save fp32 copies and GQA's K and V are saved expanded; measured with saved-tensor hooks
on a small model it keeps 1.5x (fp32) to 2.1x (bf16) this estimate per layer.
"""
from __future__ import annotations

import math

from llamapro_megatron.checkpoint.mcore import CheckpointMeta
from llamapro_megatron.training.config import TrainConfig

GIB = 2**30
GRAD_BYTES = 4  # DistributedDataParallelConfig(grad_reduce_in_fp32=True) in training/model.py
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MAIN_PARAM_BYTES = 4  # fp32 copy of each trainable bf16 parameter


def state_bytes(params: int, trainable: int, config: TrainConfig, dp: int, expert_trainable: int = 0,
                expert_dp: int | None = None) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes of a rank with `params` parameters, `trainable` of them training,
    `expert_trainable` of those experts: the distributed optimizer shards their state over the ranks that hold the
    same experts only (`expert_dp`: world / (ETP x EP x PP); default DP), the rest over DP."""
    per_param = ADAM_BYTES + (MAIN_PARAM_BYTES if config.model.bf16 else 0)
    dense, experts = (trainable - expert_trainable) * per_param, expert_trainable * per_param
    if config.parallelism.use_distributed_optimizer:
        dense = math.ceil(dense / dp)
        experts = math.ceil(experts / (expert_dp or dp))
    return params * (2 if config.model.bf16 else 4), trainable * GRAD_BYTES, dense + experts


def virtual_stages(config: TrainConfig) -> int | None:
    v = config.parallelism.virtual_pipeline_model_parallel_size
    return v if v and v > 1 else None


def setting(config: TrainConfig, name: str, default=None):
    """A setting wherever a section defines it (recomputation and sequence parallelism may live in any section)."""
    for section in (config.model, config.parallelism, config.schedule):
        if hasattr(section, name):
            return getattr(section, name)
    return default


def describe_recompute(config: TrainConfig, granularity: str | None) -> str:
    if not granularity:
        return "none"
    if granularity == "selective":
        return "selective (core attention)"
    return (f"full, {setting(config, 'recompute_method') or 'uniform'}, "
            f"{setting(config, 'recompute_num_layers') or 1} layer(s)")


def layer_activation_bytes(meta: CheckpointMeta, config: TrainConfig, flash: bool, granularity: str | None,
                           trainable: bool = True) -> int:
    """Bytes one decoder layer keeps for backward per micro batch (the module docstring's formula); ``trainable``:
    whether its weights train (a frozen layer that gradients pass through keeps no GEMM inputs)."""
    a, s = meta.arch, config.schedule
    t = config.parallelism.tensor_model_parallel_size
    e = 2 if config.model.bf16 else 4
    gemm_input = 1 if config.model.fp8_format else e  # TE keeps an FP8 GEMM's input in FP8 for its wgrad
    sp = t if setting(config, "sequence_parallel") else 1
    q, k = a.num_attention_heads * a.head_dim, a.num_query_groups * a.head_dim
    ffn = a.expert_ffn_size * (a.moe_topk or 1)  # dropless MoE: each token's top-k experts
    h = a.hidden_size
    per_token = e * (2 * h / sp + (2 * q + 2 * k + 2 * ffn) / t)
    mlp_input = h / sp  # the pre-MLP norm's output, fc1's input
    if a.is_moe:  # the router's probabilities and its input, which it keeps whether it trains or not
        per_token += e * (a.num_experts / t + h / sp)
        # fc1 reads each token once per chosen expert: the tokens of ETP ranks pooled (SP), split over EP
        etp = config.parallelism.expert_tensor_parallel_size or t
        mlp_input = a.moe_topk * h * etp / t
    if trainable:  # the GEMMs' inputs, for their weight gradients: the attention's and fc1's, SwiGLU's output
        per_token += gemm_input * (h / sp + mlp_input + ffn / t)
    scores = 0 if flash or granularity == "selective" else e * a.num_attention_heads * s.seq_length ** 2 * \
        s.micro_batch_size / t
    return int(s.seq_length * s.micro_batch_size * per_token + scores)


def fp8_weight_bytes(chunks, config: TrainConfig) -> int:
    """FP8 copies of the decoder's GEMM weights (TE 2.x): each weight cast to FP8 row-wise for the forward and
    column-wise (transposed) for the input gradient, one byte per element each, kept from the forward to the
    backward of every layer on the rank (frozen ones too: their input gradients need them)."""
    from llamapro_megatron.training.freeze import decoder_layers

    if not config.model.fp8_format:
        return 0
    return 2 * sum(p.numel() for chunk in chunks for layer in decoder_layers(chunk)
                   for name, p in layer.named_parameters() if p.ndim == 2 and "router" not in name)


def activation_bytes(chunks, meta: CheckpointMeta, config: TrainConfig, pp_rank: int, microbatches: int,
                      flash: bool, granularity: str | None) -> int:
    from llamapro_megatron.training.freeze import EMBEDDING, decoder_layers

    s, p = config.schedule, config.parallelism
    pp, vpp = p.pipeline_model_parallel_size, virtual_stages(config)
    e = 2 if config.model.bf16 else 4
    full_layer = layer_activation_bytes(meta, config, flash, granularity)
    frozen_layer = layer_activation_bytes(meta, config, flash, granularity, trainable=False)
    layer_input = s.seq_length * s.micro_batch_size * meta.arch.hidden_size * e
    if setting(config, "sequence_parallel"):
        layer_input //= p.tensor_model_parallel_size
    group = setting(config, "recompute_num_layers") or 1
    method = setting(config, "recompute_method") or "uniform"
    per_chunk, working_set = [], 0
    for chunk in chunks:
        # A layer keeps activations when a gradient flows through it: its chunk's input requires grad (a later
        # stage: megatron-core's received tensors do; or a trainable embedding), or it is at or above a trainable one.
        # Full recomputation makes the decoder's input require grad (training/model.py): every layer keeps its input.
        embedding = dict(chunk.named_parameters()).get(EMBEDDING)
        flowing = (not chunk.pre_process or (embedding is not None and embedding.requires_grad)
                   or granularity == "full")
        stored = 0
        for i, layer in enumerate(decoder_layers(chunk)):
            trains = any(t.requires_grad for t in layer.parameters())
            flowing = flowing or trains
            if not flowing:
                continue
            if granularity == "full" and method == "uniform":  # groups of `group` layers keep their input
                stored += layer_input if i % group == 0 else 0
                working_set = max(working_set, full_layer * group)
            elif granularity == "full" and method == "block" and i < group:  # the first `group` layers do
                stored += layer_input
                working_set = max(working_set, full_layer)
            else:
                stored += full_layer if trains else frozen_layer
        per_chunk.append(stored)
    if pp == 1:
        in_flight = 1  # forward and backward of one micro batch at a time
    elif vpp is None:
        in_flight = min(microbatches, pp - pp_rank)  # 1F1B warm-up + 1
    else:  # megatron-core's interleaved warm-up, (pp - rank - 1) * 2 + (vpp - 1) * pp, + 1 chunk-micro-batches
        in_flight = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, microbatches * vpp)
    total = in_flight * sum(per_chunk) / len(per_chunk) + working_set
    if any(chunk.post_process for chunk in chunks):
        vocab = meta.padded_vocab_size // p.tensor_model_parallel_size
        total += s.seq_length * s.micro_batch_size * vocab * (e + 4 + 4)
    return int(total)
