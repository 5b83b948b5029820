"""The Instruct stage (--sft, --freeze none) through the trainer, against a hand computation on transformers'
logits, in one 2-rank world.

A tiny random LLaMA with SmolLM2's vocabulary (its real tokenizer and chat template) is converted to Megatron;
the chats are real CHAMP problems (user) and solutions (assistant). The trainer's first-step loss - computed
before any optimizer step, so on the converted weights - must equal the mean over every assistant token of the
global batch of the cross entropy logsumexp(logits) - logit[label], computed by hand in float64 from transformers'
logits with each conversation run *on its own* (positions from 0, nothing else in its context); its gradient
norm must equal that of the same loss in transformers (all parameters train). Packed samples hold two
conversations each (block-diagonal attention, run at PP2 with 2 micro batches); padded samples one each (run at
DP2 with 2 micro batches per rank, uneven token counts), once more from a checkpoint with padded vocabulary rows
(masked out of the model's loss by `mask_padded_vocabulary`). Equality for packing is what shows that neither
attention nor loss crosses a conversation boundary; controls show that a leak across the boundary, a loss over
the prompt tokens too, or a mean of per-sample means would each differ by far more than the tolerances.
The token ids and assistant masks are `encode_conversation`'s, which tests/unit/test_data_sft.py checks against
the `tokenizers` library. Finally examples/sft_instruct.yaml runs two steps with small overrides, and every
tensor of the model moves (all blocks, embedding and head train).
"""
from __future__ import annotations

import json
import math
import runpy
import shutil
from pathlib import Path

import pytest
import torch

from llamapro_megatron.runtime import run_workers
from tests.data_artifacts import artifact, smollm2_tokenizer_dir
from tests.tiny_models import make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "sft_instruct.yaml"
SEQ = 223  # 224-token samples: the four shortest CHAMP chats (84, 108, 108, 111 tokens) pack two by two
# fp32 on both sides; what differs is summation order and, packed, RoPE angles at shifted (not restarted)
# positions: attention sees only their difference, so the loss agrees up to rounding.
TOLERANCE = 1e-6  # relative, on a loss of ~11.2 (measured: packed 7.3e-8, padded 2.6e-9)
# relative, on the gradient norm ~5.84. Measured 1.07e-5 both ways, all of it megatron-core's norm: it takes
# torch.norm of each fp32 gradient (here a 3.1M-element embedding), which on CPU rounds to 5.835623 where the
# float64 norm of the same gradients is 5.835686 (checked on the converted model outside the trainer). A mean of
# per-sample means is 1.1e-2 away.
GRAD_TOLERANCE = 3e-5


