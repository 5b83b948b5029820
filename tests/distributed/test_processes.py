"""What only a fresh interpreter shows: the tools/ scripts forward to the CLI, and the modules the conversion's parent
process and the byte-copying workers import never import torch (they start seconds sooner)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, words", [("convert_hf_to_mcore.py", "--hf-dir"), ("convert_mcore_to_hf.py", "--load"),
                                           ("verify.py", "--hf-dir"), ("preprocess_data.py", "--json-keys")])
def test_tools_scripts_forward(script, words):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / script), "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert words in out


@pytest.mark.parametrize("module", [
    "llamapro_megatron.checkpoint.convert",  # the parent of both conversion directions (direct paths included)
    "llamapro_megatron.checkpoint.expand",
    "llamapro_megatron.checkpoint.merge",
    "llamapro_megatron.checkpoint.expand_hf",  # and its byte-copying workers
    "llamapro_megatron.checkpoint.st_copy",
    "llamapro_megatron.checkpoint.dcp.index",
])
def test_parent_and_copying_modules_do_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules) or 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
