"""Pipeline split, recomputation, overlap, sequence parallel and attention-window decisions (no ranks needed).

Reference for the uneven split: megatron-core's own ``get_num_layers_to_build`` / ``get_transformer_layer_offset``.
"""
from __future__ import annotations

import pytest

from llamapro_megatron.arch import LlamaArch, pipeline_stage_layers
from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import config_from_argv
from llamapro_megatron.training.layout import resolve_pipeline, transformer_overrides
from tests.unit.test_arch import BASE

BASE_ARGV = ["--load", "ckpt/pro", "--train-iters", "10", "--mock-data"]
TINY = dict(BASE, num_hidden_layers=10, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize("pp, first, last, vpp", [(4, 1, 3, None), (4, 1, 1, None), (3, 2, None, 2),
                                                  (2, 4, None, 2), (2, None, 6, None), (5, None, None, 2)])
def test_stage_split_matches_megatron_core(pp, first, last, vpp):
    from llamapro_megatron.runtime import prepare

    prepare()
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    arch = LlamaArch.from_hf_config(TINY)
    config = arch.transformer_config(tp=1, pp=pp, vpp=vpp, dtype="float32", num_layers_in_first_pipeline_stage=first,
                                     num_layers_in_last_pipeline_stage=last)
    megatron = [sum(get_num_layers_to_build(config, vp_stage=v if vpp else None, pp_rank=r)
                    for v in range(vpp or 1)) for r in range(pp)]
    assert pipeline_stage_layers(10, pp, first, last) == megatron


def _resolve(*argv: str, layers: int = 10):
    arch = LlamaArch.from_hf_config(dict(TINY, num_hidden_layers=layers))
    return resolve_pipeline(config_from_argv([*BASE_ARGV, *argv]), arch), arch


def test_layers_per_virtual_stage_becomes_the_chunk_count():
    config, _ = _resolve("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1")
    assert config.parallelism.virtual_pipeline_model_parallel_size == 5


@pytest.mark.parametrize("argv, layers, message", [
    (["--pipeline-model-parallel-size", "4"], 10,
     "--pipeline-model-parallel-size 4 does not divide 10 layers.*--decoder-first-pipeline"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"], 10,
     "--num-layers-per-virtual-pipeline-stage 2 does not divide the 5 layers"),
    (["--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "1",
      "--decoder-last-pipeline-num-layers", "2"], 10, "the other 2 stage.* share 7 of the 10 layers"),
    (["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "3",
      "--virtual-pipeline-model-parallel-size", "2"], 9,
     "--virtual-pipeline-model-parallel-size 2 does not divide the 3"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "4",
      "--decoder-last-pipeline-num-layers", "6", "--virtual-pipeline-model-parallel-size", "2"], 10,
     "give only --decoder-first-pipeline-num-layers"),
])
def test_bad_pipeline_split_is_refused(argv, layers, message):
    with pytest.raises(UserError, match=message):
        _resolve(*argv, layers=layers)


