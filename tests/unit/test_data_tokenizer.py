"""Tokenizers against llama.cpp's reference tokenizations of the real LLaMA, Llama-3 and Qwen2 vocabularies.

llama.cpp's convert_hf_to_gguf_update.py writes the `.inp` file as `text + "\\n__ggml_vocab_test__\\n"` per
case and the `.out` file as one line of ids per case, from the Hugging Face tokenizer's
`encode(text, add_special_tokens=False)`; test-tokenizer-0 compares with `add_special=false`. So the reference
ids carry no BOS, and for the SentencePiece vocabulary the leading "dummy prefix" space IS part of them
(" " -> "▁▁"). Our `tokenize` has the same conventions: no BOS, SentencePiece's own dummy prefix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llamapro_megatron.data.tokenizer import HUGGINGFACE, SENTENCEPIECE, load_tokenizer
from llamapro_megatron.errors import UserError
from tests.data_artifacts import artifact

MARKER = "\n__ggml_vocab_test__\n"


def read_reference(vocab: str) -> list[tuple[str, list[int]]]:
    inp = artifact(f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8")
    out = artifact(f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8")
    assert inp.endswith(MARKER)
    texts = inp[: -len(MARKER)].split(MARKER)  # every case, the last one included, ends with the marker
    lines = out.split("\n")
    assert lines[-1] == ""  # every line ends with a newline
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(texts) == len(ids)
    return list(zip(texts, ids))


@pytest.fixture(scope="module")
def llama_spm():
    # The LLaMA-1/2 vocabulary ships as a gguf: load_tokenizer rebuilds the SentencePiece model from it.
    return load_tokenizer(artifact("ggml-vocab-llama-spm.gguf"))


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(artifact("llama3_tokenizer.json"))


def test_reference_files_parse():
    for vocab in ("llama-spm", "llama-bpe", "qwen2"):
        cases = read_reference(vocab)
        assert len(cases) == 46  # llama.cpp's test list (the empty string and whitespace-only cases included)
        assert ("", []) in cases


def test_llama_spm_golden(llama_spm):
    assert llama_spm.kind == SENTENCEPIECE and llama_spm.vocab_size == 32000
    assert (llama_spm.bos, llama_spm.eos, llama_spm.eod, llama_spm.pad) == (1, 2, 2, -1)
    cases = read_reference("llama-spm")
    mismatches = [(text, llama_spm.tokenize(text), ids) for text, ids in cases if llama_spm.tokenize(text) != ids]
    assert not mismatches
    # The conventions the comparison rests on, checked on the reference itself.
    reference = dict(cases)
    assert reference[" "] == [259] and llama_spm.detokenize([259]) == " "  # dummy prefix + the space: "▁▁"
    assert reference["Hello world"][0] == llama_spm.token_to_id("▁Hello")
    assert all(llama_spm.bos not in ids for _, ids in cases)
    assert llama_spm.batch_encode([t for t, _ in cases], num_threads=2) == [ids for _, ids in cases]


def test_a_sentencepiece_gguf_is_parsed_once(monkeypatch):
    """Loading an SPM gguf vocabulary parses its fields once (its kind and its pieces come from one reader), and
    the tokenizer is the one the golden test checks."""
    import gguf

    opened = []
    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: opened.append(a) or real(*a, **k))
    tok = load_tokenizer(artifact("ggml-vocab-llama-spm.gguf"))
    assert len(opened) == 1 and tok.kind == SENTENCEPIECE and tok.vocab_size == 32000
    assert tok.tokenize("Hello world") == dict(read_reference("llama-spm"))["Hello world"]  # llama.cpp's ids


def test_llama3_bpe_golden(llama3):
    assert llama3.kind == HUGGINGFACE and llama3.vocab_size == 128256
    assert (llama3.bos, llama3.eos) == (128000, 128001)
    cases = read_reference("llama-bpe")
    mismatches = [(text, llama3.tokenize(text), ids) for text, ids in cases if llama3.tokenize(text) != ids]
    assert not mismatches
    assert all(llama3.bos not in ids for _, ids in cases)
    assert llama3.batch_encode([t for t, _ in cases], num_threads=2) == [ids for _, ids in cases]
    for text, ids in cases:
        assert llama3.detokenize(ids) == text  # byte-level BPE round-trips exactly


def test_qwen2_byte_level_bpe_gguf_golden():
    """Qwen2/2.5's byte-level BPE gguf vocabulary loads as its tokenizer.json would: llama.cpp's reference ids for
    every case, the gguf's special-token ids, vocabulary size and chat template."""
    import gguf

    vocab = "qwen2"
    path = artifact(f"ggml-vocab-{vocab}.gguf")
    tok = load_tokenizer(path)
    reader = gguf.GGUFReader(str(path))
    assert tok.kind == HUGGINGFACE and tok.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].contents())
    assert tok.eos == reader.fields["tokenizer.ggml.eos_token_id"].contents()
    cases = read_reference(vocab)
    mismatches = [(text, tok.tokenize(text), ids) for text, ids in cases if tok.tokenize(text) != ids]
    assert not mismatches
    assert tok.batch_encode([t for t, _ in cases], num_threads=2) == [ids for _, ids in cases]
    for text, ids in cases:
        assert tok.detokenize(ids) == text  # byte-level BPE round-trips exactly
    assert tok.eos == tok.token_to_id("<|endoftext|>") == 151643
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nhi"), chat


