"""Blends of real corpora through megatron-core's BlendedMegatronDatasetBuilder (1-process gloo group)."""

from __future__ import annotations

import socket
from collections import Counter

import pytest

from llamapro_megatron.data.blend import BlendConfig, Corpus, build_datasets, describe, sampling_fractions
from llamapro_megatron.errors import UserError
from tests.data_artifacts import artifact, python_stdlib

# BlendedDataset assigns samples greedily to the corpus furthest below its target share, so over N samples
# each realised fraction is within a few samples of its weight: 0.5% at N=4000 leaves a wide margin.
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    """Code (stdlib modules), prose (botchan paragraphs) and a 10-document tiny corpus, as indexed datasets."""
    import json

    from llamapro_megatron.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("corpora")
    lines = artifact("botchan.txt").read_text(encoding="utf-8").split("\n")
    texts = {
        "code": [p.read_text(encoding="utf-8") for p in sorted((python_stdlib() / "json").glob("*.py"))]
        + [(python_stdlib() / n).read_text(encoding="utf-8") for n in ("bisect.py", "textwrap.py", "heapq.py")],
        "prose": ["\n".join(lines[i : i + 5]) for i in range(0, 2000, 5)],
        "tiny": ["\n".join(lines[i : i + 3]) for i in range(3000, 3030, 3)],
    }
    prefixes = {}
    for name, docs in texts.items():
        src = d / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        preprocess([src], artifact("tokenizer.model.v1"), d / name, append_eod=True)
        prefixes[name] = str(d / f"{name}_text_document")
    return prefixes


@pytest.fixture(scope="module")
def tokenizer():
    from llamapro_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(artifact("tokenizer.model.v1"))


def test_paper_weights():
    # LLaMA Pro: Proof-Pile-2 55B tokens x 1.0 and The-Stack Python 22B x 1.5 -> about 62/38.
    fractions = sampling_fractions([55_000_000_000, 22_000_000_000], [1.0, 1.5], "multiplier")
    assert fractions == pytest.approx([0.625, 0.375])
    assert sampling_fractions([55, 22], [3, 1], "probability") == pytest.approx([0.75, 0.25])


def realised_fractions(dataset, n: int) -> list[float]:
    counts = Counter(int(dataset[i]["dataset_id"]) for i in range(n))
    return [counts[k] / n for k in range(len(counts))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("weighting", ["probability", "multiplier"])
def test_sampled_fractions_match_weights(process_group, corpora, tokenizer, tmp_path, weighting):
    config = BlendConfig(
        corpora=[Corpus(corpora["code"], 1.5), Corpus(corpora["prose"], 1.0)],
        weighting=weighting,
        split="90,5,5",
        seq_length=64,
        cache_dir=str(tmp_path / "cache"),
    )
    text = describe(config)
    assert "fraction" in text and "tokens per epoch" in text
    n = 4000
    train, valid, test = build_datasets(config, tokenizer, (n, 50, None))
    assert test is None and len(valid) >= 50
    from llamapro_megatron.data.blend import corpus_stats

    tokens = [s.tokens[0] for s in corpus_stats(config)]
    expected = sampling_fractions(tokens, [1.5, 1.0], weighting)
    got = realised_fractions(train, n)
    assert got == pytest.approx(expected, abs=TOLERANCE)
    sample = train[0]
    assert sample["tokens"].shape == (64,) and sample["labels"].shape == (64,)
    assert int(sample["tokens"].max()) < tokenizer.vocab_size


@pytest.mark.timeout(120)
def test_tiny_corpus_empty_split_is_skipped_not_hung(process_group, corpora, tokenizer):
    # 10 documents at 98,1,1: valid and test get round(9.9)-round(9.8) = 0 documents.
    config = BlendConfig(
        corpora=[Corpus(corpora["prose"], 1.0), Corpus(corpora["tiny"], 1.0)], split="98,1,1", seq_length=32
    )
    with pytest.warns(UserWarning, match="tiny_text_document has no documents in the valid split"):
        train, valid, _ = build_datasets(config, tokenizer, (200, 20, None))
    assert {int(train[i]["dataset_id"]) for i in range(200)} == {0, 1}
    assert len(valid) >= 20
    only_tiny = BlendConfig(corpora=[Corpus(corpora["tiny"])], split="98,1,1", seq_length=32)
    with pytest.warns(UserWarning, match="no corpus has documents in the valid split"):
        train, valid, test = build_datasets(only_tiny, tokenizer, (50, 10, 10))
    assert len(train) >= 50 and valid is None and test is None


def test_config_errors(corpora):
    with pytest.raises(UserError, match="weighting"):
        BlendConfig(corpora=[Corpus(corpora["code"])], weighting="tokens")
    with pytest.raises(UserError, match="split"):
        BlendConfig(corpora=[Corpus(corpora["code"])], split="a,b")
    with pytest.raises(UserError, match="run `llamapro preprocess` first"):
        describe(BlendConfig(corpora=[Corpus(corpora["code"] + "_missing")]))
    cfg = BlendConfig.from_dict(
        {
            "weighting": "multiplier",
            "split": "99,1,0",
            "corpora": [{"prefix": corpora["code"], "weight": 1.5}, [corpora["prose"], 1.0]],
        }
    )
    assert [c.weight for c in cfg.corpora] == [1.5, 1.0] and cfg.corpora[0].name == "code_text_document"


class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


@pytest.mark.timeout(120)
def test_a_planted_object_array_in_the_index_cache_is_refused(process_group, corpora, tokenizer, tmp_path):
    import numpy as np

    from llamapro_megatron.runtime.safe_load import UnsafeCheckpoint

    cache = tmp_path / "cache"
    config = BlendConfig(corpora=[Corpus(corpora["code"], 1.5), Corpus(corpora["prose"], 1.0)], split="90,5,5",
                         seq_length=64, cache_dir=str(cache))
    first = build_datasets(config, tokenizer, (300, 20, None))[0]
    again = build_datasets(config, tokenizer, (300, 20, None))[0]  # from the cache, loaded without pickle
    assert all((first[i]["tokens"] == again[i]["tokens"]).all() for i in (0, 17, 299))
    caches = sorted(cache.rglob("*.npy"))
    assert any("document_index" in f.name for f in caches) and any("dataset_index" in f.name for f in caches)
    marker = tmp_path / "ran"
    for f in caches:
        saved = f.read_bytes()
        np.save(f, np.array([_Planted(str(marker))], dtype=object), allow_pickle=True)
        with pytest.raises(UnsafeCheckpoint, match=f"{f}: refused to load an object array"):
            build_datasets(config, tokenizer, (300, 20, None))[0][0]  # built, and one sample read
        assert not marker.exists()
        f.write_bytes(saved)
