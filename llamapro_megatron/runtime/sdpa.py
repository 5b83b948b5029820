"""Core attention through PyTorch's ``scaled_dot_product_attention``: the ``sdpa`` layer spec's attention.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward, same [s, b, h, d] layout,
no parameters, so checkpoints are shared with the local and TE specs). Where the local module materialises
the [b, h, s, s] score matrix, SDPA picks a fused kernel: FlashAttention or memory-efficient attention on
CUDA (and ROCm), a flash-style kernel on CPU. Training without Transformer Engine stays fast and long
sequences fit.

Kernel choice, ``LLAMAPRO_SDPA_BACKEND`` (read when the model is built; like Transformer Engine's ``NVTE_*``
attention switches): ``auto`` (default) prefers cuDNN attention on Hopper and newer GPUs wherever torch says it
takes the inputs (grouped K/V as they are, else repeated), and otherwise leaves the choice to PyTorch (FlashAttention
first); ``cudnn``, ``flash``, ``efficient`` or ``math`` force that kernel on CUDA (an error if it cannot run).
``benchmarks/attention.py`` times the kernels at a shape.

Masks follow the local module's rules: an explicit boolean ``attention_mask`` (True = masked) wins; otherwise
``AttnMaskType.causal`` is causal and ``padding``/``no_mask`` attend everywhere. A sliding window
(``config.window_size``, for the layers ``window_attn_skip_freq`` selects) is applied as a banded mask. A
plain causal mask goes to the kernel as ``is_causal`` (the flash path); anything else becomes a boolean mask.
Not handled, refused with an error: packed sequences (``packed_seq_params``), attention bias, context
parallelism, softmax variants other than vanilla.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from ..errors import UserError

_UNMASKED = (AttnMaskType.padding, AttnMaskType.no_mask)
BACKEND_ENV = "LLAMAPRO_SDPA_BACKEND"
BACKEND_CHOICES = ("auto", "cudnn", "flash", "efficient", "math")


def _refuse(what: str) -> UserError:
    return UserError(f"the 'sdpa' layer spec does not handle {what}; use --spec te (Transformer Engine) "
                     "or --spec local")


def backend_choice() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKEND_CHOICES:
        raise UserError(f"{BACKEND_ENV}={value!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    return value


@functools.cache
def _prefers_cudnn(device_index: int) -> bool:
    # Hopper and newer: cuDNN's fused attention beat FlashAttention-2 (torch's flash kernel) in
    # benchmarks/attention.py on an H200 (BENCHMARKS.md); older GPUs keep torch's own order.
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _cudnn_takes(q, k, v, allowed, dropout: float, is_causal: bool, gqa: bool) -> bool:
    try:
        from torch.backends.cuda import SDPAParams, can_use_cudnn_attention

        return bool(can_use_cudnn_attention(SDPAParams(q, k, v, allowed, dropout, is_causal, gqa)))
    except (ImportError, TypeError, RuntimeError):  # an older torch without these checks or arguments
        return False


def _has_enable_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a C builtin without a signature: try the call instead
        return torch.__version__ >= "2.5"


class SDPAttention(MegatronModule):
    """megatron-core core attention computed by ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: Any = None, **extra: Any) -> None:
        super().__init__(config=config)
        _refuse_extra("constructor", extra)
        if config.context_parallel_size != 1:
            raise _refuse(f"context parallelism (--context-parallel-size {config.context_parallel_size})")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise _refuse(f"softmax_type {config.softmax_type!r}")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.heads = divide(config.num_attention_heads, tp_size)
        self.groups = divide(config.num_query_groups, tp_size)
        head_dim = divide(config.kv_channels * config.num_attention_heads, config.num_attention_heads)
        # apply_query_key_layer_scaling divides the scale by the layer number and multiplies the scores back
        # in the local softmax: the product is unchanged, so SDPA takes the plain scale.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None
        self.enable_gqa = _has_enable_gqa()
        self.backend = backend_choice()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None,
                **extra: Any) -> torch.Tensor:
        """query [sq, b, heads, d], key/value [sk, b, groups, d] (this TP rank's) -> context [sq, b, heads*d]."""
        if packed_seq_params is not None:
            raise _refuse("packed sequences (packed_seq_params)")
        if attention_bias is not None:
            raise _refuse("an attention bias")
        _refuse_extra("forward", extra)
        sq, b, _, d = query.shape
        sk = key.shape[0]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        allowed, is_causal = self._mask(attention_mask, mask_type, sq, sk, query.device)
        # [s, b, h, d] -> [b, h, s, d]: a view, last dimension contiguous as the fused kernels need.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        kernel, grouped = self._kernel(q, k, v, allowed, dropout, is_causal)
        kwargs = {}
        if self.heads != self.groups:
            if grouped:
                kwargs["enable_gqa"] = True
            else:  # kernels that take equal head counts only: repeat K/V as the local module does
                k = k.repeat_interleave(self.heads // self.groups, dim=1)
                v = v.repeat_interleave(self.heads // self.groups, dim=1)
        # Dropout under megatron's model-parallel RNG, as the local module does.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng, kernel:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                     is_causal=is_causal, scale=self.softmax_scale, **kwargs)
        # [b, h, sq, d] -> [sq, b, h*d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads * d)

    def _mask(self, attention_mask: torch.Tensor | None, mask_type: AttnMaskType, sq: int, sk: int,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask, True = attend; is_causal) for SDPA, following the local module's precedence."""
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise _refuse(f"a {attention_mask.dtype} attention mask (megatron masks are boolean, True = masked)")
            allowed = ~attention_mask
        elif mask_type == AttnMaskType.causal:
            if self.window is None and sq == sk:
                return None, True  # the kernels' own causal masking: no mask tensor at all
            if self.window is None and sq == 1:
                return None, False  # one new token attends to the whole cache (as the local module)
            allowed = _band(sq, sk, None, 0, device)  # causal aligned to the end (a cache before the queries)
        elif mask_type in _UNMASKED:
            allowed = None
        else:
            raise _refuse(f"attention mask type {mask_type.name} without an explicit mask")
        if self.window is not None:
            band = _band(sq, sk, self.window[0], self.window[1], device)
            allowed = band if allowed is None else allowed & band
        return allowed, False

    def _kernel(self, q, k, v, allowed, dropout: float, is_causal: bool):
        """(context choosing the SDPA kernel, whether grouped K/V go in as they are) per LLAMAPRO_SDPA_BACKEND."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        choice = self.backend
        if not q.is_cuda:  # the switch is about CUDA kernels
            return contextlib.nullcontext(), self._use_enable_gqa(q, allowed)
        if choice == "cudnn" or (choice == "auto" and _prefers_cudnn(q.device.index or 0)):
            gqa = self.heads != self.groups and self.enable_gqa
            if _cudnn_takes(q, k, v, allowed, dropout, is_causal, gqa):
                return sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), gqa
            if _cudnn_takes(q, q, q, allowed, dropout, is_causal, False):  # K/V repeated to the query's shape
                return sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), False
            if choice == "cudnn":
                raise UserError(f"{BACKEND_ENV}=cudnn: cuDNN attention does not take these inputs here ({q.dtype}, "
                                f"head dim {q.shape[-1]}, {'a mask' if allowed is not None else 'no mask'}); "
                                "unset it to let PyTorch choose")
        if choice in ("auto", "cudnn"):
            return contextlib.nullcontext(), self._use_enable_gqa(q, allowed)
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "math": SDPBackend.MATH}[choice]
        return sdpa_kernel([backend]), choice == "flash" and self.enable_gqa

    def _use_enable_gqa(self, q: torch.Tensor, allowed: torch.Tensor | None) -> bool:
        # FlashAttention reads grouped K/V directly; the memory-efficient kernel (fp32, or a mask) and the CPU
        # kernels do not and would fall back to the slow math path, so give those repeated K/V instead.
        return (self.enable_gqa and q.is_cuda and allowed is None
                and q.dtype in (torch.float16, torch.bfloat16))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return {}  # no parameters, no extra state: checkpoints are those of the local and TE specs


def _band(sq: int, sk: int, left: int | None, right: int, device: torch.device) -> torch.Tensor:
    """Query i (aligned to the end of the keys) may attend key j when j - i' in [-left, right]; True = attend.

    The same band as megatron-core's ``get_sliding_window_causal_mask`` (left None: unbounded)."""
    i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    j = torch.arange(sk, device=device).unsqueeze(0)
    allowed = j <= i + right
    if left is not None and left >= 0:
        allowed &= j >= i - left
    return allowed


def _refuse_extra(where: str, extra: dict[str, Any]) -> None:
    # Newer megatron-core may pass more keyword arguments; unset ones are harmless, set ones are not handled.
    given = sorted(k for k, v in extra.items() if v is not None)
    if given:
        raise _refuse(f"the {where} argument(s) {', '.join(given)} (from a newer megatron-core?)")
