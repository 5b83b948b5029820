"""--save-trainable-only and `llamapro merge`, in one 2-rank world (PP2) on a tiny expanded model (4 -> 6 layers,
fp16 weights, bf16 training, only the new blocks train).

The same run is saved in full (F) and trainable-only (T). Checks, each against the full form: the merged T equals
F's model tensors bit for bit (also through the `llamapro merge` command, in rounds of one unit); exporting T
gives the same Hugging Face files as exporting F; expanding T gives the same checkpoint as expanding F; resuming
from T at step N gives the same losses and the same saved weights and optimizer state, bit for bit, as resuming
from F. A trainable-only save holds no frozen tensor, and a mismatched or missing base is refused.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamapro_megatron.errors import UserError
from llamapro_megatron.runtime import run_workers
from tests.tiny_models import make_tiny_hf

N = 2
NEW_LAYERS = [2, 5]  # interleave(4 layers, 2 groups)
COMMON = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "2", "--seq-length", "16",
          "--train-iters", str(2 * N), "--save-interval", str(N), "--lr", "5e-3", "--bf16", "--eval-iters", "0",
          "--log-interval", str(N), "--seed", "7", "--pipeline-model-parallel-size", "2"]


def _train(argv: list[str]):
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    return train(config_from_argv(argv)).losses


def _plan(n: int):
    from llamapro_megatron.expansion import plan_from_args

    return plan_from_args(n, None, "6", None, None)  # one more block on top


def _world(root: str) -> dict:
    from llamapro_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.checkpoint.merge import merge_trainable
    from llamapro_megatron.expansion import interleave

    r = Path(root)
    hf_to_mcore(r / "hf", r / "base", pp=2, progress=False)
    expand_mcore(r / "base", r / "pro", lambda n: interleave(n, 2), pp=2, progress=False)
    out = {"F": _train([*COMMON, "--load", str(r / "pro"), "--save", str(r / "F")]),
           "T": _train([*COMMON, "--load", str(r / "pro"), "--save", str(r / "T"), "--save-trainable-only"])}
    resume = ["--ckpt-step", str(N)]
    out["F2"] = _train([*COMMON, "--load", str(r / "F"), *resume, "--save", str(r / "F2")])
    out["T2"] = _train([*COMMON, "--load", str(r / "T"), *resume, "--save", str(r / "T2"), "--save-trainable-only"])
    merge_trainable(None, r / "T", r / "M", progress=False)
    # the command, with the base given (its save directory) and one unit per round: many rounds, each reading
    # parts of the stacked layer tensors from the save and the rest from the base
    from llamapro_megatron.cli import main

    out["cli_merge"] = main(["merge", "--base", str(r / "pro"), "--trainable", str(r / "T"), "--ckpt-step", str(N),
                             "--out", str(r / "M_cli"), "--max-round-mb", "0", "--no-progress"])
    for name in ("F", "T"):
        mcore_to_hf(r / name, r / f"hf_{name}", progress=False)
        expand_mcore(r / name, r / f"E_{name}", _plan, progress=False)
    return out


def _tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt_dir.parent / f"{ckpt_dir.parent.name}_{ckpt_dir.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


def _model(tensors: dict) -> dict:
    """The model's tensors of a save: not its optimizer's (under `optimizer.`, or `chained_N.optimizer.` for an MoE
    model's chained optimizer)."""
    return {k: v for k, v in tensors.items() if not k.startswith("optimizer") and ".optimizer." not in k}


def _assert_equal(a: dict, b: dict) -> None:
    assert a and set(a) == set(b), sorted(set(a) ^ set(b))
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainable")
    make_tiny_hf(root / "hf", "gqa", dtype=torch.float16)
    return root, run_workers(_world, 2, args=(str(root),), timeout_s=900)[0]


def _iter(root: Path, name: str, it: int = 2 * N) -> Path:
    return root / name / f"iter_{it:07d}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trainable_only_save_holds_only_trained_tensors(runs):
    root, out = runs
    assert out["T"] == out["F"] and len(out["F"]) == 2 * N
    meta = json.loads((_iter(root, "T") / "llamapro.json").read_text())["trainable_only"]
    assert meta["base"] == str((root / "pro" / "release").resolve()) and meta["fingerprint"].startswith("sha256:")
    stored = _model(_tensors(_iter(root, "T")))
    assert set(stored) == set(meta["keys"])
    assert {int(k.split(".")[2]) for k in stored} == set(NEW_LAYERS)  # decoder.layers.<i>.* of new blocks only
    full = _tensors(_iter(root, "F"))
    for key, value in stored.items():  # the stacked full tensor's slice of that layer
        layer, rest = int(key.split(".")[2]), ".".join(key.split(".")[3:])
        assert torch.equal(full[f"decoder.layers.{rest}"][layer], value), key
    # the optimizer part is the full save's (frozen tensors have no optimizer state)
    _assert_equal({k: v for k, v in full.items() if k.startswith("optimizer")},
                  {k: v for k, v in _tensors(_iter(root, "T")).items() if k.startswith("optimizer")})


@pytest.mark.slow
def test_merge_equals_the_full_save(runs):
    root, out = runs
    _assert_equal(_model(_tensors(root / "M" / "release")), _model(_tensors(_iter(root, "F"))))
    # `llamapro merge --base --trainable --ckpt-step --out`, in rounds of one unit, at step N
    assert out["cli_merge"] == 0
    _assert_equal(_model(_tensors(root / "M_cli" / "release")), _model(_tensors(_iter(root, "F", N))))
    meta = json.loads((root / "M" / "release" / "llamapro.json").read_text())
    assert meta["trainable_only"] is None and meta["iteration"] == 2 * N and meta["source"]["kind"] == "merged"
    assert meta["expansion"]["new_layer_indices"] == NEW_LAYERS


@pytest.mark.slow
def test_export_and_expand_accept_a_trainable_only_save(runs):
    from safetensors.torch import load_file

    root, _ = runs

    def hf(name: str) -> dict:
        return {k: v for f in sorted((root / name).glob("*.safetensors")) for k, v in load_file(f).items()}

    _assert_equal(hf("hf_T"), hf("hf_F"))
    assert (root / "hf_T" / "config.json").read_text() == (root / "hf_F" / "config.json").read_text()
    _assert_equal(_model(_tensors(root / "E_T" / "release")), _model(_tensors(root / "E_F" / "release")))


@pytest.mark.slow
def test_resume_from_trainable_only_equals_resume_from_full(runs):
    root, out = runs
    after = [out["F"][k] for k in sorted(out["F"]) if k > N]
    assert [out["T2"][k] for k in sorted(out["T2"])] == [out["F2"][k] for k in sorted(out["F2"])] == after
    full, trained_only = _tensors(_iter(root, "F2")), _tensors(_iter(root, "T2"))
    _assert_equal({k: v for k, v in full.items() if k.startswith("optimizer")},
                  {k: v for k, v in trained_only.items() if k.startswith("optimizer")})
    # T2's base is still the expanded checkpoint (what T built on), not T
    assert json.loads((_iter(root, "T2") / "llamapro.json").read_text())["trainable_only"]["base"] == str(
        (root / "pro" / "release").resolve())


def _loaded_at_world_1(ckpt_dirs: list[str]) -> list[dict[str, torch.Tensor]]:
    """Each checkpoint's weights as a one-rank TP 1 PP 1 model loads them (`load.load_model_weights`)."""
    from llamapro_megatron.checkpoint.load import load_model_weights
    from llamapro_megatron.checkpoint.mcore import read_meta
    from llamapro_megatron.runtime.distributed import destroy_distributed, init_distributed
    from llamapro_megatron.runtime.model import build_gpt_model

    init_distributed(tp=1, pp=1)
    try:
        out = []
        for ckpt_dir in ckpt_dirs:
            meta = read_meta(ckpt_dir)
            model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype=meta.dtype)
            load_model_weights(model, ckpt_dir)
            out.append({k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
        return out
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_a_world_of_one_loads_a_trainable_only_save(runs):
    """One rank (verify, evaluate, generate and train at TP 1 PP 1, a one-worker merge) reads the trainable-only
    save as the full one, bit for bit; megatron-core's reader cannot read a stacked tensor with holes in a world of
    one, so the base part is read whole there (`load.load`)."""
    root, _ = runs
    full, trained_only = run_workers(_loaded_at_world_1, 1, args=([str(_iter(root, "F")), str(_iter(root, "T"))],),
                                     timeout_s=300)[0]
    _assert_equal(trained_only, full)
    pro = run_workers(_loaded_at_world_1, 1, args=([str(root / "pro" / "release")],), timeout_s=300)[0][0]
    assert any(not torch.equal(pro[k], full[k]) for k in full)  # the trained blocks moved


@pytest.mark.slow
def test_mismatched_or_missing_base_is_refused(runs, tmp_path):
    from llamapro_megatron.checkpoint.convert import mcore_to_hf
    from llamapro_megatron.checkpoint.merge import merge_trainable

    root, _ = runs
    moved = tmp_path / "T" / "iter_0000004"
    shutil.copytree(_iter(root, "T"), moved)
    meta_file = moved / "llamapro.json"
    meta = json.loads(meta_file.read_text())
    meta["trainable_only"]["base"] = str(root / "base" / "release")  # a real checkpoint, but not the base
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match the one"):
        mcore_to_hf(moved, tmp_path / "x", progress=False)
    meta["trainable_only"]["base"] = str(tmp_path / "gone")
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not exist"):
        mcore_to_hf(moved, tmp_path / "x", progress=False)
    with pytest.raises(UserError, match="does not match the one"):  # --base must be the same checkpoint too
        merge_trainable(root / "base", moved, tmp_path / "y", progress=False)
    with pytest.raises(UserError, match="full checkpoint already"):
        merge_trainable(None, root / "F", tmp_path / "z", progress=False)
    with pytest.raises(UserError, match="--trainable .*gone does not exist"):
        merge_trainable(None, tmp_path / "gone", tmp_path / "z", progress=False)
