"""On the installed megatron-core (each CI leg runs this on its own version), the workflow's commands print nothing
on stderr but the project's progress bars: no megatron-core / PyTorch notes, no fallback notice on a checkpoint the
project wrote (the direct paths are taken), no warning a user cannot act on."""
from __future__ import annotations

import re

import pytest

from tests.distributed.versions import TRAIN, llamapro, megatron_core_version
from tests.tiny_models import make_tiny_hf

# tqdm's lines of the project's own bars: "<desc>:  42%|####      | 1.2M/2.9M [00:00<00:00, ...]"
PROGRESS_BAR = re.compile(r"^(hf-to-mcore|mcore-to-hf|expand|expand-hf): +\d+%\|")


def _unexpected(stderr: str) -> list[str]:
    lines = [part for line in stderr.split("\n") for part in line.split("\r") if part.strip()]
    return [line for line in lines if not PROGRESS_BAR.match(line)]


@pytest.mark.slow
def test_workflow_stderr_is_only_progress_bars(tmp_path):
    import sys

    hf = make_tiny_hf(tmp_path / "hf", "gqa")
    steps = [
        ["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--tp", "2", "--pp", "2"],
        ["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc_bf16"), "--dtype", "bf16"],
        ["expand", "--load", str(tmp_path / "mc"), "--out", str(tmp_path / "pro"), "--groups", "2"],
        ["train", "--load", str(tmp_path / "pro"), "--save", str(tmp_path / "tr"), "--train-iters", "2",
         "--save-interval", "2", *TRAIN],
        ["convert", "mcore-to-hf", "--load", str(tmp_path / "pro"), "--out", str(tmp_path / "hf_pro")],
        ["convert", "mcore-to-hf", "--load", str(tmp_path / "tr"), "--out", str(tmp_path / "hf_tr")],
        ["expand-hf", "--hf-dir", str(hf), "--out", str(tmp_path / "hf_x"), "--groups", "2"],
    ]
    for argv in steps:
        stderr = llamapro(*argv).stderr
        assert not _unexpected(stderr), (megatron_core_version(sys.executable), argv[:2], _unexpected(stderr))
    # the first conversion (no dtype change) took the direct path
    assert any(p.name.startswith("__direct_") for p in (tmp_path / "mc" / "release").iterdir())
