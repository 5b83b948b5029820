"""Tokenizers from the vocabulary stored in a llama.cpp gguf file.

- "llama" (SPM) vocabularies keep every piece, score and piece type of the original SentencePiece model, so
  the original model is rebuilt exactly: a BPE model with byte fallback, the identity normaliser, a dummy-prefix
  space and no whitespace collapsing (LLaMA-1/2, Mistral).
- "gpt2" (byte-level BPE) vocabularies keep the tokens, merges, special-token ids, chat template and the name of
  the family's pre-tokenizer (`tokenizer.ggml.pre`: llama-bpe, qwen2, smollm, ...), which transformers' GGUF
  converter turns into that family's `tokenizer.json` (Llama-3, Qwen2/2.5, SmolLM2).
"""

from __future__ import annotations

from pathlib import Path

from llamapro_megatron.errors import UserError


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_fields(gguf_path: str | Path):
    """The file's `gguf.GGUFReader`: it parses every field on opening (~1 s for a 32k-token SentencePiece
    vocabulary, ~8 s for Qwen2's 151,646 tokens), so a load opens one and passes it on."""
    import gguf

    return gguf.GGUFReader(str(gguf_path))


def vocabulary_model(gguf_path: str | Path, reader=None) -> str | None:
    """The gguf vocabulary's kind: ``tokenizer.ggml.model`` ("llama", "gpt2", ...; None without one); `reader`: the
    file's :func:`read_fields`, if open already."""
    return _field(reader or read_fields(gguf_path), "tokenizer.ggml.model")


def write_hf_tokenizer_from_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, the chat template) of a
    byte-level BPE ("gpt2") gguf vocabulary into `out_dir`, through transformers' own GGUF converter."""
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # an architecture or pre-tokenizer transformers' converter does not know
        raise UserError(f"{path}: transformers cannot build a tokenizer from this gguf vocabulary ({e}); pass "
                        "the model's tokenizer.json instead") from None
    tokenizer.save_pretrained(str(out_dir))


def _cache_folder(gguf_path: str | Path) -> Path:
    """Where this file content's conversion lives under this transformers version (its sha256, not its name)."""
    import hashlib

    import transformers

    from llamapro_megatron.artifacts import cache_dir

    digest = hashlib.sha256(transformers.__version__.encode())
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return cache_dir() / "gguf-tokenizers" / digest.hexdigest()[:32]


def cached_conversion(gguf_path: str | Path) -> Path | None:
    """The folder of an earlier :func:`cached_hf_tokenizer_dir` of the same file content, else None. Cheap (a
    hash): reading the gguf's fields to learn its kind (:func:`vocabulary_model`) takes ~8 s for Qwen2's
    (`benchmarks/gguf_tokenizer.py`)."""
    out = _cache_folder(gguf_path)
    return out if (out / "tokenizer.json").is_file() else None


def cached_hf_tokenizer_dir(gguf_path: str | Path) -> Path:
    """The folder of :func:`write_hf_tokenizer_from_gguf`'s files for this byte-level BPE gguf vocabulary, converted
    once per file content and transformers version and kept in the artifact cache (``$LLAMAPRO_CACHE/
    gguf-tokenizers/``): transformers' conversion takes ~10 s for Qwen2's 151,646 tokens, and every preprocessing
    worker and every later run loads the vocabulary again. The folder appears by one rename, complete; where two
    processes convert at once, the first rename wins and the other's copy is dropped."""
    import os
    import shutil
    import tempfile

    out = _cache_folder(gguf_path)
    if (out / "tokenizer.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write_hf_tokenizer_from_gguf(gguf_path, tmp)
        os.rename(tmp, out)
    except OSError:
        if not (out / "tokenizer.json").is_file():  # not "another process renamed its copy first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def sentencepiece_model_from_gguf(gguf_path: str | Path, reader=None) -> bytes:
    """Return the serialized SentencePiece ModelProto equivalent to the gguf file's vocabulary (`reader`: the
    file's :func:`read_fields`, if open already)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = reader or read_fields(gguf_path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "llama":
        raise UserError(
            f"{gguf_path}: tokenizer.ggml.model is {kind!r}, expected 'llama' (a SentencePiece vocabulary); "
            "byte-level BPE vocabularies (gpt2) go through write_hf_tokenizer_from_gguf"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")

    model = pb.ModelProto()
    # gguf token types (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte) use the same
    # numbers as sentencepiece's SentencePiece.Type.
    for piece, score, typ in zip(tokens, scores, types):
        model.pieces.add(piece=piece, score=float(score), type=int(typ))

    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(int(t) == 6 for t in types)
    spec.unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id") or 0)
    spec.bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id") or 1)
    spec.eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id") or 2)
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    spec.pad_id = -1 if pad is None else int(pad)

    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix") in (None, True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()
