"""The sdpa layer spec in a GPTModel, against the local spec and against transformers, in one 2-rank gloo world.

A tiny random LLaMA (GQA: 4 heads, 2 KV groups; untied) is converted once; at TP1 (DP2), TP2 and PP2 the same
checkpoint is loaded into a local-spec and an sdpa-spec GPTModel (the checkpoints are interchangeable: core
attention has no parameters), and one forward + backward through megatron-core's schedule (2 micro batches) runs
on each. Checked, fp32: logits and every parameter's gradient agree within stated tolerances; the sdpa-spec logits
equal transformers' within the conversion tests' tolerance (what `llamapro verify` checks). And a checkpoint
written from an sdpa-spec model (TP2, weights changed from the converted ones) loads into a local-spec model at PP2
and gives the same logits (the converted checkpoint, written from a local-spec model, covers the other direction).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamapro_megatron.runtime.launch import run_workers
from tests.tiny_models import VARIANTS, make_tiny_hf

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
BATCH, SEQ = 2, 24
LOGIT_TOL = 1e-5  # sdpa vs local, fp32, logits O(1): measured max 1.8e-6 (2.7e-6 across layouts, cross-spec load)
GRAD_TOL = 1e-5  # relative to the tensor's largest gradient entry: measured max 1.2e-6
HF_LOGIT_TOL = 1e-4  # as tests/distributed/test_conversion.py


def _step(model, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
    """Forward + backward of 2 micro batches; (TP-gathered logits on the last stage, grads by parameter name)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

    positions = torch.arange(SEQ).unsqueeze(0)
    logits = []

    def forward_step(data_iterator, module):
        toks, labs = next(data_iterator)
        output = module(toks, positions, attention_mask=None)

        def loss_func(out):
            logits.append(gather_from_tensor_model_parallel_region(out).detach().clone())
            loss = vocab_parallel_cross_entropy(out.float(), labs).mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    micro = list(zip(tokens.split(1), labels.split(1)))
    model.train()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
                                num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=1, forward_only=False)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (torch.cat(logits) if ps.is_pipeline_last_stage() else None), grads


def _worker(hf: str, ckpt: str, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    import torch.distributed as dist

    from llamapro_megatron.checkpoint.convert import hf_to_mcore
    from llamapro_megatron.checkpoint.load import load_model_weights
    from llamapro_megatron.checkpoint.mcore import read_meta, resolve_checkpoint
    from llamapro_megatron.runtime import destroy_distributed, init_distributed
    from llamapro_megatron.runtime.model import build_gpt_model
    from llamapro_megatron.verify import megatron_logits

    dist.init_process_group("gloo")
    hf_to_mcore(hf, ckpt, tp=2, progress=False)
    ckpt_dir = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt_dir)
    out = {}
    for tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp, seed=5)
        runs = {}
        for spec in ("local", "sdpa"):
            model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype="float32", tp=tp, pp=pp, spec=spec)
            load_model_weights(model, ckpt_dir)
            core = type(model.decoder.layers[0].self_attention.core_attention).__name__
            assert core == {"local": "DotProductAttention", "sdpa": "SDPAttention"}[spec], core
            runs[spec] = _step(model, tokens, labels)
        (logits_l, grads_l), (logits_s, grads_s) = runs["local"], runs["sdpa"]
        assert grads_l.keys() == grads_s.keys() and grads_l
        grad_rel = max(((grads_l[n] - grads_s[n]).abs().max() / grads_l[n].abs().max().clamp(min=1e-30)).item()
                       for n in grads_l)
        logit_diff = None if logits_l is None else (logits_l - logits_s).abs().max().item()
        out[(tp, pp)] = dict(grad_rel=grad_rel, logit_diff=logit_diff, num_grads=len(grads_l))
        if (tp, pp) == (2, 1):
            converted_logits = logits_s
        destroy_distributed()
    out["cross"] = _cross_spec_checkpoint(meta, ckpt_dir, Path(ckpt).parent / "cross", tokens, labels, converted_logits)
    out["verify"] = megatron_logits(ckpt, tokens, tp=2, pp=1, spec="sdpa")
    dist.barrier()
    dist.destroy_process_group()
    return out


def _cross_spec_checkpoint(meta, ckpt_dir: Path, cross: Path, tokens, labels, converted_logits) -> dict | None:
    """Write from an sdpa-spec model at TP2, read into a local-spec model at PP2; logits before and after."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from llamapro_megatron.checkpoint.load import load_model_weights
    from llamapro_megatron.checkpoint.mcore import META_FILE
    from llamapro_megatron.runtime import destroy_distributed, init_distributed
    from llamapro_megatron.runtime.model import build_gpt_model

    init_distributed(tp=2, pp=1, seed=5)
    model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype="float32", tp=2, spec="sdpa")
    load_model_weights(model, ckpt_dir)
    torch.manual_seed(11)  # the same noise on every rank: TP-replicated norms stay replicated
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    written, _ = _step(model, tokens, labels)
    if dist.get_rank() == 0:
        cross.mkdir()
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(cross))
    if dist.get_rank() == 0:
        (cross / META_FILE).write_text(meta.to_json())  # load_model_weights reads what the checkpoint holds
    dist.barrier()
    destroy_distributed()
    init_distributed(tp=1, pp=2, seed=5)
    model = build_gpt_model(meta.arch, meta.padded_vocab_size, dtype="float32", pp=2, spec="local")
    load_model_weights(model, cross)
    read, _ = _step(model, tokens, labels)
    destroy_distributed()
    if read is None:  # not the last pipeline stage
        return None
    return dict(diff=(written - read).abs().max().item(), moved=(written - converted_logits).abs().max().item())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sdpa")
    hf = make_tiny_hf(root / "hf", "gqa")
    vocab = VARIANTS["gqa"]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(input_ids=tokens).logits
    per_rank = run_workers(_worker, 2, args=(str(hf), str(root / "ckpt"), tokens, labels))
    return per_rank, reference


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_sdpa_spec_matches_local_spec_outputs_and_gradients(results, layout):
    per_rank, _ = results
    logit_diffs = [r[layout]["logit_diff"] for r in per_rank if r[layout]["logit_diff"] is not None]
    assert logit_diffs, "no rank returned logits"
    assert max(logit_diffs) <= LOGIT_TOL, f"max |dlogit| {max(logit_diffs):.2e}"
    for rank, r in enumerate(per_rank):
        assert r[layout]["num_grads"] > 0
        assert r[layout]["grad_rel"] <= GRAD_TOL, f"rank {rank}: max relative |dgrad| {r[layout]['grad_rel']:.2e}"


@pytest.mark.slow
def test_sdpa_spec_logits_match_transformers(results):
    per_rank, reference = results
    vocab = VARIANTS["gqa"]["vocab_size"]
    got = per_rank[0]["verify"][..., :vocab]
    diff = (got - reference).abs().max().item()
    assert diff <= HF_LOGIT_TOL, f"max |dlogit| vs transformers {diff:.2e}"


@pytest.mark.slow
def test_checkpoint_written_with_sdpa_spec_loads_into_local_spec(results):
    per_rank, _ = results
    cross = [r["cross"] for r in per_rank if r["cross"] is not None]
    assert len(cross) == 1, "exactly the last pipeline stage returns logits"
    assert cross[0]["moved"] > 0.1, "the written weights must differ from the converted ones"
    assert cross[0]["diff"] <= LOGIT_TOL, f"max |dlogit| after the cross-spec load {cross[0]['diff']:.2e}"
