"""An MoE base (Qwen3-MoE: q/k norms, 4 experts, top 2) through LLaMA Pro training with expert parallelism, over gloo.

Conversion, verify, expansion (every expert's down projection zeroed) and export of the MoE families are in the
shared variant tests (test_conversion.py, test_direct_convert.py, test_expansion.py). Here, as a user runs it:
- `train` at EP 2 (DP 2: each rank holds 2 of the 4 experts of every layer), then resumed at EP 1, then at ETP 2
  (DP 2 for the dense layers, each expert's FFN split over both ranks);
- the frozen blocks' routers, experts and q/k norms are bit-identical to the HF originals after both runs; the new
  blocks' routers and experts moved;
- only the new blocks' routers add a load-balancing loss (TrainResult.moe_aux_losses names exactly those layers);
- the parameter counts the trainer reports (each EP rank's experts added once) and `--dry-run` at EP 2 and at
  ETP 2 equal transformers' count of the expanded model;
- at the same EP 2 with the distributed optimizer, a resume from a trainable-only save is bit-exact (loss, weights,
  the experts' optimizer state), and `merge` of that save equals the full save.
"""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from llamapro_megatron.checkpoint.mcore import read_meta
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


def _same_ep_world(root: str) -> dict:
    """At EP 2 with the distributed optimizer (each expert's state on the rank that holds it): a full save (F), a
    trainable-only save every step (T), T resumed at step 2 (T2), and T merged (M)."""
    from pathlib import Path

    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.merge import merge_trainable
    from llamapro_megatron.expansion import interleave
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    r = Path(root)
    hf_to_mcore(r / "hf", r / "pro", plan=interleave(4, 2), progress=False)
    common = [*COMMON, "--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--seed", "7",
              "--train-iters", "3", "--lr-decay-style", "constant"]  # constant: step 3 moves the weights too
    out = {"F": train(config_from_argv([*common, "--load", str(r / "pro"), "--save", str(r / "F"),
                                        "--save-interval", "3"])).losses,
           "T": train(config_from_argv([*common, "--load", str(r / "pro"), "--save", str(r / "T"),
                                        "--save-interval", "1", "--save-trainable-only"])).losses}
    out["T2"] = train(config_from_argv([*common, "--load", str(r / "T"), "--ckpt-step", "2", "--save", str(r / "T2"),
                                        "--save-interval", "3", "--save-trainable-only"])).losses
    merge_trainable(None, r / "T", r / "M", ep=2, progress=False)  # the layout to record: EP 2
    return out


@pytest.mark.slow
def test_moe_resumes_bit_exactly_at_the_same_ep_with_the_distributed_optimizer_and_merges(tmp_path):
    """EP 2 + distributed optimizer, trainable-only saves: the resume from step 2 gives step 3's loss and every saved
    tensor (weights and the experts' optimizer state) bit for bit as the uninterrupted run; the merged trainable-only
    save equals the full save's model tensors bit for bit, and so does the trainable-only save as one rank (EP 1) loads
    it."""
    from tests.distributed.test_trainable_only import _assert_equal, _loaded_at_world_1, _model
    from tests.distributed.test_training import _tensors as dcp_tensors

    make_tiny_hf(tmp_path / "hf", "qwen3_moe")
    out = run_workers(_same_ep_world, 2, args=(str(tmp_path),), timeout_s=600)[0]
    assert out["F"] == out["T"] and sorted(out["T"]) == [1, 2, 3], out  # trainable-only saves change no step
    assert out["T2"] == {3: out["T"][3]}, out
    resumed, uninterrupted = dcp_tensors(tmp_path / "T2" / "iter_0000003"), dcp_tensors(tmp_path / "T" / "iter_0000003")
    assert any("optimizer" in k and ".experts." in k for k in uninterrupted), sorted(uninterrupted)[:20]
    _assert_equal(resumed, uninterrupted)
    _assert_equal(_model(dcp_tensors(tmp_path / "M" / "release")),
                  _model(dcp_tensors(tmp_path / "F" / "iter_0000003")))
    assert read_meta(tmp_path / "M" / "release").layout == {"tp": 1, "pp": 1, "vpp": None, "ep": 2}
    full, trained_only = run_workers(_loaded_at_world_1, 1, timeout_s=300, args=(
        [str(tmp_path / "F" / "iter_0000003"), str(tmp_path / "T" / "iter_0000003")],))[0]
    _assert_equal(trained_only, full)
