"""The one description of how a Megatron checkpoint's tensors are made of Hugging Face tensors.

Every stored megatron tensor (per decoder layer, and per expert for experts) is described once, as its rows in
megatron order: row spans of HF tensors, cut into the *blocks* megatron-core stores as separate chunks at TP=1.
"Rows" are dim 0 (the elements of a 1-D tensor). Every path consumes this description and nothing else:

- the regular import fills a megatron-core sharded-state-dict entry with its blocks (:func:`blocks_from_hf`);
- the direct import turns each block into byte ranges of the safetensors files (`direct_import.plan_import`);
- the regular export cuts a loaded tensor into its HF tensors (:func:`hf_from_blocks`) and the direct export
  reads those same row spans from the checkpoint's chunks (`direct_export.plan_export`), both through
  :func:`hf_row_spans`;
- expansion zeroes the tensors marked ``zero_in_identity_copy``; unit sizes (`units.py`) sum stored shapes.

Megatron names are megatron-core's local-spec state-dict names of a GPTModel built at TP=1 PP=1 (layer numbers
global). A torch_dist checkpoint stores *global* tensors, so nothing here splits for TP: the checkpoint reshards on
load. What differs from HF, written once below:
- `linear_qkv` fuses Q, K, V per query group: for each of G groups, [H/G q heads, 1 k head, 1 v head]
  (:func:`per_group_rows`; q/k/v biases, where a family has them, interleave the same way);
- `linear_fc1` is [gate; up] on the output dim, stored as two chunks (megatron-core's SwiGLU factory);
- embedding / output rows are padded to the padded vocabulary with zero rows; export strips them;
- norms are stored under the TE spec's names (`sharded_state_dict_keys_map` in gpt_layer_specs.py), so a checkpoint
  loads with either spec.
Experts (MoE) are stored by megatron-core under one key with an expert axis after the layer axis, indexed by the
global expert number (`SequentialMLP.sharded_state_dict`: `mlp.experts.local_experts.E.linear_fc1.weight` -> key
`mlp.experts.experts.linear_fc1.weight` at expert offset E; TE's grouped `linear_fc1.weightE` maps to the same key),
so a checkpoint is free of the expert-parallel layout:
:attr:`StoredTensor.expert` carries (index, count) and every consumer honours that axis.

Torch-free except the two tensor consumers (torch imported inside them).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamapro_megatron.arch import LlamaArch

if TYPE_CHECKING:
    import torch

MCORE_LAYER_PREFIX = "decoder.layers."
HF_LAYER_PREFIX = "model.layers."
_MCORE_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of an HF tensor; `hf` None: zero rows (vocabulary padding)."""
    hf: str | None
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class StoredTensor:
    """One megatron tensor: names, shape of one layer's (one expert's) tensor, its rows as HF row spans."""
    name: str  # model state-dict name (local spec), relative to the layer for decoder tensors
    key: str  # checkpoint key, same convention; stacked over layers (and experts) in the checkpoint
    shape: tuple[int, ...]
    blocks: tuple[tuple[Rows, ...], ...]  # megatron order, one block per stored chunk at TP=1
    zero_in_identity_copy: bool = False  # residual-branch output projections: zero in LLaMA Pro's copies
    expert: tuple[int, int] | None = None  # (global expert index, number of experts): an expert axis

    @property
    def row_elements(self) -> int:
        """Elements per row (1 for a 1-D tensor)."""
        return math.prod(self.shape[1:])

    def hf_names(self) -> list[str]:
        """The HF tensors feeding this one, in order of first appearance."""
        return list(dict.fromkeys(r.hf for block in self.blocks for r in block if r.hf is not None))

    def block_offsets(self) -> list[int]:
        """First megatron row of each block."""
        starts, at = [], 0
        for block in self.blocks:
            starts.append(at)
            at += sum(r.count for r in block)
        return starts

    def lead(self, layer: int | None) -> tuple[int, ...]:
        """Indices on the leading (layer, expert) axes of the stored tensor."""
        if layer is None:
            return ()
        return (layer,) if self.expert is None else (layer, self.expert[0])

    def stored_shape(self, num_layers: int | None) -> tuple[int, ...]:
        """The checkpoint's global shape: (layers, [experts,] *shape) for decoder tensors."""
        if num_layers is None:
            return self.shape
        return (num_layers, *([] if self.expert is None else [self.expert[1]]), *self.shape)


# --------------------------------------------------------------------- HF shapes
# HF names of an MoE layer's router and of expert E's gate / up / down projections, per family
_MOE_HF_NAMES = {
    "MixtralForCausalLM": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                           "block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight"),
    "Qwen3MoeForCausalLM": ("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                            "mlp.experts.{e}.down_proj.weight"),
}


def moe_hf_names(arch: LlamaArch, expert: int) -> tuple[str, str, str, str]:
    """(router, gate, up, down) HF names of one expert of an MoE layer (relative to the layer)."""
    router, *projections = _MOE_HF_NAMES[arch.architecture]
    return (router, *(p.format(e=expert) for p in projections))


