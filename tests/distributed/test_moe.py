"""An MoE base (Qwen3-MoE: q/k norms, 4 experts, top 2) through LLaMA Pro training with expert parallelism, over gloo.

Conversion, verify, expansion (every expert's down projection zeroed) and export of the MoE families are in the
shared variant tests (test_conversion.py, test_direct_convert.py, test_expansion.py). Here, as a user runs it:
- `train` at EP 2 (DP 2: each rank holds 2 of the 4 experts of every layer), then resumed at EP 1, then at ETP 2
  (DP 2 for the dense layers, each expert's FFN split over both ranks);
- the frozen blocks' routers, experts and q/k norms are bit-identical to the HF originals after both runs; the new
  blocks' routers and experts moved;
- only the new blocks' routers add a load-balancing loss (TrainResult.moe_aux_losses names exactly those layers);
- the parameter counts the trainer reports (each EP rank's experts added once) and `--dry-run` at EP 2 and at
  ETP 2 equal transformers' count of the expanded model.
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from llamapro_megatron.runtime import run_workers
from tests.distributed.versions import llamapro
from tests.tiny_models import make_tiny_hf

NEW = [2, 5]  # --groups 2 on 4 layers
SOURCE = {0: 0, 1: 1, 3: 2, 4: 3}  # expanded index -> original index of the frozen layers
COMMON = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--lr", "1e-2",
          "--eval-iters", "0", "--log-interval", "1", "--moe-aux-loss-coeff", "0.05"]


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def _train_2_ranks(argv: list[str]):
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    result = train(config_from_argv(argv))
    return result.moe_aux_losses, result.parameter_counts, result.iteration


@pytest.mark.slow
def test_moe_new_blocks_train_with_expert_parallelism_and_resume_at_another_ep(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe")
    pro = tmp_path / "pro"
    llamapro("convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(pro), "--groups", "2", "--no-progress")
    aux, counts, iteration = run_workers(_train_2_ranks, 2, args=([
        "--load", str(pro), "--save", str(tmp_path / "tr"), *COMMON, "--expert-model-parallel-size", "2",
        "--train-iters", "2", "--save-interval", "2"],), timeout_s=600)[0]
    assert iteration == 2
    assert set(aux) == {1, 2} and all(set(a) == set(NEW) and min(a.values()) > 0 for a in aux.values()), aux
    out = llamapro("train", "--load", str(tmp_path / "tr"), "--save", str(tmp_path / "tr"), *COMMON,
                   "--expert-model-parallel-size", "1", "--train-iters", "3", "--save-interval", "3").stdout
    assert "training iterations 2 -> 3" in out and "(mean of the 2 trained routers)" in out, out
    etp = ["--expert-tensor-parallel-size", "2"]  # TP 1: megatron-core trains MoE at TP > 1 only with SP (GPU)
    aux_etp, counts_etp, iteration = run_workers(_train_2_ranks, 2, args=([
        "--load", str(tmp_path / "tr"), "--save", str(tmp_path / "tr"), *COMMON, *etp, "--train-iters", "4",
        "--save-interval", "4"],), timeout_s=600)[0]
    assert iteration == 4 and set(aux_etp) == {4} and set(aux_etp[4]) == set(NEW), aux_etp
    plans = [llamapro("train", "--dry-run", "--load", str(pro), *COMMON, *layout, "--world-size", "2").stdout
             for layout in (["--expert-model-parallel-size", "2"], etp)]
    assert "EP 2" in plans[0] and "ETP 2 (each expert split over 2 ranks)" in plans[1], plans

    for ckpt in ("pro", "tr"):
        llamapro("convert", "mcore-to-hf", "--load", str(tmp_path / ckpt), "--out", str(tmp_path / f"{ckpt}_hf"),
                 "--no-progress")
    expanded = AutoModelForCausalLM.from_pretrained(tmp_path / "pro_hf")
    total = sum(p.numel() for p in expanded.parameters())
    padding = 2 * (256 - 170) * 64  # the untied embedding's and output layer's padded vocabulary rows
    for c in (counts, counts_etp):
        assert c["trainable"] + c["frozen"] - padding == total, (c, total)
    assert counts_etp == counts
    for plan in plans:
        assert int(re.search(r"parameters: ([\d,]+) \(as transformers", plan).group(1).replace(",", "")) == total, plan

    original, start = _tensors(hf), _tensors(tmp_path / "pro_hf")
    trained = _tensors(tmp_path / "tr_hf")  # after the EP 2 run and the EP 1 and ETP 2 resumes
    moved = set()
    for name, value in trained.items():
        if not name.startswith("model.layers."):
            assert torch.equal(value, original[name]), name
            continue
        layer, rest = int(name.split(".")[2]), name.split(".", 3)[3]
        if layer in NEW:
            moved.update({rest} if not torch.equal(value, start[name]) else set())
        else:
            assert torch.equal(value, original[f"model.layers.{SOURCE[layer]}.{rest}"]), name
    assert "mlp.gate.weight" in moved and "self_attn.q_norm.weight" in moved, sorted(moved)
    assert sum(r.endswith("down_proj.weight") for r in moved) >= 3, sorted(moved)  # of the 4 experts' (zeroed)
    assert sum(r.endswith("gate_proj.weight") for r in moved) >= 3, sorted(moved)
