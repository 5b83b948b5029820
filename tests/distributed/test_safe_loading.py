"""A checkpoint is data: a planted `__reduce__` in a checkpoint's pickles never runs, in any command that reads one.

The hostile pickle asks for `os.system("touch MARKER")`. Planted as a release checkpoint's `.metadata` or
`common.pt` or in place of a tensor chunk, a training save's `.metadata` (plain and distributed optimizer), a
trainable-only save's `.metadata` and a training save's RNG state objects (inside its `.distcp` files), it is
refused by every reading command: one `error:` line naming the file (or object) and the class, exit code 1, no
traceback, and the marker never appears. (The SFT save: tests/distributed/test_sft.py.)
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.versions import TRAIN


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "llamapro_megatron.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=600)


def _plant_metadata(ckpt: Path, marker: Path) -> None:
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Hostile(marker)))


def _plant_objects(ckpt: Path, prefix: str, marker: Path) -> int:
    """Replace every stored object or tensor chunk whose key starts with `prefix` by the hostile pickle (as torch.save
    writes it), appended to its data file; returns how many."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = pickle.loads((ckpt / ".metadata").read_bytes())  # the test's own, clean checkpoint
    buf = io.BytesIO()
    torch.save(_Hostile(marker), buf)
    planted = 0
    for index, info in list(md.storage_data.items()):
        if not index.fqn.startswith(prefix):
            continue
        with open(ckpt / info.relative_path, "ab") as f:
            offset = f.tell()
            f.write(buf.getvalue())
        md.storage_data[index] = _StorageInfo(info.relative_path, offset, len(buf.getvalue()))
        planted += 1
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    return planted


@pytest.fixture(scope="module")
def clean(workflow_checkpoints):
    return workflow_checkpoints


def _case(clean: Path, tmp_path: Path, kind: str):
    """A hostile copy of a clean checkpoint: (the argument naming it, the marker, what the refusal must name)."""
    marker = tmp_path / "MARKER"
    if kind in ("release_metadata", "release_common"):
        ckpt = tmp_path / "pro"
        shutil.copytree(clean / "pro", ckpt)
        if kind == "release_common":
            import torch

            torch.save(_Hostile(marker), ckpt / "release" / "common.pt")
            return ckpt, marker, "common.pt"
        if kind == "tensor_chunk":  # the embedding's chunk holds the hostile pickle instead of a tensor
            assert _plant_objects(ckpt / "release", "embedding.word_embeddings.weight", marker) == 1
            return ckpt, marker, "tensor chunk"
        _plant_metadata(ckpt / "release", marker)
        return ckpt, marker, ".metadata"
    save = {"trainable_only_metadata": "tro", "distributed_optimizer_metadata": "trd"}.get(kind, "tr")
    ckpt = tmp_path / save
    shutil.copytree(clean / save, ckpt)
    if kind == "rng_objects":
        assert _plant_objects(ckpt / "iter_0000001", "rng_state", marker) > 0
        return ckpt, marker, "rng_state"
    _plant_metadata(ckpt / "iter_0000001", marker)
    return ckpt, marker, ".metadata"


COMMANDS = {
    "mcore-to-hf": lambda c, o, clean: ["convert", "mcore-to-hf", "--load", str(c), "--out", str(o), "--no-progress"],
    "expand": lambda c, o, clean: ["expand", "--load", str(c), "--out", str(o), "--groups", "2", "--no-progress"],
    "verify": lambda c, o, clean: ["verify", "--load", str(c), "--hf-dir", str(clean / "hf"), "--pp", "2"],
    "evaluate": lambda c, o, clean: ["evaluate", "--load", str(c), "--data", f"code={clean / 'code.jsonl'}",
                                     "--seq-length", "8"],
    "generate": lambda c, o, clean: ["generate", "--load", str(c), "--prompt", "def", "--max-new-tokens", "2"],
    "train": lambda c, o, clean: ["train", "--load", str(c), "--save", str(o), "--train-iters", "2", *TRAIN],
    "merge": lambda c, o, clean: ["merge", "--trainable", str(c), "--out", str(o), "--no-progress"],
}
CASES = [(cmd, "release_metadata") for cmd in ("mcore-to-hf", "expand", "verify", "evaluate", "generate", "train")]
CASES += [("mcore-to-hf", "training_metadata"), ("train", "training_metadata"),  # train: a resume
          ("merge", "trainable_only_metadata"), ("mcore-to-hf", "trainable_only_metadata"),
          ("train", "rng_objects"), ("expand", "release_common"), ("train", "release_common"),
          ("mcore-to-hf", "tensor_chunk"), ("expand", "tensor_chunk"),
          ("train", "distributed_optimizer_metadata"), ("mcore-to-hf", "distributed_optimizer_metadata")]


@pytest.mark.slow
@pytest.mark.parametrize("command, kind", CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_a_planted_reduce_is_refused_and_never_runs(clean, tmp_path, command, kind):
    ckpt, marker, names = _case(clean, tmp_path, kind)
    proc = _run(*COMMANDS[command](ckpt, tmp_path / "out", clean))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not marker.exists()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "refused to load" in errors[0] and names in errors[0], proc.stderr[-3000:]
    assert "system" in errors[0]  # the class it wanted (posix.system / os.system)
    assert not (tmp_path / "out").exists()
