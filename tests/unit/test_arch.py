"""LlamaArch: HF config reading (transformers 4 and 5 styles), refusals, layouts, RoPE frequencies."""
from __future__ import annotations

import pytest
import torch

from llamapro_megatron.arch import LlamaArch, layout_world_size
from llamapro_megatron.errors import UserError
from tests.tiny_models import VARIANTS, make_tiny_hf

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


def test_reads_transformers4_style_rope_scaling():
    cfg = dict(BASE, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192})
    arch = LlamaArch.from_hf_config(cfg)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling.factor == 8.0
    assert arch.rope_scaling.original_max_position_embeddings == 8192 and arch.dtype == "bfloat16"
    assert arch.num_query_groups == 8 and arch.head_dim == 128


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_config_round_trip_through_transformers(tmp_path, variant):
    from transformers import AutoConfig

    hf = make_tiny_hf(tmp_path / variant, variant)
    arch = LlamaArch.from_hf_dir(hf)
    config = AutoConfig.for_model(**arch.to_hf_config())
    config.save_pretrained(tmp_path / "again")
    assert LlamaArch.from_hf_dir(tmp_path / "again") == arch


def test_rotary_frequencies_equal_transformers_llama3(tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = make_tiny_hf(tmp_path / "l31", "llama31")
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(hf), "cpu")
    got = LlamaArch.from_hf_dir(hf).rotary_inv_freq()
    assert torch.equal(got, expected)
    # and differs from megatron-core's hard-coded 1/4/8192 scaling, which is why the project sets it
    plain = LlamaArch.from_hf_dir(hf).replace(rope_scaling=None).rotary_inv_freq()
    assert not torch.equal(got, plain)


def test_rotary_frequencies_equal_transformers_linear(tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = make_tiny_hf(tmp_path / "lin", "linear_rope")
    arch = LlamaArch.from_hf_dir(hf)
    assert arch.rope_scaling.rope_type == "linear" and arch.rope_scaling.factor == 4.0
    expected, _ = ROPE_INIT_FUNCTIONS["linear"](AutoConfig.from_pretrained(hf), "cpu")
    assert torch.equal(arch.rotary_inv_freq(), expected)
    assert arch.to_hf_config()["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert LlamaArch.from_dict(arch.to_dict()) == arch  # as a checkpoint records it


def test_a_recorded_llama3_scaling_without_rope_type_still_reads():
    """Checkpoints written before linear scaling record llama3 scaling without a rope_type."""
    from llamapro_megatron.arch import RopeScaling

    d = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert RopeScaling(**d).rope_type == "llama3"


_MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8,
            "num_experts_per_tok": 2}


@pytest.mark.parametrize("change", [
    # transformers 5 writes a default rope_parameters; a rope_scaling beside it replaces it whole (theta included)
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": {"type": "linear", "factor": 4.0}},
    dict(_MIXTRAL, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
         rope_scaling={"rope_type": "linear", "factor": 2.0}),  # Mixtral's default theta is 1e6
    {"rope_parameters": {"type": "linear", "factor": 4.0, "rope_theta": 1e6}},  # the legacy key inside
    {"rope_theta": 7.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}},  # the block's theta wins
    {"rope_theta": 7.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},  # transformers 4
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 5e5}},
], ids=["scaling-beside-default-parameters", "mixtral-default-theta", "legacy-type-key", "block-theta-wins",
        "transformers4", "llama3-parameters"])
def test_rope_fields_resolve_as_transformers_resolves_them(change):
    """theta, type and factor as transformers' own config class resolves the same config.json fields (5.x:
    `convert_rope_params_to_dict`), including the combinations where one block overrides another."""
    import transformers

    cfg = {k: v for k, v in BASE.items() if k != "rope_theta"}
    cfg.update(change)
    arch = LlamaArch.from_hf_config(cfg)
    family = {"LlamaForCausalLM": transformers.LlamaConfig, "MixtralForCausalLM": transformers.MixtralConfig}
    reference = family[arch.architecture].from_dict(cfg).rope_parameters
    assert arch.rope_theta == reference["rope_theta"]
    if reference["rope_type"] == "default":
        assert arch.rope_scaling is None
    else:
        assert (arch.rope_scaling.rope_type, arch.rope_scaling.factor) == (reference["rope_type"],
                                                                            reference["factor"])


# a Qwen3-MoE config on the LLaMA base: 8 experts of FFN 1408, top 2
MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 8,
       "num_experts_per_tok": 2, "moe_intermediate_size": 1408, "norm_topk_prob": True, "decoder_sparse_step": 1,
       "mlp_only_layers": []}


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "linear"}}, "positive 'factor'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_scaling": {"rope_type": "yarn",
                                                                                      "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "four"}}, "positive 'factor'"),
    ({"rope_theta": "1e6"}, "rope_theta must be a positive number"),
    ({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"}, "shared expert"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True},
     "use_sliding_window"),
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": True},
     "use_sliding_window"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "head_dim": 256}, "head_dim"),
    (dict(MOE, norm_topk_prob=False), "norm_topk_prob"),
    (dict(MOE, decoder_sparse_step=2), "decoder_sparse_step"),
    (dict(MOE, mlp_only_layers=[1]), "mlp_only_layers"),
    (dict(MOE, num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(MOE, moe_intermediate_size=None), "moe_intermediate_size"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8,
      "num_experts_per_tok": 2, "router_jitter_noise": 0.1}, "router_jitter_noise"),
    ({"hidden_act": "gelu"}, "gelu"),
    # a value of the wrong JSON type is the user's mistake: named, not a TypeError from a comparison
    (dict(MOE, num_experts_per_tok="2"), "num_experts_per_tok='2' must be a positive integer"),
    (dict(_MIXTRAL, num_local_experts="8"), "num_local_experts='8' must be a positive integer"),
    ({"hidden_size": 4096.0}, "hidden_size=4096.0 must be a positive integer"),
    ({"num_key_value_heads": True}, "num_key_value_heads=True must be a positive integer"),
    (dict(MOE, router_aux_loss_coef="0.01"), "router_aux_loss_coef='0.01' must be a number"),
    (dict(MOE, router_aux_loss_coef=-1.0), "router_aux_loss_coef=-1.0 must be a number, 0 or more"),
])
def test_refuses_unsupported(change, field):
    with pytest.raises(UserError, match=field):
        LlamaArch.from_hf_config(dict(BASE, **change))


