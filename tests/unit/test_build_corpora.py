"""examples/data/build_corpora.py on the real artifacts: disjoint train/held-out splits of every corpus."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from tests.data_artifacts import artifact

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    module = runpy.run_path(str(ROOT / "examples" / "data" / "build_corpora.py"))
    out = tmp_path_factory.mktemp("corpora")
    summary = module["build"](out, artifact("champ_v0.json"), artifact("botchan.txt"), None, heldout=0.1)
    return out, summary


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("corpus", ["code", "math", "general", "chat"])
def test_splits_are_disjoint_and_nonempty(corpora, corpus):
    out, summary = corpora
    train, heldout = _read(out / corpus / "train.jsonl"), _read(out / corpus / "heldout.jsonl")
    assert len(train) == summary[corpus]["train"] > 0 and len(heldout) == summary[corpus]["heldout"] > 0
    assert not {r["source"] for r in train} & {r["source"] for r in heldout}
    assert 0.03 < len(heldout) / (len(train) + len(heldout)) < 0.25  # ~10% by stable hash
    if corpus == "chat":
        roles = [[m["role"] for m in r["messages"]] for r in train]
        assert all(r == ["user", "assistant"] for r in roles)
    else:
        assert all(r["text"].strip() for r in train + heldout)


def test_code_is_real_python(corpora):
    out, _ = corpora
    sources = {r["source"] for r in _read(out / "code" / "train.jsonl") + _read(out / "code" / "heldout.jsonl")}
    assert "python-stdlib/textwrap.py" in sources and len(sources) > 500
    assert not list(out.rglob("*.partial"))
