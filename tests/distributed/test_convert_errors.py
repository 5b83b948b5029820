"""Bad input to conversion: one clear error naming the input, and no output directory that looks valid."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamapro_megatron.cli import main
from tests.tiny_models import make_tiny_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("bad") / "hf", "gqa")  # 4 heads, 2 KV groups, 4 layers


def _copy(tiny, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(tiny, d)
    return d


def _convert(capsys, *argv):
    code = main(["convert", "hf-to-mcore", "--no-progress", *argv])
    return code, capsys.readouterr().err


def _assert_refused(capsys, out, *argv, match):
    code, err = _convert(capsys, *argv, "--out", str(out))
    assert code == 2, err
    assert match in err, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_no_weights(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    (d / "model.safetensors").unlink()
    _assert_refused(capsys, tmp_path / "o", "--hf-dir", str(d), match="no *.safetensors")


def test_missing_shard_listed_in_index(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    names = load_file(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    _assert_refused(capsys, tmp_path / "o", "--hf-dir", str(d), match="missing")


def test_truncated_safetensors(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-1000])
    _assert_refused(capsys, tmp_path / "o", "--hf-dir", str(d), match="truncated")


def test_tensor_of_wrong_shape(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    _assert_refused(capsys, tmp_path / "o", "--hf-dir", str(d), match="model.layers.2.mlp.up_proj.weight has shape")


def test_a_tensor_the_config_does_not_account_for_is_refused(tmp_path, capsys):
    """A shared expert's tensor in a Qwen3-MoE directory, or a fifth expert where config.json says four, would be
    dropped by conversion: refused by name, by hf-to-mcore and by expand-hf; the tensors transformers itself ignores
    (an old checkpoint's RoPE inv_freq buffers, a tied model's lm_head) are accepted."""
    hf = make_tiny_hf(tmp_path / "moe", "qwen3_moe")  # 4 experts
    for extra in ("model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.1.mlp.experts.4.down_proj.weight"):
        d = tmp_path / "extra"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(hf, d)
        tensors = load_file(d / "model.safetensors")
        tensors[extra] = torch.zeros(64, 32)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        _assert_refused(capsys, tmp_path / "o", "--hf-dir", str(d), match=f"does not account for: ['{extra}']")
        code = main(["expand-hf", "--hf-dir", str(d), "--out", str(tmp_path / "x"), "--groups", "2", "--no-progress"])
        assert code == 2 and extra in capsys.readouterr().err and not (tmp_path / "x").exists()
    tied = make_tiny_hf(tmp_path / "tied", "tied")
    tensors = load_file(tied / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    assert _convert(capsys, "--hf-dir", str(tied), "--out", str(tmp_path / "ok"))[0] == 0


def test_an_output_that_is_the_input_is_refused_even_with_overwrite(tiny, tmp_path, capsys):
    """--out naming the source (or a folder above it) would replace what is being read: refused, source intact."""
    d = _copy(tiny, tmp_path)
    before = sorted(p.name for p in d.iterdir())
    for out, what in ((d, "is the input"), (tmp_path, "is a folder above the input")):
        code, err = _convert(capsys, "--hf-dir", str(d), "--out", str(out), "--overwrite")
        assert code == 2 and f"output {out} {what} {d}" in err, err
    assert sorted(p.name for p in d.iterdir()) == before
    code = main(["expand-hf", "--hf-dir", str(d), "--out", str(d), "--groups", "2", "--overwrite", "--no-progress"])
    assert code == 2 and "is the input" in capsys.readouterr().err and sorted(p.name for p in d.iterdir()) == before


def test_missing_config_and_foreign_architecture(tiny, tmp_path, capsys):
    d = _copy(tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"], model_type="gpt2")))
    _assert_refused(capsys, tmp_path / "o", "--hf-dir", str(d), match="not a LLaMA-family model")
    (d / "config.json").unlink()
    _assert_refused(capsys, tmp_path / "o", "--hf-dir", str(d), match="no config.json")


@pytest.mark.parametrize("flags, match", [
    (["--tp", "3"], "does not divide 4 attention heads"),
    (["--tp", "4"], "must divide the 2 KV groups"),
    (["--pp", "8"], "larger than the 4 layers"),
    (["--pp", "3"], "does not divide 4 layers"),
    (["--workers", "0"], "--workers 0"),
])
def test_bad_layout(tiny, tmp_path, capsys, flags, match):
    _assert_refused(capsys, tmp_path / "o", "--hf-dir", str(tiny), *flags, match=match)


def test_existing_output_needs_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    code, err = _convert(capsys, "--hf-dir", str(tiny), "--out", str(out))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep").exists()


def test_export_needs_a_checkpoint(tmp_path, capsys):
    code = main(["convert", "mcore-to-hf", "--load", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert code == 2 and "latest_checkpointed_iteration.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_failed_write_leaves_nothing(tiny, tmp_path, capsys):
    """A disk that fills mid-save (a 300 KB tmpfs; the checkpoint needs ~600 KB): clear error, no output."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mnt / "ckpt"
        code, err = _convert(capsys, "--hf-dir", str(tiny), "--out", str(out), "--workers", "2")
        assert code == 2 and "nothing was written" in err, err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.slow
def test_overwrite_replaces(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale").write_text("x")
    # one worker asked for, rounds of one unit: two workers are used (one rank cannot save partial rounds)
    code, err = _convert(capsys, "--hf-dir", str(tiny), "--out", str(out), "--overwrite", "--workers", "1",
                         "--max-round-mb", "0")
    assert code == 0, err
    assert not (out / "stale").exists() and (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
