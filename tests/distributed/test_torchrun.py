"""Under torchrun, conversion uses the launched ranks (as on a cluster) instead of starting workers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamapro_megatron.runtime.launch import free_port
from tests.tiny_models import make_tiny_hf


def _torchrun(*argv: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "llamapro_megatron.cli", *argv, "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_round_trip_under_torchrun(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "tied")
    _torchrun("convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--pp", "2")
    _torchrun("convert", "mcore-to-hf", "--load", str(tmp_path / "mc"), "--out", str(tmp_path / "back"))
    original = load_file(hf / "model.safetensors")
    back = {}
    for f in Path(tmp_path / "back").glob("*.safetensors"):
        back.update(load_file(f))
    assert set(back) == set(original) and all(torch.equal(back[k], v) for k, v in original.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "hf", "mc"]  # no partial output left
