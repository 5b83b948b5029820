"""The one HF <-> Megatron tensor map, driving both conversion directions (and expansion).

Megatron names are megatron-core's local-spec state-dict names of a GPTModel built at TP=1 PP=1 (so layer
numbers are global). A torch_dist checkpoint stores *global* tensors, so nothing here splits for TP: the
checkpoint reshards on load. What does differ from HF:
- `linear_qkv` fuses Q, K, V per query group: for each of G groups, [H/G q heads, 1 k head, 1 v head].
- `linear_fc1` is [gate; up] concatenated on the output dim (megatron-core's SwiGLU factory splits it per TP rank).
- embedding / output rows are padded to the padded vocabulary (zeros); export strips them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamapro_megatron.arch import LlamaArch

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorMap:
    mcore: str  # name relative to the layer (layer tensors) or to the model (global tensors)
    hf: tuple[str, ...]  # HF names, same convention
    kind: str  # copy | qkv | gate_up | vocab
    # Residual-branch output projections: zeroed in LLaMA Pro's identity copies.
    zero_in_identity_copy: bool = False
    # The checkpoint key (relative, as `mcore`) when it is not the state-dict name: megatron-core's local spec stores
    # its norms under the TE spec's names (`sharded_state_dict_keys_map` in gpt_layer_specs.py), so either loads.
    stored_as: str | None = None

    @property
    def stored(self) -> str:
        return self.stored_as or self.mcore


LAYER_TENSORS: tuple[TensorMap, ...] = (
    TensorMap("input_layernorm.weight", ("input_layernorm.weight",), "copy",
              stored_as="self_attention.linear_qkv.layer_norm_weight"),
    TensorMap("self_attention.linear_qkv.weight",
              ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    TensorMap("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy", zero_in_identity_copy=True),
    TensorMap("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy",
              stored_as="mlp.linear_fc1.layer_norm_weight"),
    TensorMap("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    TensorMap("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy", zero_in_identity_copy=True),
)
GLOBAL_TENSORS: tuple[TensorMap, ...] = (
    TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    TensorMap("output_layer.weight", ("lm_head.weight",), "vocab"),
)
MCORE_LAYER_PREFIX = "decoder.layers."
HF_LAYER_PREFIX = "model.layers."
_MCORE_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_BY_MCORE_LAYER = {t.mcore: t for t in LAYER_TENSORS}
_BY_MCORE_GLOBAL = {t.mcore: t for t in GLOBAL_TENSORS}


def global_tensors(arch: LlamaArch) -> tuple[TensorMap, ...]:
    """Global (non-layer) tensors of this architecture: tied models have no output layer."""
    return tuple(t for t in GLOBAL_TENSORS if not (arch.tie_word_embeddings and t.mcore == "output_layer.weight"))


def split_layer_name(mcore_name: str) -> tuple[int | None, str]:
    """'decoder.layers.3.mlp.linear_fc2.weight' -> (3, 'mlp.linear_fc2.weight'); global names -> (None, name)."""
    m = _MCORE_LAYER_RE.match(mcore_name)
    return (int(m.group(1)), m.group(2)) if m else (None, mcore_name)


def lookup(mcore_name: str) -> tuple[int | None, TensorMap]:
    """The map entry of a megatron tensor name (KeyError for names the project does not convert)."""
    layer, rel = split_layer_name(mcore_name)
    table = _BY_MCORE_GLOBAL if layer is None else _BY_MCORE_LAYER
    return layer, table[rel]


def hf_names(mcore_name: str) -> list[str]:
    """Full HF names feeding a megatron tensor."""
    layer, t = lookup(mcore_name)
    prefix = "" if layer is None else f"{HF_LAYER_PREFIX}{layer}."
    return [prefix + h for h in t.hf]


def expected_hf_shapes(arch: LlamaArch, num_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a LLaMA-family checkpoint of this architecture must have, with its shape."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers if num_layers is None else num_layers):
        shapes.update({f"{HF_LAYER_PREFIX}{i}.{k}": v for k, v in per_layer.items()})
    return shapes


# ------------------------------------------------------------------ transforms
def to_mcore(t: TensorMap, hf: Sequence[torch.Tensor], arch: LlamaArch, padded_vocab: int) -> torch.Tensor:
    """HF tensor(s) -> the global megatron tensor."""
    import torch  # here, not at the top: the mapping tables serve processes that never import torch

    if t.kind == "copy":
        return hf[0]
    if t.kind == "qkv":
        q, k, v = hf
        g, d = arch.num_query_groups, arch.head_dim
        per_group_q = arch.num_attention_heads // g * d
        return torch.cat([q.reshape(g, per_group_q, -1), k.reshape(g, d, -1), v.reshape(g, d, -1)], dim=1).reshape(
            -1, q.shape[-1])
    if t.kind == "gate_up":
        return torch.cat(list(hf), dim=0)
    if t.kind == "vocab":
        (w,) = hf
        if padded_vocab == w.shape[0]:
            return w
        out = w.new_zeros((padded_vocab, w.shape[1]))
        out[: w.shape[0]] = w
        return out
    raise ValueError(t.kind)


def to_hf(t: TensorMap, tensor: torch.Tensor | list[torch.Tensor], arch: LlamaArch) -> list[torch.Tensor]:
    """The global megatron tensor -> HF tensor(s), in the order of `t.hf`. fc1 may come as its stored halves."""
    import torch

    if t.kind == "copy":
        return [tensor]
    if t.kind == "qkv":
        g, d = arch.num_query_groups, arch.head_dim
        per_group_q = arch.num_attention_heads // g * d
        grouped = tensor.reshape(g, per_group_q + 2 * d, -1)
        q, k, v = torch.split(grouped, [per_group_q, d, d], dim=1)
        return [_own_storage(x.reshape(-1, tensor.shape[-1]), tensor) for x in (q, k, v)]
    if t.kind == "gate_up":
        if isinstance(tensor, (list, tuple)):  # already [gate, up], each with its own storage
            return list(tensor)
        return [x.clone() for x in torch.chunk(tensor, 2, dim=0)]
    if t.kind == "vocab":
        return [tensor[: arch.vocab_size]]
    raise ValueError(t.kind)


def _own_storage(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """`x` with storage of its own (safetensors refuses views). Reshaping a strided slice already copied it; a
    contiguous slice (one query group) is still a view of `base` and is cloned."""
    return x.clone() if x.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() else x
