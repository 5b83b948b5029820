"""Transformer Engine layer spec on a GPU: builds, runs a forward, and reads a local-spec checkpoint."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB, SEQ, BATCH = 128, 16, 2
# TE runs fp32 GEMMs on TF32 tensor cores (10-bit mantissa) where torch's matmul, with TF32 off, does not: first
# seen 1.7e-4 max abs on logits of ~0.1. Relative Frobenius norm of TE vs local logits; a misplaced or missing
# tensor gives O(1).
TF32_TOL = 2e-3


@pytest.fixture
def world_of_1():
    from llamapro_megatron.runtime import destroy_distributed, init_distributed
    from llamapro_megatron.runtime.specs import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("Transformer Engine does not import here")
    info = init_distributed(tp=1, pp=1)
    yield info
    destroy_distributed()


def _model(kind: str):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from llamapro_megatron.runtime import gpt_layer_spec

    config = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, pipeline_dtype=torch.float32,
    )
    model = GPTModel(config=config, transformer_layer_spec=gpt_layer_spec(kind), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    return model.cuda().eval()


def _logits(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).cuda()
    positions = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(BATCH, -1)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)


def test_te_spec_builds_and_runs_a_forward(world_of_1):
    from llamapro_megatron.runtime import resolve_spec_kind

    assert resolve_spec_kind("auto") == "te"
    logits = _logits(_model("te"))
    assert logits.shape == (BATCH, SEQ, VOCAB)
    assert torch.isfinite(logits).all()


def test_local_spec_checkpoint_loads_into_te_spec(world_of_1, tmp_path):
    from megatron.core import dist_checkpointing

    local = _model("local")
    dist_checkpointing.save(local.sharded_state_dict(prefix=""), str(tmp_path))
    te = _model("te")
    # return_all: TE-only keys (fp8 `_extra_state` of TE modules) are reported instead of failing the load
    state, missing_in_request, not_in_checkpoint = dist_checkpointing.load(
        te.sharded_state_dict(prefix=""), str(tmp_path), strict="return_all")
    assert all(key.endswith("_extra_state") for key in not_in_checkpoint), sorted(not_in_checkpoint)
    assert not missing_in_request, sorted(missing_in_request)
    result = te.load_state_dict(state, strict=False)
    assert all(key.endswith("_extra_state") for key in result.missing_keys), result.missing_keys
    assert not result.unexpected_keys, result.unexpected_keys
    te_logits, local_logits = _logits(te).double(), _logits(local).double()
    rel = float((te_logits - local_logits).norm() / local_logits.norm())
    print(f"TE spec vs local spec, fp32 logits: relative {rel:.2e}, max abs "
          f"{float((te_logits - local_logits).abs().max()):.2e}")
    assert rel < TF32_TOL, rel
