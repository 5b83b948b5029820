"""`llamapro study`, shortened (3 strategies, 2 steps of 2 x 64 tokens, 256 held-out tokens per domain), on real
SmolLM2 with the real corpora.

The table's figures are checked against `llamapro evaluate` run again on the same checkpoints at another layout
(PP 1 instead of 2); each strategy's frozen tensors against the base model, bit for bit, in the exported HF
weights; the trainable counts against the counts the strategies promise (six SmolLM2 blocks for LLaMA Pro and for
top-K, every parameter for full fine-tuning); the training text against the corpus (drawn across it, never
held-out text). A second run is served from the cache without starting a rank.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamapro_megatron.errors import UserError
from llamapro_megatron.study import Settings, StageCache, build_graph, checkpoint_dir, study
from llamapro_megatron.study_report import format_table, plot

REL_TOL = 1e-5  # fp32, the same windows at PP 1 and PP 2, summed in float64
STRATEGIES = ("llamapro", "full", "top-k")  # the Megatron rows; LoRA (peft) is checked on its own
NEW = [5, 11, 17, 23, 29, 35]  # llamapro, --groups 6: one copy after each group of 5 of the 30 blocks


def _settings(workdir, seeds: int = 1) -> Settings:
    return Settings(workdir=str(workdir), strategies=(*STRATEGIES, "lora"), steps=2, seeds=seeds, seq_length=64,
                    global_batch_size=2, heldout_tokens=256, train_chars=20_000, progress=False)


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    yield workdir, study(_settings(workdir))
    shutil.rmtree(workdir, ignore_errors=True)  # ~3 GB of checkpoints


@pytest.mark.slow
def test_table_figures_are_llamapro_evaluate_on_the_same_checkpoints(run):
    from llamapro_megatron.evaluate import domain_tokens, megatron_domain_losses, model_tokenizer

    workdir, summary = run
    cache = StageCache(workdir)
    names = ["eval:base"] + [f"eval:{s}:1" for s in STRATEGIES]
    loads = [checkpoint_dir(cache, n) for n in names]
    tok = model_tokenizer(load=loads[0])
    domains = {d: domain_tokens(cache.path("data") / f"heldout_{d}.jsonl", tok, max_tokens=256)
               for d in ("code", "math", "general")}
    reference = megatron_domain_losses(None, domains, loads=loads, seq_length=64, pp=1, micro_batch_size=1,
                                       progress=False)
    got = [summary["base"]] + [summary["strategies"][s][0]["eval"] for s in STRATEGIES]
    for name, ref, figures in zip(names, reference, got):
        for d, r in ref.items():
            assert figures[d]["tokens"] == r.tokens == 256, (name, d)
            assert figures[d]["loss"] == pytest.approx(r.loss, rel=REL_TOL), (name, d)
    table = format_table(summary)
    for s in STRATEGIES:
        assert any(line.startswith(s + " ") for line in table.splitlines()), table
    assert summary["tokens_trained"] == 2 * 2 * 64
    for s in STRATEGIES:
        assert set(summary["strategies"][s][0]["losses"]) == {"1", "2"}


@pytest.mark.slow
def test_frozen_tensors_are_the_base_models_and_counts_are_promised(run, tmp_path):
    from llamapro_megatron.artifacts import smollm2_hf_dir
    from llamapro_megatron.checkpoint.convert import mcore_to_hf

    workdir, summary = run
    cache = StageCache(workdir)
    base = _tensors(smollm2_hf_dir())
    per_block = sum(t.numel() for n, t in base.items() if n.startswith("model.layers.0."))
    total = sum(t.numel() for t in base.values())  # tied embeddings: one tensor
    for strategy in STRATEGIES:
        out = tmp_path / strategy
        mcore_to_hf(checkpoint_dir(cache, f"train:{strategy}:1"), out, progress=False)
        trained = _tensors(out)
        row = summary["strategies"][strategy][0]
        changed = set()
        for name, tensor in trained.items():
            if not name.startswith("model.layers."):
                (changed.add(name) if not torch.equal(tensor, base[name]) else None)
                continue
            layer, rest = int(name.split(".")[2]), ".".join(name.split(".")[3:])
            source = layer - sum(n <= layer for n in NEW) if strategy == "llamapro" else layer
            if strategy == "llamapro" and layer in NEW:
                init = base[f"model.layers.{source}.{rest}"]  # the copy of the block before it
                init = torch.zeros_like(init) if rest.endswith(("o_proj.weight", "down_proj.weight")) else init
                if not torch.equal(tensor, init):
                    changed.add(layer)
            elif not torch.equal(tensor, base[f"model.layers.{source}.{rest}"]):
                changed.add(layer)
        if strategy == "llamapro":
            assert changed == set(NEW)
            assert row["trainable"] == 6 * per_block and row["total"] == total + 6 * per_block
        elif strategy == "top-k":
            assert changed == set(range(24, 30))  # K = 6 = LLaMA Pro's new blocks: the same trainable count
            assert row["trainable"] == 6 * per_block and row["total"] == total
        else:
            assert changed == set(range(30)) | {"model.embed_tokens.weight", "model.norm.weight"}
            assert row["trainable"] == row["total"] == total


@pytest.mark.slow
def test_training_text_is_drawn_across_the_corpus_and_never_held_out(run):
    workdir, _ = run
    cache = StageCache(workdir)
    for domain in ("code", "math"):
        corpus = [json.loads(line)["text"] for line in
                  (cache.path("corpora") / domain / "train.jsonl").read_text().splitlines()]
        heldout = {json.loads(line)["text"] for line in
                   (cache.path("corpora") / domain / "heldout.jsonl").read_text().splitlines()}
        chosen = [json.loads(line)["text"] for line in
                  (cache.path("data") / f"train_{domain}.jsonl").read_text().splitlines()]
        assert len(chosen) >= 10  # 20,000 characters, at most 2,000 of each document
        index = [next(i for i, doc in enumerate(corpus) if doc.startswith(text)) for text in chosen]
        assert len(set(index)) == len(index)
        # drawn across the corpus, not its first documents: some from each third of the file order
        thirds = {3 * i // len(corpus) for i in index}
        assert thirds == {0, 1, 2}, (domain, sorted(index))
        assert not any(doc.startswith(text) for text in chosen for doc in heldout)
        assert not heldout & {corpus[i] for i in index}


@pytest.mark.slow
def test_picture_and_second_run_from_the_cache(run):
    workdir, first = run
    cache = StageCache(workdir)
    graph = build_graph(_settings(workdir))
    stamps = {s: cache.read(s)["finished"] for s in graph}
    t0 = time.time()
    again = study(_settings(workdir))
    assert time.time() - t0 < 10  # no rank started
    assert all(v["cached"] for v in again["stages"].values())
    assert {s: cache.read(s)["finished"] for s in graph} == stamps
    assert again["strategies"] == first["strategies"]
    png = plot(again, workdir / "study.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    # one more seed reruns that seed's training and evaluation only
    todo = StageCache(workdir).todo(build_graph(_settings(workdir, seeds=2)))
    assert todo == [f"{kind}:{s}:2" for s in (*STRATEGIES, "lora") for kind in ("train", "eval")]


@pytest.mark.slow
def test_lora_row_is_peft_with_frozen_base_and_its_perplexity_is_the_merged_models(run):
    from llamapro_megatron.artifacts import smollm2_hf_dir
    from llamapro_megatron.evaluate import evaluate
    from llamapro_megatron.study_lora import TARGETS

    workdir, summary = run
    cache = StageCache(workdir)
    out = checkpoint_dir(cache, "train:lora:1")
    row, pro = summary["strategies"]["lora"][0], summary["strategies"]["llamapro"][0]
    assert abs(row["trainable"] / pro["trainable"] - 1) <= 0.10 and row["of_llamapro"] == row["trainable"] / pro[
        "trainable"]
    # the same tokens in the same order: every run's first step sees the base model's function on the same batch
    assert row["losses"]["1"] == pytest.approx(summary["strategies"]["full"][0]["losses"]["1"], rel=1e-5)

    # frozen base: the merged model is the base plus the adapters' B A scaled, and nothing else moved
    base, merged = _tensors(smollm2_hf_dir()), _tensors(out / "merged")
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    scale = 2.0  # lora_alpha = 2 x rank
    assert merged.keys() == base.keys()
    targets = 0
    for name, tensor in merged.items():
        if name.endswith(tuple(f".{t}.weight" for t in TARGETS)):
            stem = "base_model.model." + name.removesuffix(".weight")
            a, b = adapter[f"{stem}.lora_A.weight"], adapter[f"{stem}.lora_B.weight"]
            assert a.shape[0] == row["rank"]
            delta = scale * (b.double() @ a.double())
            assert delta.abs().max() > 0, name  # it trained
            torch.testing.assert_close(tensor.double(), base[name].double() + delta, rtol=0, atol=1e-6)
            targets += 1
        else:
            assert torch.equal(tensor, base[name]), name
    assert targets == 30 * len(TARGETS)

    files = {d: str(cache.path("data") / f"heldout_{d}.jsonl") for d in ("code", "math", "general")}
    for r in evaluate(files, hf_dir=out / "merged", seq_length=64, max_tokens=256, progress=False):
        assert row["eval"][r.domain]["tokens"] == r.tokens == 256
        assert row["eval"][r.domain]["loss"] == pytest.approx(r.loss, rel=REL_TOL), r.domain


def test_given_files_that_share_a_document_are_refused(tmp_path):
    from llamapro_megatron.artifacts import smollm2_hf_dir

    docs = [{"text": f"document {i}: " + "words " * 20} for i in range(5)]
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train.write_text("".join(json.dumps(d) + "\n" for d in docs))
    heldout.write_text(json.dumps(docs[3]) + "\n")
    settings = Settings(workdir=str(tmp_path / "w"), hf_dir=str(smollm2_hf_dir()), train={"code": str(train)},
                        heldout={"code": str(heldout)}, progress=False)
    with pytest.raises(UserError, match="1 of its documents are also in the held-out set"):
        study(settings)
