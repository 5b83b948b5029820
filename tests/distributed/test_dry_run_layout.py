"""`--dry-run`'s per-rank counts (fake process group, meta device) equal the trainer's real model on a real 4-rank
gloo world: the tiny GQA model expanded 4 -> 6 layers, built by training.model exactly as the trainer builds it, at
TP2 PP2 (DP1) and TP2 PP1 (DP2), frozen with --freeze llamapro and with the embedding and output layer trainable."""
from __future__ import annotations

import pytest

from llamapro_megatron.runtime import run_workers
from tests.tiny_models import make_tiny_hf

LAYOUTS = [
    {"parallelism.tensor_model_parallel_size": 2, "parallelism.pipeline_model_parallel_size": 2},
    {"parallelism.tensor_model_parallel_size": 2, "parallelism.pipeline_model_parallel_size": 1,
     "freeze.train_embeddings": True, "freeze.train_output_layer": True},
]


def _real_counts(hf_dir: str) -> list[dict]:
    """This rank's (parameters, trainable, layers) of the trainer's own model at every layout."""
    import os

    from llamapro_megatron.runtime import destroy_distributed, init_distributed
    from llamapro_megatron.training.config import load_config
    from llamapro_megatron.training.dry_run import model_from_hf_config
    from llamapro_megatron.training.freeze import apply_freeze, decoder_layers, global_layer_index
    from llamapro_megatron.training.model import build_model_chunks

    out = []
    for overrides in LAYOUTS:
        config = load_config(None, {**overrides, "model.bf16": True}, plan_only=True)
        p = config.parallelism
        meta, _ = model_from_hf_config(hf_dir, 2, p.tensor_model_parallel_size)
        init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
        chunks = build_model_chunks(meta, config)
        apply_freeze(chunks, meta, config.freeze)
        out.append({"rank": int(os.environ["RANK"]),
                    "parameters": sum(t.numel() for c in chunks for t in c.parameters()),
                    "trainable": sum(t.numel() for c in chunks for t in c.parameters() if t.requires_grad),
                    "layers": sorted(global_layer_index(x) for c in chunks for x in decoder_layers(c)),
                    "device": str(next(chunks[0].parameters()).device)})
        destroy_distributed()
    return out


@pytest.mark.slow
def test_dry_run_counts_equal_the_real_build_per_rank(tmp_path):
    from llamapro_megatron.training.config import load_config
    from llamapro_megatron.training.dry_run import dry_run

    hf = make_tiny_hf(tmp_path / "gqa", "gqa")
    real = run_workers(_real_counts, 4, args=(str(hf),), timeout_s=600)
    for i, overrides in enumerate(LAYOUTS):
        plan = dry_run(load_config(None, {**overrides, "model.bf16": True}, plan_only=True), 4, str(hf), 2)
        planned = {g: r for r in plan.ranks for g in r.ranks}
        assert sorted(planned) == [0, 1, 2, 3]
        for rank in range(4):
            got = real[rank][i]
            assert got["device"] != "meta" and got["rank"] == rank
            want = planned[rank]
            assert (want.parameters, want.trainable, want.layers) == \
                (got["parameters"], got["trainable"], got["layers"]), (overrides, rank)
