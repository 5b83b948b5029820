"""The HF <-> Megatron tensor map against an independent, per-head statement of Megatron's layouts."""
from __future__ import annotations

import pytest
import torch

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint import mapping
from tests.unit.test_arch import BASE

ARCH = LlamaArch.from_hf_config(dict(BASE, hidden_size=24, intermediate_size=10, num_attention_heads=6,
                                     num_key_value_heads=2, vocab_size=50))  # head_dim 4, 3 q heads per group


def _by_name(name: str):
    return next(t for t in mapping.LAYER_TENSORS + mapping.GLOBAL_TENSORS if t.mcore == name)


def test_qkv_is_grouped_per_query_group():
    d, h = ARCH.head_dim, ARCH.hidden_size
    q = torch.randn(6 * d, h)
    k = torch.randn(2 * d, h)
    v = torch.randn(2 * d, h)
    fused = mapping.to_mcore(_by_name("self_attention.linear_qkv.weight"), [q, k, v], ARCH, 128)
    # Megatron: for each group g: q heads 3g..3g+2, then k head g, then v head g
    rows = []
    for g in range(2):
        rows += [q[(3 * g + i) * d:(3 * g + i + 1) * d] for i in range(3)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    assert torch.equal(fused, torch.cat(rows))
    back = mapping.to_hf(_by_name("self_attention.linear_qkv.weight"), fused, ARCH)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


def test_fc1_is_gate_then_up_and_vocab_padding():
    gate, up = torch.randn(10, 24), torch.randn(10, 24)
    t = _by_name("mlp.linear_fc1.weight")
    fused = mapping.to_mcore(t, [gate, up], ARCH, 128)
    assert torch.equal(fused[:10], gate) and torch.equal(fused[10:], up)
    assert all(torch.equal(a, b) for a, b in zip(mapping.to_hf(t, fused, ARCH), [gate, up]))
    emb = torch.randn(50, 24)
    e = _by_name("embedding.word_embeddings.weight")
    padded = mapping.to_mcore(e, [emb], ARCH, 128)
    assert padded.shape == (128, 24) and torch.equal(padded[:50], emb) and not padded[50:].any()
    assert torch.equal(mapping.to_hf(e, padded, ARCH)[0], emb)


def test_names_and_zeroed_projections():
    assert mapping.hf_names("decoder.layers.7.mlp.linear_fc1.weight") == [
        "model.layers.7.mlp.gate_proj.weight", "model.layers.7.mlp.up_proj.weight"]
    zeroed = {t.mcore for t in mapping.LAYER_TENSORS if t.zero_in_identity_copy}
    assert zeroed == {"self_attention.linear_proj.weight", "mlp.linear_fc2.weight"}
    tied = ARCH.replace(tie_word_embeddings=True)
    assert "output_layer.weight" not in {t.mcore for t in mapping.global_tensors(tied)}
    assert "lm_head.weight" not in mapping.expected_hf_shapes(tied)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])  # MQA (the q slice is contiguous), GQA, MHA
def test_qkv_export_tensors_own_their_storage(kv_heads, tmp_path):
    from safetensors.torch import load_file, save_file

    arch = LlamaArch.from_hf_config(dict(BASE, hidden_size=24, intermediate_size=10, num_attention_heads=6,
                                         num_key_value_heads=kv_heads, vocab_size=50))
    d, h = arch.head_dim, arch.hidden_size
    q, k, v = torch.randn(6 * d, h), torch.randn(kv_heads * d, h), torch.randn(kv_heads * d, h)
    t = _by_name("self_attention.linear_qkv.weight")
    fused = mapping.to_mcore(t, [q, k, v], arch, 128)
    back = mapping.to_hf(t, fused, arch)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))
    storages = {x.untyped_storage().data_ptr() for x in [fused, *back]}
    assert len(storages) == 4  # none shares the fused tensor's storage or another's
    save_file(dict(zip("qkv", back)), str(tmp_path / "x.safetensors"))  # safetensors refuses shared storage
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[name], x) for name, x in zip("qkv", back))
