"""Bad input to expansion: one clear error naming the input, and nothing that looks like a checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest

from llamapro_megatron.checkpoint.convert import hf_to_mcore
from llamapro_megatron.cli import main
from tests.tiny_models import make_tiny_hf


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("xerr")
    hf = make_tiny_hf(root / "hf", "gqa")  # 4 layers, 4 heads / 2 KV groups
    return hf, hf_to_mcore(hf, root / "mc", workers=1, progress=False)


def _refused(capsys, argv, out, match):
    code = main([*argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags, match", [
    (["--groups", "3"], "--groups 3 must divide the 4 source layers"),
    (["--positions", "1,1"], "unique"),
    (["--positions", "9"], "out of range"),
    (["--groups", "2", "--pp", "4"], "--pp 4 does not divide 6 layers"),
    (["--groups", "2", "--tp", "4"], "must divide the 2 KV groups"),
    (["--groups", "2", "--positions", "1"], "exactly one of"),
])
def test_bad_plan_or_layout(source, tmp_path, capsys, flags, match):
    hf, mc = source
    _refused(capsys, ["expand", "--load", str(mc), *flags], tmp_path / "x", match)
    if "--pp" not in flags and "--tp" not in flags:  # expand-hf has no layout flags
        _refused(capsys, ["expand-hf", "--hf-dir", str(hf), *flags], tmp_path / "xhf", match)


@pytest.mark.slow
def test_source_not_a_llamapro_checkpoint(source, tmp_path, capsys):
    _, mc = source
    foreign = tmp_path / "foreign"
    shutil.copytree(mc, foreign)
    (foreign / "release" / "llamapro.json").unlink()
    _refused(capsys, ["expand", "--load", str(foreign), "--groups", "2"], tmp_path / "x", "not a checkpoint written")
    meta = json.loads((mc / "release" / "llamapro.json").read_text())
    meta["arch"]["architecture"] = "GPT2LMHeadModel"
    (foreign / "release" / "llamapro.json").write_text(json.dumps(meta))
    _refused(capsys, ["expand", "--load", str(foreign), "--groups", "2"], tmp_path / "x", "not a LLaMA-family")


@pytest.mark.slow
def test_existing_output(source, tmp_path, capsys):
    _, mc = source
    out = tmp_path / "x"
    out.mkdir()
    code = main(["expand", "--load", str(mc), "--groups", "2", "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_truncated_source_file(source, tmp_path, capsys):
    _, mc = source
    broken = tmp_path / "broken"
    shutil.copytree(mc, broken)
    data = max((broken / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)  # tensor data
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    _refused(capsys, ["expand", "--load", str(broken), "--groups", "2", "--workers", "1"], tmp_path / "x",
             "nothing was written")
