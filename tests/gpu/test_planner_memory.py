"""The dry-run planner's memory per GPU against the device: `llamapro train --dry-run` on the checkpoint a run trains
predicts that run's peak (torch.cuda.max_memory_allocated: weights, gradients, optimizer state, activations; the
CUDA context is outside both) within 10%, in bf16 and FP8, with and without full recomputation.

On a GPU with Transformer Engine (the te spec the planner plans for); BENCHMARKS.md ("Paper scale on one H200") has
the same comparison at 1B and 8.3B.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOUND = 0.10  # |measured / predicted - 1|
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]


def test_planner_memory_within_10_percent_of_the_device(tmp_path):
    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.cli import build_parser
    from llamapro_megatron.expansion import interleave
    from llamapro_megatron.runtime.specs import transformer_engine_available
    from llamapro_megatron.training.config import config_from_args, config_from_argv
    from llamapro_megatron.training.dry_run import dry_run
    from llamapro_megatron.training.trainer import train
    from tests.tiny_models import make_tiny_hf

    if not transformer_engine_available():
        pytest.skip("the planner plans the te spec: needs Transformer Engine")
    import transformer_engine.pytorch as te

    # ~0.4B parameters, 4 -> 6 blocks: activations and the loss's logits dominate, as at 8.3B
    make_tiny_hf(tmp_path / "hf", "gqa", dtype=torch.bfloat16, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                 max_position_embeddings=4096)
    hf_to_mcore(tmp_path / "hf", tmp_path / "base", progress=False, workers=2)
    expand_mcore(tmp_path / "base", tmp_path / "pro", lambda n: interleave(n, 2), progress=False, workers=2)
    common = ["--load", str(tmp_path / "pro"), "--mock-data", "--freeze", "llamapro", "--bf16", "--spec", "te",
              "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "4096"]
    variants = {"bf16": [], "bf16, full recompute": RECOMPUTE}
    if te.is_fp8_available():
        variants.update({"FP8": ["--fp8-format", "hybrid"], "FP8, full recompute": ["--fp8-format", "hybrid",
                                                                                     *RECOMPUTE]})
    rows = []
    for name, flags in variants.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        train(config_from_argv([*common, *flags, "--train-iters", "2", "--log-interval", "2", "--eval-iters", "0"]))
        measured = torch.cuda.max_memory_allocated()
        args = build_parser().parse_args(["train", "--dry-run", "--world-size", "1", *common, *flags])
        plan = dry_run(config_from_args(args, plan_only=True), 1)
        predicted = max(r.total for r in plan.ranks)
        rows.append((name, predicted, measured))
    for name, predicted, measured in rows:
        print(f"{name}: predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB, "
              f"ratio {measured / predicted:.3f}")
    bad = [(name, round(m / p, 3)) for name, p, m in rows if abs(m / p - 1) > BOUND]
    assert not bad, bad
