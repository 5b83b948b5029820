"""`llamapro train --dry-run` and the recipes: every examples/*.yaml parses into the trainer's configuration, and its
documented dry-run command (real CLI parser) plans its intended layout; whole-model counts equal transformers'."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from llamapro_megatron.cli import build_parser
from llamapro_megatron.errors import UserError
from llamapro_megatron.training.config import config_from_args
from tests.tiny_models import make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples").glob("*.yaml"))
# A recipe without its own "llamapro train --dry-run" line is planned on the paper's model (LLaMA-2-7B Pro).
DEFAULT_MODEL = ["--hf-config", "examples/models/llama2_7b.json", "--groups", "8"]


def _dry_run_argv(recipe: Path) -> list[str]:
    text = recipe.read_text()
    lines = re.findall(r"^#\s+(llamapro train --dry-run .*)$", text, flags=re.M)
    if lines:
        return shlex.split(lines[0])[1:]
    return ["train", "--dry-run", "--config", str(recipe.relative_to(ROOT)), *DEFAULT_MODEL]


def _hf_count(config_json: Path, num_layers: int, new_layers: list[int]) -> tuple[int, int]:
    """transformers' parameter count of the expanded model (meta device) and of its new layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_json)
    config.num_hidden_layers = num_layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    new = sum(p.numel() for i in new_layers for p in model.model.layers[i].parameters())
    return total, new


def test_the_paper_recipe_is_among_them():
    names = {r.name for r in RECIPES}
    assert {"llama2_7b_pro.yaml", "llama3_8b_pro.yaml", "mistral_7b_pro.yaml"} <= names, names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_recipe_parses_and_dry_runs_at_its_layout(recipe, monkeypatch, capsys):
    from llamapro_megatron.training.dry_run import dry_run

    monkeypatch.chdir(ROOT)
    parser = build_parser()
    config = config_from_args(parser.parse_args(["train", "--config", str(recipe)]))  # full trainer validation
    p, n = config.parallelism, config.launch
    world = (n.nodes or 1) * (n.gpus_per_node or 1) if (n.nodes or n.gpus_per_node) else \
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size

    argv = _dry_run_argv(recipe)
    args = parser.parse_args(argv)
    assert args.dry_run and args.config.endswith(recipe.name), argv
    assert args.func(args) == 0
    out = capsys.readouterr().out
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    assert f"layout: {world} GPUs" in out and f"TP {tp} x PP {pp} x DP {world // (tp * pp)}" in out, out
    assert re.search(rf"batch: global {config.schedule.global_batch_size} ", out), out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d", line)]
    assert len(rows) == tp * pp, out

    plan = dry_run(config_from_args(args, plan_only=True), None, args.hf_config, args.groups)
    new = plan.meta.expansion["new_layer_indices"]
    total, trainable = _hf_count(ROOT / args.hf_config, plan.meta.arch.num_layers, new)
    assert plan.model_parameters == total
    if config.freeze.freeze == "llamapro":
        assert plan.trainable_parameters == trainable
    # every layer on exactly one stage; DP replicas listed once per (stage, TP rank)
    assert sorted(i for r in plan.ranks if r.tp_rank == 0 for i in r.layers) == list(range(plan.meta.arch.num_layers))
    assert sorted(g for r in plan.ranks for g in r.ranks) == list(range(world))


@pytest.mark.parametrize("variant", ["gqa", "tied", "mistral"])
def test_tiny_model_counts_equal_transformers(variant, tmp_path):
    from llamapro_megatron.training.config import load_config
    from llamapro_megatron.training.dry_run import dry_run

    hf = make_tiny_hf(tmp_path / variant, variant)
    for freeze in ("llamapro", "none"):
        config = load_config(None, {"freeze.freeze": freeze, "parallelism.tensor_model_parallel_size": 2},
                             plan_only=True)
        plan = dry_run(config, 2, str(hf), 2)
        assert plan.meta.arch.num_layers == 6 and plan.meta.expansion["new_layer_indices"] == [2, 5]
        total, new = _hf_count(hf / "config.json", 6, [2, 5])
        assert plan.model_parameters == total
        assert plan.trainable_parameters == (new if freeze == "llamapro" else total)


