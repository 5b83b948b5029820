"""The LLaMA-family architecture: read a Hugging Face config, validate it, and build megatron-core's config.

`LlamaArch` is the one description of a model that every part of the project shares: conversion reads it from
`config.json`, checkpoints store it in their metadata, the trainer and verify build megatron-core models from it,
and export writes it back as a Hugging Face config.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_megatron.errors import UserError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                           "Qwen3ForCausalLM": "qwen3", "MixtralForCausalLM": "mixtral",
                           "Qwen3MoeForCausalLM": "qwen3_moe"}
# families whose q/k/v projections always have biases (no config field says so)
_QKV_BIAS_ARCHITECTURES = {"Qwen2ForCausalLM"}
# families with per-head RMSNorm of q and k (no config field says so either)
_QK_NORM_ARCHITECTURES = {"Qwen3ForCausalLM", "Qwen3MoeForCausalLM"}
MOE_ARCHITECTURES = {"MixtralForCausalLM", "Qwen3MoeForCausalLM"}
# families whose head_dim may differ from hidden_size / num_attention_heads (megatron-core's kv_channels)
_FREE_HEAD_DIM_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"}
# close relatives refused by name, saying why
_REFUSED_ARCHITECTURES = {
    "Qwen2MoeForCausalLM": "Qwen2-MoE's shared expert with a sigmoid gate (shared_expert_intermediate_size) is not "
                           "supported; Mixtral and Qwen3-MoE are",
}
# HF config fields whose presence (with a truthy value) means a feature this project does not convert.
_UNSUPPORTED_TRUTHY = {
    "attention_bias": "attention biases",
    "mlp_bias": "MLP biases",
    "shared_expert_intermediate_size": "a shared expert",
    "router_jitter_noise": "router jitter noise",
    "mlp_only_layers": "dense layers among the MoE layers",
}
# fields that mean experts, refused outside the MoE families
_MOE_FIELDS = ("num_local_experts", "num_experts", "moe_intermediate_size")
# validate_layout's flag names as `llamapro train` (Megatron-LM) spells them
TRAIN_LAYOUT_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                      "--virtual-pipeline-model-parallel-size", "--expert-model-parallel-size",
                      "--expert-tensor-parallel-size")
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def canonical_dtype(name: str) -> str:
    """'bf16' / 'bfloat16' / 'torch.bfloat16' -> 'bfloat16'."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"dtype {name!r} is not supported; choose one of bf16, fp16, fp32")
    return DTYPES[key]


def dtype_bytes(name: str) -> int:
    """Bytes per element of a supported dtype (without importing torch)."""
    return {"float32": 4, "bfloat16": 2, "float16": 2}[canonical_dtype(name)]


def torch_dtype(name: str):
    import torch

    return getattr(torch, canonical_dtype(name))


