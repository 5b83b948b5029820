"""Training configuration: YAML recipe + Megatron-LM-named flags, validation messages; FLOP counting."""
from __future__ import annotations

import pytest

from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import config_from_argv, parse_data_path

BASE = ["--load", "ckpt/pro", "--train-iters", "10", "--mock-data"]


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallelism: {tensor_model_parallel_size: 4, use_distributed_optimizer: true}\n"
                      "optimizer: {lr: 2.0e-4, min_lr: 2.0e-5}\nschedule: {seq_length: 4096}\nseed: 7\n")
    c = config_from_argv(["--config", str(recipe), *BASE, "--tensor-model-parallel-size", "2", "--lr", "1e-4"])
    assert c.parallelism.tensor_model_parallel_size == 2 and c.parallelism.use_distributed_optimizer
    assert c.optimizer.lr == 1e-4 and c.optimizer.min_lr == 2e-5 and c.schedule.seq_length == 4096 and c.seed == 7


def test_flags_alone_suffice():
    c = config_from_argv([*BASE, "--pipeline-model-parallel-size", "2", "--bf16", "--freeze", "none"])
    assert c.parallelism.pipeline_model_parallel_size == 2 and c.model.bf16 and c.freeze.freeze == "none"


@pytest.mark.parametrize("argv, message", [
    (["--train-iters", "10", "--mock-data"], "--load is required"),
    (["--load", "x", "--mock-data"], "--train-iters and --train-samples"),
    ([*BASE, "--freeze", "layers"], "--trainable-layers"),
    ([*BASE, "--min-lr", "1", "--lr", "0.1"], "--min-lr"),
    (["--load", "x", "--train-iters", "3"], "--data-path is required"),
    ([*BASE, "--sft"], "--sft trains on chat .jsonl files"),
    # FP8 (tests/unit/test_fp8_config.py has the rest)
    ([*BASE, "--fp8-format", "hybrid"], "add --bf16"),
    ([*BASE, "--bf16", "--fp8-recipe", "tensorwise"], "needs --fp8-format"),
    ([*BASE, "--bf16", "--fp8-amax-history-len", "16"], "needs --fp8-format"),
    ([*BASE, "--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "0"], "must be at least 1"),
    ([*BASE, "--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--fp8-amax-compute-algo", "max"],
     "delayed recipe"),
    # NaN passes every range check and argparse's float reads it: refused as not finite, as is infinity
    ([*BASE, "--moe-aux-loss-coeff", "nan"], r"--moe-aux-loss-coeff nan: must be a finite number"),
    ([*BASE, "--lr", "inf"], r"--lr inf: must be a finite number"),
    ([*BASE, "--clip-grad=-inf"], r"--clip-grad -inf: must be a finite number"),
])
def test_bad_input_names_the_flag(argv, message):
    with pytest.raises(UserError, match=message):
        config_from_argv(argv)


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimizer: {learning_rate: 1.0}\n")
    with pytest.raises(UserError, match="learning_rate"):
        config_from_argv(["--config", str(recipe), *BASE])


def test_megatron_data_path():
    assert parse_data_path(["a", "b"]) == [(1.0, "a"), (1.0, "b")]
    assert parse_data_path(["1.0", "a", "1.5", "b"]) == [(1.0, "a"), (1.5, "b")]
    with pytest.raises(UserError):
        parse_data_path(["1.0", "a", "b"])
    for weight in ("nan", "inf", "-1"):
        with pytest.raises(UserError, match=f"weight {float(weight)} must be a finite number, 0 or more"):
            parse_data_path([weight, "a", "1.0", "b"])


def test_a_recipe_infinity_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimizer: {weight_decay: .inf}\n")
    with pytest.raises(UserError, match="--weight-decay inf: must be a finite number"):
        config_from_argv(["--config", str(recipe), *BASE])


def test_counted_flops_below_full_training():
    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.training.metrics import flops_per_token

    arch = LlamaArch("LlamaForCausalLM", 40, 4096, 11008, 32, 32, 128, 32000, 4096, 1e-5, 1e4, False)
    full = flops_per_token(arch, 32000, 4096, None, False, False, 40)
    pro = flops_per_token(arch, 32000, 4096, set(range(4, 40, 5)), False, False, 40)
    # full training ~ 6N plus attention; LLaMA Pro skips weight gradients of 32 of 40 blocks and the head's
    assert 1.0 < full.per_token / full.six_n_per_token < 1.5
    assert 0.6 < pro.per_token / full.per_token < 0.75


def test_sft_recipe_loads():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "examples" / "sft_instruct.yaml"
    c = config_from_argv(["--config", str(recipe)])
    assert c.data.sft and c.freeze.freeze == "none" and c.optimizer.lr == 2e-5
    assert c.schedule.global_batch_size == 128 and c.model.bf16 and c.schedule.lr_decay_style == "cosine"
