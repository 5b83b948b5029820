"""Qwen2 (q/k/v biases, tied embeddings) through the LLaMA Pro workflow as a user runs it: convert, expand, verify
the expansion, train the new blocks, export; checked against transformers' Qwen2 model.

Conversion, round trips, the direct path and the expansion's exactness for Qwen2 are in the shared variant tests
(tests/distributed/test_conversion.py, test_direct_convert.py, test_expansion.py); here: after training, every
tensor of an original layer (biases included) and the tied embedding are bit-identical to the HF originals, every
tensor of a new layer (its q/k/v biases included) has moved, and the export loads in transformers with the
trainer's weights.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.versions import TRAIN, llamapro
from tests.tiny_models import make_tiny_hf

NEW = [2, 5]  # --groups 2 on 4 layers


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_qwen2_trains_only_its_new_blocks_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_tiny_hf(tmp_path / "hf", "qwen2")
    llamapro("convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "pro"), "--groups", "2",
             "--no-progress")
    llamapro("convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--no-progress")
    out = llamapro("verify", "--load", str(tmp_path / "mc"), "--load-expanded", str(tmp_path / "pro")).stdout
    assert "max |dlogit| 0.000e+00" in out, out
    llamapro("train", "--load", str(tmp_path / "pro"), "--save", str(tmp_path / "tr"), *TRAIN, "--train-iters", "2",
             "--save-interval", "2", "--lr", "1e-2")
    for ckpt in ("pro", "tr"):
        llamapro("convert", "mcore-to-hf", "--load", str(tmp_path / ckpt), "--out", str(tmp_path / f"{ckpt}_hf"),
                 "--no-progress")
    original, trained, start = (_tensors(d) for d in (hf, tmp_path / "tr_hf", tmp_path / "pro_hf"))
    assert json.loads((tmp_path / "tr_hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    source = {0: 0, 1: 1, 3: 2, 4: 3}  # expanded index -> original index
    for name, value in trained.items():
        if not name.startswith("model.layers."):
            assert torch.equal(value, original[name]), name  # the tied embedding, the final norm
            continue
        layer, rest = int(name.split(".")[2]), name.split(".", 3)[3]
        if layer in NEW:
            assert torch.equal(start[name], original[f"model.layers.{layer - 1 - NEW.index(layer)}.{rest}"]) or \
                rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"), name  # the copy, those two zeroed
            # (k_proj's bias adds the same score to every key of a query: softmax cancels it, its gradient is 0)
            if rest != "self_attn.k_proj.bias":
                assert not torch.equal(value, start[name]), name
        else:
            assert torch.equal(value, original[f"model.layers.{source[layer]}.{rest}"]), name
    assert any(n.endswith("q_proj.bias") for n in trained)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tr_hf")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert all(torch.equal(p, trained[n]) for n, p in model.state_dict().items() if n in trained)