ROPE_TYPES = ("llama3", "linear")  # besides "default" (no scaling)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling, carried exactly: Llama-3.1's frequency-dependent one (``llama3``; megatron-core hard-codes
    1 / 4 / 8192), or position interpolation (``linear``: every frequency divided by ``factor``, as transformers'
    "linear" rope type). A checkpoint's record without ``rope_type`` is llama3 (the only kind before linear)."""

    factor: float
    low_freq_factor: float | None = None  # llama3 only, as the next two
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: str = "llama3"

    def to_hf(self) -> dict[str, Any]:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {"rope_type": "llama3", "factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings}


def layout_world_size(tp: int, pp: int, ep: int = 1, etp: int | None = None) -> int:
    """The fewest ranks a layout runs on: megatron-core lays TP x PP (x DP) and, for the experts, ETP x EP x PP
    (x expert DP) over the same world, so both products must divide it."""
    return pp * math.lcm(tp, (etp or tp) * ep)


@dataclass(frozen=True)
class LlamaArch:
    architecture: str  # a key of SUPPORTED_ARCHITECTURES
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # recorded (Mistral); the trainer refuses sequences it cannot window
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    dtype: str = "float32"  # the source's dtype
    qkv_bias: bool = False  # q/k/v projection biases (Qwen2); megatron-core's add_qkv_bias
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3); megatron-core's qk_layernorm
    # mixture of experts (every layer): experts per layer, experts per token (weights renormalised over the top k),
    # each expert's FFN size (ffn_hidden_size keeps the config's intermediate_size), the HF aux-loss coefficient
    num_experts: int | None = None
    moe_topk: int | None = None
    moe_ffn_hidden_size: int | None = None
    router_aux_loss_coef: float | None = None  # None (a checkpoint recorded before the default was read): 0.001

    @property
    def aux_loss_coef(self) -> float:
        """The load-balancing loss's coefficient the config means (transformers' default where it names none)."""
        return ROUTER_AUX_LOSS_COEF_DEFAULT if self.router_aux_loss_coef is None else self.router_aux_loss_coef

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def expert_ffn_size(self) -> int:
        """The FFN size of the layers' MLPs: each expert's for MoE models."""
        return self.moe_ffn_hidden_size if self.is_moe else self.ffn_hidden_size

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> LlamaArch:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise UserError(f"{hf_dir} has no config.json; pass a Hugging Face model directory (config.json + "
                            "*.safetensors)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from e
        return cls.from_hf_config(config, source=str(path))

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> LlamaArch:
        def need(field: str):
            if config.get(field) is None:
                raise UserError(f"{source}: required field {field!r} is missing")
            return config[field]

        archs = config.get("architectures") or []
        model_type = config.get("model_type")
        _check_int_fields(config, source)
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        refused = next((a for a in archs if a in _REFUSED_ARCHITECTURES), None)
        if arch is None and refused:
            raise UserError(f"{source}: {refused}: {_REFUSED_ARCHITECTURES[refused]}")
        if arch is None:
            if archs or model_type not in SUPPORTED_ARCHITECTURES.values():
                raise UserError(f"{source}: architectures={archs} model_type={model_type!r} is not a LLaMA-family "
                                f"model; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
            arch = next(a for a, t in SUPPORTED_ARCHITECTURES.items() if t == model_type)
        for field, what in _UNSUPPORTED_TRUTHY.items():
            if config.get(field):
                raise UserError(f"{source}: {field}={config[field]!r} ({what}) is not supported by LLaMA-family "
                                "conversion")
        if arch not in MOE_ARCHITECTURES:
            for field in _MOE_FIELDS:
                if config.get(field):
                    raise UserError(f"{source}: {field}={config[field]!r} (mixture of experts) in a {arch} config; "
                                    f"MoE models convert as {sorted(MOE_ARCHITECTURES)}")
        moe = _read_moe(config, arch, source) if arch in MOE_ARCHITECTURES else {}
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{source}: hidden_act={act!r}; LLaMA-family models use 'silu' (SwiGLU)")

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        groups = config.get("num_key_value_heads") or heads
        if heads % groups:
            raise UserError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
        head_dim = config.get("head_dim") or hidden // heads
        theta, scaling = _read_rope(config, source, arch)
        eps = config.get("rms_norm_eps", 1e-6)
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        sliding = config.get("sliding_window") if arch in ("MistralForCausalLM", "MixtralForCausalLM") else None
        if arch.startswith("Qwen") and config.get("use_sliding_window"):
            raise UserError(f"{source}: use_sliding_window=true (Qwen's sliding window on the layers from "
                            "max_window_layers on) is not supported; the released Qwen models disable it")
        if arch not in _FREE_HEAD_DIM_ARCHITECTURES and head_dim != hidden // heads:
            raise UserError(f"{source}: head_dim={head_dim} differs from hidden_size / num_attention_heads "
                            f"({hidden // heads}), which {arch} models use")
        return cls(
            architecture=arch,
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=need("intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=head_dim,
            vocab_size=need("vocab_size"),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=float(eps),
            rope_theta=float(theta),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            sliding_window=sliding,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            initializer_range=config.get("initializer_range", 0.02),
            dtype=canonical_dtype(dtype),
            qkv_bias=arch in _QKV_BIAS_ARCHITECTURES,
            qk_norm=arch in _QK_NORM_ARCHITECTURES,
            **moe,
        )

    # ------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaArch:
        d = dict(d)
        if d.get("architecture") not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"architecture {d.get('architecture')!r} is not a LLaMA-family model; supported: "
                            f"{sorted(SUPPORTED_ARCHITECTURES)}")
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def replace(self, **changes) -> LlamaArch:
        return dataclasses.replace(self, **changes)

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json that transformers (4.45+ and 5.x) reads back to this architecture."""
        model_type = SUPPORTED_ARCHITECTURES[self.architecture]
        rope_scaling = None if self.rope_scaling is None else self.rope_scaling.to_hf()
        config = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "torch_dtype": canonical_dtype(dtype or self.dtype),
            "use_cache": True,
        }
        if model_type == "llama":
            config["mlp_bias"] = False
        elif model_type in ("mistral", "mixtral"):
            config["sliding_window"] = self.sliding_window
        else:  # Qwen: the sliding-window fields present, disabled
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
        if model_type == "qwen2":  # biases implied, head_dim implied
            del config["attention_bias"], config["head_dim"]
        if model_type == "mixtral":
            config.update(num_local_experts=self.num_experts, router_jitter_noise=0.0)
            if self.head_dim == self.hidden_size // self.num_attention_heads:
                del config["head_dim"]  # as Mixtral's configs say it: implied (transformers keeps None)
        elif model_type == "qwen3_moe":
            config.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_ffn_hidden_size,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        if self.is_moe:
            config.update(num_experts_per_tok=self.moe_topk, router_aux_loss_coef=self.aux_loss_coef,
                          output_router_logits=False)
        return config

    # ----------------------------------------------------------- validation
    def validate_layout(self, tp: int, pp: int, vpp: int | None = None, num_layers: int | None = None,
                        first: int | None = None, last: int | None = None,
                        flags: tuple[str, ...] = ("--tp", "--pp", "--vpp", "--ep", "--etp"), ep: int = 1,
                        etp: int | None = None) -> None:
        """Refuse a TP/PP/VPP layout megatron-core cannot run this model at, saying what would work.

        ``first``/``last``: layers on the first/last pipeline stage when they differ from the rest (Megatron-LM's
        --decoder-first/last-pipeline-num-layers); the other stages split the remaining layers evenly. ``flags``:
        the command's names for TP / PP / VPP / EP / ETP, used in the messages (train takes Megatron-LM's long names).
        ``ep``: expert parallelism (MoE models only; the experts of a layer are split over EP ranks); ``etp``: each
        expert's tensor-parallel size (MoE only; None: TP), which then splits the experts' FFN instead of TP.
        """
        T, P, V, E, ET = (*flags, "--ep", "--etp")[:5]
        layers = num_layers if num_layers is not None else self.num_layers
        if tp < 1 or pp < 1:
            raise UserError(f"{T} {tp} {P} {pp}: both must be at least 1")
        for flag, value in ((E, ep), (ET, etp)):
            if value is not None and value < 1:
                raise UserError(f"{flag} {value}: must be at least 1")
        if self.num_attention_heads % tp:
            raise UserError(f"{T} {tp} does not divide {self.num_attention_heads} attention heads; choose one of "
                            f"{_divisors(math.gcd(self.num_attention_heads, self.num_query_groups))}")
        if tp > self.num_query_groups or self.num_query_groups % tp:
            raise UserError(f"{T} {tp} must divide the {self.num_query_groups} KV groups (query groups are split "
                            f"across TP ranks, never a group itself); choose one of "
                            f"{_divisors(math.gcd(self.num_attention_heads, self.num_query_groups))}")
        if etp is not None:
            if not self.is_moe:
                raise UserError(f"{ET} {etp}: expert tensor parallelism needs a mixture-of-experts model; this is a "
                                f"dense {self.architecture}")
            if etp < 1 or self.expert_ffn_size % etp:
                raise UserError(f"{ET} {etp} does not divide the experts' FFN size {self.expert_ffn_size}")
        elif self.expert_ffn_size % tp:
            what = "experts' FFN size" if self.is_moe else "FFN size"
            raise UserError(f"{T} {tp} does not divide the {what} {self.expert_ffn_size}")
        if ep != 1:
            if not self.is_moe:
                raise UserError(f"{E} {ep}: expert parallelism needs a mixture-of-experts model; this is a dense "
                                f"{self.architecture}")
            if ep < 1 or self.num_experts % ep:
                raise UserError(f"{E} {ep} does not divide the {self.num_experts} experts; choose one of "
                                f"{_divisors(self.num_experts)}")
        if pp > layers:
            raise UserError(f"{P} {pp} is larger than the {layers} layers; use at most {P} {layers}")
        stages = pipeline_stage_layers(layers, pp, first, last, pp_flag=P)
        if vpp is not None and vpp > 1:
            if pp < 2:
                raise UserError(f"{V} {vpp} needs {P} of at least 2 (virtual stages interleave pipeline stages)")
            bad = sorted({n for n in stages if n % vpp})
            if bad:
                raise UserError(f"{V} {vpp} does not divide the {bad[0]} layers of a pipeline stage (stages hold "
                                f"{stages}); every stage's layers are split into {vpp} chunks")

    def padded_vocab_size(self, tp: int = 1, divisible_by: int = 128) -> int:
        """Megatron-LM's padding: a multiple of divisible_by x TP (extra rows are excluded from loss and export)."""
        multiple = divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    # --------------------------------------------------------- megatron-core
    def transformer_config(self, *, tp: int = 1, pp: int = 1, vpp: int | None = None, dtype: str = "float32",
                           fused_kernels: bool = False, num_layers: int | None = None, **overrides):
        """megatron-core TransformerConfig for this architecture at a parallel layout.

        fused_kernels=False is what the CPU (local spec) path needs: no apex/TE fusions. With True, the weight-gradient
        accumulation fusion is still left off where Apex's extension is missing (a TE install without Apex).
        """
        import torch
        from megatron.core.transformer.transformer_config import TransformerConfig

        from llamapro_megatron.runtime.compat import weight_gradient_fusion_available

        dt = canonical_dtype(dtype)
        kwargs = dict(
            num_layers=num_layers if num_layers is not None else self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.initializer_range,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
            params_dtype=getattr(torch, dt),
            pipeline_dtype=getattr(torch, dt),
            bf16=dt == "bfloat16",
            fp16=dt == "float16",
            apply_rope_fusion=fused_kernels,
            masked_softmax_fusion=fused_kernels,
            bias_activation_fusion=False,
            bias_dropout_fusion=fused_kernels,
            gradient_accumulation_fusion=fused_kernels and weight_gradient_fusion_available(),
            persist_layer_norm=fused_kernels,
            use_cpu_initialization=not torch.cuda.is_available(),
            sequence_parallel=False,
            window_size=self.attention_window(),
            qk_layernorm=self.qk_norm,
        )
        if self.is_moe:
            # top-k on the logits, softmax over those k: Mixtral's and Qwen3-MoE's (norm_topk_prob) renormalised
            # weights; dropless like transformers. The all-to-all dispatcher needs CUDA streams (token_dispatcher.py
            # `torch.cuda.Stream()` in its constructor): on CPU the all-gather one
            kwargs.update(num_moe_experts=self.num_experts, moe_router_topk=self.moe_topk,
                          moe_ffn_hidden_size=self.moe_ffn_hidden_size, moe_router_pre_softmax=False,
                          moe_router_load_balancing_type="aux_loss",
                          moe_aux_loss_coeff=self.aux_loss_coef,
                          moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
                          moe_grouped_gemm=fused_kernels)
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    def attention_window(self) -> tuple[int, int] | None:
        """megatron-core's (left, right) window for Mistral's sliding window, None for full causal attention.

        transformers lets query i see keys i-W+1..i (``kv_idx > q_idx - sliding_window``): W keys including itself,
        so the left window is W-1. megatron-core applies it in TE attention and in the local spec's softmax.
        """
        return None if self.sliding_window is None else (self.sliding_window - 1, 0)

    def gpt_model_kwargs(self, padded_vocab_size: int) -> dict[str, Any]:
        """Arguments of megatron-core's GPTModel besides config, layer spec and pre/post process."""
        return dict(
            vocab_size=padded_vocab_size,
            max_sequence_length=self.max_position_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=self.rope_theta,
            share_embeddings_and_output_weights=self.tie_word_embeddings,
        )

    def rotary_inv_freq(self):
        """RoPE inverse frequencies exactly as transformers computes them (incl. Llama-3.1 scaling).

        megatron-core 0.16's `_apply_scaling` hard-codes low/high frequency factors 1/4 and original length
        8192, and GPTModel takes only a factor, so the project sets the model's `inv_freq` itself.
        """
        import torch

        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        s = self.rope_scaling
        if s is None:
            return inv_freq
        if s.rope_type == "linear":
            return inv_freq / s.factor
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)


