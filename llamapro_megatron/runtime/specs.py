"""Which megatron-core transformer-layer implementation ("spec") to build GPT models with.

- ``te``: Transformer Engine modules (fused LayerNorm+Linear, TE attention); needs CUDA and transformer_engine.
- ``sdpa``: the local spec with core attention by torch's ``scaled_dot_product_attention`` (flash /
  memory-efficient kernels; :mod:`.sdpa`); runs anywhere, fast without Transformer Engine (CPU, AMD, a GPU box
  without TE). What ``auto`` picks where TE is not usable.
- ``local``: megatron-core's own modules (torch RMSNorm/LayerNorm, DotProductAttention, which materialises the
  [b, h, s, s] scores); runs anywhere.

Checkpoints are interchangeable between all three: the local and sdpa specs map their norm keys onto TE's fused
names (``sharded_state_dict_keys_map`` in ``gpt_layer_specs.py``), and core attention has no parameters.

Every spec runs sequence parallelism: the local and sdpa specs' norms are :class:`TorchNorm` (megatron-core's
``WrappedTorchNorm`` refuses ``sequence_parallel``), and their final norm comes with them (:func:`decoder_spec`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

from ..errors import UserError

SPEC_KINDS = ("auto", "te", "sdpa", "local")
SPEC_HELP = ("megatron layer spec: te (Transformer Engine, CUDA), sdpa (torch scaled_dot_product_attention: "
             "flash/memory-efficient kernels, any device), local (megatron-core's plain modules), or auto (te "
             "where CUDA and Transformer Engine are usable, else sdpa). Checkpoints work with every spec")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """True when ``transformer_engine.pytorch`` imports (it cannot without CUDA libraries)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, OSError (missing cuDNN/CUDA libraries), RuntimeError...
        return False
    return True


