"""`llamapro evaluate`: per-domain perplexity of a Megatron checkpoint equals transformers' at any TP/PP.

A tiny GQA model (vocabulary 200, padded to 256 at TP2) gets a real BPE tokenizer trained on botchan, is
converted at TP2 PP2 and evaluated in one 4-rank world at TP2 PP2 and at TP1 PP2 (two data-parallel replicas
sharing the windows). The reference is transformers' own loss (`labels=`) on the same windows. Domains: a text
file, a .jsonl file, and the same .jsonl preprocessed into an indexed dataset (must equal the .jsonl's figures).
The same world also generates greedily at TP2 PP2 (`llamapro generate`): the tokens must be transformers' greedy
`generate` output on the HF model. A tiny Mixtral (MoE) with the same tokenizer is evaluated in that world at
EP 2 (with PP 2: the two EP ranks run the same windows; at PP 1: two expert-data-parallel pairs share them) and
generates at TP 2 with ETP 1 x EP 2, against transformers' Mixtral.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from llamapro_megatron.runtime import run_workers
from tests.data_artifacts import artifact, python_stdlib
from tests.tiny_models import make_tiny_hf

LAYOUTS = [(2, 2), (1, 2)]
MOE_LAYOUTS = [(1, 2, 2), (1, 1, 2)]  # (tp, pp, ep) of the MoE model's evaluation
SEQ = 32  # the held-out streams are not multiples of it: the last window is shorter
MICRO = 3
MAX_TOKENS = 1500
REL_TOL = 1e-5  # fp32: the same math through different kernels, summed in float64
PROMPTS = ["I went to school", "the master said that"]
NEW_TOKENS = 12


def _tiny_tokenizer(hf_dir, text: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=190, limit_alphabet=80,
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def _world(hf: str, ckpt: str, data: dict, moe_hf: str, moe_ckpt: str) -> dict:
    import torch.distributed as dist

    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.evaluate import evaluate
    from llamapro_megatron.generate import generate

    dist.init_process_group("gloo")
    hf_to_mcore(hf, ckpt, tp=2, pp=2, progress=False)
    out = {}
    for tp, pp in LAYOUTS:
        results = evaluate(data, load=ckpt, tp=tp, pp=pp, seq_length=SEQ, max_tokens=MAX_TOKENS,
                           micro_batch_size=MICRO, progress=False)
        out[(tp, pp)] = {r.domain: r for r in results}
    out["generated"] = generate(PROMPTS, load=ckpt, tp=2, pp=2, max_new_tokens=NEW_TOKENS)
    hf_to_mcore(moe_hf, moe_ckpt, progress=False)
    for tp, pp, ep in MOE_LAYOUTS:
        results = evaluate(data, load=moe_ckpt, tp=tp, pp=pp, ep=ep, seq_length=SEQ, max_tokens=MAX_TOKENS,
                           micro_batch_size=MICRO, progress=False)
        out[("moe", tp, pp, ep)] = {r.domain: r for r in results}
    out["moe_generated"] = generate(PROMPTS, load=moe_ckpt, tp=2, ep=2, etp=1, max_new_tokens=NEW_TOKENS)
    dist.destroy_process_group()
    return out


def _transformers_reference(hf_dir, tokens: list[int]) -> tuple[float, int]:
    """transformers' own loss (labels=) over the windows, weighted by the predicted tokens of each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, SEQ):
        window = torch.tensor([tokens[start : start + SEQ + 1]])
        with torch.no_grad():
            loss = model(input_ids=window, labels=window).loss.double().item()
        total, count = total + loss * (window.shape[1] - 1), count + window.shape[1] - 1
    return total / count, count


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from llamapro_megatron.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("evaluate")
    botchan = artifact("botchan.txt").read_text()
    hf = make_tiny_hf(root / "hf", "gqa")
    _tiny_tokenizer(hf, botchan[: len(botchan) // 2])
    (root / "general.txt").write_text(botchan[len(botchan) // 2 :][:20000])
    sources = sorted((python_stdlib() / "json").glob("*.py"))
    (root / "code.jsonl").write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in sources))
    preprocess([root / "code.jsonl"], hf, root / "code", append_eod=True, progress=False)
    data = {"general": str(root / "general.txt"), "code": str(root / "code.jsonl"),
            "code_indexed": str(root / "code_text_document")}
    moe_hf = make_tiny_hf(root / "moe_hf", "mixtral", vocab_size=200)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (moe_hf / name).write_bytes((hf / name).read_bytes())
    out = run_workers(_world, 4, args=(str(hf), str(root / "ckpt"), data, str(moe_hf), str(root / "moe_ckpt")),
                      timeout_s=600)[0]
    return hf, data, out, moe_hf


@pytest.mark.slow
def test_megatron_perplexity_equals_transformers_at_every_layout(evaluated):
    hf, data, out, _ = evaluated
    _assert_transformers_losses(hf, data, {layout: out[layout] for layout in LAYOUTS})
    for layout in LAYOUTS:
        for r in out[layout].values():
            assert r.perplexity == pytest.approx(math.exp(r.loss), rel=1e-12)


def _assert_transformers_losses(hf, data: dict, results: dict) -> None:
    """Each layout's general and code figures: transformers' loss over the same MAX_TOKENS tokens."""
    from llamapro_megatron.data.tokenizer import load_tokenizer
    from llamapro_megatron.evaluate import domain_tokens

    tok = load_tokenizer(hf)
    for domain in ("general", "code"):
        ref_loss, ref_count = _transformers_reference(hf, domain_tokens(data[domain], tok, max_tokens=MAX_TOKENS))
        assert ref_count == MAX_TOKENS
        for layout, figures in results.items():
            r = figures[domain]
            assert r.tokens == ref_count, (layout, domain)  # MoE: each window once, not once per EP rank
            assert r.loss == pytest.approx(ref_loss, rel=REL_TOL), (layout, domain)


@pytest.mark.slow
def test_same_figures_across_layouts_and_for_the_indexed_dataset(evaluated):
    _, _, out, _ = evaluated
    a, b = (out[layout] for layout in LAYOUTS)
    for domain in a:
        assert a[domain].tokens == b[domain].tokens
        assert a[domain].loss == pytest.approx(b[domain].loss, rel=1e-6), domain
    assert a["code_indexed"].tokens == a["code"].tokens
    assert a["code_indexed"].loss == pytest.approx(a["code"].loss, rel=1e-6)


@pytest.mark.slow
def test_hf_path_is_transformers_loss(evaluated):
    from llamapro_megatron.evaluate import evaluate

    hf, data, out, _ = evaluated
    results = {r.domain: r for r in evaluate(data, hf_dir=hf, seq_length=SEQ, max_tokens=MAX_TOKENS,
                                             micro_batch_size=MICRO, progress=False)}
    for domain, r in results.items():
        assert r.tokens == out[LAYOUTS[0]][domain].tokens
        assert r.loss == pytest.approx(out[LAYOUTS[0]][domain].loss, rel=REL_TOL), domain


@pytest.mark.slow
def test_greedy_generation_equals_transformers(evaluated):
    from llamapro_megatron.generate import generate

    hf, _, out, _ = evaluated
    reference = generate(PROMPTS, hf_dir=hf, max_new_tokens=NEW_TOKENS)  # transformers' model.generate
    assert [p for p, _ in out["generated"]] == [p for p, _ in reference]
    for (_, megatron), (_, transformers) in zip(out["generated"], reference):
        assert len(transformers) == NEW_TOKENS or transformers[-1] == 2  # ran to the end, or stopped at </s>
        assert megatron == transformers
    assert len({tuple(new) for _, new in reference}) == len(PROMPTS)  # the prompts steer it: not a constant


@pytest.mark.slow
def test_moe_model_evaluates_and_generates_with_expert_parallelism(evaluated):
    from llamapro_megatron.generate import generate

    _, data, out, moe_hf = evaluated
    _assert_transformers_losses(moe_hf, data, {layout: out[("moe", *layout)] for layout in MOE_LAYOUTS})
    reference = generate(PROMPTS, hf_dir=moe_hf, max_new_tokens=NEW_TOKENS)
    assert out["moe_generated"] == reference