def hf_layer_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of one decoder layer (names relative to the layer), with its shape."""
    h, f, d = arch.hidden_size, arch.expert_ffn_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
    }
    if arch.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    if not arch.is_moe:
        shapes.update({"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)})
        return shapes
    for e in range(arch.num_experts):
        router, gate, up, down = moe_hf_names(arch, e)
        shapes.update({router: (arch.num_experts, h), gate: (f, h), up: (f, h), down: (h, f)})
    return shapes


def hf_global_shapes(arch: LlamaArch) -> dict[str, tuple[int, ...]]:
    h = arch.hidden_size
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def expected_hf_shapes(arch: LlamaArch, num_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a LLaMA-family checkpoint of this architecture must have, with its shape."""
    shapes = hf_global_shapes(arch)
    per_layer = hf_layer_shapes(arch)
    for i in range(arch.num_layers if num_layers is None else num_layers):
        shapes.update({f"{HF_LAYER_PREFIX}{i}.{k}": v for k, v in per_layer.items()})
    return shapes


# ------------------------------------------------------------------ the description
def whole(hf: str, shapes: dict[str, tuple[int, ...]]) -> tuple[Rows, ...]:
    return (Rows(hf, 0, shapes[hf][0]),)


def per_group_rows(q: str, k: str, v: str, groups: int, q_rows: int, kv_rows: int) -> tuple[Rows, ...]:
    """megatron-core's fused QKV order (weights and biases alike): per query group, its q rows, then k, then v."""
    return tuple(r for g in range(groups) for r in (Rows(q, g * q_rows, (g + 1) * q_rows),
                                                     Rows(k, g * kv_rows, (g + 1) * kv_rows),
                                                     Rows(v, g * kv_rows, (g + 1) * kv_rows)))


def stored_tensor(name: str, blocks: tuple[tuple[Rows, ...], ...], shapes: dict, key: str | None = None,
                  zero: bool = False, expert: tuple[int, int] | None = None) -> StoredTensor:
    """A stored tensor made of `blocks` of HF rows (`shapes`: the HF tensors' shapes); its shape follows from them."""
    width = next(shapes[r.hf][1:] for block in blocks for r in block if r.hf is not None)
    rows = sum(r.count for block in blocks for r in block)
    return StoredTensor(name, key or name, (rows, *width), blocks, zero, expert)


