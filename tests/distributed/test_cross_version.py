"""A checkpoint written under one tested megatron-core is trained, resumed and exported under the other (0.16.1 on
Python 3.11, 0.19.x on Python 3.12). Needs the other version's interpreter as LLAMAPRO_OTHER_PYTHON:
`LLAMAPRO_TEST_MATRIX=1 bash tests/run.sh` (what CI runs) sets it in both legs, so each direction runs twice."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.versions import TRAIN, llamapro, megatron_core_version
from tests.tiny_models import make_tiny_hf

OTHER = os.environ.get("LLAMAPRO_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(not OTHER, reason="LLAMAPRO_OTHER_PYTHON (the other tested megatron-core's "
                                "interpreter) is not set; LLAMAPRO_TEST_MATRIX=1 bash tests/run.sh sets it")


def _hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["other", "this"])
def test_written_by_one_version_trained_resumed_and_exported_by_the_other(writer, tmp_path):
    python = {"this": sys.executable, "other": OTHER}
    reader = "this" if writer == "other" else "other"
    assert megatron_core_version(python[writer]) != megatron_core_version(python[reader])
    hf = make_tiny_hf(tmp_path / "hf", "gqa")  # 4 layers; --groups 2: new layers 2 and 5, copies of 1 and 3
    llamapro("convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--no-progress",
             python=python[writer])
    llamapro("expand", "--load", str(tmp_path / "mc"), "--out", str(tmp_path / "pro"), "--groups", "2",
             "--no-progress", python=python[writer])
    # the other version trains two steps from it and saves; the writer's version resumes (optimizer, RNG, position)
    llamapro("train", "--load", str(tmp_path / "pro"), "--save", str(tmp_path / "tr"), "--train-iters", "2",
             "--save-interval", "2", *TRAIN, python=python[reader])
    resumed = llamapro("train", "--load", str(tmp_path / "tr"), "--save", str(tmp_path / "tr"), "--train-iters", "3",
                       "--save-interval", "1", *TRAIN, python=python[writer])
    assert "iterations 2 -> 3" in resumed.stdout, resumed.stdout
    llamapro("convert", "mcore-to-hf", "--load", str(tmp_path / "tr"), "--out", str(tmp_path / "out"),
             "--no-progress", python=python[reader])

    source, out = _hf_tensors(hf), _hf_tensors(tmp_path / "out")
    sources = [0, 1, 1, 2, 3, 3]  # expanded layer -> source layer
    for name, tensor in out.items():
        if not name.startswith("model.layers."):
            assert torch.equal(tensor, source[name]), name  # embedding, final norm, output layer: frozen
            continue
        layer = int(name.split(".")[2])
        if layer not in (2, 5):  # an original block: frozen, bit-exact
            src = name.replace(f"model.layers.{layer}.", f"model.layers.{sources[layer]}.")
            assert torch.equal(tensor, source[src]), name
    trained = [n for n in out if n.startswith(("model.layers.2.", "model.layers.5.")) and "o_proj" in n]
    assert trained and all(out[n].abs().sum() > 0 for n in trained)  # the new blocks trained (were zero)
