"""hf-to-mcore's direct path (`checkpoint.direct`: tensor bytes copied by a torch-free parent) against the regular
path (megatron-core's dist_checkpointing writes tensors a worker built).

Reference: the regular path's checkpoint of the same HF directory, read back by PyTorch's own DCP reader
(`dcp_to_torch_save`). Checked for every tiny variant, an expansion in the same pass, and the real SmolLM2-135M:
the DCP metadata describes the same tensors, chunks and objects, and every tensor and object reads back
identical. The regular path is what the conversion tests (`test_conversion.py`, inside a launched world) use.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from llamapro_megatron.checkpoint import direct
from llamapro_megatron.checkpoint.convert import hf_to_mcore
from llamapro_megatron.expansion import interleave
from llamapro_megatron.runtime.launch import run_workers
from tests.tiny_models import VARIANTS, make_tiny_hf


def _regular_world(cases: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # inside a launched world conversion takes the regular path
    for case in cases.values():
        plan = interleave(case["layers"], 2) if case["expand"] else None
        hf_to_mcore(case["hf"], case["regular"], tp=1, pp=1, plan=plan, progress=False)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    cases = {}
    for variant in VARIANTS:
        hf = make_tiny_hf(root / f"hf_{variant}", variant)
        cases[variant] = dict(hf=str(hf), layers=VARIANTS[variant]["num_hidden_layers"], expand=False)
    make_tiny_hf(root / "hf_bf16", "gqa", seed=1, dtype=torch.bfloat16)
    cases["gqa_bf16"] = dict(hf=str(root / "hf_bf16"), layers=4, expand=False)
    cases["gqa_expanded"] = dict(hf=cases["gqa"]["hf"], layers=4, expand=True)
    try:
        from llamapro_megatron.checkpoint.gguf_import import smollm2_hf_dir

        cases["smollm2"] = dict(hf=str(smollm2_hf_dir()), layers=30, expand=False)
    except Exception as e:  # the real model is fetched once per machine (tests/data_artifacts.py)
        print(f"SmolLM2 not available ({e}): direct path checked on tiny models only")
    for name, case in cases.items():
        case["regular"], case["direct"] = str(root / f"regular_{name}"), str(root / f"direct_{name}")
    run_workers(_regular_world, 2, args=(cases,))
    for case in cases.values():
        plan = interleave(case["layers"], 2) if case["expand"] else None
        hf_to_mcore(case["hf"], case["direct"], tp=1, pp=1, plan=plan, workers=2, progress=False)
    return cases


def _dcp_metadata(ckpt: str):
    with open(Path(ckpt) / "release" / ".metadata", "rb") as f:
        return pickle.load(f)


def _read_all(ckpt: str, tmp: Path) -> dict:
    """Every tensor and object of a torch_dist checkpoint, read by PyTorch's DCP reader (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(Path(ckpt) / "release", tmp / "all.pt")
    state = torch.load(tmp / "all.pt", weights_only=False)
    (tmp / "all.pt").unlink()
    return state


@pytest.mark.slow
@pytest.mark.parametrize("name", [*VARIANTS, "gqa_bf16", "gqa_expanded", "smollm2"])
def test_direct_checkpoint_equals_regular(converted, name, tmp_path):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if name not in converted:
        pytest.skip("SmolLM2-135M not available")
    case = converted[name]
    files = sorted(p.name for p in (Path(case["direct"]) / "release").iterdir())
    assert any(f.startswith("__direct_") for f in files), f"the direct path did not run: {files}"

    ours, theirs = _dcp_metadata(case["direct"]), _dcp_metadata(case["regular"])
    assert sorted(ours.state_dict_metadata) == sorted(theirs.state_dict_metadata)
    for key, want in theirs.state_dict_metadata.items():
        got = ours.state_dict_metadata[key]
        assert type(got) is type(want), key
        if isinstance(want, TensorStorageMetadata):
            assert (got.size, got.properties) == (want.size, want.properties), key
            chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in got.chunks)
            assert chunks == sorted((tuple(c.offsets), tuple(c.sizes)) for c in want.chunks), key
    assert sorted((i.fqn, tuple(i.offset or ())) for i in ours.storage_data) == \
        sorted((i.fqn, tuple(i.offset or ())) for i in theirs.storage_data)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    got, want = _read_all(case["direct"], tmp_path / "a"), _read_all(case["regular"], tmp_path / "b")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key
    for f in ("common.pt", "metadata.json", "llamapro.json"):
        assert (Path(case["direct"]) / "release" / f).is_file()


@pytest.mark.slow
def test_layout_mismatch_falls_back_to_the_regular_path(converted, tmp_path, monkeypatch, capsys):
    """A plan megatron-core's sharded state dict does not confirm (as another megatron-core version might give):
    the worker refuses it, and the conversion reruns through megatron-core's writer."""
    case = converted["tied"]
    plan_import = direct.plan_import

    def wrong_plan(*args, **kwargs):
        chunks = plan_import(*args, **kwargs)
        chunks[0].key += "_renamed"
        return chunks

    monkeypatch.setattr(direct, "plan_import", wrong_plan)
    out = tmp_path / "ckpt"
    hf_to_mcore(case["hf"], out, progress=False)
    assert "converting through megatron-core's writer instead" in capsys.readouterr().err
    assert not any(p.name.startswith("__direct_") for p in (out / "release").iterdir())
    want = _read_all(case["regular"], tmp_path)
    got = _read_all(str(out), tmp_path)
    assert all(torch.equal(got[k], v) for k, v in want.items() if isinstance(v, torch.Tensor))


def test_copy_failure_leaves_nothing(converted, tmp_path, monkeypatch):
    from llamapro_megatron.errors import UserError

    def fail(path, chunks, progress, stop):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(direct, "write_file", fail)
    out = tmp_path / "ckpt"
    with pytest.raises(UserError, match="nothing was written there: .*No space left"):
        hf_to_mcore(converted["gqa"]["hf"], out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_plan_refuses_what_it_cannot_copy(converted):
    """A dtype change (bytes cannot be copied as they are) leaves the conversion to the regular path."""
    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.checkpoint.hf import HFReader
    from llamapro_megatron.expansion import ExpansionPlan

    hf = converted["gqa"]["hf"]  # fp32
    arch = LlamaArch.from_hf_dir(hf)
    args = (HFReader(hf), arch, ExpansionPlan.identity(arch.num_layers), arch.padded_vocab_size(1, 128))
    assert isinstance(direct.plan_import(*args, "float32"), list)
    reason = direct.plan_import(*args, "bfloat16")
    assert isinstance(reason, str) and "float32" in reason and "bfloat16" in reason
