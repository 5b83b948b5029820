"""Real weights: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV groups, tied embeddings, rope theta 1e5).

Its TP can only be 1 or 3, so the multi-rank layout here is TP=1 PP=2. One 2-rank world converts it, runs the
Megatron model on real Python source, exports it back, and expands it 30 -> 36 blocks (6 groups);
transformers and the paper's algorithm on the HF weights are the references.
"""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from llamapro_megatron.runtime.launch import run_workers

LOGIT_TOL = 2e-4  # fp32 on real weights (logits of magnitude ~20): same math, different kernels


def _world(hf: str, ckpt: str, export: str, tokens: torch.Tensor):
    import torch.distributed as dist

    from llamapro_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave
    from llamapro_megatron.verify import megatron_logits_many

    dist.init_process_group("gloo")
    # rounds of ~64 MB: each worker saves its 30 layers over several rounds that each cover part of the stacked
    # layer tensors, merged into one checkpoint
    hf_to_mcore(hf, ckpt, tp=1, pp=2, progress=False, round_bytes=64 << 20)
    expand_mcore(ckpt, ckpt + "_pro", lambda n: interleave(n, 6), tp=1, pp=2, progress=False, round_bytes=64 << 20)
    logits, expanded = megatron_logits_many([ckpt, ckpt + "_pro"], tokens, tp=1, pp=2, spec="local")
    mcore_to_hf(ckpt, export, progress=False, round_bytes=64 << 20)
    mcore_to_hf(ckpt + "_pro", export + "_pro", progress=False)
    dist.destroy_process_group()
    return logits, expanded


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamapro_megatron.artifacts import smollm2_hf_dir

    hf = smollm2_hf_dir()
    root = tmp_path_factory.mktemp("smollm2")
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:1500]
    tokens = torch.tensor([AutoTokenizer.from_pretrained(hf)(text)["input_ids"][:128]])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(input_ids=tokens).logits
    logits, expanded = run_workers(_world, 2, args=(str(hf), str(root / "mcore"), str(root / "hf"), tokens))[0]
    yield hf, root / "hf", tokens, reference, logits, expanded
    shutil.rmtree(root, ignore_errors=True)  # ~2 GB of checkpoints: keep the suite's disk peak low


@pytest.mark.slow
def test_smollm2_logits_tp1_pp2_match_transformers(smollm2_run):
    _, _, tokens, reference, logits, _ = smollm2_run
    assert logits.shape[:2] == reference.shape[:2] and logits.shape[-1] == 49152  # 49152 = 384 x 128: no padding
    diff = (logits[..., :49152] - reference).abs()
    assert diff.max().item() <= LOGIT_TOL, diff.max().item()
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_smollm2_round_trip_bit_exact(smollm2_run):

    hf, export, _, _, _, _ = smollm2_run
    original, exported = _load(hf), _load(export)
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) and original[k].dtype == exported[k].dtype for k in original)
    tokenizer_files = sorted(p.name for p in Path(hf).glob("tokenizer*"))
    assert sorted(p.name for p in Path(export).glob("tokenizer*")) == tokenizer_files


def _load(hf_dir) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in Path(hf_dir).glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_smollm2_expanded_30_to_36_is_exact(smollm2_run):
    from tests.expansion_reference import assert_same_values, expand_hf_state_dict, reference_layer_sources

    hf, export, _, _, logits, expanded = smollm2_run
    assert torch.equal(logits, expanded)  # fp32, same layout: the identity blocks change nothing
    sources, new = reference_layer_sources(30, groups=6)
    assert sorted(new) == [5, 11, 17, 23, 29, 35]
    assert_same_values(_load(str(export) + "_pro"), expand_hf_state_dict(_load(hf), sources, new))
