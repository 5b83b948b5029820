"""The direct conversion paths (`checkpoint.direct_import` / `direct_export`: tensor bytes copied by a torch-free
parent) against the regular ones (workers build tensors; megatron-core's dist_checkpointing writes and reads them).

hf-to-mcore. Reference: the regular path's checkpoint of the same HF directory, read back by PyTorch's own DCP
reader (`dcp_to_torch_save`). The DCP metadata describes the same tensors, chunks and objects, and every tensor
and object reads back identical.
mcore-to-hf. Reference: the regular path's export of the same checkpoint: every file is identical, byte for byte.
Checked for every tiny variant, an expansion in the same pass, and the real SmolLM2-135M. The regular paths are what
the conversion tests (`test_conversion.py`, inside a launched world) use.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from llamapro_megatron.checkpoint import direct_export, direct_import
from llamapro_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
from llamapro_megatron.expansion import interleave
from llamapro_megatron.runtime.launch import run_workers
from tests.tiny_models import VARIANTS, make_tiny_hf


def _regular_world(cases: dict, tp2_ckpt: str) -> None:
    import shutil

    import torch.distributed as dist

    from llamapro_megatron.checkpoint.load import load_model_weights
    from llamapro_megatron.checkpoint.mcore import RELEASE, read_meta
    from llamapro_megatron.runtime.dist_ckpt import save
    from llamapro_megatron.runtime.distributed import destroy_distributed, init_distributed
    from llamapro_megatron.runtime.model import build_gpt_model

    dist.init_process_group("gloo")  # inside a launched world conversion takes the regular path
    for case in cases.values():
        plan = interleave(case["layers"], 2) if case["expand"] else None
        hf_to_mcore(case["hf"], case["regular"], tp=1, pp=1, plan=plan, progress=False)
        mcore_to_hf(case["regular"], case["regular_export"], progress=False)
    # the gqa checkpoint saved again by a TP=2 model: its row-parallel weights are split by columns
    src = Path(cases["gqa"]["regular"]) / RELEASE
    meta = read_meta(src)
    init_distributed(tp=2, pp=1)
    model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype=meta.dtype, tp=2)
    load_model_weights(model, src)
    out = Path(tp2_ckpt) / RELEASE
    if dist.get_rank() == 0:
        out.mkdir(parents=True)
    dist.barrier()
    save({"model": model.sharded_state_dict(), "checkpoint_version": 3.0, "iteration": 0}, str(out))
    if dist.get_rank() == 0:
        shutil.copy(src / "llamapro.json", out / "llamapro.json")
        (out.parent / "latest_checkpointed_iteration.txt").write_text(RELEASE)
    destroy_distributed()
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
        from llamapro_megatron.artifacts import smollm2_hf_dir

        cases["smollm2"] = dict(hf=str(smollm2_hf_dir()), layers=30, expand=False)
    except Exception as e:  # the real model is fetched once per machine (tests/data_artifacts.py)
        print(f"SmolLM2 not available ({e}): direct path checked on tiny models only")
    for name, case in cases.items():
        for kind in ("regular", "direct", "regular_export", "direct_export", "direct_export_of_direct"):
            case[kind] = str(root / f"{kind}_{name}")
    run_workers(_regular_world, 2, args=(cases, str(root / "tp2")))
    for case in cases.values():
        plan = interleave(case["layers"], 2) if case["expand"] else None
        hf_to_mcore(case["hf"], case["direct"], tp=1, pp=1, plan=plan, workers=2, progress=False)
        mcore_to_hf(case["regular"], case["direct_export"], workers=2, progress=False)
        mcore_to_hf(case["direct"], case["direct_export_of_direct"], progress=False)
    cases["tp2"] = str(root / "tp2")
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
@pytest.mark.parametrize("name", [*VARIANTS, "gqa_bf16", "gqa_expanded", "smollm2"])
def test_direct_export_equals_regular_byte_for_byte(converted, name):
    if name not in converted:
        pytest.skip("SmolLM2-135M not available")
    case = converted[name]
    want = sorted(p.name for p in Path(case["regular_export"]).iterdir())
    assert any(n.endswith(".safetensors") for n in want)
    for export in ("direct_export", "direct_export_of_direct"):
        assert sorted(p.name for p in Path(case[export]).iterdir()) == want, export
        for n in want:
            assert (Path(case[export]) / n).read_bytes() == (Path(case["regular_export"]) / n).read_bytes(), \
                f"{export}/{n}"


@pytest.mark.slow
def test_export_of_a_column_split_checkpoint(converted, tmp_path):
    """A TP=2 save splits linear_proj / linear_fc2 by columns: the direct export refuses it (the regular path
    exports it, equal to the TP=1 checkpoint's export); its row-split tensors (qkv, fc1, embedding) are still read
    as row ranges across chunks, equal to the TP=1 checkpoint's bytes."""
    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.checkpoint.dcp import index as dcp_index

    tp2, case = Path(converted["tp2"]) / "release", converted["gqa"]
    arch = LlamaArch.from_hf_dir(case["hf"])
    reason = direct_export.plan_export(tp2, arch, arch.padded_vocab_size(1, 128), "float32", "float32")
    assert isinstance(reason, str) and "split by columns" in reason
    mcore_to_hf(converted["tp2"], tmp_path / "export", progress=False)
    for p in Path(case["regular_export"]).glob("*.safetensors"):
        assert (tmp_path / "export" / p.name).read_bytes() == p.read_bytes(), p.name

    tp1 = Path(case["regular"]) / "release"
    rows = {d: direct_export.RowReader(d, dcp_index.read_tensor_index(d), "float32") for d in (tp1, tp2)}

    def read(d, key, layer, r0, r1):
        out = b""
        for p in rows[d](key, () if layer is None else (layer,), r0, r1):
            with open(p.path, "rb") as f:
                f.seek(p.offset)
                out += f.read(p.length)
        return out

    for key, layer, r0, r1 in [("decoder.layers.self_attention.linear_qkv.weight", 3, 5, 120),
                               ("decoder.layers.mlp.linear_fc1.weight", 1, 40, 150),
                               ("embedding.word_embeddings.weight", None, 100, 256)]:
        chunks = [c for c in rows[tp2].index[key].chunks if layer is None or c.offsets[0] == layer]
        assert len(chunks) > 1, key  # the range spans chunks
        assert read(tp2, key, layer, r0, r1) == read(tp1, key, layer, r0, r1), key


@pytest.mark.slow
def test_layout_mismatch_falls_back_to_the_regular_path(converted, tmp_path, monkeypatch, capsys):
    """A plan megatron-core's sharded state dict does not confirm (as another megatron-core version might give):
    the worker refuses it, and the conversion reruns through megatron-core's writer."""
    case = converted["tied"]
    plan_import = direct_import.plan_import

    def wrong_plan(*args, **kwargs):
        chunks = plan_import(*args, **kwargs)
        chunks[0].key += "_renamed"
        return chunks

    monkeypatch.setattr(direct_import, "plan_import", wrong_plan)
    _assert_fell_back(case, tmp_path, capsys)


def _assert_fell_back(case, tmp_path, capsys):
    out = tmp_path / "ckpt"
    hf_to_mcore(case["hf"], out, progress=False)
    assert "converting through megatron-core's writer instead" in capsys.readouterr().err
    assert not any(p.name.startswith("__direct_") for p in (out / "release").iterdir())
    want = _read_all(case["regular"], tmp_path)
    got = _read_all(str(out), tmp_path)
    tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    assert tensors and sorted(got) == sorted(want)
    for k in tensors:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.slow
def test_an_archive_that_reads_back_differently_falls_back(converted, tmp_path, monkeypatch, capsys):
    """The worker reads the probe archive back with torch.load before anything is committed: an archive this torch
    reads otherwise than the direct writer meant (simulated: its data bytes spoilt) makes the conversion rerun
    through megatron-core's writer."""
    write_chunk = direct_import.write_chunk

    def spoilt(out, c):
        write_chunk(out, c)
        out.seek(c.file_offset + len(direct_import.archive.frame(c.dtype, c.shape, c.serial).prefix))
        out.write(b"\xff" * 4)

    monkeypatch.setattr(direct_import, "write_chunk", spoilt)
    _assert_fell_back(converted["tied"], tmp_path, capsys)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("direct_tiny") / "hf", "gqa")


def test_copy_failure_leaves_nothing(tiny_fp32, tmp_path, monkeypatch):
    from llamapro_megatron.errors import UserError

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(direct_import, "write_file", fail)
    out = tmp_path / "ckpt"
    with pytest.raises(UserError, match="nothing was written there: .*No space left"):
        hf_to_mcore(tiny_fp32, out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_plan_refuses_what_it_cannot_copy(tiny_fp32):
    """A dtype change (bytes cannot be copied as they are) leaves the conversion to the regular path."""
    from llamapro_megatron.arch import LlamaArch
    from llamapro_megatron.checkpoint.hf import HFReader
    from llamapro_megatron.expansion import ExpansionPlan

    hf = tiny_fp32  # fp32
    arch = LlamaArch.from_hf_dir(hf)
    args = (HFReader(hf), arch, ExpansionPlan.identity(arch.num_layers), arch.padded_vocab_size(1, 128))
    assert isinstance(direct_import.plan_import(*args, "float32"), list)
    reason = direct_import.plan_import(*args, "bfloat16")
    assert isinstance(reason, str) and "float32" in reason and "bfloat16" in reason
