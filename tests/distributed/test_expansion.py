"""Block expansion inside the sharded checkpoint, on tiny models, in one 4-rank gloo world.

- expanded logits equal the original's exactly (fp32, same TP; PP may differ since every layer computes alone);
  MoE models also with the experts split over 2 ranks (EP 2);
- sources written for one layout, expanded for another; interleave, explicit positions, top, bottom, and a second
  expansion composed with the first;
- the HF export of each expanded checkpoint, `expand-hf`, and one-pass `hf-to-mcore --groups` all equal the
  paper's algorithm applied directly to the HF weights (tests/expansion_reference.py);
- the metadata lists the new layers.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamapro_megatron.checkpoint.expand_hf import expand_hf
from llamapro_megatron.expansion import plan_from_args
from llamapro_megatron.runtime.launch import run_workers
from tests.expansion_reference import assert_same_values, expand_hf_state_dict, reference_layer_sources
from tests.tiny_models import make_tiny_hf

# name: (variant, source layout (tp, pp), plan kwargs, reference kwargs, target layout, comparisons)
# comparisons: (original's tp, pp) vs (expanded's tp, pp), same TP
CASES = {
    "groups": ("gqa", (2, 2), dict(groups=2), dict(groups=2), (1, 2), [((1, 1), (1, 2)), ((2, 2), (2, 2))]),
    "positions": ("tied", (1, 2), dict(positions="0,3"), dict(positions=[0, 3]), (2, 2), [((2, 1), (2, 2))]),
    "top": ("gqa", (1, 1), dict(where="top", num_new=2), dict(top=2), (1, 2), [((1, 1), (1, 2))]),
    "bottom": ("llama31", (1, 2), dict(where="bottom", num_new=4), dict(bottom=4), (1, 4), [((1, 2), (1, 4))]),
    "qwen2": ("qwen2", (2, 1), dict(groups=2), dict(groups=2), (2, 2), [((2, 1), (2, 2))]),  # q/k/v biases copied
    "qwen3": ("qwen3", (1, 2), dict(groups=2), dict(groups=2), (2, 1), [((2, 2), (2, 1))]),  # q/k norms copied
    # every expert's down projection zeroed, the router copied; compared at EP 2 below
    "mixtral": ("mixtral", (2, 2), dict(positions="1,4"), dict(positions=[1, 4]), (1, 2), [((1, 1), (1, 2))]),
    "qwen3_moe": ("qwen3_moe", (1, 1), dict(groups=2), dict(groups=2), (2, 2), [((2, 2), (2, 1))]),
}
# MoE cases also compared with their experts split over 2 ranks: (original's tp, pp, ep) vs (expanded's)
EP_COMPARISONS = {"mixtral": ((1, 1, 2), (1, 2, 2)), "qwen3_moe": ((2, 1, 2), (2, 1, 2))}


def _world(root: str, cases: dict, tokens: torch.Tensor):
    import torch.distributed as dist

    from llamapro_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.verify import megatron_logits

    dist.init_process_group("gloo")
    r = Path(root)
    diffs = {}
    converted = set()
    for name, (variant, (stp, spp), plan, _, (ttp, tpp), comparisons) in cases.items():
        src = r / f"src_{variant}_{stp}{spp}"
        if src.name not in converted:
            hf_to_mcore(r / f"hf_{variant}", src, tp=stp, pp=spp, progress=False)
            converted.add(src.name)
        # one-unit rounds: several save rounds merged into one checkpoint
        expand_mcore(src, r / f"x_{name}", lambda n, p=plan: plan_from_args(n, **p), tp=ttp, pp=tpp, progress=False,
                     round_bytes=1)
        mcore_to_hf(r / f"x_{name}", r / f"xhf_{name}", progress=False)
        for (otp, opp), (etp, epp) in comparisons:
            a = megatron_logits(src, tokens, tp=otp, pp=opp, spec="local")
            b = megatron_logits(r / f"x_{name}", tokens, tp=etp, pp=epp, spec="local")
            diffs[(name, otp, opp, etp, epp)] = (a - b).abs().max().item()
        if name in EP_COMPARISONS:
            (otp, opp, oep), (etp, epp, eep) = EP_COMPARISONS[name]
            a = megatron_logits(src, tokens, tp=otp, pp=opp, ep=oep, spec="local")
            b = megatron_logits(r / f"x_{name}", tokens, tp=etp, pp=epp, ep=eep, spec="local")
            diffs[(name, otp, opp, oep, etp, epp, eep)] = (a - b).abs().max().item()
    # a second expansion composes with the first (6 -> 9 layers), then loads at PP=1
    expand_mcore(r / "x_groups", r / "x_twice", lambda n: plan_from_args(n, groups=3), progress=False)
    a = megatron_logits(r / "src_gqa_22", tokens, tp=1, pp=1, spec="local")
    b = megatron_logits(r / "x_twice", tokens, tp=1, pp=1, spec="local")
    diffs[("twice", 1, 1, 1, 1)] = (a - b).abs().max().item()
    # one pass from Hugging Face
    hf_to_mcore(r / "hf_gqa", r / "onepass", tp=1, pp=2, plan=plan_from_args(4, groups=2), progress=False)
    mcore_to_hf(r / "onepass", r / "onepass_hf", progress=False)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return diffs if rank == 0 else None


def _load_dir(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("expand")
    for variant in {c[0] for c in CASES.values()}:
        make_tiny_hf(root / f"hf_{variant}", variant)
    tokens = torch.randint(0, 130, (2, 20), generator=torch.Generator().manual_seed(1))
    diffs = run_workers(_world, 4, args=(str(root), CASES, tokens))[0]
    return root, diffs


@pytest.mark.slow
def test_expanded_logits_equal_original_exactly(world):
    _, diffs = world
    assert len(diffs) == 12
    assert all(d == 0.0 for d in diffs.values()), diffs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_export_equals_reference_expansion_and_expand_hf(world, name):
    root, _ = world
    variant, _, plan, ref, _, _ = CASES[name]
    original = _load_dir(root / f"hf_{variant}")
    sources, new = reference_layer_sources(4, **ref)
    expected = expand_hf_state_dict(original, sources, new)
    assert_same_values(_load_dir(root / f"xhf_{name}"), expected)
    out = expand_hf(root / f"hf_{variant}", root / f"ehf_{name}", lambda n: plan_from_args(n, **plan), workers=2,
                    progress=False)
    assert_same_values(_load_dir(out), expected)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(sources)
    meta = json.loads((root / f"x_{name}" / "release" / "llamapro.json").read_text())
    assert meta["expansion"]["new_layer_indices"] == sorted(new)
    assert meta["expansion"]["original_num_layers"] == 4 and meta["arch"]["num_layers"] == len(sources)


@pytest.mark.slow
def test_one_pass_and_composed_expansion(world):
    root, _ = world
    sources, new = reference_layer_sources(4, groups=2)
    assert_same_values(_load_dir(root / "onepass_hf"), expand_hf_state_dict(_load_dir(root / "hf_gqa"), sources, new))
    meta = json.loads((root / "x_twice" / "release" / "llamapro.json").read_text())["expansion"]
    assert meta["num_layers"] == 9 and meta["new_layer_indices"] == [2, 3, 5, 7, 8]
    onepass = json.loads((root / "onepass" / "release" / "llamapro.json").read_text())["expansion"]
    assert onepass["new_layer_indices"] == [2, 5]