def _read_moe(config: dict[str, Any], arch: str, source: str) -> dict[str, Any]:
    """The MoE fields of a Mixtral / Qwen3-MoE config (every layer sparse, top-k weights renormalised)."""
    # the hub's Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts for both families
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not experts:
        raise UserError(f"{source}: {arch} needs num_local_experts (or num_experts), the experts per layer")
    topk = config.get("num_experts_per_tok")
    if not topk or not 0 < topk <= experts:  # an integer, if there (_check_int_fields)
        raise UserError(f"{source}: num_experts_per_tok={topk!r} must be between 1 and the {experts} experts")
    if arch == "Qwen3MoeForCausalLM":
        if not config.get("norm_topk_prob"):
            raise UserError(f"{source}: norm_topk_prob={config.get('norm_topk_prob')!r}: only renormalised top-k "
                            "routing weights (norm_topk_prob: true, as the released Qwen3-MoE models) are supported")
        step = config.get("decoder_sparse_step", 1)
        if step != 1:
            raise UserError(f"{source}: decoder_sparse_step={step!r} (dense layers between the MoE layers) is not "
                            "supported; every layer must be an MoE layer (decoder_sparse_step 1)")
        ffn = config.get("moe_intermediate_size")
        if not ffn:
            raise UserError(f"{source}: required field 'moe_intermediate_size' is missing")
    else:  # Mixtral: the experts' FFN size is intermediate_size
        ffn = config.get("intermediate_size")
    coef = config.get("router_aux_loss_coef")
    if coef is None:
        coef = ROUTER_AUX_LOSS_COEF_DEFAULT
    if not _is_number(coef) or not 0 <= coef < float("inf"):
        raise UserError(f"{source}: router_aux_loss_coef={coef!r} must be a number, 0 or more")
    return dict(num_experts=experts, moe_topk=topk, moe_ffn_hidden_size=ffn, router_aux_loss_coef=float(coef))


