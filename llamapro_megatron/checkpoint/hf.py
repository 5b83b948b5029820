"""Hugging Face checkpoint directories: streaming safetensors reads, sharded writes, the files that travel along."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

from llamapro_megatron.errors import UserError

# torch and safetensors' torch API are imported where tensors are read or written: the conversion's parent
# process only reads safetensors headers, and starting its workers need not wait for torch's import (~1.5 s).

INDEX_NAME = "model.safetensors.index.json"
# Tokenizer and chat files copied between HF and Megatron directories when present (none is required).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class HFReader:
    """Reads single tensors (or their headers) from a HF directory's safetensors files, never the whole model.

    Shapes and dtypes come from the files' JSON headers (no torch needed); tensors are read through
    safetensors' memory-mapped `safe_open` on first `get`.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise UserError(f"--hf-dir {hf_dir} is not a directory")
        self._handles: dict[str, object] = {}
        self._headers: dict[str, dict] = {}
        self._data_starts: dict[str, int] = {}
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index} is not a valid safetensors index ({e})") from e
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.dir.glob("*.bin"))
                hint = f" (found {bins}: re-save the model with safe_serialization=True)" if bins else ""
                raise UserError(f"{hf_dir} has no *.safetensors weights{hint}")
            weight_map = {name: f.name for f in files for name in self._header(f.name) if name != "__metadata__"}
        self.weight_map: dict[str, str] = weight_map
        for fname in sorted(set(weight_map.values())):
            self._header(fname)  # fail early on a missing, corrupt or truncated file
        for name, fname in weight_map.items():
            if name not in self._headers[fname]:
                raise UserError(f"{self.dir / fname} lacks {name}, which {INDEX_NAME} places there; "
                                "re-download the checkpoint")

    def _header(self, fname: str) -> dict:
        if fname not in self._headers:
            path = self.dir / fname
            if not path.is_file():
                raise UserError(f"{path} is listed in {INDEX_NAME} but missing; re-download the checkpoint")
            self._data_starts[fname], self._headers[fname] = read_header(path)
        return self._headers[fname]

    def _open(self, fname: str):
        if fname not in self._handles:
            from safetensors import safe_open

            path = self.dir / fname
            try:
                self._handles[fname] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise UserError(f"{path} is not a readable safetensors file ({e}); re-download it") from e
        return self._handles[fname]

    def release(self) -> None:
        """Close the open files (unmapping them); they reopen on the next read."""
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _entry(self, name: str) -> dict:
        if name not in self.weight_map:
            raise UserError(f"{self.dir} has no tensor {name!r}")
        return self._header(self.weight_map[name])[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> str:
        """The stored dtype's torch name ('bfloat16', 'float16', 'float32', 'float64')."""
        st = self._entry(name)["dtype"]
        if st not in ST_DTYPES:
            raise UserError(f"{name} in {self.dir} has dtype {st}; only floating-point weights are supported")
        return ST_DTYPES[st]

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(file, offset, length) of a tensor's bytes, for copying them without reading them into a tensor."""
        begin, end = self._entry(name)["data_offsets"]
        fname = self.weight_map[name]
        return self.dir / fname, self._data_starts[fname] + begin, end - begin

    def get(self, name: str):
        """The tensor (a view of the memory-mapped file)."""
        self._entry(name)
        return self._open(self.weight_map[name]).get_tensor(name)


def transformers_model(hf_dir: str | Path, dtype):
    """transformers' model of a HF directory, as the references (verify, evaluate, generate) load it: safetensors
    weights only (a directory with only `*.bin` gets the refusal conversion gives) and never code from the
    directory (`trust_remote_code=False`)."""
    from transformers import AutoModelForCausalLM

    HFReader(hf_dir)  # refuses a directory without safetensors, naming any .bin files and how to re-save them
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, use_safetensors=True,
                                                trust_remote_code=False)


def read_header(path: str | Path) -> tuple[int, dict]:
    """(offset of the data section, JSON header {name: {dtype, shape, data_offsets}}) of a safetensors file;
    refuses corrupt or truncated files. Torch-free: `st_copy`'s byte-copying workers use it too."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if not 0 < header_len <= _MAX_HEADER:
                raise ValueError(f"header length {header_len}")
            header = json.loads(fh.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-download it") from e
    size = path.stat().st_size
    if size < 8 + header_len + end:
        raise UserError(f"{path} is truncated ({size} bytes, header promises {8 + header_len + end}); re-download it")
    return 8 + header_len, header


def validate_hf_tensors(reader: HFReader, expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor is present with its shape, and every tensor there is expected (checked from headers,
    before any conversion work): a tensor the config does not account for (a shared expert, a fifth expert of a
    four-expert config) would otherwise be dropped without a word."""
    def listed(names: list[str]) -> str:
        return f"{names[:3]}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"

    missing = [n for n in expected if n not in reader]
    if missing:
        raise UserError(f"{reader.dir} lacks tensors the config implies: {listed(missing)}")
    unexpected = sorted(n for n in reader.weight_map if n not in expected and not _ignorable(n))
    if unexpected:
        raise UserError(f"{reader.dir} has tensors its config.json does not account for: {listed(unexpected)}; the "
                        "weights do not match the config (another architecture, or a different expert count), and "
                        "converting would drop them")
    for name, shape in expected.items():
        got = reader.shape(name)
        if got != shape:
            raise UserError(f"{reader.dir}: tensor {name} has shape {list(got)}, but config.json implies "
                            f"{list(shape)}; the weights do not match the config")


def _ignorable(name: str) -> bool:
    """Tensors transformers itself ignores when loading: older LLaMA checkpoints' RoPE buffers (recomputed from the
    config), and the output layer of a model with tied embeddings (tied to the embedding on load)."""
    return name.endswith(".rotary_emb.inv_freq") or name == "lm_head.weight"


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_shard(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_index(out_dir: Path, weight_map: dict[str, str], shapes: dict[str, tuple[int, ...]], itemsize: int) -> int:
    """`model.safetensors.index.json`; returns its total_size: the bytes of all tensors (shapes x itemsize)."""
    total_size = sum(math.prod(shape) for shape in shapes.values()) * itemsize
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total_size


def copy_tokenizer_files(src: Path, dst: Path, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    """Copy the tokenizer files present in src; returns the names copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def generation_config(arch_config: dict) -> dict:
    gen = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if arch_config.get(key) is not None:
            gen[key] = arch_config[key]
    return gen
