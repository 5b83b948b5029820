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


_PARENT_PROBE = """
import sys
from llamapro_megatron.cli import main

hf, out = sys.argv[1], sys.argv[2]
assert main(["convert", "hf-to-mcore", "--hf-dir", hf, "--out", out + "/mc", "--workers", "2", "--no-progress"]) == 0
assert main(["expand-hf", "--hf-dir", hf, "--out", out + "/hf_x", "--groups", "2", "--workers", "2",
             "--no-progress"]) == 0
print("HEAVY", sorted({m.split(".")[0] for m in sys.modules} & {"torch", "megatron", "safetensors", "numpy"}))
"""


@pytest.mark.slow
def test_cli_parent_stays_light_and_output_quiet(tmp_path):
    """The parent of spawned workers validates and waits without importing torch (workers start ~1.5 s sooner);
    megatron-core's fallback notes and the rounds' expected partial-fill warnings reach no user."""
    hf = make_tiny_hf(tmp_path / "hf", "gqa")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PARENT_PROBE, str(hf), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout, proc.stdout
    noisy = [line for line in proc.stderr.splitlines() if "Warning" in line or "invalid fill" in line]
    assert not noisy, noisy
    assert (tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (tmp_path / "hf_x" / "config.json").is_file()