# transformers' default of both MoE families' config classes (MixtralConfig, Qwen3MoeConfig), for a config.json
# that leaves the field out
ROUTER_AUX_LOSS_COEF_DEFAULT = 0.001
# integer fields of a config.json, checked before any is used: a string or a float there is the user's mistake
_POSITIVE_INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings", "sliding_window",
                        "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size")


def _check_int_fields(config: dict[str, Any], source: str) -> None:
    for field in _POSITIVE_INT_FIELDS:
        value = config.get(field)
        if value is not None and (not _is_int(value) or value < 1):
            raise UserError(f"{source}: {field}={value!r} must be a positive integer")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# transformers' `default_theta` of each family's config class: the theta of a config.json that names none
_DEFAULT_THETA = {"MixtralForCausalLM": 1000000.0}
_DEFAULT_THETA_OTHERS = 10000.0


def _read_rope(config: dict[str, Any], source: str, arch: str) -> tuple[float, RopeScaling | None]:
    """theta and scaling from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters` (transformers 5),
    with transformers' precedence (`modeling_rope_utils.convert_rope_params_to_dict`, 5.x): a `rope_scaling` block
    replaces `rope_parameters` whole; theta is that block's `rope_theta`, else the top-level `rope_theta`, else the
    family's default; the type is `rope_type`, else the legacy `type`, else "default"."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise UserError(f"{source}: rope_scaling / rope_parameters must be an object, got {scaling!r}")
    theta = scaling.get("rope_theta", config.get("rope_theta", _DEFAULT_THETA.get(arch, _DEFAULT_THETA_OTHERS)))
    if not _is_number(theta) or not theta > 0:
        raise UserError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise UserError(f"{source}: rope type {rope_type!r} is not supported; supported: 'default', 'linear' and "
                        "'llama3'")
    if rope_type == "linear":
        factor = scaling.get("factor")
        if not _is_number(factor) or not factor > 0:
            raise UserError(f"{source}: linear rope scaling needs a positive 'factor' (got {factor!r})")
        return theta, RopeScaling(factor=float(factor), rope_type="linear")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    for name in fields:
        if name not in scaling:
            raise UserError(f"{source}: llama3 rope scaling is missing {name!r}")
        if not _is_number(scaling[name]) or not scaling[name] > 0:
            raise UserError(f"{source}: llama3 rope scaling's {name!r} must be a positive number, got "
                            f"{scaling[name]!r}")
    return theta, RopeScaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                              high_freq_factor=float(scaling["high_freq_factor"]),
                              original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def _is_number(value: Any) -> bool:
    """A JSON number (not a bool, which Python counts as one, nor a string that looks like one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pipeline_stage_layers(num_layers: int, pp: int, first: int | None = None, last: int | None = None,
                          pp_flag: str = "--pp") -> list[int]:
    """Decoder layers of each pipeline stage, as megatron-core splits them: ``first``/``last`` on the end stages
    when given, the remaining layers evenly over the other stages. Refuses splits it cannot make (naming the
    pipeline size as ``pp_flag``)."""
    flags = "--decoder-first-pipeline-num-layers/--decoder-last-pipeline-num-layers"
    if first is None and last is None:
        if num_layers % pp:
            raise UserError(f"{pp_flag} {pp} does not divide {num_layers} layers; choose one of "
                            f"{_divisors(num_layers)}, or (training) put the remainder on the end stages with {flags}")
        return [num_layers // pp] * pp
    if pp < 2:
        raise UserError(f"{flags} need pipeline parallelism ({pp_flag} 2 or more)")
    for name, value in (("first", first), ("last", last)):
        if value is not None and value < 1:
            raise UserError(f"--decoder-{name}-pipeline-num-layers {value}: must be at least 1")
    middle_stages = pp - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    if middle < 0 or bool(middle) != bool(middle_stages) or (middle_stages and middle % middle_stages):
        given = " ".join(f"--decoder-{n}-pipeline-num-layers {v}" for n, v in (("first", first), ("last", last))
                         if v is not None)
        raise UserError(f"{given} with --pp {pp}: the other {middle_stages} stage(s) would share {middle} of the "
                        f"{num_layers} layers; they must split evenly (and every stage needs a layer)")
    each = middle // middle_stages if middle_stages else 0
    if middle_stages and each < 1:
        raise UserError(f"{flags}: the middle pipeline stages would hold no layer")
    stages = [each] * pp
    if first is not None:
        stages[0] = first
    if last is not None:
        stages[-1] = last
    return stages


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
