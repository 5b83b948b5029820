"""MoE on Transformer Engine: a checkpoint written from the local spec's sequential experts runs on TE's grouped
experts (megatron-core stores both under the same keys) and matches transformers, with and without expert
parallelism. Needs CUDA and Transformer Engine (2 GPUs for EP 2)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = "2e-3"  # fp32 logits vs transformers; TE's grouped GEMM may take TF32 paths that torch's matmul does not


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe"])
def test_local_spec_moe_checkpoint_runs_on_te_grouped_experts(tmp_path, variant):
    from llamapro_megatron.runtime.specs import transformer_engine_available
    from tests.distributed.versions import llamapro
    from tests.tiny_models import make_tiny_hf

    if not transformer_engine_available():
        pytest.skip("Transformer Engine does not import here")
    hf = make_tiny_hf(tmp_path / "hf", variant)
    mc = tmp_path / "mc"
    llamapro("convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc), "--no-progress")
    eps = [1, 2] if torch.cuda.device_count() >= 2 else [1]
    for ep in eps:
        out = llamapro("verify", "--hf-dir", str(hf), "--load", str(mc), "--spec", "te", "--ep", str(ep),
                       "--tolerance", TOL).stdout
        assert "-> OK" in out, out
