"""Real weights: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV groups, tied embeddings, rope theta 1e5).

Its TP can only be 1 or 3, so the multi-rank layout here is TP=1 PP=2. One 2-rank world converts it, runs the
Megatron model on real Python source, and exports it back; transformers is the reference.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from llamapro_megatron.runtime.launch import run_workers

LOGIT_TOL = 2e-4  # fp32 on real weights (logits of magnitude ~20): same math, different kernels


def _world(hf: str, ckpt: str, export: str, tokens: torch.Tensor):
    import torch.distributed as dist

    from llamapro_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from llamapro_megatron.verify import megatron_logits

    dist.init_process_group("gloo")
    hf_to_mcore(hf, ckpt, tp=1, pp=2, progress=False)
    logits = megatron_logits(ckpt, tokens, tp=1, pp=2, spec="local")
    mcore_to_hf(ckpt, export, progress=False)
    dist.destroy_process_group()
    return logits


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamapro_megatron.checkpoint.gguf_import import smollm2_hf_dir

    hf = smollm2_hf_dir()
    root = tmp_path_factory.mktemp("smollm2")
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()[:1500]
    tokens = torch.tensor([AutoTokenizer.from_pretrained(hf)(text)["input_ids"][:128]])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(input_ids=tokens).logits
    logits = run_workers(_world, 2, args=(str(hf), str(root / "mcore"), str(root / "hf"), tokens))[0]
    return hf, root / "hf", tokens, reference, logits


@pytest.mark.slow
def test_smollm2_logits_tp1_pp2_match_transformers(smollm2_run):
    _, _, tokens, reference, logits = smollm2_run
    assert logits.shape[:2] == reference.shape[:2] and logits.shape[-1] == 49152  # 49152 = 384 x 128: no padding
    diff = (logits[..., :49152] - reference).abs()
    assert diff.max().item() <= LOGIT_TOL, diff.max().item()
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_smollm2_round_trip_bit_exact(smollm2_run):
    from safetensors.torch import load_file

    hf, export, _, _, _ = smollm2_run
    original, exported = {}, {}
    for f in Path(hf).glob("*.safetensors"):
        original.update(load_file(f))
    for f in Path(export).glob("*.safetensors"):
        exported.update(load_file(f))
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) and original[k].dtype == exported[k].dtype for k in original)
    tokenizer_files = sorted(p.name for p in Path(hf).glob("tokenizer*"))
    assert sorted(p.name for p in Path(export).glob("tokenizer*")) == tokenizer_files