@pytest.mark.parametrize("argv, message", [
    (["--virtual-pipeline-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "1"], "are alternatives"),
    (["--num-layers-per-virtual-pipeline-stage", "2"], "needs pipeline parallelism"),
    (["--decoder-first-pipeline-num-layers", "2"], "needs pipeline parallelism"),
    (["--overlap-param-gather", "--overlap-grad-reduce"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer"], "needs --overlap-grad-reduce"),
    (["--sequence-parallel"], "--sequence-parallel .* needs --tensor-model-parallel-size 2"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "3", "--seq-length", "64"],
     "--seq-length 64 must be a multiple of 3"),
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"], "takes no --recompute-method"),
    (["--recompute-method", "block", "--recompute-num-layers", "1"], "need --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "0"],
     "--recompute-num-layers 0"),
])
def test_bad_flag_combinations_name_the_flag(argv, message):
    with pytest.raises(UserError, match=message):
        config_from_argv([*BASE_ARGV, *argv])


@pytest.mark.parametrize("spec", ["te", "sdpa", "local"])
def test_sequence_parallel_reaches_the_config_on_every_spec(spec):
    config, arch = _resolve("--tensor-model-parallel-size", "2", "--sequence-parallel")
    assert transformer_overrides(config, arch, spec)["sequence_parallel"] is True


def test_swiglu_fusion_only_on_cuda_and_only_unless_disabled(monkeypatch):
    from llamapro_megatron.training import layout

    config, arch = _resolve()
    assert transformer_overrides(config, arch, "sdpa")["bias_activation_fusion"] is False  # CPU: unfused ops
    monkeypatch.setattr(layout, "_cuda_available", lambda: True)
    assert transformer_overrides(config, arch, "sdpa")["bias_activation_fusion"] is True
    config, arch = _resolve("--no-bias-swiglu-fusion")
    assert transformer_overrides(config, arch, "te")["bias_activation_fusion"] is False


def test_recompute_and_uneven_stages_reach_the_transformer_config():
    config, arch = _resolve("--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "1",
                            "--decoder-last-pipeline-num-layers", "3", "--recompute-granularity", "full",
                            "--recompute-method", "block", "--recompute-num-layers", "2")
    tc = arch.transformer_config(tp=1, pp=4, dtype="float32", **transformer_overrides(config, arch, "local"))
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (1, 3)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 2)


def test_sliding_window_reaches_the_config_and_unwindowed_specs_refuse_longer_sequences(monkeypatch):
    mistral = dict(TINY, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)
    arch = LlamaArch.from_hf_config(mistral)
    # transformers: query i sees keys i-15..i; megatron-core's (left, right) window counts the others
    assert arch.attention_window() == (15, 0)
    assert arch.transformer_config(tp=1, pp=1, dtype="float32").window_size == (15, 0)
    long = config_from_argv([*BASE_ARGV, "--seq-length", "32"])
    transformer_overrides(long, arch, "local")  # the local spec's softmax applies the window
    transformer_overrides(long, arch, "sdpa")  # a banded mask (tests/unit/test_sdpa_attention.py)
    # a spec without window support (as sdpa was before it had the band) refuses the longer sequence only
    monkeypatch.setattr("llamapro_megatron.training.layout.WINDOWED_SPECS", ("te", "local"))
    with pytest.raises(UserError, match="--seq-length 32 is longer than the model's sliding attention window"):
        transformer_overrides(long, arch, "sdpa")
    transformer_overrides(config_from_argv([*BASE_ARGV, "--seq-length", "16"]), arch, "sdpa")


@pytest.mark.parametrize("cuda", [False, True])
def test_cross_entropy_fusion_defaults_to_the_device_and_either_flag_wins(monkeypatch, cuda):
    from llamapro_megatron.training import layout

    monkeypatch.setattr(layout, "_cuda_available", lambda: cuda)
    for flags, fused in (((), cuda), (("--cross-entropy-loss-fusion",), True),
                         (("--no-cross-entropy-loss-fusion",), False)):
        config, arch = _resolve(*flags)
        assert transformer_overrides(config, arch, "sdpa")["cross_entropy_loss_fusion"] is fused, flags


@pytest.mark.parametrize("apex", [False, True])
def test_weight_gradient_fusion_needs_apex_even_with_fused_kernels(monkeypatch, apex):
    """megatron-core's output layer refuses gradient_accumulation_fusion without Apex's extension (seen on a GPU
    with Transformer Engine and no Apex): the TE path's fused_kernels leaves it off there."""
    from llamapro_megatron.runtime import compat, prepare

    prepare()
    monkeypatch.setattr(compat, "weight_gradient_fusion_available", lambda: apex)
    arch = LlamaArch.from_hf_config(TINY)
    # (rope fusion off: TransformerConfig refuses it without TE, and this runs anywhere)
    fused = arch.transformer_config(tp=1, pp=1, dtype="float32", fused_kernels=True, apply_rope_fusion=False)
    assert fused.gradient_accumulation_fusion is apex
    assert not arch.transformer_config(tp=1, pp=1, dtype="float32").gradient_accumulation_fusion


def test_moe_flags_set_megatron_core_and_are_refused_for_a_dense_model():
    from tests.unit.test_arch import MOE

    moe = LlamaArch.from_hf_config({**TINY, **MOE, "num_experts": 4, "moe_intermediate_size": 32,
                                    "router_aux_loss_coef": 0.001})
    default = transformer_overrides(config_from_argv(BASE_ARGV), moe, "local")
    assert default["moe_aux_loss_coeff"] == 0.001 and "moe_token_dispatcher_type" not in default
    chosen = transformer_overrides(config_from_argv([*BASE_ARGV, "--moe-aux-loss-coeff", "0.01",
                                                     "--moe-token-dispatcher-type", "allgather"]), moe, "local")
    assert chosen["moe_aux_loss_coeff"] == 0.01 and chosen["moe_token_dispatcher_type"] == "allgather"
    with pytest.raises(UserError, match="alltoall needs CUDA"):
        transformer_overrides(config_from_argv([*BASE_ARGV, "--moe-token-dispatcher-type", "alltoall"]), moe,
                              "local")
    dense = LlamaArch.from_hf_config(TINY)
    with pytest.raises(UserError, match="--moe-aux-loss-coeff is for mixture-of-experts models"):
        transformer_overrides(config_from_argv([*BASE_ARGV, "--moe-aux-loss-coeff", "0.01"]), dense, "local")
    with pytest.raises(UserError, match="--expert-model-parallel-size 0: must be at least 1"):
        config_from_argv([*BASE_ARGV, "--expert-model-parallel-size", "0"])
    with pytest.raises(UserError, match="an MoE model trains with tensor parallelism only with --sequence-parallel"):
        transformer_overrides(config_from_argv([*BASE_ARGV, "--tensor-model-parallel-size", "2"]), moe, "local")
    with pytest.raises(UserError, match="--expert-tensor-parallel-size 0: must be at least 1"):
        config_from_argv([*BASE_ARGV, "--expert-tensor-parallel-size", "0"])


def test_nproc_that_the_layout_cannot_run_on_is_refused_before_any_rank_starts():
    """`train --nproc N` that cannot hold the layout is refused as `--dry-run --world-size N` is (one check,
    `layout.check_world_size`), naming train's flags, not megatron-core's internal names, before anything is
    spawned."""
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.launch import launch

    config = config_from_argv(["--load", "x", "--mock-data", "--train-iters", "1", "--expert-model-parallel-size",
                               "2"])
    with pytest.raises(UserError, match=r"--expert-model-parallel-size 2 does not divide the data-parallel size 1 "
                                        r"\(--nproc 1 / TP x PP 1\): experts are split over data-parallel ranks"):
        launch(config, nproc=1)
    with pytest.raises(UserError, match="--nproc 0: must be at least 1"):
        launch(config, nproc=0)