def require_fp8_support(recipe: str) -> None:
    """Refuse an FP8 recipe this device cannot run, with Transformer Engine's own reason (e.g. "Device compute
    capability 9.0 or higher required for FP8 execution.", "MXFP8 ... Blackwell")."""
    if not (_cuda_available() and transformer_engine_available()):
        raise UserError("--fp8-format needs a GPU with Transformer Engine installed (FP8 GEMMs are TE kernels)")
    import transformer_engine.pytorch as te

    checks = {"mxfp8": "is_mxfp8_available", "blockwise": "is_fp8_block_scaling_available"}
    check = getattr(te, checks.get(recipe, "is_fp8_available"), None)
    if check is None:  # Transformer Engine older than 2.8 names these fp8.check_*_support()
        from transformer_engine.pytorch import fp8

        old = {"mxfp8": "check_mxfp8_support", "blockwise": "check_fp8_block_scaling_support"}
        ok, reason = getattr(fp8, old.get(recipe, "check_fp8_support"))()
    else:
        ok, reason = check(return_reason=True)
    if not ok:
        import torch

        raise UserError(f"--fp8-recipe {recipe} cannot run on this GPU ({torch.cuda.get_device_name()}): {reason}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_spec_kind(requested: str = "auto") -> str:
    """Turn a requested spec kind into the one to build: ``"te"``, ``"sdpa"`` or ``"local"``.

    ``"auto"`` gives ``"te"`` when CUDA is available and Transformer Engine imports, else ``"sdpa"``. Asking for
    ``"te"`` where that is not the case raises :class:`~llamapro_megatron.errors.UserError`.
    """
    kind = str(requested).strip().lower()
    if kind not in SPEC_KINDS:
        raise UserError(f"unknown layer spec {requested!r} (--spec); expected one of {', '.join(SPEC_KINDS)}")
    if kind in ("local", "sdpa"):
        return kind
    te_usable = _cuda_available() and transformer_engine_available()
    if kind == "auto":
        return "te" if te_usable else "sdpa"
    if not _cuda_available():
        raise UserError("layer spec 'te' needs CUDA, which is not available here (torch.cuda.is_available() is "
                        "False); use --spec sdpa, local or auto")
    if not te_usable:
        raise UserError("layer spec 'te' needs Transformer Engine, which does not import here; install "
                        "transformer-engine[pytorch] (e.g. use an NGC PyTorch container) or use --spec sdpa/auto")
    return "te"


def _require_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")


class TorchNorm:
    """torch's RMSNorm / LayerNorm (``TransformerConfig.normalization``) as megatron-core's ``WrappedTorchNorm``
    builds them, which also runs under sequence parallelism.

    ``WrappedTorchNorm`` asserts ``not config.sequence_parallel`` (``torch_norm.py:32``, megatron-core 0.16.1 and
    0.19). Under sequence parallelism a norm sees only its rank's slice of the sequence, so its weight's gradient is a
    partial sum; megatron-core all-reduces over the tensor-parallel group exactly the parameters marked
    ``sequence_parallel`` (``finalize_model_grads.py``, ``_allreduce_non_tensor_model_parallel_grads``), as TE's and
    Apex's norms mark theirs. The q/k norms (Qwen3) are summed there by name already, with or without the mark.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any) -> Any:
        import torch

        _require_normalization(config.normalization)
        norm = getattr(torch.nn, config.normalization)(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _te_spec(normalization: str, qk_layernorm: bool, num_experts: int | None) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    # TE norms read TransformerConfig.normalization; the spec function has no normalization argument. Experts are
    # TE's grouped GEMM (TransformerConfig.moe_grouped_gemm follows the spec kind, `arch.transformer_config`).
    return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=num_experts is not None,
                                                      qk_layernorm=qk_layernorm)


def _local_spec(normalization: str, qk_layernorm: bool, num_experts: int | None) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if not _accepts_kwarg(get_gpt_layer_local_spec, "normalization"):
        raise RuntimeError("this megatron-core's get_gpt_layer_local_spec() has no 'normalization' argument; "
                           "llamapro_megatron.runtime.specs needs an update for it")
    spec = get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=qk_layernorm, normalization=normalization)
    if num_experts is not None:
        # An MoE layer's pre-MLP norm is not fused into an fc1 in TE's spec (`pre_mlp_layernorm=TENorm`, stored as
        # `pre_mlp_layernorm.weight`), but the local spec maps it to `mlp.linear_fc1.layer_norm_weight` all the
        # same (gpt_layer_specs.py, get_gpt_layer_local_spec's sharded_state_dict_keys_map): keep TE's key, so an
        # MoE checkpoint loads with every spec.
        keys = dict(spec.submodules.sharded_state_dict_keys_map)
        keys.pop("pre_mlp_layernorm.", None)
        spec.submodules.sharded_state_dict_keys_map = keys
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = TorchNorm
    if qk_layernorm:
        layer.self_attention.submodules.q_layernorm = layer.self_attention.submodules.k_layernorm = TorchNorm
    return spec


def _sdpa_spec(normalization: str, qk_layernorm: bool, num_experts: int | None) -> Any:
    from .sdpa import SDPAttention

    spec = _local_spec(normalization, qk_layernorm, num_experts)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _accepts_kwarg(fn: Callable[..., Any], name: str) -> bool:
    # Newer megatron-core wraps spec functions as (*args, **kwargs) forwarding to *_submodules(...).
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_BUILDERS: dict[str, Callable[[str, bool, int | None], Any]] = {"te": _te_spec, "sdpa": _sdpa_spec,
                                                                  "local": _local_spec}


def decoder_spec(kind: str, layer_spec: Any, config: Any, vp_stage: int | None) -> Any:
    """What GPTModel's ``transformer_layer_spec`` gets: the layer spec itself on TE (its final norm is TENorm), on
    the local and sdpa specs the decoder block of this rank's layers with :class:`TorchNorm` as its final norm
    (megatron-core would pick ``WrappedTorchNorm`` for it, ``transformer_block.py``'s ``LayerNormImpl``). The layer
    count is megatron-core's own for the stage (``get_num_layers_to_build``, as ``get_gpt_decoder_block_spec``)."""
    if resolve_spec_kind(kind) == "te":
        return layer_spec
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=ps.get_pipeline_model_parallel_rank())
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=TorchNorm)


def gpt_layer_spec(kind: str, normalization: str = "RMSNorm", qk_layernorm: bool = False,
                   num_experts: int | None = None) -> Any:
    """megatron-core ``ModuleSpec`` of one GPT decoder layer for ``kind`` (resolved first if ``"auto"``).

    ``normalization`` selects the local and sdpa specs' norm; the TE spec follows ``TransformerConfig.normalization``,
    so set that to the same value in either case. ``qk_layernorm``: per-head q/k norms (Qwen3); ``num_experts``: an
    MoE layer (sequential experts on the local specs, grouped GEMM on TE; the checkpoint keys are the same).
    """
    _require_normalization(normalization)
    from . import prepare

    prepare()
    resolved = resolve_spec_kind(kind)
    return _BUILDERS[resolved](normalization, qk_layernorm, num_experts)
