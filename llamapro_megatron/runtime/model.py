"""The GPTModel of a LLaMA-family architecture, built from megatron-core's layer specs (`specs.py`).

One construction for every user: conversion and expansion workers (on the meta device, for the sharded state
dict only), the trainer, verify, evaluate, generate and the dry-run planner. Also what megatron-core's GPTModel
does not carry itself: transformers-exact RoPE frequencies (Llama-3.1 scaling included) and the padded vocabulary
rows' mask.
"""
from __future__ import annotations

from llamapro_megatron.arch import LlamaArch


def build_gpt_model(arch: LlamaArch, padded_vocab_size: int, *, dtype: str, tp: int = 1, pp: int = 1,
                    vpp: int | None = None, ep: int = 1, etp: int | None = None, num_layers: int | None = None,
                    spec: str = "local", meta_device: bool = False, vp_stage: int | None = None,
                    rope_fusion: bool | None = None, **config_overrides):
    """A megatron-core GPTModel for this rank's pipeline stage (parallel state must be initialised); ``ep``: the
    expert-parallel size of an MoE model (this rank builds its share of each layer's experts), ``etp`` the
    tensor-parallel size of each expert (None: ``tp``).

    meta_device=True builds it without memory, for its sharded_state_dict only (keys, global shapes).
    rope_fusion (CUDA): True (training) fuses RoPE, TE's kernel on the te spec, a compiled one otherwise
    (:mod:`~llamapro_megatron.runtime.rope`); False: megatron's unfused ops on every spec; None: megatron's defaults
    (TE's kernel on te, no compiling: short inference runs would spend more on compiling than it saves).
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from llamapro_megatron.runtime.specs import decoder_spec, gpt_layer_spec, resolve_spec_kind

    kind = resolve_spec_kind(spec)
    overrides = dict(config_overrides)
    if ep != 1:
        overrides["expert_model_parallel_size"] = ep
    if etp is not None:
        overrides["expert_tensor_parallel_size"] = etp
    if meta_device:
        overrides.update(use_cpu_initialization=True, perform_initialization=False)
    if kind == "te" and rope_fusion is False:
        overrides.setdefault("apply_rope_fusion", False)
    if not meta_device and torch.cuda.is_available():  # the route is process-wide: set it for every real build
        from llamapro_megatron.runtime.rope import set_rope_fusion

        set_rope_fusion(bool(rope_fusion) and kind != "te")  # TE fuses RoPE itself (apply_rope_fusion)
    config = arch.transformer_config(tp=tp, pp=pp, vpp=vpp, dtype=dtype, num_layers=num_layers,
                                     fused_kernels=kind == "te", **overrides)
    ignore_virtual = vp_stage is None
    spec_module = decoder_spec(kind, gpt_layer_spec(kind, qk_layernorm=arch.qk_norm, num_experts=arch.num_experts),
                               config, vp_stage)
    kwargs = dict(config=config, transformer_layer_spec=spec_module,
                  pre_process=ps.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
                  post_process=ps.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
                  **arch.gpt_model_kwargs(padded_vocab_size))
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    if meta_device:
        with torch.device("meta"):
            model = GPTModel(**kwargs)
    else:
        model = GPTModel(**kwargs)
    set_rotary_inv_freq(model, arch)
    return model


def mask_padded_vocabulary(model, vocab_size: int, padded_vocab_size: int) -> None:
    """Give the padded vocabulary rows' logits -inf, so a loss the model computes (labels given to GPTModel) leaves
    them out of the softmax as HF's loss, which has no such rows, does. No-op without padding or output layer.

    With labels, megatron-core's cross-entropy runs on the [s, b, v] logits; returning logits instead copies them to
    [b, s, v] (and, in training, their gradient back): CPU, SmolLM2 at 2 x 256 tokens, ~0.3 s of a ~4 s step.
    Used by the trainer and by evaluate.
    """
    import torch
    from megatron.core import parallel_state as ps

    layer = getattr(model, "output_layer", None)
    if layer is None or padded_vocab_size <= vocab_size:
        return
    tp_rank = ps.get_tensor_model_parallel_rank()

    def hook(module, inputs, output):
        logits, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        start = tp_rank * logits.shape[-1]  # this rank's vocabulary slice
        if start + logits.shape[-1] <= vocab_size:
            return None
        padded = torch.arange(start, start + logits.shape[-1], device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
        return logits if rest is None else (logits, *rest)

    layer.register_forward_hook(hook)


def set_rotary_inv_freq(model, arch: LlamaArch) -> None:
    """Install transformers-exact RoPE frequencies (Llama-3.1 scaling included); not part of the state dict."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None and rope.inv_freq.device.type != "meta":
        rope.inv_freq = arch.rotary_inv_freq().to(rope.inv_freq.device)
