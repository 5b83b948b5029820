"""The HF <-> Megatron tensor description against an independent, per-head statement of Megatron's layouts, and the
four consumers of the description (regular fill, direct import plan, direct export plan, regular export) agreeing
tensor by tensor, for LLaMA's tensors and for the kinds the next families bring (q/k/v biases, per-head q/k norms,
experts on an expert axis)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint import direct_export, direct_import, mapping
from llamapro_megatron.checkpoint.dcp import archive
from llamapro_megatron.checkpoint.dcp.index import ChunkLocation, TensorIndex
from llamapro_megatron.checkpoint.hf import HFReader
from tests.unit.test_arch import BASE

ARCH = LlamaArch.from_hf_config(dict(BASE, hidden_size=24, intermediate_size=10, num_attention_heads=6,
                                     num_key_value_heads=2, vocab_size=50))  # head_dim 4, 3 q heads per group
DESC = mapping.Description(ARCH, 128)


def _by_name(name: str, desc: mapping.Description = DESC) -> mapping.StoredTensor:
    return next(t for t in desc.layer + desc.globals if t.name == name)


def _to_mcore(t: mapping.StoredTensor, hf: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(mapping.blocks_from_hf(t, hf.__getitem__, torch.float32))


def _to_hf(t: mapping.StoredTensor, fused: torch.Tensor) -> list[torch.Tensor]:
    back = mapping.hf_from_blocks(t, [fused])
    return [back[name] for name in t.hf_names()]


def test_qkv_is_grouped_per_query_group():
    d, h = ARCH.head_dim, ARCH.hidden_size
    q = torch.randn(6 * d, h)
    k = torch.randn(2 * d, h)
    v = torch.randn(2 * d, h)
    t = _by_name("self_attention.linear_qkv.weight")
    fused = _to_mcore(t, {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v})
    # Megatron: for each group g: q heads 3g..3g+2, then k head g, then v head g
    rows = []
    for g in range(2):
        rows += [q[(3 * g + i) * d:(3 * g + i + 1) * d] for i in range(3)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    assert torch.equal(fused, torch.cat(rows))
    back = _to_hf(t, fused)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


def test_fc1_is_gate_then_up_and_vocab_padding():
    gate, up = torch.randn(10, 24), torch.randn(10, 24)
    t = _by_name("mlp.linear_fc1.weight")
    fused = _to_mcore(t, {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up})
    assert torch.equal(fused[:10], gate) and torch.equal(fused[10:], up)
    assert all(torch.equal(a, b) for a, b in zip(_to_hf(t, fused), [gate, up]))
    emb = torch.randn(50, 24)
    e = _by_name("embedding.word_embeddings.weight")
    padded = _to_mcore(e, {"model.embed_tokens.weight": emb})
    assert padded.shape == (128, 24) and torch.equal(padded[:50], emb) and not padded[50:].any()
    assert torch.equal(_to_hf(e, padded)[0], emb)


def test_names_and_zeroed_projections():
    layer, t = DESC.lookup("decoder.layers.7.mlp.linear_fc1.weight")
    assert [mapping.hf_name(rel, layer) for rel in t.hf_names()] == [
        "model.layers.7.mlp.gate_proj.weight", "model.layers.7.mlp.up_proj.weight"]
    zeroed = {t.name for t in DESC.layer if t.zero_in_identity_copy}
    assert zeroed == {"self_attention.linear_proj.weight", "mlp.linear_fc2.weight"}
    tied = ARCH.replace(tie_word_embeddings=True)
    assert "output_layer.weight" not in {t.name for t in mapping.global_tensors(tied, 128)}
    assert "lm_head.weight" not in mapping.expected_hf_shapes(tied)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])  # MQA (the q slice is contiguous), GQA, MHA
def test_qkv_export_tensors_own_their_storage(kv_heads, tmp_path):
    from safetensors.torch import load_file, save_file

    arch = LlamaArch.from_hf_config(dict(BASE, hidden_size=24, intermediate_size=10, num_attention_heads=6,
                                         num_key_value_heads=kv_heads, vocab_size=50))
    d, h = arch.head_dim, arch.hidden_size
    q, k, v = torch.randn(6 * d, h), torch.randn(kv_heads * d, h), torch.randn(kv_heads * d, h)
    t = _by_name("self_attention.linear_qkv.weight", mapping.Description(arch, 128))
    fused = _to_mcore(t, {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v})
    back = _to_hf(t, fused)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))
    storages = {x.untyped_storage().data_ptr() for x in [fused, *back]}
    assert len(storages) == 4  # none shares the fused tensor's storage or another's
    save_file(dict(zip("qkv", back)), str(tmp_path / "x.safetensors"))  # safetensors refuses shared storage
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[name], x) for name, x in zip("qkv", back))


# ----------------------------------------------------------------- one description, four consumers
def _next_family_tensors(arch: LlamaArch) -> tuple[mapping.StoredTensor, ...]:
    """What the next families add, written with the description's own building blocks: q/k/v biases interleaved per
    query group like the weights (Qwen2), per-head q/k norms (Qwen3), experts' [gate; up] and down projections on an
    expert axis (Mixtral / Qwen3-MoE: HF `mlp.experts.E.*`, megatron `mlp.experts.linear_fc1.weight` at expert E)."""
    g, d, h = arch.num_query_groups, arch.head_dim, arch.hidden_size
    q_rows = arch.num_attention_heads // g * d
    shapes = {"self_attn.q_proj.bias": (g * q_rows,), "self_attn.k_proj.bias": (g * d,),
              "self_attn.v_proj.bias": (g * d,), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    tensors = [
        mapping.stored_tensor("self_attention.linear_qkv.bias", (mapping.per_group_rows(
            "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", g, q_rows, d),), shapes),
        mapping.stored_tensor("self_attention.q_layernorm.weight", (mapping.whole("self_attn.q_norm.weight", shapes),),
                              shapes),
        mapping.stored_tensor("self_attention.k_layernorm.weight", (mapping.whole("self_attn.k_norm.weight", shapes),),
                              shapes),
    ]
    experts, f = 3, 8
    for e in range(experts):
        p = f"mlp.experts.{e}."
        shapes.update({p + "gate_proj.weight": (f, h), p + "up_proj.weight": (f, h), p + "down_proj.weight": (h, f)})
        tensors += [
            mapping.stored_tensor(f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                                  (mapping.whole(p + "gate_proj.weight", shapes),
                                   mapping.whole(p + "up_proj.weight", shapes)), shapes,
                                  key="mlp.experts.linear_fc1.weight", expert=(e, experts)),
            mapping.stored_tensor(f"mlp.experts.local_experts.{e}.linear_fc2.weight",
                                  (mapping.whole(p + "down_proj.weight", shapes),), shapes,
                                  key="mlp.experts.linear_fc2.weight", zero=True, expert=(e, experts)),
        ]
    return tuple(tensors)


def _hf_shapes(tensors, layer: int | None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the stored tensors name, with its shape (its rows: the largest row any span reaches)."""
    shapes = {}
    for t in tensors:
        for block in t.blocks:
            for r in block:
                if r.hf is not None:
                    name = mapping.hf_name(r.hf, layer)
                    shapes[name] = (max(shapes.get(name, (0,))[0], r.stop), *t.shape[1:])
    return shapes


