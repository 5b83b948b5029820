"""The workflow's commands as a user runs them (fresh `llamapro` processes of a given interpreter), shared by the
quiet-output and the cross-version tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TRAIN = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--lr", "1e-3",
         "--eval-iters", "0", "--pipeline-model-parallel-size", "2", "--log-interval", "1"]


def llamapro(*argv: str, python: str = sys.executable, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`llamapro ARGV` in a fresh process of `python`; fails the test with its stderr when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([python, "-m", "llamapro_megatron.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=600, cwd=cwd)
    assert proc.returncode == 0, f"llamapro {' '.join(argv)} ({python}) failed:\n{proc.stderr[-4000:]}"
    return proc


def megatron_core_version(python: str) -> str:
    return subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