def test_a_byte_level_bpe_gguf_is_converted_once_and_then_read_from_the_cache(tmp_path: Path, monkeypatch):
    """The Qwen2 vocabulary loaded again (another preprocessing worker, a later run) reads the cached conversion
    (shared with the golden test above: at most one conversion between them): the converter is not called, the
    tokenizer is the same, and the gguf's fields are not even parsed. Another file content gets its own folder,
    converted anew."""
    import shutil

    from llamapro_megatron.artifacts import cache_dir
    from llamapro_megatron.data import gguf_vocab

    path = artifact("ggml-vocab-qwen2.gguf")
    text = "Hello, 世界! <|im_start|>"
    first = load_tokenizer(path)
    calls = []
    real = gguf_vocab.write_hf_tokenizer_from_gguf
    monkeypatch.setattr(gguf_vocab, "write_hf_tokenizer_from_gguf", lambda *a: calls.append(a) or real(*a))
    read = gguf_vocab.read_fields  # parsing the gguf's fields: ~8 s for this one
    monkeypatch.setattr(gguf_vocab, "read_fields", lambda *a: calls.append(a) or read(*a))
    second = load_tokenizer(path)
    assert not calls and second.tokenize(text) == first.tokenize(text)
    assert second.chat_template == first.chat_template and second.eos == first.eos == 151643
    cached = gguf_vocab.cached_hf_tokenizer_dir(path)
    assert cached.parent == cache_dir() / "gguf-tokenizers" and (cached / "tokenizer.json").is_file()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # another content: a new folder; the converter's work stood in for by copying the files (the keying is tested)
    monkeypatch.setenv("LLAMAPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_vocab, "write_hf_tokenizer_from_gguf",
                        lambda src, out: calls.append(src) or shutil.copytree(cached, out, dirs_exist_ok=True))
    copy = tmp_path / "vocab.gguf"
    copy.write_bytes(path.read_bytes() + b"\0")
    other = gguf_vocab.cached_hf_tokenizer_dir(copy)
    assert calls == [copy] and other.name != cached.name and (other / "tokenizer.json").is_file()
    assert gguf_vocab.cached_hf_tokenizer_dir(path).parent == tmp_path / "cache" / "gguf-tokenizers"
    assert calls[1:] == [path]  # the original's folder is per cache too


def test_detect_by_content_and_config(tmp_path: Path):
    # Mistral's SentencePiece model under an unusual name, in a directory with a tokenizer_config.json.
    model = tmp_path / "weird.name"
    shutil.copy(artifact("tokenizer.model.v1"), model)
    tok = load_tokenizer(model)
    assert tok.kind == SENTENCEPIECE and tok.vocab_size == 32000 and tok.chat_template is None
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "chat_template": "{{ messages[0]['content'] }}"})
    )
    tok = load_tokenizer(model)
    assert tok.eos == 2 and tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    # A directory: the kind comes from the file found there.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(artifact("llama3_tokenizer.json"), hf_dir / "tokenizer.json")
    assert load_tokenizer(hf_dir).kind == HUGGINGFACE


def test_megatron_interface(llama3):
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(llama3, MegatronTokenizerBase)
    assert llama3.unique_identifiers["class"] == "Tokenizer"
    json.dumps(llama3.unique_identifiers)  # megatron-core hashes it into dataset cache names


def test_special_strings_are_text_unless_asked(llama3):
    assert 128001 not in llama3.tokenize("a<|end_of_text|>b")
    assert llama3.encode_with_special_tokens("a<|end_of_text|>b") == [64, 128001, 65]


def test_bad_tokenizer_path(tmp_path: Path):
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x00\x01not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        load_tokenizer(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(empty)