def test_memory_figures_follow_the_stated_formulas(tmp_path):
    """Weights, gradients and optimizer bytes from the per-rank counts; the distributed optimizer shards over DP."""
    from llamapro_megatron.training.config import load_config
    from llamapro_megatron.training.dry_run import dry_run
    from llamapro_megatron.training.memory import layer_activation_bytes

    hf = make_tiny_hf(tmp_path / "gqa", "gqa")
    base = {"model.bf16": True, "parallelism.tensor_model_parallel_size": 2,
            "parallelism.pipeline_model_parallel_size": 2, "schedule.seq_length": 64, "schedule.global_batch_size": 8}
    plain = dry_run(load_config(None, base, plan_only=True), 8, str(hf), 2)
    sharded = dry_run(load_config(None, {**base, "parallelism.use_distributed_optimizer": True}, plan_only=True),
                      8, str(hf), 2)
    assert plain.dp == 2 and plain.num_microbatches == 4
    for r, s in zip(plain.ranks, sharded.ranks):
        assert r.weights == 2 * r.parameters and r.gradients == 4 * r.trainable
        assert r.optimizer == 12 * r.trainable and s.optimizer == -(-12 * r.trainable // 2)
    # Stage 0 holds frozen layers 0-1 below the first new one (2): no gradient flows there, nothing is kept; it has
    # 2 micro batches in flight (1F1B warm-up), stage 1 one: frozen layers 3-4 (no GEMM inputs), new layer 5, plus
    # the logits (bf16 softmax, its fp32 gradient and the bf16 copy).
    layer = layer_activation_bytes(plain.meta, plain.config, flash=True, granularity=None)
    frozen = layer_activation_bytes(plain.meta, plain.config, flash=True, granularity=None, trainable=False)
    assert layer == 64 * 2 * (4 * 64 + (2 * 64 + 2 * 32 + 3 * 96) // 2)
    assert frozen == 64 * 2 * (2 * 64 + (2 * 64 + 2 * 32 + 2 * 96) // 2)
    assert plain.ranks[0].layers == [0, 1, 2] and plain.ranks[0].activations == 2 * layer
    logits = 64 * (plain.meta.padded_vocab_size // 2) * (2 + 4 + 4)
    assert plain.ranks[-1].layers == [3, 4, 5] and plain.ranks[-1].activations == 2 * frozen + layer + logits
    # FP8: GEMM inputs in one byte, plus the row- and column-wise FP8 copies of the rank's decoder GEMM weights
    fp8 = dry_run(load_config(None, {**base, "model.fp8_format": "hybrid"}, plan_only=True), 8, str(hf), 2)
    gemm_weights = 3 * (64 * 128 + 64 * 64 + 2 * 96 * 64 + 64 * 96) // 2  # 3 layers, each qkv, proj, fc1, fc2 / TP
    fp8_layer = 64 * (2 * (2 * 64 + (2 * 64 + 2 * 32 + 2 * 96) // 2) + (2 * 64 + 96 // 2))
    assert fp8.ranks[-1].activations == 2 * frozen + fp8_layer + logits
    assert fp8.ranks[-1].weights == plain.ranks[-1].weights + 2 * gemm_weights
    # sequence parallel: the norms' inputs and outputs (the hidden-size terms) split over TP; the logits do not
    sp = dry_run(load_config(None, {**base, "parallelism.sequence_parallel": True}, plan_only=True), 8, str(hf), 2)
    sp_layer = 64 * 2 * (4 * 64 // 2 + (2 * 64 + 2 * 32 + 3 * 96) // 2)
    sp_frozen = 64 * 2 * (2 * 64 // 2 + (2 * 64 + 2 * 32 + 2 * 96) // 2)
    assert sp.ranks[0].activations == 2 * sp_layer and sp.ranks[-1].activations == 2 * sp_frozen + sp_layer + logits
    assert "TP 2 x PP 2 x DP 2, sequence parallel;" in sp.format() and "sequence parallel" not in plain.format()


def saved_tensors(tp: int = 1, sequence_parallel: bool = False, moe: tuple[int, int, int] | None = None,
                  mlp_only: bool = False, etp: int | None = None) -> dict[bool, tuple[dict[int, int], bool]]:
    """What autograd saves for backward in one decoder layer of the gqa variant's shape (the sdpa spec, fp32, this
    rank's part of 2 x 32 tokens), trainable (True) and frozen (False), with the gradient flowing through it either
    way (as through the frozen blocks below a new one): the saved tensors' bytes by storage, and whether the input
    is among them. ``moe``: (experts, top-k, the experts' FFN size) makes the MLP an MoE layer (allgather dispatcher,
    no auxiliary loss; ``etp``: its expert tensor parallelism, default TP); ``mlp_only``: the MLP alone, fed the
    input. Parallel state: initialised here at ``tp``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from llamapro_megatron.runtime import destroy_distributed, gpt_layer_spec, init_distributed
    from llamapro_megatron.runtime.specs import decoder_spec

    h, s, b = 64, 32, 2
    experts = {} if moe is None else dict(
        num_moe_experts=moe[0], moe_router_topk=moe[1], moe_ffn_hidden_size=moe[2],
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    init_distributed(tp=tp, pp=1, etp=etp)
    try:
        config = TransformerConfig(num_layers=1, hidden_size=h, ffn_hidden_size=96, num_attention_heads=4,
                                   num_query_groups=2, normalization="RMSNorm", gated_linear_unit=True,
                                   activation_func=torch.nn.functional.silu, add_bias_linear=False,
                                   hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
                                   tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                                   expert_tensor_parallel_size=etp, use_cpu_initialization=True, **experts)
        spec = gpt_layer_spec("sdpa", num_experts=moe and moe[0])
        model = GPTModel(config=config, transformer_layer_spec=decoder_spec("sdpa", spec, config, None),
                         vocab_size=128, max_sequence_length=64, position_embedding_type="rope")
        layer, kept = model.decoder.layers[0], {}
        for trains in (True, False):
            layer.requires_grad_(trains)
            saved = {}

            def pack(t, saved=saved):
                saved[t.data_ptr()] = t.numel() * t.element_size()
                return t

            x = torch.randn(s // tp if sequence_parallel else s, b, h, requires_grad=True)  # this rank's part
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if mlp_only:
                    layer.mlp(x)
                else:
                    layer(x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(s))
            kept[trains] = (saved, x.data_ptr() in saved)
    finally:
        destroy_distributed()
    return kept


def saved_bytes(tp: int = 1, sequence_parallel: bool = False) -> dict[bool, int]:
    """Bytes :func:`saved_tensors` counts for the gqa layer, trainable (True) and frozen (False)."""
    return {trains: sum(saved.values()) for trains, (saved, _) in saved_tensors(tp, sequence_parallel).items()}


def test_a_frozen_layer_keeps_less_than_its_trainable_twin_by_the_gemm_inputs():
    """The planner's frozen-layer rule against torch's own autograd (the sdpa spec, CPU): a layer whose weights do
    not train, with a gradient flowing through it, saves at least its GEMMs' inputs (both norm outputs and
    SwiGLU's output, s*b*(2h + f) values) less for backward than the same layer training."""
    h, f, s, b = 64, 96, 32, 2
    kept = saved_bytes()
    assert kept[True] - kept[False] >= s * b * (2 * h + f) * 4, kept


@pytest.mark.parametrize("tp, etp", [(1, None), (2, 2), (2, 1)], ids=["TP1", "TP2-SP-ETP2", "TP2-SP-ETP1"])
def test_an_moe_layer_keeps_what_the_planner_counts_for_its_experts(tmp_path, tp, etp):
    """The planner's MoE terms against torch's autograd (the sdpa spec's sequential experts, CPU; 4 experts, top 3,
    expert FFN 48, so top-k x h and f differ from every other combination of the terms): a trainable MoE MLP keeps
    exactly the experts' GEMM inputs, top-k x (h + f) per token its experts see, more than its frozen twin, which is
    the planner's trainable-minus-frozen difference less the attention's h/SP; and the router keeps its input in a
    frozen layer too. At TP 2 (sequence parallel, as MoE needs there) the experts see the tokens of their ETP ranks:
    all of the sequence's split over the FFN at ETP 2, half of them whole at ETP 1 (gloo, rank 0's count)."""
    from llamapro_megatron.runtime import run_workers
    from llamapro_megatron.training.config import load_config
    from llamapro_megatron.training.dry_run import dry_run
    from llamapro_megatron.training.memory import layer_activation_bytes

    h, s, b, experts, topk, fe = 64, 32, 2, 4, 3, 48
    moe = (experts, topk, fe)
    kept = (saved_tensors(moe=moe, mlp_only=True) if tp == 1 else
            run_workers(saved_tensors, tp, args=(tp, True, moe, True, etp), timeout_s=300)[0])
    measured = sum(kept[True][0].values()) - sum(kept[False][0].values())
    tokens = s * b * (etp or tp) // tp  # what this rank's experts see, each token once per chosen expert
    assert measured == tokens * topk * (h + fe // (etp or tp)) * 4, measured
    assert kept[False][1] and kept[True][1]  # the router's input, whether it trains or not
    hf = make_tiny_hf(tmp_path / "moe", "qwen3_moe", num_experts=experts, num_experts_per_tok=topk,
                      moe_intermediate_size=fe)
    layout = {"parallelism.tensor_model_parallel_size": tp, "parallelism.sequence_parallel": tp > 1,
              "parallelism.expert_tensor_parallel_size": etp}
    plan = dry_run(load_config(None, {"schedule.seq_length": s, "schedule.micro_batch_size": b, **layout},
                               plan_only=True), tp, str(hf), 2)
    layer = {trains: layer_activation_bytes(plan.meta, plan.config, flash=True, granularity=None, trainable=trains)
             for trains in (True, False)}
    assert layer[True] - layer[False] - s * b * h // tp * 4 == measured
    if tp == 1:  # the frozen layer's MoE terms: every chosen expert's gate and up, the router's probabilities, input
        attention = 2 * h + 2 * 4 * 32 + 2 * 2 * 32  # norms' inputs, Q and attention output, K and V (head_dim 32)
        assert layer[False] == s * b * 4 * (attention + 2 * topk * fe + experts + h)
        # the model line: every layer is sparse, so the dense intermediate_size (96) is not shown as the FFN
        assert "hidden 64, 4 experts of FFN 48, top 3, heads 4" in plan.format() and "FFN 96" not in plan.format()


@pytest.mark.parametrize("argv, message", [
    (["--world-size", "6"], "--world-size 6 is not a multiple of TP x PP = 4"),
    (["--world-size", "8", "--global-batch-size", "5"], "--global-batch-size 5 is not a multiple"),
    (["--world-size", "4", "--freeze", "llamapro", "--no-groups"], "give --groups N"),
    (["--world-size", "6", "--tensor-model-parallel-size", "3"],
     "--tensor-model-parallel-size 3 does not divide 4 attention heads"),
    (["--world-size", "16", "--pipeline-model-parallel-size", "8"],
     "--pipeline-model-parallel-size 8 does not divide 6 layers"),
])
def test_bad_layouts_name_the_flag(argv, message, tmp_path, monkeypatch):
    from llamapro_megatron.training.dry_run import dry_run

    hf = make_tiny_hf(tmp_path / "gqa", "gqa")
    groups = None if "--no-groups" in argv else 2
    argv = [a for a in argv if a != "--no-groups"]
    args = build_parser().parse_args(["train", "--dry-run", "--tensor-model-parallel-size", "2",
                                      "--pipeline-model-parallel-size", "2", "--hf-config", str(hf), *argv])
    with pytest.raises(UserError, match=re.escape(message)):
        dry_run(config_from_args(args, plan_only=True), args.world_size, args.hf_config, groups)


def test_dry_run_without_a_model_is_refused(capsys):
    assert build_parser().parse_args(["train", "--dry-run"]).func is not None
    from llamapro_megatron.cli import main

    assert main(["train", "--dry-run", "--world-size", "1"]) == 2
    assert "--dry-run needs the model" in capsys.readouterr().err


def test_virtual_and_uneven_stages_are_planned_as_the_trainer_builds_them():
    """--num-layers-per-virtual-pipeline-stage and uneven end stages reach the planned layout: each rank holds the
    layers megatron-core's split gives it (arch.pipeline_stage_layers is tested against get_num_layers_to_build)."""
    from llamapro_megatron.training.dry_run import dry_run

    def plan(*flags):
        args = build_parser().parse_args(["train", "--dry-run", "--config", "examples/llama2_7b_pro.yaml",
                                          *DEFAULT_MODEL, "--tensor-model-parallel-size", "1", *flags])
        return dry_run(config_from_args(args, plan_only=True), args.world_size, args.hf_config, args.groups)

    interleaved = plan("--world-size", "4", "--pipeline-model-parallel-size", "4",
                       "--num-layers-per-virtual-pipeline-stage", "5", "--global-batch-size", "8")
    assert interleaved.config.parallelism.virtual_pipeline_model_parallel_size == 2
    # 40 layers, 4 stages x 2 chunks of 5: rank 0 holds chunks 0 and 4 of the 8
    assert interleaved.ranks[0].layers == [*range(0, 5), *range(20, 25)]
    uneven = plan("--world-size", "3", "--pipeline-model-parallel-size", "3", "--global-batch-size", "6",
                  "--decoder-first-pipeline-num-layers", "12", "--decoder-last-pipeline-num-layers", "14")
    assert [len(r.layers) for r in uneven.ranks] == [12, 14, 14]
    assert uneven.ranks[0].layers == list(range(12)) and uneven.ranks[2].layers == list(range(26, 40))
    assert sum(r.trainable for r in uneven.ranks) == uneven.trainable_parameters  # every new block, once
