"""Checksums from every writer of a Megatron checkpoint, checked by `llamapro verify --integrity`.

Every checkpoint of the workflow (conversion on the direct and the regular path, expansion, training saves with the
plain and the distributed optimizer, a trainable-only save) records a digest for each of its files, and the check
passes on each; a flipped byte in a copy of a training save is named by file (exit code 1), which no size check can
find; a trainable-only save's check covers its base too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamapro_megatron.checkpoint import integrity
from tests.distributed.versions import llamapro


def _verify(ckpt: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "llamapro_megatron.cli", "verify", "--integrity", "--load",
                           str(ckpt), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def checkpoints(workflow_checkpoints, tmp_path_factory):
    regular = tmp_path_factory.mktemp("regular") / "mcr"
    os.environ["LLAMAPRO_DIRECT_CONVERT"] = "0"
    try:
        llamapro("convert", "hf-to-mcore", "--hf-dir", str(workflow_checkpoints / "hf"), "--out", str(regular),
                 "--no-progress")
    finally:
        del os.environ["LLAMAPRO_DIRECT_CONVERT"]
    return {"mc": workflow_checkpoints / "mc" / "release", "mcr": regular / "release",
            "pro": workflow_checkpoints / "pro" / "release", "tr": workflow_checkpoints / "tr" / "iter_0000001",
            "trd": workflow_checkpoints / "trd" / "iter_0000001", "tro": workflow_checkpoints / "tro" / "iter_0000001"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mc", "mcr", "pro", "tr", "trd", "tro"])
def test_every_writer_records_a_digest_for_each_file(checkpoints, name):
    ckpt = checkpoints[name]
    recorded = json.loads((ckpt / integrity.CHECKSUMS_FILE).read_text())["files"]
    assert sorted(recorded) == integrity.files_of(ckpt)
    assert any(rel.endswith(".distcp") for rel in recorded) and ".metadata" in recorded
    proc = _verify(ckpt.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("integrity of")]
    assert lines[0].startswith(f"integrity of {ckpt}: {len(recorded)} files") and lines[0].endswith("-> OK")
    assert len(lines) == (2 if name == "tro" else 1)  # a trainable-only save: its base too


@pytest.mark.slow
def test_a_flipped_byte_is_found_and_named(checkpoints, tmp_path):
    copy = tmp_path / "tr"
    shutil.copytree(checkpoints["tr"].parent, copy)
    ckpt = copy / checkpoints["tr"].name
    victim = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    victim.write_bytes(raw)
    proc = _verify(copy)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "-> FAIL, 1 damaged" in proc.stdout
    assert f"{victim}: contents differ from the checksum recorded at save time" in proc.stdout, proc.stdout
