"""FP8 options (`--fp8-format`, `--fp8-recipe`, `--fp8-amax-history-len`, `--fp8-amax-compute-algo`; Megatron-LM's
names): what reaches megatron-core's TransformerConfig, the refusals that need no GPU (the flag checks are in
test_training_config.py), and the dry-run planner.
On a GPU with Transformer Engine, tests/gpu/test_fp8.py trains with them."""
from __future__ import annotations

from pathlib import Path

import pytest

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import config_from_argv
from llamapro_megatron.training.layout import transformer_overrides

BASE = ["--load", "ckpt/pro", "--train-iters", "10", "--mock-data", "--bf16"]
ARCH = LlamaArch(architecture="LlamaForCausalLM", num_layers=4, hidden_size=64, ffn_hidden_size=96,
                 num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=200, max_position_embeddings=256,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


@pytest.mark.parametrize("argv, expected", [
    (["--fp8-format", "hybrid"], {"fp8": "hybrid", "fp8_recipe": "delayed"}),
    (["--fp8-format", "e4m3", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max"],
     {"fp8": "e4m3", "fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}),
    (["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"], {"fp8": "hybrid", "fp8_recipe": "tensorwise"}),
    ([], {}),
])
def test_fp8_flags_reach_the_transformer_config(argv, expected):
    overrides = transformer_overrides(config_from_argv([*BASE, *argv]), ARCH, "te")
    assert {k: v for k, v in overrides.items() if k.startswith("fp8")} == expected


def test_megatron_core_takes_the_fields():
    """The names are TransformerConfig's own (a renamed field would be a silent no-op in a plain dict)."""
    import dataclasses

    from llamapro_megatron.runtime import prepare

    prepare()
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert {"fp8", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo"} <= fields


def test_a_recipe_key_is_checked_too(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {bf16: true, fp8_format: e5m2}\n")
    with pytest.raises(UserError, match="--fp8-format 'e5m2': choose one of e4m3, hybrid"):
        config_from_argv(["--config", str(recipe), "--load", "x", "--train-iters", "1", "--mock-data"])


@pytest.mark.parametrize("spec", ["sdpa", "local"])
def test_fp8_without_the_te_spec_is_refused(spec):
    with pytest.raises(UserError, match=f"needs the te spec .* not the {spec} spec"):
        transformer_overrides(config_from_argv([*BASE, "--fp8-format", "hybrid"]), ARCH, spec)


def test_fp8_without_a_gpu_is_refused():
    import torch

    from llamapro_megatron.runtime.specs import require_fp8_support

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/gpu/test_fp8.py covers it")
    with pytest.raises(UserError, match="needs a GPU with Transformer Engine"):
        require_fp8_support("delayed")


def test_dry_run_plans_fp8_with_the_same_parameters(capsys):
    """The planner builds the model without FP8 (meta device, local spec): the same parameters; it says FP8."""
    from llamapro_megatron.cli import main

    config_json = Path(__file__).resolve().parents[2] / "examples" / "models" / "llama2_7b.json"
    argv = ["train", "--dry-run", "--hf-config", str(config_json), "--groups", "8", "--bf16",
            "--world-size", "1", "--micro-batch-size", "1", "--seq-length", "4096"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]) == 0
    fp8 = capsys.readouterr().out
    assert "FP8 GEMMs (hybrid, tensorwise scaling)" in fp8 and "FP8" not in plain
    count = next(line for line in plain.splitlines() if line.startswith("parameters:"))
    assert count in fp8 and "8,357,482,496" in count
