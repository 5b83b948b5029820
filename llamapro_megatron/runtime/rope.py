"""RoPE as compiled kernels on a GPU where Transformer Engine's fused RoPE is not in use (the sdpa and local specs).

megatron-core's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``) makes about six passes over the query and
the key of every layer (cos and sin, two products, the rotate-half ``cat``, the sum, and a ``cat`` with an empty
pass-through part), forward and backward. ``torch.compile`` turns each direction into one kernel. megatron-core
calls that function through its module, so routing it here changes nothing else; the math is megatron's own.

:func:`set_rope_fusion` installs or removes the route; ``build_gpt_model`` installs it on CUDA for the trainer's
models on the non-TE specs (the TE spec uses TE's fused RoPE, ``apply_rope_fusion``) and removes it for every other
build: verify, evaluate and generate are short runs whose compiling would cost more than it saves (and generate's
growing sequence recompiles). The trainer's ``--no-rope-fusion`` turns both off. On CPU the route is never
installed (the CPU tests compare megatron's eager ops against transformers). If compiling fails here (no working
Triton, say), the first call warns once and megatron's unfused function runs from then on.
"""

from __future__ import annotations

import warnings

_ORIGINAL_ATTR = "_llamapro_original"
_compile_failed = False


def set_rope_fusion(enabled: bool) -> bool:
    """Route megatron-core's bshd RoPE through ``torch.compile`` (enabled) or back to its own; returns whether
    the compiled route is installed now."""
    from megatron.core.models.common.embeddings import rope_utils

    current = rope_utils._apply_rotary_pos_emb_bshd
    original = getattr(current, _ORIGINAL_ATTR, current)
    if not enabled:
        rope_utils._apply_rotary_pos_emb_bshd = original
        return False
    if current is not original:
        return True
    rope_utils._apply_rotary_pos_emb_bshd = _compiled_route(original)
    return True


def _compiled_route(original):
    import torch

    compiled = torch.compile(original)  # compiled at the first call; a second shape (key vs query heads) goes dynamic

    def rope(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        global _compile_failed
        if t.is_cuda and not _compile_failed:
            try:
                return compiled(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
            except _compile_errors() as exc:
                _compile_failed = True
                warnings.warn(f"compiled RoPE unavailable here ({type(exc).__name__}: {str(exc)[:200]}); using "
                              "megatron-core's unfused RoPE", stacklevel=2)
        return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)

    setattr(rope, _ORIGINAL_ATTR, original)
    return rope


def _compile_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ImportError]
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)
