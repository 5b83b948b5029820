"""Real weights: SmolLM2-135M expanded by 6 blocks (30 -> 36), its new blocks trained on real Python code.

One 2-rank world (TP1 PP2; SmolLM2's 3 KV groups allow TP 1 or 3) converts, expands, trains a few dozen
micro batches from a blend of the running Python's standard library sources (tokenized by SmolLM2's own
tokenizer) and exports the training save directory to Hugging Face. Checks: the validation loss goes down; the
export loads in transformers; every original block, the embedding and the final norm are bit-identical to
SmolLM2's own weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamapro_megatron.runtime import run_workers
from tests.data_artifacts import python_stdlib, smollm2_tokenizer_dir

NEW = [5, 11, 17, 23, 29, 35]  # interleave(30 layers, 6 groups)
STEPS = 10


def _world(hf: str, root: str, prefix: str) -> dict:
    import torch.distributed as dist

    from llamapro_megatron.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from llamapro_megatron.checkpoint.expand import expand_mcore
    from llamapro_megatron.expansion import interleave
    from llamapro_megatron.training.config import config_from_argv
    from llamapro_megatron.training.trainer import train

    dist.init_process_group("gloo")
    r = Path(root)
    hf_to_mcore(hf, r / "base", tp=1, pp=2, progress=False)
    expand_mcore(r / "base", r / "pro", lambda n: interleave(n, 6), tp=1, pp=2, progress=False)
    result = train(config_from_argv([
        "--load", str(r / "pro"), "--save", str(r / "trained"), "--pipeline-model-parallel-size", "2",
        "--data-path", prefix, "--split", "90,10,0", "--seq-length", "128", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", str(STEPS), "--lr", "3e-4", "--min-lr", "3e-5",
        "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--eval-at-start", "--eval-interval", str(STEPS),
        "--eval-iters", "2", "--log-interval", "4"]))
    mcore_to_hf(r / "trained", r / "export", progress=False)
    dist.destroy_process_group()
    return {"losses": result.losses, "eval": result.eval_losses, "parameters": result.parameter_counts}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from llamapro_megatron.data.preprocess import preprocess

    hf = smollm2_tokenizer_dir()  # the HF directory built from the real SmolLM2 weights
    root = tmp_path_factory.mktemp("smollm2_train")
    files = sorted((python_stdlib() / "json").glob("*.py")) + sorted((python_stdlib() / "email").glob("*.py"))
    (root / "code.jsonl").write_text("".join(json.dumps({"text": p.read_text()}) + "\n" for p in files))
    preprocess([root / "code.jsonl"], hf, root / "code", append_eod=True, progress=False)
    out = run_workers(_world, 2, args=(str(hf), str(root), str(root / "code_text_document")), timeout_s=1500)[0]
    yield hf, root, out
    shutil.rmtree(root, ignore_errors=True)  # ~2.5 GB of checkpoints: keep the suite's disk peak low


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_validation_loss_goes_down_on_real_code(trained):
    _, _, out = trained
    before, after = out["eval"][0], out["eval"][STEPS]
    assert after < before - 0.01, (before, after, out["losses"])


@pytest.mark.slow
def test_export_loads_in_transformers_with_frozen_weights_bit_exact(trained):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf, root, _ = trained
    model = AutoModelForCausalLM.from_pretrained(root / "export", dtype=torch.float32)
    assert model.config.num_hidden_layers == 36
    original = {}
    for f in Path(hf).glob("*.safetensors"):
        original.update(load_file(f))
    exported = model.state_dict()
    old_of_new = [i for i in range(36) if i not in NEW]  # expanded index of original layer j
    for name, tensor in original.items():
        if name.startswith("model.layers."):
            j = int(name.split(".")[2])
            target = name.replace(f"model.layers.{j}.", f"model.layers.{old_of_new[j]}.", 1)
        else:
            target = name
        assert torch.equal(exported[target], tensor), name
    changed = [i for i in NEW if not torch.equal(exported[f"model.layers.{i}.mlp.down_proj.weight"],
                                                 torch.zeros_like(exported[f"model.layers.{i}.mlp.down_proj.weight"]))]
    assert changed == NEW  # the identity copies' zeroed projections trained


@pytest.mark.slow
def test_reported_parameter_counts_equal_transformers(trained):
    """At PP2 the tied embedding has a copy on the last stage: it is counted once, as transformers counts it."""
    from transformers import AutoModelForCausalLM

    _, root, out = trained
    model = AutoModelForCausalLM.from_pretrained(root / "export", dtype=torch.float32)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert out["parameters"]["trainable"] == len(NEW) * per_layer
    assert out["parameters"]["trainable"] + out["parameters"]["frozen"] == model.num_parameters()