def layer_tensors(arch: LlamaArch) -> tuple[StoredTensor, ...]:
    """The stored tensors of one decoder layer (HF names relative to the layer)."""
    s = hf_layer_shapes(arch)
    g, d = arch.num_query_groups, arch.head_dim

    def qkv(kind: str) -> tuple[Rows, ...]:
        return per_group_rows(f"self_attn.q_proj.{kind}", f"self_attn.k_proj.{kind}", f"self_attn.v_proj.{kind}", g,
                              arch.num_attention_heads // g * d, d)

    def one(name: str, hf: str, **kw) -> StoredTensor:
        return stored_tensor(name, (whole(hf, s),), s, **kw)

    attention = [
        one("input_layernorm.weight", "input_layernorm.weight", key="self_attention.linear_qkv.layer_norm_weight"),
        stored_tensor("self_attention.linear_qkv.weight", (qkv("weight"),), s),
    ]
    if arch.qkv_bias:
        attention.append(stored_tensor("self_attention.linear_qkv.bias", (qkv("bias"),), s))
    if arch.qk_norm:  # per head, before RoPE, one weight shared by the heads (transformers' q_norm / k_norm)
        attention += [one("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
                      one("self_attention.k_layernorm.weight", "self_attn.k_norm.weight")]
    attention.append(one("self_attention.linear_proj.weight", "self_attn.o_proj.weight", zero=True))
    if not arch.is_moe:
        mlp = [
            one("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", key="mlp.linear_fc1.layer_norm_weight"),
            stored_tensor("mlp.linear_fc1.weight", (whole("mlp.gate_proj.weight", s), whole("mlp.up_proj.weight", s)),
                          s),
            one("mlp.linear_fc2.weight", "mlp.down_proj.weight", zero=True),
        ]
        return (*attention, *mlp)
    # MoE: the norm unfused (TE's key on every spec, `specs._local_spec`), the router, then each expert on the expert
    # axis of one key per projection (`SequentialMLP.sharded_state_dict`: local_experts.E. -> experts.experts. at E)
    n = arch.num_experts
    mlp = [one("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
           one("mlp.router.weight", moe_hf_names(arch, 0)[0])]
    for e in range(n):
        _, gate, up, down = moe_hf_names(arch, e)
        local = f"mlp.experts.local_experts.{e}."
        mlp += [stored_tensor(local + "linear_fc1.weight", (whole(gate, s), whole(up, s)), s,
                              key="mlp.experts.experts.linear_fc1.weight", expert=(e, n)),
                stored_tensor(local + "linear_fc2.weight", (whole(down, s),), s,
                              key="mlp.experts.experts.linear_fc2.weight", zero=True, expert=(e, n))]
    return (*attention, *mlp)


def global_tensors(arch: LlamaArch, padded_vocab: int) -> tuple[StoredTensor, ...]:
    """The stored tensors outside the decoder layers; tied models have no output layer."""
    s = hf_global_shapes(arch)
    pad = (Rows(None, 0, padded_vocab - arch.vocab_size),) if padded_vocab > arch.vocab_size else ()
    tensors = [stored_tensor("embedding.word_embeddings.weight", (whole("model.embed_tokens.weight", s) + pad,), s),
               stored_tensor("decoder.final_layernorm.weight", (whole("model.norm.weight", s),), s)]
    if not arch.tie_word_embeddings:
        tensors.append(stored_tensor("output_layer.weight", (whole("lm_head.weight", s) + pad,), s))
    return tuple(tensors)


def split_layer_name(mcore_name: str) -> tuple[int | None, str]:
    """'decoder.layers.3.mlp.linear_fc2.weight' -> (3, 'mlp.linear_fc2.weight'); global names -> (None, name)."""
    m = _MCORE_LAYER_RE.match(mcore_name)
    return (int(m.group(1)), m.group(2)) if m else (None, mcore_name)


class Description:
    """The stored tensors of one checkpoint, looked up by model state-dict name."""

    def __init__(self, arch: LlamaArch, padded_vocab: int):
        self.arch, self.padded_vocab = arch, padded_vocab
        self.layer = layer_tensors(arch)
        self.globals = global_tensors(arch, padded_vocab)
        self._by_name = {t.name: t for t in self.layer}
        self._global_by_name = {t.name: t for t in self.globals}

    def lookup(self, mcore_name: str) -> tuple[int | None, StoredTensor]:
        """The layer and description of a megatron tensor name (KeyError for names the project does not convert)."""
        layer, rel = split_layer_name(mcore_name)
        return layer, (self._global_by_name if layer is None else self._by_name)[rel]


def hf_name(rel: str, layer: int | None) -> str:
    return rel if layer is None else f"{HF_LAYER_PREFIX}{layer}.{rel}"


def stored_key(t: StoredTensor, layer: int | None) -> str:
    return t.key if layer is None else MCORE_LAYER_PREFIX + t.key


def hf_row_spans(t: StoredTensor) -> dict[str, list[tuple[int, int]]]:
    """For each HF tensor of `t`: the megatron row ranges [r0, r1) that hold its rows, in HF row order."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for block, start in zip(t.blocks, t.block_offsets()):
        at = start
        for r in block:
            if r.hf is not None:
                spans.setdefault(r.hf, []).append((r.start, at, at + r.count))
            at += r.count
    return {name: [(r0, r1) for _, r0, r1 in sorted(parts)] for name, parts in spans.items()}


# ------------------------------------------------------------------ tensor consumers
def blocks_from_hf(t: StoredTensor, get: Callable[[str], torch.Tensor], dtype) -> list[torch.Tensor]:
    """The regular import: `t`'s blocks as tensors of `dtype`, from `get(hf_name)` (relative names)."""
    import torch  # here, not at the top: the description serves processes that never import torch

    sources = {name: get(name) for name in t.hf_names()}
    blocks = []
    for block in t.blocks:
        parts = [sources[r.hf][r.start:r.stop].to(dtype) if r.hf is not None
                 else torch.zeros((r.count, *t.shape[1:]), dtype=dtype) for r in block]
        blocks.append(parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0))
    return blocks


def hf_from_blocks(t: StoredTensor, blocks: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The regular export: the HF tensors of `t` (relative names) from its loaded blocks (or one whole tensor);
    no two of them share storage (safetensors refuses to write tensors that do)."""
    import torch

    whole_tensor = len(blocks) == 1 and len(t.blocks) > 1
    starts = [0] if whole_tensor else t.block_offsets()
    ends = [t.shape[0]] if whole_tensor else [s + b.shape[0] for s, b in zip(starts, blocks)]
    out = {}
    row_spans = hf_row_spans(t)
    for name, spans in row_spans.items():
        pieces = []
        for r0, r1 in spans:
            i = next(i for i, (s, e) in enumerate(zip(starts, ends)) if s <= r0 and r1 <= e)
            pieces.append((blocks[i], r0 - starts[i], r1 - starts[i]))
        if len(pieces) == 1:
            src, a, b = pieces[0]
            shared = len(row_spans) > 1 and (a, b) != (0, src.shape[0])  # a slice beside its siblings' slices
            out[name] = src[a:b].clone() if shared else src[a:b]
        else:
            out[name] = torch.cat([src[a:b] for src, a, b in pieces], dim=0)
    return out
