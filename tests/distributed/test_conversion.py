"""HF -> Megatron -> HF on tiny random models of every supported variant, in one 4-rank gloo world.

Reference: transformers' own models. Checked for each variant:
- the Megatron model's logits at TP/PP in {1,2}x{1,2} (MoE: also EP 2 at TP 1 and 2) equal transformers' (fp32,
  max |diff| <= 1e-4); the checkpoint is written once (for TP2 PP2) and megatron-core's loader reshards it for
  every layout;
- the exported HF directory has exactly the original tensors, bit for bit, and transformers loads it.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llamapro_megatron.runtime.launch import run_workers
from tests.tiny_models import MOE_VARIANTS, VARIANTS, make_tiny_hf

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
# (tp, pp, ep, etp) for the MoE variants; etp None: each expert split over TP, else over ETP ranks (ETP x EP of them)
EP_LAYOUTS = [(1, 1, 2, None), (2, 1, 2, None), (2, 1, 2, 1), (1, 1, 2, 2)]
LOGIT_TOL = 1e-4  # fp32; different attention/softmax kernels, same math


def _matrix_worker(cases: dict, layouts: list) -> dict | None:
    import torch.distributed as dist

    from llamapro_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from llamapro_megatron.verify import megatron_logits

    dist.init_process_group("gloo")  # shared by every step below (each sets up its own model-parallel layout)
    results = {}
    for i, (name, case) in enumerate(cases.items()):
        # every other case in one-unit rounds, so merging several save rounds into one checkpoint is exercised
        rounds = {"round_bytes": 1} if i % 2 else {}
        hf_to_mcore(case["hf"], case["ckpt"], tp=2, pp=2, progress=False, **rounds)
        logits = {}
        if case["tokens"] is not None:
            for tp, pp in layouts:
                logits[(tp, pp)] = megatron_logits(case["ckpt"], case["tokens"], tp=tp, pp=pp, spec="local")
            for tp, pp, ep, etp in EP_LAYOUTS if name in MOE_VARIANTS else ():
                logits[(tp, pp, ep, etp)] = megatron_logits(case["ckpt"], case["tokens"], tp=tp, pp=pp, ep=ep,
                                                            etp=etp, spec="local")
        mcore_to_hf(case["ckpt"], case["export"], progress=False, **rounds)
        results[name] = logits
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("conv")
    cases, reference = {}, {}
    g = torch.Generator().manual_seed(0)
    for variant in VARIANTS:
        hf = make_tiny_hf(root / f"hf_{variant}", variant)
        tokens = torch.randint(0, VARIANTS[variant]["vocab_size"], (2, 24), generator=g)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        with torch.no_grad():
            reference[variant] = model(input_ids=tokens).logits
        cases[variant] = dict(hf=str(hf), ckpt=str(root / f"mc_{variant}"), export=str(root / f"ex_{variant}"),
                              tokens=tokens)
    # bf16 source: round trip only (stays bf16 end to end)
    hf = make_tiny_hf(root / "hf_gqa_bf16", "gqa", seed=1, dtype=torch.bfloat16)
    cases["gqa_bf16"] = dict(hf=str(hf), ckpt=str(root / "mc_gqa_bf16"), export=str(root / "ex_gqa_bf16"),
                             tokens=None)
    logits = run_workers(_matrix_worker, 4, args=(cases, LAYOUTS))[0]
    return cases, reference, logits


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_megatron_logits_match_transformers(matrix, variant, layout):
    _, reference, logits = matrix
    ref = reference[variant]
    got = logits[variant][layout]
    vocab = VARIANTS[variant]["vocab_size"]
    assert got.shape[-1] >= vocab and got.shape[:2] == ref.shape[:2]
    diff = (got[..., :vocab] - ref).abs().max().item()
    assert diff <= LOGIT_TOL, f"{variant} at TP{layout[0]} PP{layout[1]}: max |dlogit| {diff:.3e}"
    assert torch.equal(got[..., :vocab].argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("variant", MOE_VARIANTS)
@pytest.mark.parametrize("layout", EP_LAYOUTS, ids=[f"tp{t}pp{p}ep{e}" + (f"etp{x}" if x else "")
                                                     for t, p, e, x in EP_LAYOUTS])
def test_moe_logits_match_transformers_with_expert_parallelism(matrix, variant, layout):
    _, reference, logits = matrix
    ref, got = reference[variant], logits[variant][layout]
    vocab = VARIANTS[variant]["vocab_size"]
    diff = (got[..., :vocab] - ref).abs().max().item()
    assert diff <= LOGIT_TOL, f"{variant} at TP/PP/EP/ETP {layout}: max |dlogit| {diff:.3e}"
    assert torch.equal(got[..., :vocab].argmax(-1), ref.argmax(-1))


def _tensors(hf_dir) -> dict:
    from pathlib import Path

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", [*VARIANTS, "gqa_bf16"])
def test_round_trip_is_bit_exact(matrix, variant):
    cases, _, _ = matrix
    original, exported = _tensors(cases[variant]["hf"]), _tensors(cases[variant]["export"])
    assert set(original) == set(exported)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype, name
        assert torch.equal(exported[name], t), name


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_transformers(matrix, variant):
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    cases, reference, _ = matrix
    export = Path(cases[variant]["export"])
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(export))
    original_cfg, exported_cfg = AutoConfig.from_pretrained(cases[variant]["hf"]), AutoConfig.from_pretrained(export)
    for key in ("num_hidden_layers", "hidden_size", "num_key_value_heads", "tie_word_embeddings", "vocab_size",
                "rms_norm_eps", "rope_parameters", "sliding_window", "head_dim", "intermediate_size",
                "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "router_aux_loss_coef", "decoder_sparse_step"):
        assert getattr(exported_cfg, key, None) == getattr(original_cfg, key, None), key
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokens = cases[variant]["tokens"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, reference[variant])