def _champ_chats() -> list[list[dict]]:
    """CHAMP problem -> solution conversations, as examples/data/build_corpora.py writes them for SFT."""
    build = runpy.run_path(str(ROOT / "examples" / "data" / "build_corpora.py"))
    return [[{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
            for _, problem, solution in build["champ_problems"](artifact("champ_v0.json"))]


def _write(path: Path, chats: list[list[dict]]) -> str:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return str(path)


def _train(argv: list[str]):
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    return train(config_from_argv(argv))


def _world(root: str, chat: str, recipe_chat: str, tokenizer: str) -> dict:
    from llamapro_megatron.checkpoint.convert import hf_to_mcore

    r = Path(root)
    hf_to_mcore(r / "hf", r / "mc", progress=False)
    # the same weights with 48 padded vocabulary rows (49152 -> 49200): the output layer's hook masks them out of
    # the loss the model computes (runtime/model.mask_padded_vocabulary); SmolLM2's vocabulary has no padding
    hf_to_mcore(r / "hf", r / "mc_pad", progress=False, make_vocab_size_divisible_by=100)
    common = ["--load", str(r / "mc"), "--freeze", "none", "--sft", "--data-path", chat, "--tokenizer-model",
              tokenizer, "--seq-length", str(SEQ), "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
              "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1"]
    out = {
        "packed": _train([*common, "--sft-packing", "packed", "--global-batch-size", "2",
                          "--pipeline-model-parallel-size", "2"]),
        "padded": _train([*common, "--sft-packing", "padded", "--global-batch-size", "4"]),
        "padded_vocab": _train([*common, "--sft-packing", "padded", "--global-batch-size", "4", "--load",
                                str(r / "mc_pad")]),
    }
    out = {mode: {"loss": run.losses[1], "grad_norm": run.grad_norms[1]} for mode, run in out.items()}
    recipe = _train(["--config", str(RECIPE), "--load", str(r / "mc"), "--data-path", recipe_chat,
                     "--tokenizer-model", tokenizer, "--save", str(r / "instruct"), "--tensor-model-parallel-size",
                     "1", "--pipeline-model-parallel-size", "1", "--global-batch-size", "4", "--seq-length", "256",
                     "--train-iters", "2", "--eval-iters", "1", "--tensorboard-dir", str(r / "tb")])
    out["recipe"] = {"losses": recipe.losses, "eval": recipe.eval_losses, "saved": recipe.last_checkpoint}
    return out


def _reference(hf_dir: Path, sequences, all_tokens: bool = False, per_sequence_mean: bool = False):
    """(loss, gradient norm) of the mean cross entropy over the assistant tokens of `sequences` ((ids, mask)
    pairs), by hand from transformers' logits: for each position t whose label ids[t+1] is an assistant token,
    logsumexp(logits[t]) - logits[t, ids[t+1]] (in float64), summed over all sequences and divided by their
    count; the gradient norm is over every parameter (all train: --freeze none).
    `all_tokens`: over every label instead (what ignoring the assistant mask would give); `per_sequence_mean`:
    the mean of each sequence's mean instead (what a per-micro-batch loss would give)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    sums, counts = [], []
    for ids, mask in sequences:
        ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)
        logits = model(ids[None]).logits[0, :-1].double()
        labels = ids[1:]
        nll = torch.logsumexp(logits, dim=-1) - logits[torch.arange(len(labels)), labels]
        keep = torch.ones_like(labels, dtype=torch.bool) if all_tokens else mask[1:].bool()
        sums.append(nll[keep].sum())
        counts.append(int(keep.sum()))
    if per_sequence_mean:
        loss = sum(t / c for t, c in zip(sums, counts)) / len(sums)
    else:
        loss = sum(sums) / sum(counts)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    return float(loss), float(grad_norm)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    from llamapro_megatron.data.sft import encode_conversation
    from llamapro_megatron.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("sft")
    tokenizer_dir = smollm2_tokenizer_dir()
    make_tiny_hf(root / "hf", "gqa", vocab_size=json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"])
    tokenizer = load_tokenizer(tokenizer_dir)
    champ = _champ_chats()
    encoded = sorted(((encode_conversation(tokenizer, c), c) for c in champ), key=lambda e: len(e[0].ids))[:4]
    conversations = [e[0] for e in encoded]
    assert [len(c.ids) for c in conversations] == [84, 108, 108, 111]  # two per 224-token sample, none cut
    chat = _write(root / "chat.jsonl", [e[1] for e in encoded])
    recipe_chat = _write(root / "champ_chat.jsonl", champ[:40])
    out = run_workers(_world, 2, args=(str(root), chat, recipe_chat, str(tokenizer_dir)), timeout_s=900)[0]
    yield root, out, conversations
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_first_step_loss_is_the_assistant_token_mean(sft_runs):
    from llamapro_megatron.checkpoint.mcore import read_meta

    root, out, conversations = sft_runs
    assert [read_meta(root / name / "release").padded_vocab_size for name in ("mc", "mc_pad")] == [49152, 49200]
    alone = [(c.ids, c.mask) for c in conversations]
    loss, grad_norm = _reference(root / "hf", alone)
    for mode in ("packed", "padded", "padded_vocab"):
        got = out[mode]
        assert got["loss"] == pytest.approx(loss, rel=TOLERANCE), (mode, got, loss)
        # the gradient too: megatron-core divides by the global batch's assistant-token count (per-token loss)
        assert got["grad_norm"] == pytest.approx(grad_norm, rel=GRAD_TOLERANCE), (mode, got, grad_norm)
    # The same reference over the packed samples with attention across the boundary: what a leak would give
    # (the boundary label, a chat's first token, is a prompt token either way). The packed run is far from it.
    leaky = []
    for a, b in ((0, 1), (2, 3)):
        ids = torch.cat([torch.as_tensor(conversations[a].ids), torch.as_tensor(conversations[b].ids)])
        mask = torch.cat([torch.as_tensor(conversations[a].mask), torch.as_tensor(conversations[b].mask)])
        leaky.append((ids, mask))
    leaked = _reference(root / "hf", leaky)[0]
    assert abs(leaked - loss) > 100 * TOLERANCE * loss, (leaked, loss)
    # a loss over the prompt tokens too (the assistant mask ignored) is far from it as well
    unmasked = _reference(root / "hf", alone, all_tokens=True)[0]
    assert abs(unmasked - loss) > 100 * TOLERANCE * loss, (unmasked, loss)
    # and so is the gradient of a mean of per-conversation means (micro-batch means, not a per-token mean)
    per_sample = _reference(root / "hf", alone, per_sequence_mean=True)[1]
    assert abs(per_sample - grad_norm) > 100 * GRAD_TOLERANCE * grad_norm, (per_sample, grad_norm)


@pytest.mark.slow
def test_sft_recipe_runs_on_cpu(sft_runs):
    root, out, _ = sft_runs
    recipe = out["recipe"]
    losses = [recipe["losses"][k] for k in sorted(recipe["losses"])]
    assert len(losses) == 2 and all(math.isfinite(x) and 5 < x < 15 for x in losses), losses  # ~ln(49152)
    assert recipe["saved"] and Path(recipe["saved"]).name == "iter_0000002"
    saved = json.loads((Path(recipe["saved"]) / "llamapro.json").read_text())
    assert saved["iteration"] == 2
    # --freeze none: every block, the embedding and the head trained (each saved tensor moved from the start)
    before, after = _model_tensors(root / "mc" / "release"), _model_tensors(Path(recipe["saved"]))
    assert before and set(before) == set(after), sorted(set(before) ^ set(after))
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    layers = [k for k in before if k.startswith("decoder.layers.")]
    assert layers and all(not torch.equal(b, a) for k in layers
                          for b, a in zip(before[k], after[k])), "a decoder layer did not train"


def _model_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a torch_dist checkpoint (decoder layers stacked on dim 0), read with torch's DCP."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt_dir.parent / f"{ckpt_dir.name}.pt"
    dcp_to_torch_save(str(ckpt_dir), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items()
            if isinstance(v, torch.Tensor) and not k.startswith("optimizer") and "_extra_state" not in k}


@pytest.mark.slow
def test_the_sft_save_is_checksummed_and_read_only_as_data(sft_runs, tmp_path):
    """The Instruct stage's save: its checksums hold, it exports, and a copy with a planted `.metadata` is refused
    without running it (the reader of every other save; tests/distributed/test_safe_loading.py)."""
    from llamapro_megatron.checkpoint import integrity
    from tests.distributed.test_safe_loading import _plant_metadata, _run

    _, out, _ = sft_runs
    saved = Path(out["recipe"]["saved"])
    assert integrity.check(saved).ok
    proc = _run("convert", "mcore-to-hf", "--load", str(saved.parent), "--out", str(tmp_path / "hf"), "--no-progress")
    assert proc.returncode == 0 and (tmp_path / "hf" / "config.json").is_file(), proc.stderr[-3000:]
    hostile = tmp_path / "instruct"
    shutil.copytree(saved.parent, hostile)
    marker = tmp_path / "MARKER"
    _plant_metadata(hostile / saved.name, marker)
    proc = _run("convert", "mcore-to-hf", "--load", str(hostile), "--out", str(tmp_path / "hf2"), "--no-progress")
    assert proc.returncode == 1 and "refused to load" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "hf2").exists()