@pytest.mark.parametrize("case", ["llama", "llama_tied_unpadded", "next_families"])
def test_regular_fill_direct_import_and_direct_export_agree(case, tmp_path: Path):
    from safetensors.torch import save_file

    layer, num_layers = 2, 5
    if case == "next_families":
        work = [(t, layer) for t in _next_family_tensors(ARCH)]
    else:  # "llama": the vocabulary padded 50 -> 128; tied: no output layer, no padding
        arch = ARCH if case == "llama" else ARCH.replace(tie_word_embeddings=True, vocab_size=128)
        desc = mapping.Description(arch, 128)
        work = [(t, layer) for t in desc.layer] + [(t, None) for t in desc.globals]
    shapes = {**_hf_shapes([t for t, lay in work if lay is not None], layer),
              **_hf_shapes([t for t, lay in work if lay is None], None)}
    g = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    save_file(hf, str(tmp_path / "model.safetensors"))
    reader = HFReader(tmp_path)

    data = tmp_path / "stored.distcp"
    index: dict[str, TensorIndex] = {}
    with open(data, "wb") as f:
        for t, lay in work:
            # 1. the regular fill
            blocks = mapping.blocks_from_hf(t, lambda rel, lay=lay: hf[mapping.hf_name(rel, lay)], torch.float32)
            # 2. the direct import plan: each chunk's bytes are its block's bytes, at the block's place
            chunks = direct_import.chunks_of(t, lay, num_layers, "float32",
                                             lambda rel, lay=lay: reader.byte_range(mapping.hf_name(rel, lay)))
            assert len(chunks) == len(blocks) == len(t.blocks), t.name
            for c, block, start in zip(chunks, blocks, t.block_offsets()):
                got = b"".join(bytes(p.length) if p.path is None else
                               Path(p.path).read_bytes()[p.offset:p.offset + p.length] for p in c.pieces)
                assert got == block.numpy().tobytes(), t.name
                assert c.offsets == (*t.lead(lay), start, *[0] * (len(t.shape) - 1)), t.name
                assert c.global_shape == t.stored_shape(None if lay is None else num_layers), t.name
                # stored as the direct writer stores it: a torch.save archive per chunk
                frame = archive.frame("float32", c.shape, 0)
                entry = index.setdefault(c.key, TensorIndex("float32", c.global_shape, []))
                entry.chunks.append(ChunkLocation(c.offsets, c.shape, data.name, f.tell(), frame.size))
                f.write(frame.prefix + block.numpy().tobytes() + frame.suffix)
            # 4. the regular export gives back every HF tensor
            back = mapping.hf_from_blocks(t, blocks)
            assert sorted(back) == sorted(t.hf_names()), t.name
            for rel, tensor in back.items():
                assert torch.equal(tensor, hf[mapping.hf_name(rel, lay)]), (t.name, rel)
    # 3. the direct export plan reads every HF tensor back from the stored chunks
    rows = direct_export.RowReader(tmp_path, index, "float32")
    raw = data.read_bytes()
    exported = [h for t, lay in work for h in direct_export.hf_tensors_of(t, lay, rows, shapes)]
    assert sorted(h.name for h in exported) == sorted(shapes)
    for h in exported:
        assert b"".join(raw[p.offset:p.offset + p.length] for p in h.pieces) == hf[h.name].numpy().tobytes(), h.name
