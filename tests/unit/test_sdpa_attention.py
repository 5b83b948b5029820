"""The sdpa spec's core attention against megatron-core's DotProductAttention (the local spec's), one process.

Same random query/key/value in megatron's [s, b, h, d] layout through both modules; outputs and the gradients
of query, key and value agree in fp32 within ATOL (different kernels: fused SDPA vs baddbmm + softmax + bmm).
Cases: causal GQA and MHA, an explicit packed-document mask, a sliding window, one decoding query against a
longer cache, dropout off in eval. Then what the module refuses.
"""
from __future__ import annotations

import pytest
import torch

from llamapro_megatron.errors import UserError

ATOL = 1e-5  # fp32, values up to ~5: measured max |diff| 2.7e-6 (a wrong mask gives O(1))
SEQ, BATCH, HEAD_DIM = 12, 2, 8


@pytest.fixture(scope="module")
def world_of_1():
    from llamapro_megatron.runtime import destroy_distributed, init_distributed

    info = init_distributed(tp=1, pp=1, seed=3)
    yield info
    destroy_distributed()


def _config(heads: int, groups: int, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=HEAD_DIM, attention_dropout=0.0,
                             hidden_dropout=0.0, masked_softmax_fusion=False, params_dtype=torch.float32,
                             **overrides)


def _pair(config, layer_number: int = 1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from llamapro_megatron.runtime.sdpa import SDPAttention

    kw = dict(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**kw), SDPAttention(**kw)


def _qkv(heads: int, groups: int, sq: int = SEQ, sk: int = SEQ, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, BATCH, heads, HEAD_DIM, generator=g)
    k = torch.randn(sk, BATCH, groups, HEAD_DIM, generator=g)
    v = torch.randn(sk, BATCH, groups, HEAD_DIM, generator=g)
    return q, k, v


def _run(module, q, k, v, mask):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _assert_same(config, q, k, v, mask=None, layer_number: int = 1):
    local, sdpa = _pair(config, layer_number)
    expected, got = _run(local, q, k, v, mask), _run(sdpa, q, k, v, mask)
    assert got[0].shape == expected[0].shape == (q.shape[0], BATCH, q.shape[2] * HEAD_DIM)
    for name, a, b in zip(("output", "dq", "dk", "dv"), expected, got):
        diff = (a - b).abs().max().item()
        assert diff <= ATOL, f"{name}: max |diff| {diff:.2e}"
    return got[0]


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_causal_matches_local(world_of_1, heads, groups):
    q, k, v = _qkv(heads, groups)
    out = _assert_same(_config(heads, groups), q, k, v)
    # causal: the first position sees only itself, so changing later keys leaves it unchanged
    k2 = k.clone()
    k2[1:] += 1.0
    local, sdpa = _pair(_config(heads, groups))
    assert torch.allclose(sdpa(q, k2, v, None)[0], out[0], atol=ATOL)


def test_explicit_mask_matches_local(world_of_1):
    """Two packed documents (block-diagonal causal, True = masked): the mask packed SFT samples carry."""
    q, k, v = _qkv(4, 2)
    pos = torch.arange(SEQ)
    doc = (pos >= 5).long()
    allowed = (pos[None, :] <= pos[:, None]) & (doc[None, :] == doc[:, None])
    mask = (~allowed).expand(BATCH, 1, SEQ, SEQ)
    _assert_same(_config(4, 2), q, k, v, mask)


def test_sliding_window_matches_local(world_of_1):
    q, k, v = _qkv(4, 2)
    _assert_same(_config(4, 2, window_size=(3, 0)), q, k, v)
    # window_attn_skip_freq=2: layer 2 is a full-attention layer in both modules
    _assert_same(_config(4, 2, window_size=(3, 0), window_attn_skip_freq=2), q, k, v, layer_number=2)


def test_one_query_against_a_cache_matches_local(world_of_1):
    q, k, v = _qkv(4, 2, sq=1, sk=SEQ)
    _assert_same(_config(4, 2), q, k, v)


def test_refusals_name_the_spec(world_of_1):
    from megatron.core.packed_seq_params import PackedSeqParams

    q, k, v = _qkv(4, 2)
    _, sdpa = _pair(_config(4, 2))
    with pytest.raises(UserError, match="'sdpa' layer spec does not handle packed sequences"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(UserError, match="attention bias"):
        sdpa(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(UserError, match="float32 attention mask"):
        sdpa(q, k, v, torch.zeros(1, 1, SEQ, SEQ))
    with pytest.raises(UserError, match="forward argument.*new_option"):
        sdpa(q, k, v, None, new_option=True)
    # unset extra arguments (a newer megatron-core's defaults) are accepted
    assert sdpa(q, k, v, None, new_option=None).shape == (SEQ, BATCH, 4 * HEAD_DIM)


def test_backend_switch_is_checked_and_only_steers_cuda_kernels(world_of_1, monkeypatch):
    q, k, v = _qkv(4, 2)
    monkeypatch.setenv("LLAMAPRO_SDPA_BACKEND", "fastest")
    with pytest.raises(UserError, match="LLAMAPRO_SDPA_BACKEND='fastest': choose one of auto, cudnn, flash"):
        _pair(_config(4, 2))
    for choice in ("cudnn", "math", " Flash "):  # CPU tensors: the choice is about CUDA kernels, results unchanged
        monkeypatch.setenv("LLAMAPRO_SDPA_BACKEND", choice)
        _assert_same(_config(4, 2), q, k, v)
