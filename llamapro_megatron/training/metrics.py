"""Throughput figures: FLOPs counted for what a LLaMA Pro step really computes, and the 6N convention beside.

Per token, forward matmuls (2 FLOPs per multiply-add): attention projections, the attention core (QK^T and
AV over the full sequence, as the local spec computes them), the SwiGLU MLP and the output layer. Backward:
- input (activation) gradients, as much as the forward, wherever autograd runs: from the lowest layer that
  needs them upwards (the lowest trainable layer; every layer past the first pipeline chunk, whose received
  activations always require grad in megatron's schedule; everything when the embedding trains); the
  attention core's backward costs twice its forward;
- weight gradients, as much as the forward of that weight, only for weights that train.
A frozen block below every trainable one costs its forward only; a frozen block above costs forward + input
gradients. The conventional 6N (N = all parameters, as if all trained) is printed beside, labelled. An MoE layer's
MLP counts the top-k experts a token goes through, and its router (N counts every expert).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from llamapro_megatron.arch import LlamaArch

# bf16 dense peak TFLOP/s per device, by a substring of torch.cuda.get_device_name()
KNOWN_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@dataclass(frozen=True)
class FlopCounts:
    per_token: float  # what the step computes, per token (forward + backward)
    six_n_per_token: float  # 6 x all parameters
    num_parameters: int


def parameter_count(arch: LlamaArch, padded_vocab: int) -> int:
    """Every parameter (every expert's), from the one tensor description."""
    from llamapro_megatron.checkpoint import mapping

    per_layer = sum(math.prod(t.shape) for t in mapping.layer_tensors(arch))
    return arch.num_layers * per_layer + sum(math.prod(t.shape) for t in mapping.global_tensors(arch, padded_vocab))


def flops_per_token(arch: LlamaArch, padded_vocab: int, seq_length: int, trainable_layers: set[int] | None,
                    train_embeddings: bool, train_output: bool, first_chunk_layers: int) -> FlopCounts:
    """``trainable_layers`` None means every layer trains; ``first_chunk_layers``: layers of pipeline chunk 0
    (the whole model without pipeline parallelism)."""
    h, f = arch.hidden_size, arch.expert_ffn_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    proj = 2 * h * (q + 2 * kv) + 2 * q * h
    core = 2 * 2 * seq_length * q
    # MoE: each token through its top-k experts, and the router
    mlp = 2 * 3 * h * f * (arch.moe_topk or 1) + (2 * h * arch.num_experts if arch.is_moe else 0)
    head = 2 * h * padded_vocab
    n = arch.num_layers
    trains = (lambda i: True) if trainable_layers is None else (lambda i: i in trainable_layers)
    if trainable_layers is None or train_embeddings:
        lowest = 0
    else:
        lowest = min([*trainable_layers, first_chunk_layers if first_chunk_layers < n else n])
    any_backward = lowest < n or train_output
    total = n * (proj + core + mlp) + head  # forward
    for i in range(n):
        if i >= lowest:
            total += proj + 2 * core + mlp  # input gradients
        if trains(i):
            total += proj + mlp  # weight gradients
    if any_backward and lowest < n:
        total += head  # input gradient of the output layer
    if train_output or (trainable_layers is None):
        total += head
    params = parameter_count(arch, padded_vocab)
    return FlopCounts(float(total), 6.0 * params, params)


def peak_tflops(override: float | None) -> float | None:
    if override is not None:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in KNOWN_PEAKS.items() if k in name), None)


class ScalarWriter:
    """TensorBoard scalars (torch's SummaryWriter; needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str | None) -> None:
        self.writer = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            import warnings

            warnings.warn(f"--tensorboard-dir {log_dir}: the tensorboard package is not installed; "
                          "`pip install tensorboard` to get TensorBoard logs (console logging continues)",
                          stacklevel=2)
            return
        self.writer = SummaryWriter(log_dir=log_dir)

    def add(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
