"""`llamapro preprocess`: real text through real tokenizers into indexed datasets read by megatron-core."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from llamapro_megatron.data import preprocess as pp
from llamapro_megatron.errors import UserError
from tests.data_artifacts import artifact, python_stdlib


def real_documents() -> list[str]:
    """English prose (botchan paragraphs) and Python code (stdlib modules), with unicode and odd spacing."""
    prose = artifact("botchan.txt").read_text(encoding="utf-8").split("\n")
    paragraphs = ["\n".join(prose[i : i + 7]) for i in range(0, 1400, 7)]
    code = [(python_stdlib() / name).read_text(encoding="utf-8") for name in ("textwrap.py", "bisect.py", "this.py")]
    return paragraphs + code + ["  leading spaces, tab\tand ü ß 🦙", "x"]


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "meta": 1}) + "\n")
    return path


def read_back(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) == len(ds) + 1  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("which", ["sentencepiece", "tokenizer.json"])
def test_ids_equal_the_libraries_own_encoding(tmp_path: Path, which: str):
    docs = real_documents()
    src = write_jsonl(tmp_path / "docs.jsonl.gz", docs)
    if which == "sentencepiece":
        import sentencepiece

        path = artifact("tokenizer.model.v1")
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        expected = [sp.encode(d) for d in docs]
        bos, eos, dtype = 1, 2, np.uint16
    else:
        import tokenizers

        path = artifact("llama3_tokenizer.json")
        tk = tokenizers.Tokenizer.from_file(str(path))
        expected = [tk.encode(d, add_special_tokens=False).ids for d in docs]
        bos, eos, dtype = 128000, 128001, np.int32
    stats = pp.preprocess([src], path, tmp_path / "out", append_eod=True, prepend_bos=True, batch_size=64)
    prefix = str(tmp_path / "out_text_document")
    assert stats.documents == len(docs) and stats.skipped == 0
    assert read_back(prefix) == [[bos, *ids, eos] for ids in expected]
    assert stats.tokens == sum(len(e) + 2 for e in expected)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(prefix).index.dtype == dtype
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "docs.jsonl.gz",
        "out_text_document.bin",
        "out_text_document.idx",
    ]


def test_one_and_two_workers_give_identical_files(tmp_path: Path):
    src = write_jsonl(tmp_path / "docs.jsonl", real_documents())
    tok = artifact("tokenizer.model.v1")
    for workers in (1, 2):
        pp.preprocess([src, src], tok, tmp_path / f"w{workers}", workers=workers, append_eod=True, batch_size=16)
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"w1_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"w2_text_document{suffix}").read_bytes()


def test_bad_lines_are_reported_counted_and_skipped(tmp_path: Path):
    src = tmp_path / "mixed.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"text": "first document"}),
                "{not json",
                json.dumps({"body": "no text key"}),
                json.dumps({"text": ""}),  # empty: would hang megatron-core's index builder
                json.dumps({"text": 42}),
                "",  # a blank line is not a document
                json.dumps({"text": "last document"}),
            ]
        )
        + "\n"
    )
    messages: list[str] = []
    stats = pp.preprocess([src], artifact("tokenizer.model.v1"), tmp_path / "out", log=messages.append)
    assert (stats.documents, stats.skipped_invalid, stats.skipped_empty) == (2, 3, 1)
    assert [m.split(": ")[0] for m in messages] == [f"{src}:2", f"{src}:3", f"{src}:5"]
    assert "invalid JSON" in messages[0] and "missing key 'text'" in messages[1]
    assert len(read_back(str(tmp_path / "out_text_document"))) == 2
    with pytest.raises(UserError, match=rf"{src.name}:2: invalid JSON"):
        pp.preprocess([src], artifact("tokenizer.model.v1"), tmp_path / "strict", strict=True)
    assert not list(tmp_path.glob("strict*"))


def test_parquet_and_several_keys(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = real_documents()[:50]
    table = pa.table({"text": docs, "title": [d[:20] for d in docs]})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=16)
    tok_path = artifact("llama3_tokenizer.json")
    stats = pp.preprocess([tmp_path / "docs.parquet"], tok_path, tmp_path / "pq", json_keys=["text", "title"])
    assert stats.documents == 50
    from llamapro_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    assert read_back(str(tmp_path / "pq_title_document")) == [tok.tokenize(d[:20]) for d in docs]
    with pytest.raises(UserError, match="lack \\['body'\\]"):
        pp.preprocess([tmp_path / "docs.parquet"], tok_path, tmp_path / "x", json_keys=["body"])


def test_interrupted_run_leaves_no_dataset(tmp_path: Path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", real_documents())
    calls = {"n": 0}
    original = pp._Output.add

    def add_then_interrupt(self, tokens, lengths):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, tokens, lengths)

    monkeypatch.setattr(pp._Output, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess([src], artifact("tokenizer.model.v1"), tmp_path / "out", batch_size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_cli(tmp_path: Path, capsys):
    from llamapro_megatron.cli import main

    src = write_jsonl(tmp_path / "docs.jsonl", ["hello world", "second"])
    rc = main(
        [
            "preprocess",
            "--input",
            str(src),
            "--tokenizer",
            str(artifact("tokenizer.model.v1")),
            "--out",
            str(tmp_path / "data" / "c"),
            "--workers",
            "1",
            "--append-eod",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "documents: 2" in out and "skipped: 0" in out
    assert (tmp_path / "data" / "c_text_document.idx").is_file()
    assert main(["preprocess", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", "x", "--out", "y"]) == 2
    assert "--input" in capsys.readouterr().err


def test_batches_are_bounded_by_size_and_keep_line_numbers(tmp_path: Path):
    """Large documents are cut into many batches (no idle worker at the tail); line/row numbers stay exact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llamapro_megatron.data.readers import iter_batches

    texts = [("x" * (100 if i % 3 else 900)) + f" {i}" for i in range(40)]
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet", row_group_size=16)
    for path in (src, tmp_path / "docs.parquet"):
        batches = list(iter_batches([path], ["text"], batch_size=8, batch_chars=1000))
        assert all(len(b.items) <= 8 for b in batches) and len(batches) > 40 // 8
        numbered = [(b.first_line + i, item) for b in batches for i, item in enumerate(b.items)]
        got = [(n, json.loads(x)["text"] if isinstance(x, str) else x["text"]) for n, x in numbered]
        assert got == list(enumerate(texts, start=1))
