"""Import a llama.cpp GGUF LLaMA model as a Hugging Face LLaMA checkpoint directory.

The only real LLaMA-architecture model reachable here (SmolLM2-135M-Instruct) comes as a Q4_1 GGUF file.
The rest of the project (HF -> Megatron conversion, block expansion, training) reads Hugging Face
directories, so this module turns the GGUF into one: `config.json`, `generation_config.json`,
`model.safetensors` (dequantized, fp32 by default) and the tokenizer files.

transformers can load a GGUF itself (`from_pretrained(dir, gguf_file=...)`, which needs `accelerate`), but
such a model cannot be `save_pretrained`-ed; this importer is independent of that loader, and the tests
check that both give the same tensors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamapro_megatron.errors import UserError

# Files that make a directory written by `gguf_to_hf` complete.
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_MISSING = object()


def gguf_to_hf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the LLaMA model in `gguf_path` as a Hugging Face `LlamaForCausalLM` directory `out_dir`.

    Every tensor is dequantized with `gguf.quants.dequantize` and stored in `dtype`; the q/k rows that
    llama.cpp permutes for its rope are put back in Hugging Face order. The tokenizer is built by transformers
    from the same file. Everything is written into a temporary sibling directory that is renamed to `out_dir`
    at the end, so an interrupted import leaves no `out_dir` behind. Returns `out_dir`.
    """
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} does not exist")
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; remove it or pass overwrite=True")

    reader = gguf.GGUFReader(gguf_path)
    hp = _hyperparameters(reader, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tensors = _convert_tensors(reader, hp, dtype, gguf_path)
        del reader  # drop the memory map before the long writes
        # `format: pt` is what transformers' own save_pretrained writes; some loaders check it.
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors

        config = _hf_config(hp, dtype, tied="lm_head.weight" not in hp["tensor_names"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        special = {k: hp[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hp.get(k) is not None}
        GenerationConfig(**special).save_pretrained(tmp)

        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  trust_remote_code=False)
        tokenizer.save_pretrained(tmp)
        _make_tokenizer_config_portable(tmp)

        missing = [f for f in HF_FILES if not (tmp / f).is_file()]
        if missing:
            raise UserError(f"import of {gguf_path} wrote no {missing}")
        _apply_umask(tmp)
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def is_complete_hf_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` holds every file `gguf_to_hf` writes."""
    return all((Path(path) / f).is_file() for f in HF_FILES)


def unpermute_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (`permute` in its convert_hf_to_gguf.py).

    Hugging Face's rope (`rotate_half`) pairs row i of each head with row i + head_dim/2; ggml's rope pairs
    adjacent rows 2i and 2i+1, so the converter interleaves the two halves of every head. Within a head, GGUF
    row 2i + j holds HF row j * head_dim/2 + i; this is the inverse.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------- internals


def _field(reader: Any, key: str, default: Any = _MISSING) -> Any:
    """A scalar or string metadata value (read by hand: `ReaderField.contents` is missing in older gguf)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise UserError(f"GGUF file has no metadata key {key!r}")
        return default
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if field.types[0] == GGUFValueType.ARRAY:
        raise UserError(f"GGUF metadata key {key!r} is an array, expected a single value")
    return field.parts[field.data[0]].tolist()[0]


def _hyperparameters(reader: Any, gguf_path: Path) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{gguf_path} holds a {arch!r} model; only 'llama' GGUF files can be imported")
    a = f"{arch}."
    hidden = int(_field(reader, a + "embedding_length"))
    n_head = int(_field(reader, a + "attention.head_count"))
    head_dim = int(_field(reader, a + "attention.key_length", hidden // n_head))
    rope_dim = int(_field(reader, a + "rope.dimension_count", head_dim))
    names = [t.name for t in reader.tensors]
    # Refuse what a plain HF LlamaConfig cannot express rather than import a model that computes wrongly.
    if rope_dim != head_dim:
        raise UserError(f"{gguf_path}: partial rotary embedding ({rope_dim} of {head_dim} dims) is not supported")
    scaling = _field(reader, a + "rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise UserError(f"{gguf_path}: rope scaling ({scaling!r} / rope_freqs) is not supported")
    if int(_field(reader, a + "expert_count", 0)) > 0:
        raise UserError(f"{gguf_path}: mixture-of-experts models are not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserError(f"{gguf_path} has no token_embd.weight tensor")
    hp: dict[str, Any] = {
        "n_layer": int(_field(reader, a + "block_count")),
        "hidden": hidden,
        "ffn": int(_field(reader, a + "feed_forward_length")),
        "n_head": n_head,
        "n_kv_head": int(_field(reader, a + "attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        # GGUF stores eps as float32; print it back as the short decimal it came from (9.9999997e-06 -> 1e-05).
        "rms_eps": float(str(np.float32(_field(reader, a + "attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "context": int(_field(reader, a + "context_length", 2048)),
        # The embedding's row count is authoritative; `llama.vocab_size` is optional in GGUF.
        "vocab": int(embd.shape[1]),
        "tensor_names": {_hf_name(n, gguf_path) for n in names},
    }
    for key in ("bos", "eos", "padding"):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        hp[f"{'pad' if key == 'padding' else key}_token_id"] = None if value is None else int(value)
    return hp


def _hf_name(name: str, gguf_path: Path) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.weight"
    raise UserError(f"{gguf_path}: tensor {name!r} has no LLaMA counterpart (biases and extras are unsupported)")


def _expected_shape(hf_name: str, hp: dict[str, Any]) -> tuple[int, ...]:
    h, q, kv = hp["hidden"], hp["n_head"] * hp["head_dim"], hp["n_kv_head"] * hp["head_dim"]
    suffix = hf_name.rsplit(".", 2)[-2]
    return {
        "embed_tokens": (hp["vocab"], h),
        "lm_head": (hp["vocab"], h),
        "norm": (h,),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (hp["ffn"], h),
        "up_proj": (hp["ffn"], h),
        "down_proj": (h, hp["ffn"]),
    }[suffix]


def _convert_tensors(reader: Any, hp: dict[str, Any], dtype: torch.dtype, gguf_path: Path) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, gguf_path)
        # GGUF lists dims fastest-first; the dequantized numpy array is row-major (rows, cols) like torch.
        weights = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        expected = _expected_shape(name, hp)
        if weights.shape != expected:
            raise UserError(f"{gguf_path}: {t.name} has shape {weights.shape}, expected {expected}")
        tensor = torch.from_numpy(weights.copy())  # copy: detach from the file's memory map
        if name.endswith("q_proj.weight"):
            tensor = unpermute_rope_rows(tensor, hp["n_head"])
        elif name.endswith("k_proj.weight"):
            tensor = unpermute_rope_rows(tensor, hp["n_kv_head"])
        out[name] = tensor.to(dtype).contiguous()
    if len(out) != len(reader.tensors):
        raise UserError(f"{gguf_path}: two GGUF tensors map to one Hugging Face name")
    missing = {f"model.layers.{i}.{v}.weight" for i in range(hp["n_layer"]) for v in _LAYER_TENSORS.values()}
    missing |= {"model.embed_tokens.weight", "model.norm.weight"}
    missing -= set(out)
    if missing:
        raise UserError(f"{gguf_path} lacks tensors for {sorted(missing)[:5]}")
    return out


def _hf_config(hp: dict[str, Any], dtype: torch.dtype, tied: bool) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": hp["vocab"],
        "hidden_size": hp["hidden"],
        "intermediate_size": hp["ffn"],
        "num_hidden_layers": hp["n_layer"],
        "num_attention_heads": hp["n_head"],
        "num_key_value_heads": hp["n_kv_head"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": hp["context"],
        "rms_norm_eps": hp["rms_eps"],
        # Both spellings: transformers 5 reads `rope_parameters`, 4.x (and older tools) read `rope_theta`.
        "rope_theta": hp["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": hp["rope_theta"]},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": tied,
        "use_cache": True,
        # Both spellings again: `dtype` (transformers 5) and `torch_dtype` (4.x).
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hp.get(key) is not None:
            config[key] = hp[key]
    return config


def _make_tokenizer_config_portable(directory: Path) -> None:
    """Let transformers 4.x load the tokenizer transformers 5 saved.

    5.x names the class `TokenizersBackend` (unknown to 4.x; 5.x maps `PreTrainedTokenizerFast` to it) and
    keeps the chat template only in `chat_template.jinja`, which older 4.x releases do not read.
    """
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):  # load-time arguments that 5.x leaks into the saved file
        config.pop(key, None)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = directory / "chat_template.jinja"
    if template.is_file() and "chat_template" not in config:
        config["chat_template"] = template.read_text()
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _apply_umask(directory: Path) -> None:
    # mkdtemp makes a 0700 directory and safetensors writes 0600 files; give them the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not (overwrite and out_dir.exists()):
        os.rename(tmp, out_dir)  # fails if out_dir appeared meanwhile (POSIX: only an empty dir is replaced)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
