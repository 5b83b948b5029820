"""Rebuild a SentencePiece `tokenizer.model` from the vocabulary stored in a llama.cpp gguf file.

llama.cpp's "llama" (SPM) vocabularies keep every piece, score and piece type of the original
SentencePiece model, so the original model can be rebuilt exactly: a BPE model with byte fallback,
the identity normaliser, a dummy-prefix space and no whitespace collapsing (LLaMA-1/2, Mistral).
"""

from __future__ import annotations

from pathlib import Path

from llamapro_megatron.errors import UserError


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def sentencepiece_model_from_gguf(gguf_path: str | Path) -> bytes:
    """Return the serialized SentencePiece ModelProto equivalent to the gguf file's vocabulary."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(str(gguf_path))
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "llama":
        raise UserError(
            f"{gguf_path}: tokenizer.ggml.model is {kind!r}, expected 'llama' (a SentencePiece vocabulary); "
            "BPE vocabularies (gpt2) need their tokenizer.json instead"
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