def test_missing_field_is_named():
    cfg = dict(BASE)
    del cfg["intermediate_size"]
    with pytest.raises(UserError, match="intermediate_size"):
        LlamaArch.from_hf_config(cfg)


@pytest.mark.parametrize("tp, pp, match", [
    (3, 1, "does not divide 32 attention heads"),
    (16, 1, "must divide the 8 KV groups"),
    (1, 64, "larger than the 32 layers"),
    (1, 5, "does not divide 32 layers"),
])
def test_layout_validation(tp, pp, match):
    with pytest.raises(UserError, match=match):
        LlamaArch.from_hf_config(BASE).validate_layout(tp, pp)


def test_moe_fields_and_expert_parallel_layouts():
    arch = LlamaArch.from_hf_config(dict(BASE, **MOE, router_aux_loss_coef=0.001))
    assert (arch.num_experts, arch.moe_topk, arch.moe_ffn_hidden_size, arch.router_aux_loss_coef) == (8, 2, 1408,
                                                                                                        0.001)
    assert arch.qk_norm and arch.expert_ffn_size == 1408 and arch.ffn_hidden_size == BASE["intermediate_size"]
    arch.validate_layout(2, 2, ep=8)
    with pytest.raises(UserError, match="does not divide the 8 experts"):
        arch.validate_layout(1, 1, ep=3)
    with pytest.raises(UserError, match="needs a mixture-of-experts model"):
        LlamaArch.from_hf_config(BASE).validate_layout(1, 1, ep=2)
    # ETP splits each expert's FFN instead of TP; the world holds TP x PP and ETP x EP x PP alike
    arch.validate_layout(4, 1, ep=2, etp=1)
    with pytest.raises(UserError, match="--etp 3 does not divide the experts' FFN size 1408"):
        arch.validate_layout(1, 1, ep=2, etp=3)
    with pytest.raises(UserError, match="--etp 2: expert tensor parallelism needs a mixture-of-experts model"):
        LlamaArch.from_hf_config(BASE).validate_layout(1, 1, etp=2)
    assert [layout_world_size(*layout) for layout in ((2, 1, 2), (2, 1, 2, 1), (1, 1, 2, 2), (2, 2, 4, 1), (4, 1, 2, 4))
            ] == [4, 2, 4, 8, 8]
    config = arch.transformer_config()
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (8, 2, 1408)
    assert config.qk_layernorm and not config.moe_router_pre_softmax and config.moe_aux_loss_coeff == 0.001
    # transformers 5 writes num_local_experts for Qwen3-MoE too
    alias = dict(BASE, **MOE, num_local_experts=8)
    del alias["num_experts"]
    assert LlamaArch.from_hf_config(alias) == arch  # router_aux_loss_coef left out: transformers' 0.001


def test_layout_ok_and_vocab_padding():
    arch = LlamaArch.from_hf_config(BASE)
    arch.validate_layout(8, 4)
    assert arch.padded_vocab_size(1) == 32000 and arch.padded_vocab_size(4) == 32256


def test_qwen2_has_qkv_biases_no_config_field_names():
    arch = LlamaArch.from_hf_config(dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                         use_sliding_window=False, sliding_window=4096))
    assert arch.qkv_bias and arch.sliding_window is None
    assert not LlamaArch.from_hf_config(BASE).qkv_bias
    assert arch.transformer_config().add_qkv_bias


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_equals_transformers(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    from llamapro_megatron.training.metrics import parameter_count

    hf = make_tiny_hf(tmp_path / variant, variant)
    model = AutoModelForCausalLM.from_pretrained(hf)
    arch = LlamaArch.from_hf_dir(hf)
    assert parameter_count(arch, arch.vocab_size) == sum(p.numel() for p in model.parameters())  # tied: once


@pytest.mark.parametrize("family", [MOE, _MIXTRAL], ids=["qwen3_moe", "mixtral"])
def test_a_config_without_router_aux_loss_coef_means_transformers_default(family):
    """Left out of config.json, the load-balancing coefficient is what transformers' config class gives it (0.001
    for both MoE families), trained with and written back on export, never null."""
    import transformers

    cfg = dict(BASE, **family)
    arch = LlamaArch.from_hf_config(cfg)
    reference = {"MixtralForCausalLM": transformers.MixtralConfig,
                 "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig}[arch.architecture].from_dict(cfg)
    assert arch.router_aux_loss_coef == arch.aux_loss_coef == reference.router_aux_loss_coef == 0.001
    assert arch.to_hf_config()["router_aux_loss_coef"] == 0.001
    assert arch.transformer_config().moe_aux_loss_coeff == 0.001
    # a checkpoint recorded before the default was read (None) means the same
    assert arch.replace(router_aux_loss_coef=None).to_hf_config()["router_aux_loss_coef"] == 0.001
